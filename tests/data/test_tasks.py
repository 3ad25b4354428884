"""Every adapter on a few rows in its dataset's real schema, written to disk and loaded through the
local-folder path; one row with a missing field and one with a corrupt image are skipped and counted."""

import io
import json
import tarfile

import datasets
import pytest
from datasets import Features, Image, List, Value
from PIL import Image as PILImage

from ghostvis_jax.data import chat, tasks
from ghostvis_jax.data.sources import EmptyDatasetError, TaskSource

N = 4
CORRUPT = {"bytes": b"\xff\xd8 this is not a jpeg", "path": "corrupt.jpg"}
TEXTS = Features({"user": Value("string"), "assistant": Value("string"), "source": Value("string")})


def png(i):
    buf = io.BytesIO()
    PILImage.new("RGB", (6 + i, 5), (40 * i % 255, 90, 200)).save(buf, format="PNG")
    return {"bytes": buf.getvalue(), "path": f"img{i}.png"}


def write(tmp_path, rows, features, name="train-00000.parquet"):
    datasets.Dataset.from_list(rows, features=features).to_parquet(str(tmp_path / name))
    return str(tmp_path)


def ten(a):
    return [a] * 7 + ["other", "other", a + "s"]


# Each case: rows(i) builds good row i; `missing` is the field set to None in the bad row.
CASES = {
    ("coco_captions", "validation"): dict(
        features=Features({"image": Image(), "answer": List(Value("string")), "file_name": Value("string")}),
        row=lambda i: {"image": png(i), "answer": [f"caption {i} {k}" for k in range(5)], "file_name": f"{i}.jpg"},
        missing="image", target=lambda i: f"caption {i} {i % 5}", answers=lambda i: [f"caption {i} {k}" for k in range(5)]),
    ("coco_captions", "train"): dict(
        features=Features({"image": Image(), "caption": Value("string")}),
        row=lambda i: {"image": png(i), "caption": f"A photo number {i}."}, missing="caption",
        target=lambda i: f"A photo number {i}.", answers=lambda i: [f"A photo number {i}."]),
    ("laion_filtered", "train"): dict(
        features=Features({"image": Image(), "caption": Value("string"), "url": Value("string")}),
        row=lambda i: {"image": png(i), "caption": f"web text {i}", "url": "http://x"}, missing="caption",
        target=lambda i: f"web text {i}", answers=lambda i: [f"web text {i}"]),
    ("vqav2", "train"): dict(  # HuggingFaceM4/the_cauldron, config vqav2
        features=Features({"images": List(Image()), "texts": List(TEXTS)}),
        row=lambda i: {"images": [png(i)], "texts": [{"user": f"Is it {i}?", "assistant": "yes", "source": "VQAv2"}]},
        missing="texts", target=lambda i: "yes", answers=lambda i: ["yes"]),
    ("vqav2", "validation"): dict(  # lmms-lab/VQAv2
        features=Features({"question_id": Value("int64"), "question": Value("string"), "image": Image(),
                           "answers": List({"answer": Value("string"), "answer_confidence": Value("string"),
                                            "answer_id": Value("int64")}),
                           "multiple_choice_answer": Value("string"), "answer_type": Value("string")}),
        row=lambda i: {"question_id": i, "question": f"What number {i}?", "image": png(i),
                       "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": k + 1}
                                   for k, a in enumerate(ten(str(i)))],
                       "multiple_choice_answer": str(i), "answer_type": "number"},
        missing="question", target=lambda i: str(i), answers=lambda i: ten(str(i))),
    ("a-okvqa", "train"): dict(  # HuggingFaceM4/A-OKVQA
        features=Features({"image": Image(), "question_id": Value("string"), "question": Value("string"),
                           "choices": List(Value("string")), "correct_choice_idx": Value("int8"),
                           "direct_answers": List(Value("string")), "difficult_direct_answer": Value("bool"),
                           "rationales": List(Value("string"))}),
        row=lambda i: {"image": png(i), "question_id": str(i), "question": "What is it for?",
                       "choices": ["eating", "sleeping", "riding", "reading"], "correct_choice_idx": i % 4,
                       "direct_answers": ten("eating"), "difficult_direct_answer": False,
                       "rationales": ["People use it like that.", "b", "c"]},
        missing="direct_answers", target=lambda i: ["eating", "sleeping", "riding", "reading"][i % 4]
        + ". People use it like that.", answers=lambda i: ten("eating")),
    ("okvqa", "validation"): dict(  # lmms-lab/OK-VQA
        features=Features({"question_id": Value("string"), "question": Value("string"),
                           "answers": List(Value("string")), "image": Image(), "image_id": Value("string")}),
        row=lambda i: {"question_id": str(i), "question": "Which sport?", "answers": ten("tennis"),
                       "image": png(i), "image_id": str(i)},
        missing="answers", target=lambda i: "tennis", answers=lambda i: ten("tennis")),
    ("textvqa", "validation"): dict(  # lmms-lab/textvqa
        features=Features({"image_id": Value("string"), "question_id": Value("int32"), "question": Value("string"),
                           "question_tokens": List(Value("string")), "image": Image(),
                           "answers": List(Value("string")), "ocr_tokens": List(Value("string"))}),
        row=lambda i: {"image_id": str(i), "question_id": i, "question": "What brand?", "question_tokens": ["a"],
                       "image": png(i), "answers": ten("nokia"), "ocr_tokens": ["nokia"]},
        missing="question", target=lambda i: "nokia", answers=lambda i: ten("nokia")),
    ("stvqa", "validation"): dict(
        features=Features({"question_id": Value("int64"), "question": Value("string"), "image": Image(),
                           "answers": List(Value("string"))}),
        row=lambda i: {"question_id": i, "question": "What does the sign say?", "image": png(i),
                       "answers": ["stop", "stop sign"]},
        missing="answers", target=lambda i: "stop", answers=lambda i: ["stop", "stop sign"]),
    ("docvqa", "validation"): dict(  # lmms-lab/DocVQA, config DocVQA
        features=Features({"questionId": Value("string"), "question": Value("string"),
                           "question_types": List(Value("string")), "image": Image(), "docId": Value("int64"),
                           "answers": List(Value("string")), "data_split": Value("string")}),
        row=lambda i: {"questionId": str(i), "question": "What is the date?", "question_types": ["form"],
                       "image": png(i), "docId": i, "answers": ["1 May 1999", "May 1, 1999"], "data_split": "val"},
        missing="question", target=lambda i: "1 May 1999", answers=lambda i: ["1 May 1999", "May 1, 1999"]),
    ("chartqa", "validation"): dict(  # HuggingFaceM4/ChartQA
        features=Features({"image": Image(), "query": Value("string"), "label": List(Value("string")),
                           "human_or_machine": Value("int64")}),
        row=lambda i: {"image": png(i), "query": "What is the highest value?", "label": [f"{i}.5"],
                       "human_or_machine": 0},
        missing="label", target=lambda i: f"{i}.5", answers=lambda i: [f"{i}.5"]),
    ("chartqa", "train"): dict(  # the_cauldron, config chartqa
        features=Features({"images": List(Image()), "texts": List(TEXTS)}),
        row=lambda i: {"images": [png(i)], "texts": [{"user": "Value of A?", "assistant": str(i), "source": "c"}]},
        missing="images", target=lambda i: str(i), answers=lambda i: [str(i)]),
}


