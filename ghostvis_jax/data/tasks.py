"""Dataset adapters: one small function per dataset from its real row schema to the conversation format.

An adapter takes `(row, index)` and returns `{"images": [raw image refs], "messages": [...], ...}`; images are
left undecoded (HF `{"bytes", "path"}` dicts, bytes, PIL images or file paths) and decoded by the source
(`sources.py`), so answer-token estimation never pays for decoding. A missing or empty field raises
`SkipRow`, which the source counts per dataset. VQA-style rows keep every reference answer in "answers".

`TASKS` maps a dataset name to its `TaskSpec`: hub id, hub config, split names, the fields read, and the
adapter per split ("train" rows are often in a different schema than the eval split).
"""

from __future__ import annotations

import collections
import dataclasses
import os
from typing import Any, Callable

from ghostvis_jax.data.chat import IMAGE_PLACEHOLDER, ensure_image_placeholders

SHORT_ANSWER = "Answer the question using a single word or phrase."


class SkipRow(ValueError):
    """A row that cannot become a conversation; `reason` is the key it is counted under."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def field(row: dict[str, Any], name: str) -> Any:
    value = row.get(name)
    if value is None or (hasattr(value, "__len__") and len(value) == 0):
        raise SkipRow(f"missing field '{name}'")
    return value


def _first_present(row: dict[str, Any], names: tuple[str, ...]) -> Any:
    for name in names:
        if row.get(name) not in (None, "", []):
            return row[name]
    raise SkipRow(f"missing field '{names[0]}' (also tried {list(names[1:])})")


def majority_answer(answers: list[str]) -> str:
    """The most frequent reference answer (ties: first seen), the usual VQA training target."""
    counts = collections.Counter(a.strip() for a in answers if a and a.strip())
    if not counts:
        raise SkipRow("missing field 'answers' (all empty)")
    return counts.most_common(1)[0][0]


def _vqa(image, question: str, answers: list[str], task: str, target: str | None = None) -> dict[str, Any]:
    target = target if target is not None else majority_answer(answers)
    return {
        "images": [image],
        "messages": [{"role": "user", "content": f"{IMAGE_PLACEHOLDER}\n{question}\n{SHORT_ANSWER}"},
                     {"role": "assistant", "content": target}],
        "question": question,
        "answers": list(answers),
        "task": task,
    }


# ---- captions / pairs (stage 2) -------------------------------------------------------------------------

def coco_captions(row, index):
    """lmms-lab/COCO-Caption2017 (`image`, `answer`: 5 captions) or one-caption-per-row mirrors (`caption`)."""
    image = field(row, "image")
    captions = row.get("answer") or row.get("captions") or row.get("sentences")
    if isinstance(captions, str):
        captions = [captions]
    if not captions:
        captions = [field(row, "caption")]
    captions = [c["raw"] if isinstance(c, dict) else c for c in captions]
    caption = captions[index % len(captions)].strip()
    if not caption:
        raise SkipRow("missing field 'caption' (empty)")
    return {"images": [image], "answers": captions, "task": "caption",
            "messages": [{"role": "user", "content": f"{IMAGE_PLACEHOLDER}\nDescribe the image briefly."},
                         {"role": "assistant", "content": caption}]}


def image_text_pairs(row, index):
    """LAION-style pairs from parquet (`image`|`jpg`, `caption`|`text`|`TEXT`) or webdataset (`jpg`, `txt`)."""
    image = _first_present(row, ("image", "jpg", "jpeg", "png", "webp"))
    text = _first_present(row, ("caption", "text", "TEXT", "txt"))
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    return {"images": [image], "answers": [text.strip()], "task": "caption",
            "messages": [{"role": "user", "content": f"{IMAGE_PLACEHOLDER}\nDescribe the image briefly."},
                         {"role": "assistant", "content": text.strip()}]}


# ---- LLaVA-style conversations ----------------------------------------------------------------------------

_LLAVA_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def llava_conversations(row, index, image_root: str | None = None):
    """LLaVA-Instruct-150K / ShareGPT4V: `image` (a file name under `image_root`), `conversations` from/value."""
    turns = field(row, "conversations")
    messages = []
    for t in turns:
        role = _LLAVA_ROLES.get(t.get("from"))
        if role is None or t.get("value") is None:
            raise SkipRow("bad field 'conversations' (unknown speaker or empty value)")
        messages.append({"role": role, "content": t["value"]})
    images = []
    if row.get("image"):
        name = row["image"]
        images = [os.path.join(image_root, name) if image_root and isinstance(name, str) else name]
    elif any(IMAGE_PLACEHOLDER in m["content"] for m in messages):
        raise SkipRow("missing field 'image'")
    # LLaVA writes "<image>\n" inside the first human turn; normalise the count to one placeholder per image.
    placeholders = sum(m["content"].count(IMAGE_PLACEHOLDER) for m in messages)
    if placeholders > len(images):
        raise SkipRow("bad field 'conversations' (more <image> than images)")
    return {"images": images, "messages": ensure_image_placeholders(messages, len(images)), "task": "instruct"}


# ---- the_cauldron train schema (vqav2, textvqa, chartqa, aokvqa, okvqa, st_vqa, docvqa) ---------------------

def cauldron(row, index):
    """HuggingFaceM4/the_cauldron: `images` (list), `texts` (list of {user, assistant, source})."""
    images = list(field(row, "images"))
    texts = field(row, "texts")
    messages = []
    for t in texts:
        if not t.get("user") or t.get("assistant") is None:
            raise SkipRow("bad field 'texts' (turn without user/assistant)")
        messages += [{"role": "user", "content": t["user"]}, {"role": "assistant", "content": t["assistant"]}]
    conv = {"images": images, "messages": ensure_image_placeholders(messages, len(images)), "task": "vqa"}
    conv["question"] = texts[0]["user"]
    conv["answers"] = [texts[0]["assistant"]]
    return conv


# ---- eval / native schemas -------------------------------------------------------------------------------

def vqav2(row, index):
    """lmms-lab/VQAv2: `image`, `question`, `answers` [{answer, answer_confidence, answer_id}],
    `multiple_choice_answer`."""
    answers = [a["answer"] if isinstance(a, dict) else a for a in field(row, "answers")]
    return _vqa(field(row, "image"), field(row, "question"), answers, "vqav2",
                target=row.get("multiple_choice_answer") or None)


def okvqa(row, index):
    """lmms-lab/OK-VQA: `image`, `question`, `answers` (10 strings)."""
    return _vqa(field(row, "image"), field(row, "question"), list(field(row, "answers")), "okvqa")


def textvqa(row, index):
    """lmms-lab/textvqa: `image`, `question`, `answers` (10 strings)."""
    return _vqa(field(row, "image"), field(row, "question"), list(field(row, "answers")), "textvqa")


def stvqa(row, index):
    """ST-VQA rows with `image`, `question`, `answers` (list of strings)."""
    return _vqa(field(row, "image"), field(row, "question"), list(field(row, "answers")), "stvqa")


def docvqa(row, index):
    """lmms-lab/DocVQA (config DocVQA): `image`, `question`, `answers` (list of strings)."""
    return _vqa(field(row, "image"), field(row, "question"), list(field(row, "answers")), "docvqa")


def chartqa(row, index):
    """HuggingFaceM4/ChartQA: `image`, `query`, `label` (list of strings; the answer)."""
    label = field(row, "label")
    answers = [label] if isinstance(label, str) else list(label)
    return _vqa(field(row, "image"), field(row, "query"), answers, "chartqa", target=answers[0])


def aokvqa(row, index):
    """HuggingFaceM4/A-OKVQA: `image`, `question`, `choices`, `correct_choice_idx`, `direct_answers`,
    `rationales`. Training target: the answer followed by the first rationale (long form)."""
    question = field(row, "question")
    direct = list(field(row, "direct_answers"))
    choices, idx = row.get("choices"), row.get("correct_choice_idx")
    answer = choices[idx] if choices and idx is not None and 0 <= idx < len(choices) else majority_answer(direct)
    rationales = row.get("rationales") or []
    target = f"{answer}. {rationales[0].strip()}" if rationales else answer
    conv = _vqa(field(row, "image"), question, direct, "aokvqa", target=target)
    conv["messages"][0]["content"] = f"{IMAGE_PLACEHOLDER}\n{question}\nAnswer, then explain briefly."
    if choices:
        conv["choices"] = list(choices)
    return conv


def smoltalk(row, index):
    """HuggingFaceTB/smol-smoltalk: `messages` [{role, content}] (text only)."""
    messages = [{"role": m["role"], "content": m["content"]} for m in field(row, "messages")]
    if not any(m["role"] == "assistant" for m in messages):
        raise SkipRow("bad field 'messages' (no assistant turn)")
    return {"images": [], "messages": messages, "task": "text"}


# ---- registry --------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class SplitSource:
    hub_id: str
    hub_config: str | None
    hub_split: str
    adapter: Callable[..., dict]
    fields: tuple[str, ...]
    data_files: str | None = None  # for hub repos that are plain JSON files
    needs_image_root: bool = False


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    name: str
    splits: dict[str, SplitSource]


def _cauldron(config: str) -> SplitSource:
    return SplitSource("HuggingFaceM4/the_cauldron", config, "train", cauldron, ("images", "texts"))


TASKS: dict[str, TaskSpec] = {
    "coco_captions": TaskSpec("coco_captions", {
        "train": SplitSource("jxie/coco_captions", None, "train", coco_captions, ("image", "caption")),
        "validation": SplitSource("lmms-lab/COCO-Caption2017", None, "val", coco_captions, ("image", "answer")),
    }),
    "laion_filtered": TaskSpec("laion_filtered", {  # local folder only (parquet or webdataset tars)
        "train": SplitSource("", None, "train", image_text_pairs, ("image|jpg", "caption|text|txt")),
    }),
    "llava_instruct_150k": TaskSpec("llava_instruct_150k", {
        "train": SplitSource("liuhaotian/LLaVA-Instruct-150K", None, "train", llava_conversations,
                             ("image", "conversations"), data_files="llava_instruct_150k.json",
                             needs_image_root=True),
    }),
    "sharegpt4v": TaskSpec("sharegpt4v", {
        "train": SplitSource("Lin-Chen/ShareGPT4V", None, "train", llava_conversations, ("image", "conversations"),
                             data_files="sharegpt4v_instruct_gpt4-vision_cap100k.json", needs_image_root=True),
    }),
    "vqav2": TaskSpec("vqav2", {
        "train": _cauldron("vqav2"),
        "validation": SplitSource("lmms-lab/VQAv2", None, "validation", vqav2,
                                  ("image", "question", "answers", "multiple_choice_answer")),
    }),
    "a-okvqa": TaskSpec("a-okvqa", {
        "train": SplitSource("HuggingFaceM4/A-OKVQA", None, "train", aokvqa,
                             ("image", "question", "choices", "correct_choice_idx", "direct_answers", "rationales")),
        "validation": SplitSource("HuggingFaceM4/A-OKVQA", None, "validation", aokvqa,
                                  ("image", "question", "choices", "correct_choice_idx", "direct_answers")),
    }),
    "okvqa": TaskSpec("okvqa", {
        "train": _cauldron("okvqa"),
        "validation": SplitSource("lmms-lab/OK-VQA", None, "val2014", okvqa, ("image", "question", "answers")),
    }),
    "textvqa": TaskSpec("textvqa", {
        "train": _cauldron("textvqa"),
        "validation": SplitSource("lmms-lab/textvqa", None, "validation", textvqa, ("image", "question", "answers")),
    }),
    "stvqa": TaskSpec("stvqa", {
        "train": _cauldron("st_vqa"),
        "validation": SplitSource("", None, "validation", stvqa, ("image", "question", "answers")),  # local only
    }),
    "docvqa": TaskSpec("docvqa", {
        "train": _cauldron("docvqa"),
        "validation": SplitSource("lmms-lab/DocVQA", "DocVQA", "validation", docvqa, ("image", "question", "answers")),
    }),
    "chartqa": TaskSpec("chartqa", {
        "train": _cauldron("chartqa"),
        "validation": SplitSource("HuggingFaceM4/ChartQA", None, "val", chartqa, ("image", "query", "label")),
        "test": SplitSource("HuggingFaceM4/ChartQA", None, "test", chartqa, ("image", "query", "label")),
    }),
    "smoltalk": TaskSpec("smoltalk", {
        "train": SplitSource("HuggingFaceTB/smol-smoltalk", None, "train", smoltalk, ("messages",)),
        "validation": SplitSource("HuggingFaceTB/smol-smoltalk", None, "test", smoltalk, ("messages",)),
    }),
}

# Native-schema adapters usable for a train split from a local folder (e.g. ChartQA's own train split).
NATIVE_ADAPTERS: dict[str, Callable[..., dict]] = {
    "vqav2": vqav2, "okvqa": okvqa, "textvqa": textvqa, "stvqa": stvqa, "docvqa": docvqa, "chartqa": chartqa,
    "a-okvqa": aokvqa, "coco_captions": coco_captions, "laion_filtered": image_text_pairs,
    "llava_instruct_150k": llava_conversations, "sharegpt4v": llava_conversations, "smoltalk": smoltalk,
    "cauldron": cauldron,
}


def split_source(name: str, split: str) -> SplitSource:
    if name not in TASKS:
        raise KeyError(f"unknown dataset {name!r}; known: {sorted(TASKS)} (and synthetic_*)")
    spec = TASKS[name]
    if split not in spec.splits:
        raise KeyError(f"dataset {name!r} has no split {split!r}; it has {sorted(spec.splits)}")
    return spec.splits[split]
