"""Eval tasks: which split each reads (through the data adapters), how it is prompted, and how it is scored.

An eval example is `{"id", "messages" (the prompt, ending with the user turn), "images" (decoded),
"question", "references", ...}`. VQA-style tasks come from `data/tasks.py` adapters via `TaskSource`;
MMMU and the text multiple-choice guard (MMLU format) have their adapters here.
"""

from __future__ import annotations

import ast
import dataclasses
import re
import string
from typing import Any, Callable, Iterator

from ghostvis_jax.data.chat import IMAGE_PLACEHOLDER, ensure_image_placeholders
from ghostvis_jax.data.images import ImageDecodeError, load_image
from ghostvis_jax.data.tasks import SkipRow, field

CHOICE_INSTRUCTION = "Answer with the option's letter from the given choices directly."
MMMU_MAX_IMAGES = 7


@dataclasses.dataclass(frozen=True)
class EvalTask:
    name: str
    metric: str  # "vqa_accuracy" | "relaxed_accuracy" | "cider" | "multiple_choice"
    max_new_tokens: int
    # (local path or None, rows to read) -> (number of rows selected, iterator of examples; a bad row is a
    # SkipRow item, counted by the caller).
    examples: Callable[[str | None, "RowSelection"], tuple[int, Iterator[dict | SkipRow]]]


@dataclasses.dataclass(frozen=True)
class RowSelection:
    """Rows limit[:N], then every `count`-th from `index` (this process's shard)."""

    limit: int | None = None
    index: int = 0
    count: int = 1

    def rows(self, total: int) -> range:
        end = total if self.limit is None else min(self.limit, total)
        return range(self.index, end, self.count)


def _prompt_only(conv: dict[str, Any]) -> list[dict]:
    messages = list(conv["messages"])
    while messages and messages[-1]["role"] == "assistant":
        messages.pop()
    return messages


def adapter_examples(data_name: str, split: str) -> Callable:
    """Examples of a `data/tasks.py` dataset split (hub id or local folder) with every reference answer."""

    def examples(path: str | None, selection: RowSelection):
        from ghostvis_jax.data.sources import TaskSource

        source = TaskSource(data_name, split, path=path)
        rows = selection.rows(len(source))
        return len(rows), _adapted(source, rows)

    def _adapted(source, rows):
        for i in rows:
            try:
                conv = source.conversation(i)
            except SkipRow as e:
                yield e
                continue
            yield {"id": conv["id"], "index": i, "messages": _prompt_only(conv), "images": conv["images"],
                   "question": conv.get("question", ""), "references": list(conv["answers"])}

    return examples


def synthetic_examples(task: str, default_rows: int = 200) -> Callable:
    def examples(path: str | None, selection: RowSelection):
        rows = selection.rows(selection.limit or default_rows)
        return len(rows), _made(rows)

    def _made(rows):
        from ghostvis_jax.data.synthetic import make_example

        for i in rows:
            conv = make_example(task, i, split="heldout")
            yield {"id": conv["id"], "index": i, "messages": _prompt_only(conv), "images": conv["images"],
                   "question": conv.get("question", _prompt_only(conv)[-1]["content"]),
                   "references": list(conv["answers"])}

    return examples


# ---- multiple choice: MMMU and the text guard ----------------------------------------------------------------

def _choice_prompt(question: str, options: list[str]) -> str:
    letters = string.ascii_uppercase[: len(options)]
    lines = [question.strip()] + [f"{letter}. {str(opt).strip()}" for letter, opt in zip(letters, options)]
    return "\n".join(lines + [CHOICE_INSTRUCTION])


def mmmu_row(row: dict[str, Any], index: int) -> dict[str, Any]:
    """MMMU/MMMU, lmms-lab/MMMU: `question` with `<image k>` tags, `options` (a Python list literal or a
    list), `image_1`..`image_7`, `answer` (a letter), `question_type`. Open questions are skipped."""
    if row.get("question_type", "multiple-choice") != "multiple-choice":
        raise SkipRow("open question (not multiple choice)")
    options = field(row, "options")
    if isinstance(options, str):
        try:
            options = ast.literal_eval(options)
        except (ValueError, SyntaxError) as e:
            raise SkipRow("bad field 'options' (not a list literal)") from e
    if not isinstance(options, (list, tuple)) or not 2 <= len(options) <= 26:
        raise SkipRow("bad field 'options' (not a list of 2-26 options)")
    answer = str(field(row, "answer")).strip().upper()
    if answer not in string.ascii_uppercase[: len(options)]:
        raise SkipRow(f"bad field 'answer' ({answer!r} is not an option letter)")
    text = _choice_prompt(field(row, "question"), list(options))
    tags = re.findall(r"<image (\d+)>", text)
    images = [field(row, f"image_{k}") for k in tags]
    if not tags:  # images given but never named: they go first, in order
        images = [row[f"image_{k}"] for k in range(1, MMMU_MAX_IMAGES + 1) if row.get(f"image_{k}") is not None]
    text = re.sub(r"<image \d+>", IMAGE_PLACEHOLDER, text)
    messages = ensure_image_placeholders([{"role": "user", "content": text}], len(images))
    return {"id": str(row.get("id", index)), "messages": messages, "images": images, "question": text,
            "references": [answer], "num_options": len(options)}