@pytest.mark.parametrize("name,split", list(CASES), ids=[f"{n}-{s}" for n, s in CASES])
def test_adapter_fixture_renders_and_counts_skips(name, split, tmp_path, tokenizer):
    case = CASES[(name, split)]
    rows = [case["row"](i) for i in range(3)]
    missing = case["row"](3)
    missing[case["missing"]] = None
    corrupt = case["row"](4)
    if "images" in corrupt:
        corrupt["images"] = [CORRUPT]
    else:
        corrupt["image"] = CORRUPT
    path = write(tmp_path, rows + [missing, corrupt], case["features"])
    convs, skipped = TaskSource(name, split, path=path).scan()
    assert len(convs) == 3
    assert sum(skipped.values()) == 2 and skipped["unreadable image"] == 1
    assert [k for k in skipped if k != "unreadable image"][0].startswith("missing field")
    for i, conv in enumerate(convs):
        assert conv["dataset"] == name
        assert len(conv["images"]) == 1 and conv["images"][0].mode == "RGB"
        assert conv["images"][0].size == (6 + i, 5)
        assert conv["messages"][-1] == {"role": "assistant", "content": case["target"](i)}
        assert conv["answers"] == case["answers"](i)
        r = chat.render_conversation(tokenizer, conv, N)
        assert r.num_images == 1
        text = tokenizer.decode(r.input_ids[r.supervised])
        assert text == case["target"](i) + "<|im_end|>"


