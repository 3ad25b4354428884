"""Batch evaluation: greedy generation on each task's eval split, per-example JSONL, a summary JSON and a table.

    python -m ghostvis_jax.eval --checkpoint CKPT --tasks vqav2,textvqa,chartqa,coco_captions,mmmu,synthetic \
        [--limit N] [--batch-size B] [--out DIR] [--data vqav2=/local/folder ...]

With several processes (`--distributed`), each process takes every `process_count`-th example; the metric
sums and counts (`MetricAccumulator` states) and the skip counts are added across processes, and the records
are gathered so process 0 writes the JSONL and CIDEr-D (corpus document frequencies) sees every caption.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time
from typing import Any, Callable, Sequence

from ghostvis_jax.data.tasks import SkipRow
from ghostvis_jax.eval import metrics
from ghostvis_jax.eval.tasks import EvalTask, RowSelection, resolve

GenerateFn = Callable[[list[dict], int], list[str]]  # (prompts {"messages", "images"}, max_new_tokens) -> texts


def score(metric: str, prediction: str, example: dict[str, Any]) -> float:
    refs = example["references"]
    if metric == "vqa_accuracy":
        return metrics.vqa_accuracy(prediction, refs)
    if metric == "relaxed_accuracy":
        return metrics.relaxed_accuracy_any(prediction, refs)
    if metric == "multiple_choice":
        return metrics.multiple_choice_accuracy(prediction, refs[0], example["num_options"])
    raise ValueError(f"no per-example score for metric {metric!r}")


def allgather_objects(obj: Any) -> list[Any]:
    """Every process's `obj` (JSON-serializable), in process order; works without a shared filesystem."""
    import jax

    if jax.process_count() == 1:
        return [obj]
    import numpy as np
    from jax.experimental import multihost_utils

    data = np.frombuffer(json.dumps(obj).encode(), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.int64(len(data)))).reshape(-1)
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[: len(data)] = data
    gathered = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(sizes), -1)
    return [json.loads(bytes(row[:n]).decode()) for row, n in zip(gathered, sizes)]


def _batches(items, batch_size: int, skipped: collections.Counter):
    batch = []
    for item in items:
        if isinstance(item, SkipRow):
            skipped[item.reason] += 1
            continue
        batch.append(item)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def evaluate_task(generate_fn: GenerateFn, task: EvalTask, *, path: str | None, selection: RowSelection,
                  batch_size: int, max_new_tokens: int | None = None,
                  allgather: Callable[[Any], list[Any]] = allgather_objects, progress: bool = True):
    """(records of every process sorted by row, MetricAccumulator over every process, skip counts)."""
    from tqdm import tqdm

    num_rows, items = task.examples(path, selection)
    records, local = [], metrics.MetricAccumulator()
    skipped: collections.Counter = collections.Counter()
    bar = tqdm(total=num_rows, desc=task.name, unit="ex", disable=not progress, file=sys.stderr)
    for batch in _batches(items, batch_size, skipped):
        prompts = [{"messages": ex["messages"], "images": ex["images"]} for ex in batch]
        predictions = generate_fn(prompts, max_new_tokens or task.max_new_tokens)
        for ex, prediction in zip(batch, predictions):
            record = {"id": ex["id"], "index": ex["index"], "question": ex["question"],
                      "prediction": prediction, "references": ex["references"]}
            if task.metric != "cider":
                record["score"] = score(task.metric, prediction, ex)
                local.add(task.name, record["score"])
            if task.metric == "multiple_choice":
                record["num_options"] = ex["num_options"]
                record["choice"] = metrics.extract_choice(prediction, ex["num_options"])
            records.append(record)
        bar.update(len(records) + sum(skipped.values()) - bar.n)  # rows consumed, skipped ones included
        if local.state():
            bar.set_postfix(score=f"{local.mean(task.name):.4f}")
    bar.update(len(records) + sum(skipped.values()) - bar.n)
    bar.close()

    shards = allgather({"records": records, "state": local.state(), "skipped": dict(skipped)})
    records = sorted((r for s in shards for r in s["records"]), key=lambda r: r["index"])
    skipped = collections.Counter()
    for s in shards:
        skipped.update(s["skipped"])
    if not records:
        raise RuntimeError(f"eval task {task.name!r}: no usable example (skipped: {dict(skipped)})")
    total = metrics.MetricAccumulator(metrics.MetricAccumulator.sum_states(s["state"] for s in shards))
    if task.metric == "cider":
        scores = metrics.cider_scores([r["prediction"] for r in records], [r["references"] for r in records])
        for r, s in zip(records, scores):
            r["score"] = s
        total.add(task.name, sum(scores), len(scores))
    return records, total, skipped


