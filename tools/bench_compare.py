#!/usr/bin/env python
"""Run the PyTorch peer and tools/benchmark.py on the same card, one bench at a time (separate processes), and
print the ratio table. Every GPU speed claim of this project comes from this script's output.

  python tools/bench_compare.py --peer bench_peer/torch_peer.py --out results.jsonl \
      train-sft train-align train-full vision vision:so400m384 generate
A bench may carry options after a colon: `vision:so400m384` runs `vision --vision so400m384`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
HIGHER_IS_BETTER = {"train-sft": "tokens_per_s", "train-align": "tokens_per_s", "train-full": "tokens_per_s",
                    "vision": "images_per_s"}


def run(cmd: list[str], timeout: float) -> list[dict]:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    lines = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(f"FAILED ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-4000:]}\n")
    return lines


def key(r: dict) -> tuple:
    return (r["bench"], r.get("vision"), r.get("batch"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("benches", nargs="+")
    ap.add_argument("--peer", required=True, help="path of torch_peer.py")
    ap.add_argument("--out", help="write every JSON line here")
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--jax-extra", default="", help="extra options for tools/benchmark.py")
    ap.add_argument("--skip-peer", action="store_true")
    args = ap.parse_args()
    results = []
    for spec in args.benches:
        bench, _, opts = spec.partition(":")
        extra = ["--vision", opts] if bench == "vision" and opts else (opts.split() if opts else [])
        if not args.skip_peer:
            results += run([sys.executable, args.peer, bench, *extra], args.timeout)
        results += run([sys.executable, os.path.join(HERE, "benchmark.py"), bench, *extra,
                        *args.jax_extra.split()], args.timeout)
    if args.out:
        with open(args.out, "w") as f:
            for r in results:
                f.write(json.dumps(r) + "\n")
    peer = {key(r): r for r in results if r["peer"] == "torch"}
    print(f"\n{'bench':<28}{'torch':>14}{'jax':>14}{'ratio':>8}   metric")
    for r in results:
        if r["peer"] != "jax":
            continue
        p = peer.get(key(r))
        name = f"{r['bench']} {r.get('vision') or ''} b{r.get('batch')}".strip()
        if r["bench"] == "generate":
            metric, pv, jv = "ms_per_step", p and p["ms_per_step"], r["ms_per_step"]
            ratio = pv / jv if p else None
        else:
            metric = HIGHER_IS_BETTER[r["bench"]]
            pv, jv = p and p[metric], r[metric]
            ratio = jv / pv if p else None
        print(f"{name:<28}{pv if pv is not None else '-':>14}{jv:>14}{(f'{ratio:.2f}x' if ratio else '-'):>8}   "
              f"{metric} (jax peak {r.get('peak_gib', '-')} GiB vs {p.get('peak_gib', '-') if p else '-'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