def _llava_json(tmp_path, image_prefix=""):
    (tmp_path / "images" / "coco" / "train2017").mkdir(parents=True)
    root = tmp_path / "images"
    rows = []
    for i in range(3):
        name = f"{image_prefix}{i:012d}.jpg"
        PILImage.new("RGB", (7, 5), (i, 2, 3)).save(root / name)
        rows.append({"id": str(i), "image": name, "conversations": [
            {"from": "human", "value": "<image>\nWhat is unusual here?"}, {"from": "gpt", "value": f"Answer {i}."},
            {"from": "human", "value": "And why?"}, {"from": "gpt", "value": "Because."}]})
    (root / f"{image_prefix}bad.jpg").write_bytes(b"garbage")
    rows.append({"id": "3", "image": f"{image_prefix}bad.jpg", "conversations": rows[0]["conversations"]})
    rows.append({"id": "4", "image": f"{image_prefix}000000000001.jpg"})  # no conversations
    (tmp_path / "data").mkdir()
    with open(tmp_path / "data" / "llava_instruct_150k.json", "w") as f:
        json.dump(rows, f)
    return str(tmp_path / "data"), str(root)


@pytest.mark.parametrize("name,prefix", [("llava_instruct_150k", ""), ("sharegpt4v", "coco/train2017/")])
def test_llava_style_json_with_image_folder(name, prefix, tmp_path, tokenizer):
    path, root = _llava_json(tmp_path, prefix)
    convs, skipped = TaskSource(name, "train", path=path, image_root=root).scan()
    assert len(convs) == 3 and skipped == {"unreadable image": 1, "missing field 'conversations'": 1}
    r = chat.render_conversation(tokenizer, convs[1], N)
    assert tokenizer.decode(r.input_ids[r.supervised]) == "Answer 1.<|im_end|>Because.<|im_end|>"
    assert r.num_images == 1
    with pytest.raises(ValueError, match="image_root"):
        TaskSource(name, "train", path=path)


def test_smoltalk_text_only(tmp_path, tokenizer):
    msgs = lambda i: [{"role": "system", "content": "Be kind."}, {"role": "user", "content": f"Hi {i}"},  # noqa
                      {"role": "assistant", "content": f"Hello {i}!"}]
    rows = [{"messages": msgs(i), "source": "smol"} for i in range(3)] + [{"messages": None, "source": "x"}]
    path = write(tmp_path, rows, None)
    convs, skipped = TaskSource("smoltalk", "train", path=path).scan()
    assert len(convs) == 3 and skipped == {"missing field 'messages'": 1}
    r = chat.render_conversation(tokenizer, convs[2], N)
    assert r.num_images == 0 and tokenizer.decode(r.input_ids[r.supervised]) == "Hello 2!<|im_end|>"


def test_save_to_disk_and_webdataset_folders(tmp_path, tokenizer):
    case = CASES[("chartqa", "validation")]
    ds = datasets.Dataset.from_list([case["row"](i) for i in range(2)], features=case["features"])
    datasets.DatasetDict({"val": ds}).save_to_disk(str(tmp_path / "saved"))
    convs, _ = TaskSource("chartqa", "validation", path=str(tmp_path / "saved")).scan()
    assert [c["answers"] for c in convs] == [["0.5"], ["1.5"]]

    (tmp_path / "wds").mkdir()
    with tarfile.open(tmp_path / "wds" / "shard-000000.tar", "w") as tar:
        for i in range(3):
            for ext, data in (("jpg", _jpeg(i)), ("txt", f"a web caption {i}".encode())):
                info = tarfile.TarInfo(f"{i:06d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    convs, _ = TaskSource("laion_filtered", "train", path=str(tmp_path / "wds")).scan()
    assert [c["messages"][-1]["content"] for c in convs] == [f"a web caption {i}" for i in range(3)]
    assert convs[0]["images"][0].size == (9, 9)


def _jpeg(i):
    buf = io.BytesIO()
    PILImage.new("RGB", (9, 9), (i * 50, 0, 0)).save(buf, format="JPEG")
    return buf.getvalue()


def test_all_rows_bad_is_an_error_naming_the_dataset(tmp_path):
    case = CASES[("okvqa", "validation")]
    bad = case["row"](0)
    bad["image"] = CORRUPT
    path = write(tmp_path, [bad], case["features"])
    with pytest.raises(EmptyDatasetError, match="'okvqa'"):
        TaskSource("okvqa", "validation", path=path).scan()


def test_registry_lists_hub_ids_splits_and_fields():
    for name, spec in tasks.TASKS.items():
        for split, src in spec.splits.items():
            assert src.fields, (name, split)
            assert src.hub_id or name in ("laion_filtered", "stvqa"), (name, split)
    assert tasks.split_source("vqav2", "train").hub_config == "vqav2"
    with pytest.raises(KeyError, match="no split"):
        tasks.split_source("vqav2", "nope")
