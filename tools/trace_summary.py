#!/usr/bin/env python
"""Summarize a `jax.profiler` trace (the perfetto_trace.json.gz that `tools/benchmark.py --profile DIR` writes):
where the GPU time of the profiled steps went, by kernel class and by kernel / XLA op.

  python tools/trace_summary.py DIR [--top 25] [--steps 3]

Per device: wall span of the traced work, GPU busy time (union of kernel intervals over all streams), idle
share, then time per class (GEMM, attention, collectives, copies, other kernels) and the top kernels and, where
the trace has them, the top XLA ops (HLO fusion names: map them to code with an `--xla_dump_to` dump).
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import sys

CLASSES = (("collective", ("nccl", "all-gather", "all-reduce", "reduce-scatter", "all_gather", "reduce_scatter")),
           ("attention", ("cudnn", "fmha", "flash", "sdpa")),
           ("gemm", ("gemm", "xmma", "cutlass", "cublas", "sm90_", "sm80_", "nvjet", "triton_gemm")),
           ("copy", ("memcpy", "memset", "copy")))


def kernel_class(name: str) -> str:
    low = name.lower()
    for cls, needles in CLASSES:
        if any(n in low for n in needles):
            return cls
    return "other"


def find_trace(path: str) -> str:
    if os.path.isfile(path):
        return path
    found = sorted(glob.glob(os.path.join(path, "**", "perfetto_trace.json.gz"), recursive=True))
    if not found:
        raise SystemExit(f"no perfetto_trace.json.gz under {path}")
    return found[-1]


def load_events(path: str) -> list[dict]:
    with gzip.open(path, "rt") as f:
        data = json.load(f)
    return data["traceEvents"] if isinstance(data, dict) else data


def union_length(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for s, e in sorted(intervals):
        if s > end:
            total += e - s
            end = e
        elif e > end:
            total += e - end
            end = e
    return total


def summarize(events: list[dict], top: int, steps: int) -> str:
    proc = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    thread = {(e["pid"], e["tid"]): e["args"]["name"] for e in events
              if e.get("ph") == "M" and e.get("name") == "thread_name"}
    lines = []
    for pid, pname in sorted(proc.items()):
        if "GPU" not in pname and "gpu" not in pname:
            continue
        kernels, launches, ops, intervals = collections.Counter(), collections.Counter(), collections.Counter(), []
        for e in events:
            if e.get("ph") != "X" or e.get("pid") != pid:
                continue
            tname = thread.get((pid, e.get("tid")), "")
            dur = float(e.get("dur", 0.0))
            if tname.startswith("Stream"):
                kernels[e["name"]] += dur
                launches[e["name"]] += 1
                intervals.append((float(e["ts"]), float(e["ts"]) + dur))
            elif tname == "XLA Ops":
                ops[e["name"]] += dur
        if not intervals:
            continue
        span = max(e for _, e in intervals) - min(s for s, _ in intervals)
        busy = union_length(intervals)
        per = max(steps, 1)
        lines.append(f"\n== {pname}: span {span / per / 1e3:.2f} ms/step, GPU busy {busy / per / 1e3:.2f} ms/step "
                     f"({100 * busy / span:.1f}%), {len(intervals) / per:.0f} kernels/step")
        by_class = collections.Counter()
        for name, dur in kernels.items():
            by_class[kernel_class(name)] += dur
        total = sum(kernels.values())
        for cls, dur in by_class.most_common():
            lines.append(f"   {cls:<11}{dur / per / 1e3:9.2f} ms/step  {100 * dur / total:5.1f}%")
        lines.append(f"  top kernels (ms/step, share of kernel time):")
        for name, dur in kernels.most_common(top):
            lines.append(f"   {dur / per / 1e3:8.3f}  {100 * dur / total:5.1f}%  [{kernel_class(name)}] {name[:110]}")
        lines.append(f"  most launched (launches/step, ms/step):")
        for name, n in launches.most_common(top):
            lines.append(f"   {n / per:8.0f}  {kernels[name] / per / 1e3:8.3f}  [{kernel_class(name)}] {name[:110]}")
        if ops:
            op_total = sum(ops.values())
            lines.append(f"  top XLA ops (ms/step):")
            for name, dur in ops.most_common(top):
                lines.append(f"   {dur / per / 1e3:8.3f}  {100 * dur / op_total:5.1f}%  {name[:110]}")
    return "\n".join(lines) if lines else "no GPU events in the trace (was it taken on a GPU?)"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("trace", help="a perfetto_trace.json.gz or a folder holding one")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--steps", type=int, default=1, help="steps inside the trace (per-step figures)")
    args = ap.parse_args()
    path = find_trace(args.trace)
    print(f"trace: {path}")
    print(summarize(load_events(path), args.top, args.steps))
    return 0


if __name__ == "__main__":
    sys.exit(main())
