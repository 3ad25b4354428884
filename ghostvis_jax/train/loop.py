"""The training run: config → data → model state → jitted step → checkpoints → the stage's model folder.

    python -m ghostvis_jax.train --config configs/ghostvis_1p5b_sft.py --config.workdir=/ckpt/sft
"""

from __future__ import annotations

import copy
import json
import logging
import os
import signal
import time
from typing import Any

import jax
import numpy as np

from ghostvis_jax import checkpoint, sharding
from ghostvis_jax.config import GhostVisConfig, preset
from ghostvis_jax.train import setup as train_setup
from ghostvis_jax.train.checkpointing import (StateMismatchError, TrainCheckpointer, abstract_like,
                                              state_key_differences)
from ghostvis_jax.train.config import ConfigError, resolve_batch_split, validate
from ghostvis_jax.train.feedback import RunLog, peak_memory_gib, plot_loss_curve
from ghostvis_jax.train.flops import train_step_flops
from ghostvis_jax.train.step import stack_micro_batches

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    pass


def maybe_initialize_distributed() -> None:
    """Several processes: SLURM is detected by JAX itself; the local launcher sets GHOSTVIS_* variables."""
    if jax.distributed.is_initialized():
        return
    if "GHOSTVIS_COORDINATOR" in os.environ:
        if os.environ.get("JAX_PLATFORMS", "") == "cpu":
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=os.environ["GHOSTVIS_COORDINATOR"],
                                   num_processes=int(os.environ["GHOSTVIS_NUM_PROCESSES"]),
                                   process_id=int(os.environ["GHOSTVIS_PROCESS_ID"]))
    elif int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        jax.distributed.initialize()


def resolve_tokenizer(cfg) -> str:
    if cfg.init == "checkpoint":
        path = checkpoint.tokenizer_path(cfg.init_checkpoint)
        if path is None:
            raise ConfigError(f"{cfg.init_checkpoint}: the checkpoint has no tokenizer/ folder")
        return path
    if cfg.tokenizer == "tiny":
        from ghostvis_jax.testing.tiny_tokenizer import build_tiny_tokenizer

        path = os.path.join(cfg.workdir, "tokenizer")
        if jax.process_index() == 0 and not os.path.exists(os.path.join(path, "tokenizer.json")):
            build_tiny_tokenizer(path)
        _barrier("tiny tokenizer")
        return path
    if not os.path.isdir(cfg.tokenizer):
        raise ConfigError(f"config.tokenizer: no such folder {cfg.tokenizer!r}")
    return cfg.tokenizer


def resolve_model_config(cfg, tokenizer) -> GhostVisConfig:
    if cfg.init == "checkpoint":
        return checkpoint.read_config(cfg.init_checkpoint)
    base = preset(cfg.model_preset.llm, cfg.model_preset.vision).to_dict()
    for section, values in cfg.model.to_dict().items():
        if section not in base or not isinstance(values, dict):
            raise ConfigError(f"config.model.{section}: unknown model section; valid: {sorted(base)}")
        base[section].update(values)
    base["image_token_id"] = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    return GhostVisConfig.from_dict(base)


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _data_config(cfg) -> dict:
    data = cfg.data.to_dict()
    data["cache_dir"] = data.get("cache_dir") or None
    # "" = not given on the command line; a slot with nothing given does not add its dataset (so
    # --config.data.recipe=synthetic_pretrain on a config with real-data slots trains on that recipe alone).
    given = {name: {k: v for k, v in spec.items() if v != ""} for name, spec in (data.get("datasets") or {}).items()}
    data["datasets"] = {name: spec for name, spec in given.items() if spec}
    data["rows_per_step"] = cfg.data.batch_size * cfg.grad_accum_steps  # what length grouping keeps together
    return data


def step_length(batches: list[dict], buckets: tuple[int, ...], max_length: int) -> int:
    """A step's tokens per row: max_length, or with length buckets the shortest that holds the longest row of the
    step's batches on every process (one scalar all-gather per step when there are several)."""
    if not buckets:
        return max_length
    from ghostvis_jax.data.batching import bucket_length

    needed = max(int(np.max(b["lengths"], initial=0)) for b in batches)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        needed = int(np.max(multihost_utils.process_allgather(np.int32(needed))))
    return bucket_length(needed, buckets, max_length)


def _global_batch(mesh, local: dict, *, micro_axis: bool) -> dict:
    lead = 1 if micro_axis else 0
    return {k: jax.make_array_from_process_local_data(sharding.batch_sharding(mesh, v.ndim, leading_unsharded=lead), v)
            for k, v in local.items()}


