#!/usr/bin/env python
"""Run the PyTorch peer and tools/benchmark.py on the same card, one bench at a time (separate processes), and
print the ratio table. Every GPU speed claim of this project comes from this script's output.

  python tools/bench_compare.py --peer bench_peer/torch_peer.py --out results.jsonl \
      train-sft train-align train-full vision vision:so400m384 generate
A bench may carry options after a colon: `vision:so400m384` runs `vision --vision so400m384`.

--tabulate FILE...: only print the table from JSON lines written earlier (e.g. by the two sides run by hand).

--parallel GPU_PEER,GPU_JAX (a host with two identical cards): the peer's benches run on one card and ours on
the other at the same time (CUDA_VISIBLE_DEVICES), halving the wall time of the comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading

HERE = os.path.dirname(os.path.abspath(__file__))
# Device-to-device copy bandwidth measured on the lent machines (bytes read + written), the denominator of the
# decode bandwidth share: H100 80GB HBM3 about 2.97 TB/s (shared/JAX_STACK_NOTES.md), H200 about 4.3 TB/s.
HBM_GBPS = {"H100": 2970, "H200": 4300}
HIGHER_IS_BETTER = {"train-sft": "tokens_per_s", "train-align": "tokens_per_s", "train-full": "tokens_per_s",
                    "vision": "images_per_s"}


def hbm_gbps(device: str | None) -> int:
    """The card's copy bandwidth by its device name (rows without one were measured on H100s)."""
    return next((v for k, v in HBM_GBPS.items() if k in (device or "")), HBM_GBPS["H100"])


def run(cmd: list[str], timeout: float, gpu: str | None = None) -> list[dict]:
    env = dict(os.environ, **({"CUDA_VISIBLE_DEVICES": gpu} if gpu is not None else {}))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        sys.stderr.write(f"TIMED OUT after {timeout:.0f} s: {' '.join(cmd)}\n")
        return []
    lines = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(f"FAILED ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-4000:]}\n")
    return lines


def key(r: dict) -> tuple:
    vision = r.get("vision") if r["bench"] in ("vision", "train-sft", "train-align") else None
    seq = r.get("seq") if r["bench"].startswith("train") else None
    return (r["bench"], vision, r.get("batch"), seq, r.get("devices", 1))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("benches", nargs="*")
    ap.add_argument("--peer", help="path of torch_peer.py")
    ap.add_argument("--tabulate", nargs="+", help="JSON-lines files to tabulate instead of running anything")
    ap.add_argument("--out", help="write every JSON line here")
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--jax-extra", default="", help="extra options for tools/benchmark.py")
    ap.add_argument("--skip-peer", action="store_true")
    ap.add_argument("--parallel", help="GPU_PEER,GPU_JAX: run the two sides at once on these two cards")
    args = ap.parse_args()
    if args.tabulate:
        rows = []
        for path in args.tabulate:
            with open(path) as f:
                rows += [json.loads(x) for x in f if x.startswith("{")]
        print_table(rows)
        return 0
    if not args.benches or not (args.peer or args.skip_peer):
        ap.error("give the benches to run and --peer (or --skip-peer), or --tabulate FILES")
    peer_cmds, jax_cmds = [], []
    for spec in args.benches:
        bench, _, opts = spec.partition(":")
        extra = ["--vision", opts] if bench == "vision" and opts else (opts.split() if opts else [])
        if not args.skip_peer:
            peer_cmds.append([sys.executable, args.peer, bench, *extra])
        jax_cmds.append([sys.executable, os.path.join(HERE, "benchmark.py"), bench, *extra, *args.jax_extra.split()])
    results = []
    if args.parallel:
        gpus = args.parallel.split(",")
        side = {"peer": [], "jax": []}

        def worker(name, cmds, gpu):
            for cmd in cmds:
                side[name] += run(cmd, args.timeout, gpu)

        threads = [threading.Thread(target=worker, args=("peer", peer_cmds, gpus[0])),
                   threading.Thread(target=worker, args=("jax", jax_cmds, gpus[1]))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        results = side["peer"] + side["jax"]
    else:
        for i, cmd in enumerate(jax_cmds):
            if i < len(peer_cmds):
                results += run(peer_cmds[i], args.timeout)
            results += run(cmd, args.timeout)
    if args.out:
        with open(args.out, "w") as f:
            for r in results:
                f.write(json.dumps(r) + "\n")
    print_table(results)
    return 0


def print_table(results: list[dict]) -> None:
    peer = {key(r): r for r in results if r["peer"] == "torch"}
    print(f"\n{'bench':<44}{'torch':>14}{'jax':>14}{'ratio':>8}   metric")
    for r in results:
        if r["peer"] != "jax":
            continue
        p = peer.get(key(r))
        name = f"{r['bench']} {key(r)[1] or ''} b{r.get('batch')}".replace("  ", " ")
        if key(r)[3] not in (None, 2048):
            name += f" T{key(r)[3]}"
        if r.get("devices", 1) > 1:
            name += f" x{r['devices']}gpu"
        if r.get("xla_flags"):
            name += " " + r["xla_flags"].replace("--xla_gpu_", "")
        if r["bench"] == "generate":
            metric, pv, jv = "ms_per_step", p and p["ms_per_step"], r["ms_per_step"]
            ratio = pv / jv if p else None
        else:
            metric = HIGHER_IS_BETTER[r["bench"]]
            pv, jv = p and p[metric], r[metric]
            ratio = jv / pv if p else None
        if r["bench"] == "generate" and "achieved_gbps" in r:
            hbm = hbm_gbps(r.get("device"))
            note = f"jax {r['achieved_gbps']} GB/s = {100 * r['achieved_gbps'] / hbm:.0f}% of {hbm / 1000:.2f} TB/s"
        elif "peak_gib" in r:
            note = f"peak GiB: jax {r['peak_gib']} vs torch {p.get('peak_gib', '-') if p else '-'}"
        else:
            note = ""
        print(f"{name:<44}{pv if pv is not None else '-':>14}{jv:>14}{(f'{ratio:.2f}x' if ratio else '-'):>8}   "
              f"{metric}  {note}")


if __name__ == "__main__":
    sys.exit(main())