def evaluate(generate_fn: GenerateFn, tasks: Sequence[EvalTask] | Sequence[str] | str, *, data_paths: dict[str, str] | None = None,
             limit: int | None = None, batch_size: int = 8, out_dir: str | None = None,
             max_new_tokens: int | None = None, process_index: int | None = None, process_count: int | None = None,
             allgather: Callable[[Any], list[Any]] = allgather_objects, progress: bool = True,
             echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the tasks and return the summary; process 0 writes `{task}.jsonl` and `summary.json` to `out_dir`."""
    import jax

    if isinstance(tasks, str) or not all(isinstance(t, EvalTask) for t in tasks):
        tasks = resolve(tasks)
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    data_paths = data_paths or {}
    unknown = set(data_paths) - {t.name for t in tasks}
    if unknown:
        raise KeyError(f"--data given for tasks not being run: {sorted(unknown)}")
    writer = process_index == 0 and out_dir is not None
    if writer:
        os.makedirs(out_dir, exist_ok=True)
    summary: dict[str, Any] = {"tasks": {}}
    start = time.time()
    for task in tasks:
        task_start = time.time()
        records, total, skipped = evaluate_task(
            generate_fn, task, path=data_paths.get(task.name),
            selection=RowSelection(limit, process_index, process_count), batch_size=batch_size,
            max_new_tokens=max_new_tokens, allgather=allgather, progress=progress and process_index == 0)
        summary["tasks"][task.name] = {"metric": task.metric, "score": total.mean(task.name), "count": len(records),
                                       "skipped": dict(skipped), "seconds": round(time.time() - task_start, 2)}
        if writer:
            with open(os.path.join(out_dir, f"{task.name}.jsonl"), "w") as f:
                for r in records:
                    f.write(json.dumps(r, ensure_ascii=False) + "\n")
    summary["seconds"] = round(time.time() - start, 2)
    if writer:
        with open(os.path.join(out_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
    if process_index == 0:
        echo(format_table(summary))
    return summary


def format_table(summary: dict[str, Any]) -> str:
    lines = [f"{'task':<26} {'metric':<18} {'score':>8} {'count':>7} {'skipped':>8}"]
    for name, t in summary["tasks"].items():
        lines.append(f"{name:<26} {t['metric']:<18} {t['score']:>8.4f} {t['count']:>7} "
                     f"{sum(t['skipped'].values()):>8}")
    return "\n".join(lines)


def _parse_data(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"--data expects TASK=PATH, got {item!r}")
        out[name] = path
    return out


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m ghostvis_jax.eval", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="a checkpoint folder (ghostvis_jax.load)")
    p.add_argument("--tasks", required=True,
                   help="comma-separated: vqav2,textvqa,okvqa,chartqa,coco_captions,mmmu,mmlu,synthetic")
    p.add_argument("--limit", type=int, default=None, help="use the first N rows of each task")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--out", default="eval_out", help="folder for {task}.jsonl and summary.json")
    p.add_argument("--data", action="append", default=[], metavar="TASK=PATH",
                   help="read TASK from a local folder or file instead of the hub (repeatable)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="override every task's default")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                   help="auto: bfloat16 on GPU/TPU, float32 on CPU")
    p.add_argument("--distributed", action="store_true", help="call jax.distributed.initialize() first")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)

    import jax

    if args.distributed:
        jax.distributed.initialize()
    tasks = resolve(args.tasks)
    import ghostvis_jax as gv

    dtype = args.dtype if args.dtype != "auto" else ("float32" if jax.default_backend() == "cpu" else "bfloat16")
    model = gv.load(args.checkpoint, dtype=dtype)
    summary = evaluate(lambda prompts, n: model.generate(prompts, max_new_tokens=n), tasks,
                       data_paths=_parse_data(args.data), limit=args.limit, batch_size=args.batch_size,
                       out_dir=args.out, max_new_tokens=args.max_new_tokens, progress=not args.no_progress)
    summary["checkpoint"] = args.checkpoint
    summary["image_cache"] = model.image_cache.info()
    if jax.process_index() == 0:
        with open(os.path.join(args.out, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
    return summary