class _Window:
    """What the steps since the last logged one processed, all processes together."""

    def __init__(self):
        self.images = self.positions = self.tokens = 0
        self.flops = 0.0

    def add(self, *, images: int, positions: int, tokens: int, flops: float) -> None:
        self.images += images
        self.positions += positions
        self.tokens += tokens
        self.flops += flops


class _StopFlag:
    """SIGTERM / SIGINT ask the loop to checkpoint at the next step boundary and exit."""

    def __init__(self):
        self.signal = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signal = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def evaluate(setup, cfg, tokenizer, model_config) -> float:
    from ghostvis_jax.data.batching import trim_to_length
    from ghostvis_jax.data.pipeline import make_eval_iterator

    it = make_eval_iterator(_data_config(cfg), tokenizer, model_config)
    total, count = 0.0, 0.0
    for i, batch in enumerate(it):
        if i >= cfg.eval_batches:
            break
        batch = trim_to_length(batch, step_length([batch], tuple(cfg.data.length_buckets), cfg.data.max_length))
        local = {k: batch[k] for k in ("input_ids", "targets", "loss_mask", "pixel_values")}
        with jax.set_mesh(setup.mesh):
            loss_sum, n = setup.eval_step(setup.state["params"], setup.frozen,
                                          _global_batch(setup.mesh, local, micro_axis=False))
        total, count = total + float(loss_sum), count + float(n)
    return total / max(count, 1.0)


def enable_compilation_cache(path: str) -> None:
    """Persist compiled executables under `path`: a rerun with the same shapes skips the step's compile."""
    if path:
        jax.config.update("jax_compilation_cache_dir", path)
        if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
            jax.config.update("jax_persistent_cache_min_compile_time_secs", 2.0)  # not every small eager op


