#!/usr/bin/env python
"""Run one training job as several local processes on the CPU (gloo collectives): how the tests exercise the
multi-host code path on one machine.

  python launch/local_cpu.py --num-processes 2 --devices-per-process 4 -- \
      --config configs/demo_align.py --config.workdir=runs/mp
"""

import argparse
import os
import socket
import subprocess
import sys
import threading


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-processes", type=int, default=2)
    ap.add_argument("--devices-per-process", type=int, default=4)
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("train_args", nargs=argparse.REMAINDER, help="arguments after -- go to ghostvis_jax.train")
    args = ap.parse_args()
    train_args = [a for a in args.train_args if a != "--"]
    coordinator = f"127.0.0.1:{free_port()}"
    procs = []
    for rank in range(args.num_processes):
        env = dict(os.environ, JAX_PLATFORMS="cpu", GHOSTVIS_COORDINATOR=coordinator,
                   GHOSTVIS_NUM_PROCESSES=str(args.num_processes), GHOSTVIS_PROCESS_ID=str(rank),
                   XLA_FLAGS=f"--xla_force_host_platform_device_count={args.devices_per_process}")
        procs.append(subprocess.Popen([sys.executable, "-m", "ghostvis_jax.train", *train_args], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))

    def relay(rank, proc):
        for line in proc.stdout:
            sys.stdout.write(f"[process {rank}] {line}")
            sys.stdout.flush()

    threads = [threading.Thread(target=relay, args=(r, p), daemon=True) for r, p in enumerate(procs)]
    for t in threads:
        t.start()
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(timeout=args.timeout))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            print(f"error: processes did not finish within {args.timeout:.0f} s; killed", file=sys.stderr)
            return 1
    for t in threads:
        t.join()
    if any(codes):
        print(f"error: process exit codes {codes}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
