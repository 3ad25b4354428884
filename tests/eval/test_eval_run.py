"""The eval script on fixture datasets in the real schemas (local folders): JSONL + summary, and the summary's
numbers are the metric functions applied to the JSONL; sharded over two "processes" it gives the same."""

import io
import json
import threading

import datasets
import pytest
from datasets import Features, Image, List, Value
from PIL import Image as PILImage

from ghostvis_jax.eval import metrics
from ghostvis_jax.eval.run import evaluate, main

ROWS = 5
COLORS = ("red", "green", "blue", "pink", "gray")
CORRUPT = {"bytes": b"\xff\xd8 not a jpeg", "path": "corrupt.jpg"}


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint):
    return tiny_checkpoint


def png(i):
    buf = io.BytesIO()
    PILImage.new("RGB", (20 + i, 16), (50 * i % 255, 90, 200)).save(buf, format="PNG")
    return {"bytes": buf.getvalue(), "path": f"img{i}.png"}


def ten(a):
    return [a] * 6 + ["other"] * 3 + [a + "s"]


FIXTURES = {  # task: (file name, features, row(i))
    "vqav2": ("validation-00000.parquet",
              Features({"question_id": Value("int64"), "question": Value("string"), "image": Image(),
                        "answers": List({"answer": Value("string"), "answer_confidence": Value("string"),
                                         "answer_id": Value("int64")}),
                        "multiple_choice_answer": Value("string")}),
              lambda i: {"question_id": i, "question": f"How many {i}?", "image": png(i),
                         "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": k}
                                     for k, a in enumerate(ten(str(i)))], "multiple_choice_answer": str(i)}),
    "textvqa": ("validation-00000.parquet",
                Features({"question_id": Value("int32"), "question": Value("string"), "image": Image(),
                          "answers": List(Value("string"))}),
                lambda i: {"question_id": i, "question": "What brand?", "image": png(i), "answers": ten("nokia")}),
    "chartqa": ("test-00000.parquet",
                Features({"image": Image(), "query": Value("string"), "label": List(Value("string")),
                          "human_or_machine": Value("int64")}),
                lambda i: {"image": png(i), "query": "Highest value?", "label": [f"{i}.5"], "human_or_machine": 0}),
    "coco_captions": ("val-00000.parquet",
                      Features({"image": Image(), "answer": List(Value("string")), "file_name": Value("string")}),
                      lambda i: {"image": png(i), "answer": [f"a {COLORS[i]} square number {i}",
                                                             f"a {COLORS[i]} square on white", "a picture"],
                                 "file_name": f"{i}.jpg"}),
    "mmmu": ("validation-00000.parquet",
             Features({"id": Value("string"), "question": Value("string"), "options": Value("string"),
                       "image_1": Image(), "image_2": Image(), "answer": Value("string"),
                       "question_type": Value("string")}),
             lambda i: {"id": f"validation_Art_{i}", "question": "Which is <image 1>?" if i % 2 else
                        "Compare <image 1> and <image 2>.", "options": "['cat', 'dog', 'bird']",
                        "image_1": png(i), "image_2": None if i % 2 else png(i + 1), "answer": "ABC"[i % 3],
                        "question_type": "open" if i == 3 else "multiple-choice"}),
    "mmlu": ("test.parquet",
             Features({"question": Value("string"), "subject": Value("string"), "choices": List(Value("string")),
                       "answer": Value("int64")}),
             lambda i: {"question": f"What is {i} + 1?", "subject": "math",
                        "choices": [str(i), str(i + 1), str(i + 2), "none"], "answer": 1}),
}
SKIPPED = {"vqav2": {"unreadable image": 1}, "mmmu": {"open question (not multiple choice)": 1}}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_data")
    paths = {}
    for task, (name, features, row) in FIXTURES.items():
        rows = [row(i) for i in range(ROWS)]
        if task == "vqav2":
            rows[2]["image"] = CORRUPT
        (root / task).mkdir()
        datasets.Dataset.from_list(rows, features=features).to_parquet(str(root / task / name))
        paths[task] = str(root / task)
    return paths