def run(cfg) -> dict[str, Any]:
    maybe_initialize_distributed()
    enable_compilation_cache(cfg.compilation_cache_dir)
    cfg = copy.deepcopy(cfg)  # the batch split is resolved in place; the caller's config stays as given
    resolve_batch_split(cfg, jax.device_count(), jax.process_count())
    validate(cfg, jax.device_count(), jax.process_count())
    from transformers import AutoTokenizer

    from ghostvis_jax.data.batching import join_batches, trim_to_length
    from ghostvis_jax.data.pipeline import make_train_iterator

    os.makedirs(cfg.workdir, exist_ok=True)
    tok_dir = resolve_tokenizer(cfg)
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    model_config = resolve_model_config(cfg, tokenizer)
    mesh = sharding.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    ckpt = TrainCheckpointer(os.path.join(cfg.workdir, "checkpoints"), keep=cfg.keep_checkpoints,
                             async_save=cfg.async_checkpointing)
    latest = ckpt.latest_step()
    if latest is not None and not cfg.resume:
        raise ConfigError(f"{cfg.workdir} already holds checkpoints up to step {latest}: pass --config.resume=True "
                          f"to continue that run, or choose a new --config.workdir")

    data_it = make_train_iterator(_data_config(cfg), tokenizer, model_config, seed=cfg.seed)
    setup = train_setup.build(model_config, cfg, mesh, total_steps=cfg.num_steps)
    if latest is not None:
        try:
            setup.state, data_state, meta = ckpt.restore(latest, abstract_like(setup.state))
        except StateMismatchError as e:
            saved = (ckpt.restore_meta(latest).get("config") or {})
            differs = state_key_differences(saved, cfg)
            raise ConfigError(f"{ckpt.directory}/{latest} holds a train state that this config does not build ("
                              + ("; ".join(differs) if differs else str(e)) + "): resume with the config that "
                              "wrote it, or start a new --config.workdir") from None
        data_it.set_state(data_state)
        log.info("resumed from %s at step %d", ckpt.directory, latest)
        _warn_if_rows_per_step_changed(meta, cfg)
    run_log = RunLog(cfg.workdir, cfg.num_steps, int(setup.state["step"]), progress_bar=cfg.progress_bar)
    if jax.process_index() == 0:
        with open(os.path.join(cfg.workdir, "config.json"), "w") as f:
            f.write(cfg.to_json_best_effort(indent=2))

    buckets = tuple(cfg.data.length_buckets)

    def next_batch():
        """(the global batch of all processes' rows, this process's images, this process's tokens before the
        padding). With several processes the length's all-gather runs on the devices, after the step in flight:
        the rows are read during that step, their stacking and transfer after it."""
        micro = [next(data_it) for _ in range(cfg.grad_accum_steps)]
        length = step_length(micro, buckets, cfg.data.max_length)
        images = int(sum(int(mb["num_images"].sum()) for mb in micro))
        tokens = int(sum(int(mb["lengths"].sum()) for mb in micro))
        micro = join_batches([trim_to_length(mb, length) for mb in micro], cfg.data.max_length // length)
        return _global_batch(mesh, stack_micro_batches(micro), micro_axis=True), images, tokens

    compiled_steps: dict[int, Any] = {}  # tokens per row -> the train step compiled for that length
    compile_s: dict[int, float] = {}

    def compile_for(batch) -> float:
        (micro_batches, micro_rows, seq), t0 = batch["input_ids"].shape, time.perf_counter()
        with jax.set_mesh(mesh):
            compiled_steps[seq] = setup.train_step.lower(setup.state, setup.frozen, batch).compile()
        compile_s[seq] = time.perf_counter() - t0
        split = f"{rows} rows per step = {micro_batches} micro-batch(es) of {micro_rows}"
        if len(compile_s) == 1:
            run_log.message(f"train step compiled in {compile_s[seq]:.1f} s; mesh {dict(mesh.shape)}; "
                            f"{jax.device_count()} devices, {jax.process_count()} processes; {split}"
                            + (f"; {seq} tokens per row (length buckets {buckets + (cfg.data.max_length,)})"
                               if buckets else ""))
        else:
            run_log.message(f"train step compiled for {seq} tokens per row ({split}) in {compile_s[seq]:.1f} s")
        return compile_s[seq]

    batch, images, tokens = next_batch()
    rows = batch["input_ids"].shape[0] * batch["input_ids"].shape[1]  # all processes' rows: the batch is global
    compile_for(batch)
    on_gpu = jax.default_backend() == "gpu"

    step = int(setup.state["step"])
    first_step = step
    last_saved, stopped_by = latest, None
    window_t, window = time.perf_counter(), _Window()
    shown: dict = {}
    data_counts = data_it.counts()
    with _StopFlag() as stop:
        while step < cfg.num_steps:
            seq = batch["input_ids"].shape[2]
            if seq not in compiled_steps:  # a length not seen yet: its compile is not counted as training time
                window_t += compile_for(batch)
            setup.state, metrics = compiled_steps[seq](setup.state, setup.frozen, batch)
            step += 1
            # The step runs on the devices while the host reads and places the next batch; a checkpoint of this
            # step takes the data state from before that read.
            data_state, data_counts = data_it.get_state(), data_it.counts()
            upcoming = next_batch() if step < cfg.num_steps else None
            m = jax.device_get(metrics)
            bad_streak = int(setup.state["bad_streak"])
            pc = jax.process_count()  # images and tokens are this process's, taken as every process's
            window.add(images=images * pc, positions=rows * seq, tokens=tokens * pc,
                       flops=train_step_flops(model_config, stage=cfg.stage, batch=rows, seq=seq,
                                              num_images=images * pc, trainable_layers=cfg.num_trainable_layers))
            record = {"kind": "train", "step": step, "loss": float(m["loss"]), "grad_norm": float(m["grad_norm"]),
                      "loss_tokens": float(m["loss_tokens"]), "finite": bool(m["finite"]), "seq_len": seq}
            if not m["finite"]:
                run_log.message(f"step {step}: non-finite loss or gradient — update skipped "
                                f"({int(setup.state['skipped'])} skipped so far)")
                if bad_streak >= cfg.max_bad_steps:
                    ckpt.wait()
                    raise TrainingDiverged(
                        f"{bad_streak} non-finite updates in a row at step {step}; stopping. The last good "
                        f"checkpoint is step {ckpt.latest_step()} in {ckpt.directory}")
            if step % cfg.log_every == 0 or step == cfg.num_steps:
                dt = time.perf_counter() - window_t
                # Positions per second (padding included, as the benchmark counts them); token_fill: the share of
                # them that are real tokens (what length buckets raise).
                record.update(tokens_per_s=window.positions / dt, images_per_s=window.images / dt,
                              token_fill=window.tokens / max(window.positions, 1),
                              lr={g: float(s(step)) for g, s in _schedules(cfg).items()},
                              skipped=int(setup.state["skipped"]))
                if on_gpu:
                    record["mfu"] = window.flops / dt / (cfg.peak_tflops * 1e12 * jax.device_count())
                    record["peak_gib_per_device"] = peak_memory_gib()
                window_t, window = time.perf_counter(), _Window()
            run_log.write(record)
            if "tokens_per_s" in record:
                shown = {"tok/s": record["tokens_per_s"], "img/s": record["images_per_s"],
                         "lr": max(record["lr"].values())}
                shown.update({"mfu": record["mfu"]} if "mfu" in record else {})
            run_log.progress(1, loss=record["loss"], **shown)
            if "tokens_per_s" in record and not cfg.progress_bar:
                run_log.message(f"step {step}: loss {record['loss']:.4f} "
                                + " ".join(f"{k} {record[k]:.4g}" for k in ("tokens_per_s", "images_per_s", "mfu",
                                                                            "peak_gib_per_device") if k in record))
            if step % cfg.eval_every == 0:
                eval_t = time.perf_counter()
                eval_loss = evaluate(setup, cfg, tokenizer, model_config)
                window_t += time.perf_counter() - eval_t  # held-out batches are not training throughput
                run_log.write({"kind": "eval", "step": step, "eval_loss": eval_loss})
                run_log.message(f"step {step}: held-out loss {eval_loss:.4f}")
            if stop.signal is not None:
                stopped_by = stop.signal
                break
            if cfg.max_steps_per_run and step - first_step >= cfg.max_steps_per_run and step < cfg.num_steps:
                stopped_by = f"max_steps_per_run={cfg.max_steps_per_run}"
                break
            if step % cfg.checkpoint_every == 0 and step < cfg.num_steps:
                ckpt.save(step, setup.state, data_state, _meta(cfg, step))
                last_saved = step
            if upcoming is not None:
                batch, images, tokens = upcoming

    if last_saved != step:
        ckpt.save(step, setup.state, data_state, _meta(cfg, step))
    ckpt.close()
    run_log.close()
    summary = {"step": step, "skipped_updates": int(setup.state["skipped"]), "compile_s": sum(compile_s.values()),
               "compile_s_per_length": compile_s, "failed_checkpoint_saves": ckpt.failed_saves,
               "data": data_counts}
    saved = ckpt.latest_step()
    if stopped_by:
        summary["stopped_by"] = stopped_by
        if saved == step:
            run_log.message(f"stopped by {stopped_by} at step {step}; checkpoint saved. "
                            f"Resume with --config.resume=True")
        else:
            run_log.message(f"stopped by {stopped_by} at step {step}; the final checkpoint could NOT be saved "
                            f"(see the error above); resuming continues from step {saved}")
        return summary
    model_dir = os.path.join(cfg.workdir, "model")
    checkpoint.save_model(model_dir, model_config, setup.full_params(), tokenizer_dir=tok_dir)
    summary["model_dir"] = model_dir
    summary["loss_curve"] = plot_loss_curve(os.path.join(cfg.workdir, "metrics.jsonl"),
                                            os.path.join(cfg.workdir, "loss_curve.png"))
    if jax.process_index() == 0:
        with open(os.path.join(cfg.workdir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2, default=str)
    run_log.message(f"done: step {step}, model written to {model_dir}")
    print(f"process {jax.process_index()}/{jax.process_count()}: step {step} final loss {record['loss']:.6f}",
          flush=True)
    return summary


def _schedules(cfg) -> dict:
    from ghostvis_jax.train.optim import group_learning_rates, learning_rate_schedule

    return {g: learning_rate_schedule(lr, warmup_steps=cfg.optim.warmup_steps, total_steps=cfg.num_steps,
                                      min_lr_ratio=cfg.optim.min_lr_ratio)
            for g, lr in group_learning_rates(cfg.optim).items()}


def _warn_if_rows_per_step_changed(meta: dict, cfg) -> None:
    """Another batch_size x grad_accum_steps split of the same rows per step resumes the run as it was (say on half
    the GPUs with twice the accumulation); other rows per step change the recipe, which is allowed but said."""
    saved = (meta or {}).get("config") or {}
    try:
        before = int(saved["data"]["batch_size"]) * int(saved["grad_accum_steps"])
    except (KeyError, TypeError, ValueError):
        return
    now = cfg.data.batch_size * cfg.grad_accum_steps
    if now != before:
        log.warning("rows per step per process changed on resume: the checkpoint's run took %d (batch_size %s x "
                    "grad_accum_steps %s), this run takes %d (%d x %d); the learning-rate schedule continues by step",
                    before, saved["data"]["batch_size"], saved["grad_accum_steps"], now, cfg.data.batch_size,
                    cfg.grad_accum_steps)


def _meta(cfg, step: int) -> dict:
    return {"step": step, "stage": cfg.stage, "config": json.loads(cfg.to_json_best_effort())}
