"""Faults during training: kill -9 (three times, once in the middle of an asynchronous checkpoint save) and
SIGTERM on a trainer subprocess, then resume → bit-identical to an uninterrupted run, no finished checkpoint
lost; a NaN batch → update skipped and counted; a full disk while saving → reported, earlier checkpoint intact."""

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import traverse_util

from ghostvis_jax import checkpoint
from ghostvis_jax.testing.tiny_training import tiny_train_config
from ghostvis_jax.train import loop
from ghostvis_jax.train.checkpointing import TrainCheckpointer

pytestmark = pytest.mark.timeout(400)
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NUM_STEPS = 44
CONFIG = """
from ghostvis_jax.testing.tiny_training import tiny_train_config


def get_config():
    return tiny_train_config({workdir!r}, num_steps={steps}, checkpoint_every=2, keep_checkpoints=1000, log_every=5,
                             resume=True)
"""


def _config_file(tmp_path, workdir):
    path = tmp_path / f"cfg_{os.path.basename(workdir)}.py"
    path.write_text(CONFIG.format(workdir=workdir, steps=NUM_STEPS))
    return str(path)


def _start(config):
    # One persistent compilation cache for every trainer process: the first compiles, the others load the same
    # executable (what a restarted job on a cluster does too), which keeps this test's wall time down.
    cache = os.path.join(os.path.dirname(config), "jax_cache")
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=cache,
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    return subprocess.Popen([sys.executable, "-m", "ghostvis_jax.train", "--config", config], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def _train_records(workdir, offset=0):
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        f.seek(offset)
        text = f.read()
    lines = text.split("\n")[:-1]  # the last piece may be half written
    return [r for r in map(json.loads, lines) if r["kind"] == "train"]


def _committed(workdir):
    d = os.path.join(workdir, "checkpoints")
    return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def _uncommitted(workdir):
    d = os.path.join(workdir, "checkpoints")
    return sorted(n for n in os.listdir(d) if not n.isdigit()) if os.path.isdir(d) else []


def _segment(config, workdir, *, at_step, sig, mid_save=False, deadline_s=120):
    """Start the trainer, wait until this run has logged step >= at_step (and, with mid_save, until a checkpoint
    is being written), then send `sig`. Returns (output, step reached, committed steps when it died, mid-save?)."""
    offset = os.path.getsize(os.path.join(workdir, "metrics.jsonl")) if os.path.exists(
        os.path.join(workdir, "metrics.jsonl")) else 0
    proc = _start(config)
    t0, saving = time.time(), False
    while proc.poll() is None and time.time() - t0 < deadline_s:
        recs = _train_records(workdir, offset)
        step = recs[-1]["step"] if recs else 0
        if step >= at_step:
            saving = bool(_uncommitted(workdir))
            if not mid_save or saving or step >= at_step + 20:
                proc.send_signal(sig)
                break
        time.sleep(0.001 if step >= at_step - 1 else 0.02)
    out, _ = proc.communicate(timeout=120)
    recs = _train_records(workdir, offset)
    return proc.returncode, out, (recs[-1]["step"] if recs else 0), saving


def _losses(workdir):
    per_step = {}
    for r in _train_records(workdir):
        per_step.setdefault(r["step"], []).append(r["loss"])
    return per_step


def _model(workdir):
    d = os.path.join(workdir, "model")
    params = checkpoint.load_params(d, checkpoint.read_config(d))
    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(params).items()}