def rescore(task, records):
    if task == "coco_captions":
        return metrics.cider([r["prediction"] for r in records], [r["references"] for r in records])
    if task in ("mmmu", "mmlu"):
        fn = lambda r: metrics.multiple_choice_accuracy(r["prediction"], r["references"][0], r["num_options"])
    elif task == "chartqa":
        fn = lambda r: metrics.relaxed_accuracy_any(r["prediction"], r["references"])
    else:
        fn = lambda r: metrics.vqa_accuracy(r["prediction"], r["references"])
    return sum(fn(r) for r in records) / len(records)


def read_outputs(out):
    summary = json.loads((out / "summary.json").read_text())
    records = {t: [json.loads(line) for line in (out / f"{t}.jsonl").read_text().splitlines()]
               for t in summary["tasks"]}
    return summary, records


def check_summary_equals_rescored_jsonl(summary, records):
    for task, entry in summary["tasks"].items():
        assert entry["count"] == len(records[task]) == ROWS - sum(SKIPPED.get(task, {}).values())
        assert entry["skipped"] == SKIPPED.get(task, {})
        assert entry["score"] == pytest.approx(rescore(task, records[task]), abs=1e-12)
        for r in records[task]:
            assert {"question", "prediction", "references", "score"} <= set(r)


def test_eval_cli_on_fixture_datasets(checkpoint, data, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["--checkpoint", checkpoint, "--tasks", ",".join(FIXTURES), "--batch-size", "4", "--out", str(out),
            "--max-new-tokens", "4", "--no-progress"] + [f"--data={t}={p}" for t, p in data.items()]
    main(argv)
    summary, records = read_outputs(out)
    assert list(summary["tasks"]) == list(FIXTURES)
    check_summary_equals_rescored_jsonl(summary, records)
    assert records["mmmu"][0]["question"].count("<image>") == 2 and "A. cat" in records["mmmu"][0]["question"]
    assert summary["image_cache"]["misses"] > 0
    table = capsys.readouterr().out
    assert all(task in table for task in FIXTURES)


def answering_generator(prompts, max_new_tokens):
    """A stand-in model: right on some questions, wrong on others, so the scores are not all 0 or 1."""
    out = []
    for p in prompts:
        q = p["messages"][-1]["content"]
        if "How many" in q:
            out.append(q.split("How many ")[1].split("?")[0])       # vqav2: right
        elif "brand" in q:
            out.append("Nokia." if p["images"][0].size[0] % 2 else "samsung")  # png(i) is 20 + i wide
        elif "Highest" in q:
            out.append("2.45")                                      # chartqa: only row 2 within 5%
        elif "+ 1" in q:
            out.append("The answer is B")                           # mmlu: always right
        elif "A. cat" in q:
            out.append("(A)")                                       # mmmu: right on answer A
        else:
            out.append("a red square on white")                    # captions
    return out


def test_summary_numbers_and_two_process_sharding(data, tmp_path):
    kw = dict(data_paths=data, batch_size=2, progress=False, echo=lambda s: None)
    single = evaluate(answering_generator, list(FIXTURES), out_dir=str(tmp_path / "single"), **kw)
    summary, records = read_outputs(tmp_path / "single")
    check_summary_equals_rescored_jsonl(summary, records)
    assert summary["tasks"]["vqav2"]["score"] == 1.0 and summary["tasks"]["mmlu"]["score"] == 1.0
    assert 0 < summary["tasks"]["textvqa"]["score"] < 1 and summary["tasks"]["chartqa"]["score"] == 0.2
    assert summary["tasks"]["coco_captions"]["score"] > 0

    barrier, slots = threading.Barrier(2), [None, None]

    def allgather_for(rank):
        def allgather(obj):
            slots[rank] = obj
            barrier.wait()
            got = list(slots)
            barrier.wait()
            return got
        return allgather

    results = [None, None]

    def run(rank):
        results[rank] = evaluate(answering_generator, list(FIXTURES), out_dir=str(tmp_path / "sharded"),
                                 process_index=rank, process_count=2, allgather=allgather_for(rank), **kw)

    threads = [threading.Thread(target=run, args=(r,)) for r in range(2)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    sharded, sharded_records = read_outputs(tmp_path / "sharded")
    for task in FIXTURES:
        for result in results:
            assert result["tasks"][task]["score"] == pytest.approx(single["tasks"][task]["score"], abs=1e-12)
            assert result["tasks"][task]["skipped"] == single["tasks"][task]["skipped"]
        assert sharded_records[task] == records[task]