def text_choice_row(row: dict[str, Any], index: int) -> dict[str, Any]:
    """MMLU format (cais/mmlu): `question`, `choices` (list), `answer` (an index or a letter)."""
    choices = list(field(row, "choices"))
    answer = field(row, "answer")
    letters = string.ascii_uppercase[: len(choices)]
    if isinstance(answer, int):
        if not 0 <= answer < len(choices):
            raise SkipRow(f"bad field 'answer' (index {answer} of {len(choices)} choices)")
        answer = letters[answer]
    answer = str(answer).strip().upper()
    if answer not in letters:
        raise SkipRow(f"bad field 'answer' ({answer!r} is not an option letter)")
    text = _choice_prompt(field(row, "question"), choices)
    return {"id": str(row.get("id", index)), "messages": [{"role": "user", "content": text}], "images": [],
            "question": text, "references": [answer], "num_options": len(choices)}


def dataset_examples(name: str, adapter: Callable, hub_id: str, hub_config: str | None, hub_split: str) -> Callable:
    """Examples of a dataset read with `load_hf_dataset` (local folder or hub) and an adapter of this file."""

    def examples(path: str | None, selection: RowSelection):
        from ghostvis_jax.data.sources import load_hf_dataset

        rows = load_hf_dataset(name, hub_split, path=path, hub_id=hub_id, hub_config=hub_config,
                               hub_split=hub_split)
        selected = selection.rows(len(rows))
        return len(selected), _adapted(rows, selected)

    def _adapted(rows, selected):
        for i in selected:
            try:
                example = adapter(rows[i], i)
                example["images"] = [load_image(im, name=f"dataset {name!r} row {i}") for im in example["images"]]
            except SkipRow as e:
                yield e
                continue
            except ImageDecodeError:
                yield SkipRow("unreadable image")
                continue
            example["index"] = i
            yield example

    return examples


def _vqa_task(name: str, split: str = "validation", metric: str = "vqa_accuracy") -> EvalTask:
    return EvalTask(name, metric, 16, adapter_examples(name, split))


TASKS: dict[str, EvalTask] = {
    "vqav2": _vqa_task("vqav2"),
    "textvqa": _vqa_task("textvqa"),
    "okvqa": _vqa_task("okvqa"),
    "chartqa": _vqa_task("chartqa", "test", "relaxed_accuracy"),
    "coco_captions": EvalTask("coco_captions", "cider", 48, adapter_examples("coco_captions", "validation")),
    "mmmu": EvalTask("mmmu", "multiple_choice", 16,
                     dataset_examples("mmmu", mmmu_row, "lmms-lab/MMMU", None, "validation")),
    "mmlu": EvalTask("mmlu", "multiple_choice", 16,
                     dataset_examples("mmlu", text_choice_row, "cais/mmlu", "all", "test")),
    "synthetic_shapes_vqa": EvalTask("synthetic_shapes_vqa", "vqa_accuracy", 8, synthetic_examples("shapes_vqa")),
    "synthetic_words_ocr": EvalTask("synthetic_words_ocr", "vqa_accuracy", 8, synthetic_examples("words_ocr")),
    "synthetic_bar_chart": EvalTask("synthetic_bar_chart", "vqa_accuracy", 8, synthetic_examples("bar_chart")),
    "synthetic_shapes_caption": EvalTask("synthetic_shapes_caption", "cider", 24,
                                         synthetic_examples("shapes_caption")),
}
GROUPS = {"synthetic": [n for n in TASKS if n.startswith("synthetic_")]}


def resolve(names: str | list[str]) -> list[EvalTask]:
    """"vqav2,synthetic" → the EvalTasks, groups expanded, order kept, unknown names rejected."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    out: list[EvalTask] = []
    for name in names:
        for n in GROUPS.get(name, [name]):
            if n not in TASKS:
                raise KeyError(f"unknown eval task {n!r}; known: {sorted(TASKS)} and groups {sorted(GROUPS)}")
            if TASKS[n] not in out:
                out.append(TASKS[n])
    return out
