"""What a person watching a run sees: a progress bar, metrics.jsonl in the work dir, a loss-curve PNG."""

from __future__ import annotations

import json
import os
import time

import jax


class RunLog:
    """Appends one JSON object per line to WORKDIR/metrics.jsonl (process 0 only) and drives the bar."""

    def __init__(self, workdir: str, total_steps: int, start_step: int, *, progress_bar: bool):
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.is_main = jax.process_index() == 0
        self.bar = None
        if self.is_main and progress_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def write(self, record: dict) -> None:
        if not self.is_main:
            return
        record = {"time": round(time.time(), 3), **record}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def progress(self, steps: int, **shown) -> None:
        if self.bar is not None:
            self.bar.update(steps)
            self.bar.set_postfix({k: _fmt(v) for k, v in shown.items()}, refresh=False)

    def message(self, text: str) -> None:
        if not self.is_main:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def peak_memory_gib() -> float:
    """The largest peak allocation over this process's devices (0 where the backend reports none)."""
    return max((d.memory_stats() or {}).get("peak_bytes_in_use", 0) for d in jax.local_devices()) / 2**30


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.4g}"
    return v


def read_metrics(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_loss_curve(metrics_path: str, out_png: str) -> str | None:
    """Train loss per step and held-out loss, from metrics.jsonl."""
    if not os.path.exists(metrics_path):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in records if r.get("kind") == "train"]
    held = [(r["step"], r["eval_loss"]) for r in records if r.get("kind") == "eval"]
    if not train:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(*zip(*train), label="train loss")
    if held:
        ax.plot(*zip(*held), "o-", label="held-out loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (answer tokens)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png