def test_kill_9_three_times_and_sigterm_then_resume_is_bit_identical(tmp_path, ledger):
    ref_dir, dir_ = str(tmp_path / "straight"), str(tmp_path / "killed")
    reference = _start(_config_file(tmp_path, ref_dir))  # runs alongside the interrupted chain
    config = _config_file(tmp_path, dir_)
    rng = random.Random(20261125)
    k1 = rng.randint(4, 9)
    k2 = rng.randint(k1 + 5, k1 + 9)
    k3 = rng.randint(k2 + 5, k2 + 8)
    k4 = rng.randint(k3 + 5, NUM_STEPS - 6)
    finished_before = set()
    plan = [("kill -9", k1, signal.SIGKILL, False), ("kill -9 during an async checkpoint save", k2, signal.SIGKILL, True),
            ("SIGTERM", k3, signal.SIGTERM, False), ("kill -9", k4, signal.SIGKILL, False)]
    for what, at, sig, mid_save in plan:
        before = _committed(dir_)
        rc, out, reached, saving = _segment(config, dir_, at_step=at, sig=sig, mid_save=mid_save)
        after = _committed(dir_)
        lost = set(before) - set(after)
        if before:
            ok = f"at step {before[-1]}" in out and "resumed from" in out
            ledger.record("training faults", f"resume after an interruption (from step {before[-1]})",
                          "worked" if ok else "crash", "log names the step it resumed from")
            assert ok, out[-3000:]
        if lost:
            ledger.record("training faults", what, "data lost", f"checkpoints {sorted(lost)} vanished")
        assert not lost and reached >= at, (what, reached, before, after, out[-3000:])
        if sig == signal.SIGTERM:
            ok = rc == 0 and f"stopped by SIGTERM at step {reached}" in out and after[-1] == reached
            ledger.record("training faults", f"SIGTERM at step {reached}", "worked" if ok else "crash",
                          "checkpoint written, exit 0")
            assert ok, (rc, after, out[-3000:])
        else:
            assert rc == -9, (rc, out[-3000:])
            detail = f"at step {reached}; last complete checkpoint {after[-1] if after else None}"
            if mid_save:
                assert saving and _uncommitted(dir_), ("the kill did not land during a save", out[-2000:])
                detail += f"; half-written {_uncommitted(dir_)} ignored on resume"
            ledger.record("training faults", what, "worked", detail)
        finished_before |= set(after)
    proc = _start(config)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    ref_out, _ = reference.communicate(timeout=300)
    assert reference.returncode == 0, ref_out[-3000:]

    lost = finished_before - set(_committed(dir_))
    ledger.record("training faults", "finished checkpoints kept across 4 interruptions", "data lost" if lost else
                  "worked", f"{len(finished_before)} checkpoints")
    assert not lost
    got, want = _losses(dir_), _losses(ref_dir)
    replays_equal = all(len(set(v)) == 1 for v in got.values())  # re-run steps give the same loss
    same_losses = {s: v[0] for s, v in got.items()} == {s: v[0] for s, v in want.items()}
    a, b = _model(dir_), _model(ref_dir)
    same_params = a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    ok = replays_equal and same_losses and same_params and sorted(got) == list(range(1, NUM_STEPS + 1))
    ledger.record("training faults", "continuation vs uninterrupted run", "worked" if ok else "silent corruption",
                  f"{NUM_STEPS} step losses and final weights bit-identical")
    assert ok, (replays_equal, same_losses, same_params)


def test_nan_batch_is_skipped_counted_and_the_run_continues(tmp_path, ledger, monkeypatch):
    calls = {"n": 0}
    real = loop.stack_micro_batches

    def poisoned(micro):
        calls["n"] += 1
        out = real(micro)
        if calls["n"] == 3:  # the batch of step 3
            out["pixel_values"] = np.full_like(out["pixel_values"], np.nan)
        return out

    monkeypatch.setattr(loop, "stack_micro_batches", poisoned)
    workdir = str(tmp_path / "w")
    summary = loop.run(tiny_train_config(workdir, num_steps=5, checkpoint_every=1, keep_checkpoints=10))
    recs = {r["step"]: r for r in _train_records(workdir)}
    restore = lambda s: ocp.StandardCheckpointer().restore(os.path.join(workdir, "checkpoints", str(s), "state"))
    s2, s3, s4 = restore(2), restore(3), restore(4)
    unchanged = all(np.array_equal(x, y) for x, y in zip(*(map(np.asarray, __import__("jax").tree_util.tree_leaves(
        {"p": s["params"], "o": s["opt_state"]})) for s in (s2, s3))))
    moved = not all(np.array_equal(x, y) for x, y in zip(*(map(np.asarray, __import__("jax").tree_util.tree_leaves(
        s["params"])) for s in (s3, s4))))
    ok = (summary["step"] == 5 and summary["skipped_updates"] == 1 and recs[3]["finite"] is False
          and all(recs[s]["finite"] for s in (1, 2, 4, 5)) and unchanged and moved and int(s3["skipped"]) == 1)
    ledger.record("training faults", "NaN injected into the batch of step 3", "worked" if ok else "silent corruption",
                  "update skipped (weights + optimizer unchanged), counted, run finished")
    assert ok, (summary, recs[3], unchanged, moved)


def test_full_disk_while_saving_is_reported_and_the_previous_checkpoint_stays_loadable(tmp_path, ledger, monkeypatch,
                                                                                     caplog):
    from etils import epath

    path_cls = type(epath.Path(str(tmp_path)))
    real_write_text = path_cls.write_text

    def full_disk(self, *args, **kwargs):
        if f"{os.sep}4.orbax-checkpoint-tmp" in str(self) or f"{os.sep}checkpoints{os.sep}4{os.sep}" in str(self):
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return real_write_text(self, *args, **kwargs)

    monkeypatch.setattr(path_cls, "write_text", full_disk)
    workdir = str(tmp_path / "w")
    summary = loop.run(tiny_train_config(workdir, num_steps=6, checkpoint_every=2, keep_checkpoints=10))
    reported = summary["failed_checkpoint_saves"] >= 1 and "No space left" in caplog.text
    monkeypatch.undo()
    steps = _committed(workdir)
    ckpt = TrainCheckpointer(os.path.join(workdir, "checkpoints"), keep=10)
    loadable = ckpt.manager.restore(2, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]["step"] == 2
    ckpt.close()
    ok = reported and 4 not in steps and 2 in steps and loadable and summary["step"] == 6
    ledger.record("training faults", "disk full (ENOSPC) while saving step 4", "clear error" if ok else "crash",
                  f"save reported as failed, run went on, step 2 loadable; committed {steps}")
    assert ok, (summary, steps, caplog.text[-2000:])
