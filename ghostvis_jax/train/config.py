"""The training config: every key with its default (the one place shared defaults live), and validation that
runs before anything is compiled. Experiment files in configs/ start from `base_config()` and override."""

from __future__ import annotations

import os

import ml_collections

from ghostvis_jax.sharding import mesh_shape
from ghostvis_jax.train.optim import STAGES


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.stage = "align"                       # align | sft | full
    c.init = "checkpoint"                   # checkpoint | random (real shapes, random weights: smoke / benchmarks)
    c.init_checkpoint = ""                  # converted (or previous-stage) model folder
    c.model_preset = ml_collections.ConfigDict({"llm": "qwen2.5-1.5b", "vision": "siglip-large-patch16-256"})
    c.tokenizer = ""                        # init=random: tokenizer folder, or "tiny" for the built-in test one
    c.model = ml_collections.ConfigDict()   # init=random: overrides of the preset, e.g. {"llm": {"num_layers": 2}}
    c.workdir = ""
    c.seed = 0
    c.resume = False
    c.max_steps_per_run = 0                 # >0: checkpoint and exit after this many steps (job time limits)

    c.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": -1, "tensor": 1})
    # ZeRO-3 shards the frozen weights too. False keeps a full copy of them on every device: no all-gathers for
    # them each step (most of the FSDP traffic in sft/align), at frozen bytes x (1 - 1/fsdp) more memory per
    # device (about 3 GB at 1.5B). Trainable parameters, gradients and optimizer state stay sharded either way.
    c.mesh.shard_frozen = True
    c.num_steps = 1000
    c.grad_accum_steps = 1                  # micro-batches per step; rows per step = data.batch_size x this x processes
    # The same recipe on any device count: rows per device per micro-batch (sets data.batch_size, which is then
    # left at 0) and rows per optimizer step over all processes (sets grad_accum_steps, then left at 1). 0 = unset.
    c.rows_per_device = 0
    c.global_batch_size = 0
    c.num_trainable_layers = 4              # sft: the last N decoder layers train
    c.compute_dtype = "bfloat16"
    c.frozen_param_dtype = "bfloat16"       # storage of frozen weights; trainable ones keep float32 masters
    c.remat = "none"                        # none | full | dots | dots_saveable
    # Cross-entropy chunk: tokens of one device's rows (loss tokens first) per chunk. Chunks past the last loss
    # token are skipped, so smaller chunks skip more, but each costs ~0.35 ms more on an H100 when none is skipped
    # (8192: no cost at 8 x 2048 tokens per GPU; docs/LOG.md).
    c.loss_chunk_tokens = 8192
    # Persistent XLA compilation cache: a rerun of the same step shape skips the compile ("" = off).
    c.compilation_cache_dir = os.path.join(os.path.expanduser("~"), ".cache", "ghostvis_jax", "xla")

    c.optim = ml_collections.ConfigDict({
        "projector_lr": 5e-5, "resampler_lr": 3e-5, "llm_lr": 1e-6, "weight_decay": 0.01, "b1": 0.9, "b2": 0.95,
        "eps": 1e-8, "warmup_steps": 100, "min_lr_ratio": 0.1, "clip_norm": 1.0})

    c.checkpoint_every = 500
    c.keep_checkpoints = 3
    c.async_checkpointing = True
    c.eval_every = 500
    c.eval_batches = 20
    c.log_every = 10
    c.max_bad_steps = 3                     # consecutive non-finite updates before the run stops
    c.peak_tflops = 989.0                   # per device, for MFU (H100/H200 dense bf16)
    c.progress_bar = True

    # The data pipeline's config (ghostvis_jax/data/pipeline.py documents every key).
    c.data = ml_collections.ConfigDict({
        "recipe": "vision_sft_minimal", "datasets": ml_collections.ConfigDict(), "batch_size": 8, "max_length": 2048,
        # Shorter lengths a step's batch is cut to when its longest row fits (one compile each); () = always
        # max_length. The 1.5B configs set their own.
        "length_buckets": (),
        # N > 0: rows regrouped by length within windows of N steps, so a step's rows have similar lengths and its
        # bucket is short more often (data/length_grouping.py; the window's rows are held in host memory).
        "length_group_steps": 0,
        "max_images_per_batch": ml_collections.FieldReference(None, field_type=int), "augment": False,
        "num_threads": 8, "worker_count": 0, "cache_dir": "",
        "synthetic": ml_collections.ConfigDict({"num_examples": 20000, "eval_examples": 500, "seed": 0,
                                                "image_size": ml_collections.FieldReference(None, field_type=int)}),
        "eval": ml_collections.ConfigDict({"batch_size": ml_collections.FieldReference(None, field_type=int),
                                           "max_examples_per_dataset": 500}),
    })
    return c


def dataset_slots(recipe: str) -> ml_collections.ConfigDict:
    """One overridable entry per dataset of a recipe, so `--config.data.datasets.NAME.path=/data/...` works on the
    locked command-line config. Empty strings mean "not given" (load by hub id)."""
    from ghostvis_jax.data.recipes import get_recipe

    return ml_collections.ConfigDict({name: {"path": "", "eval_path": "", "image_root": ""}
                                      for name in get_recipe(recipe)})


class ConfigError(ValueError):
    pass


def unknown_override(config: ml_collections.ConfigDict, argv: list[str]) -> str | None:
    """The first `--config.a.b=v` whose key does not exist, as an error naming the valid keys at that level."""
    for arg in argv:
        if not arg.startswith("--config."):
            continue
        path = arg[len("--config."):].split("=", 1)[0]
        node, walked = config, "config"
        for part in path.split("."):
            if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                valid = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
                return f"unknown config key '{walked}.{part}'; valid keys of {walked}: {valid}"
            node, walked = node[part], f"{walked}.{part}"
    return None


def resolve_batch_split(c: ml_collections.ConfigDict, num_devices: int, num_processes: int = 1) -> None:
    """Fill data.batch_size from rows_per_device and grad_accum_steps from global_batch_size (where those are
    set) for this many devices and processes, in place: 256 rows per step at 8 rows per device is 4 micro-batches
    on one 8-GPU host, 32 on one GPU, 1 on four hosts."""
    for key in ("rows_per_device", "global_batch_size"):
        if not isinstance(c[key], int) or c[key] < 0:
            raise ConfigError(f"config.{key} must be an integer >= 0, got {c[key]!r}")
    if c.rows_per_device:
        if c.data.batch_size:
            raise ConfigError(f"config.data.batch_size={c.data.batch_size} and config.rows_per_device="
                              f"{c.rows_per_device} both set the rows per micro-batch: set one, the other to 0")
        try:
            data, fsdp, _ = mesh_shape(c.mesh.data, c.mesh.fsdp, c.mesh.tensor, num_devices)
        except ValueError as e:
            raise ConfigError(f"config.mesh: {e}") from None
        if (data * fsdp) % num_processes:
            raise ConfigError(f"config.rows_per_device: the batch axes data x fsdp = {data * fsdp} do not split "
                              f"evenly over {num_processes} processes; set config.data.batch_size instead")
        c.data.batch_size = c.rows_per_device * data * fsdp // num_processes
    if c.global_batch_size:
        if c.grad_accum_steps != 1:
            raise ConfigError(f"config.grad_accum_steps={c.grad_accum_steps} and config.global_batch_size="
                              f"{c.global_batch_size} both set the micro-batches per step: set one (leave "
                              "grad_accum_steps at 1 to derive it)")
        micro = c.data.batch_size * num_processes
        if micro <= 0 or c.global_batch_size % micro:
            raise ConfigError(f"config.global_batch_size={c.global_batch_size} is not a multiple of the rows per "
                              f"micro-batch, {micro} (data.batch_size {c.data.batch_size} x {num_processes} "
                              "processes)")
        c.grad_accum_steps = c.global_batch_size // micro


def validate(c: ml_collections.ConfigDict, num_devices: int, num_processes: int = 1) -> None:
    """Every check that can fail before compiling, each naming the key."""
    if "loss_chunk_size" in c:
        raise ConfigError("config.loss_chunk_size (tokens per row) was replaced by config.loss_chunk_tokens (tokens "
                          "of one device's rows per chunk, loss tokens first; default 8192)")
    if c.stage not in STAGES:
        raise ConfigError(f"config.stage must be one of {STAGES}, got {c.stage!r}")
    if c.init not in ("checkpoint", "random"):
        raise ConfigError(f"config.init must be 'checkpoint' or 'random', got {c.init!r}")
    if c.init == "checkpoint":
        if not c.init_checkpoint:
            raise ConfigError("config.init_checkpoint is empty (give a converted model folder, or --config.init=random)")
        if not os.path.isdir(c.init_checkpoint):
            raise ConfigError(f"config.init_checkpoint: no such folder {c.init_checkpoint!r}")
    if c.init == "random" and not c.tokenizer:
        raise ConfigError("config.tokenizer is needed with init=random (a tokenizer folder, or 'tiny')")
    if not c.workdir:
        raise ConfigError("config.workdir is empty")
    for key in ("num_steps", "grad_accum_steps", "checkpoint_every", "keep_checkpoints", "eval_every", "log_every",
                "loss_chunk_tokens", "max_bad_steps"):
        if not isinstance(c[key], int) or c[key] <= 0:
            raise ConfigError(f"config.{key} must be a positive integer, got {c[key]!r}")
    if not isinstance(c.max_steps_per_run, int) or c.max_steps_per_run < 0:
        raise ConfigError(f"config.max_steps_per_run must be an integer >= 0, got {c.max_steps_per_run!r}")
    if c.num_trainable_layers < 0:
        raise ConfigError(f"config.num_trainable_layers must be >= 0, got {c.num_trainable_layers}")
    for key in ("batch_size", "max_length"):
        if not isinstance(c.data[key], int) or c.data[key] <= 0:
            raise ConfigError(f"config.data.{key} must be a positive integer, got {c.data[key]!r}")
    from ghostvis_jax.data.batching import check_length_buckets  # imports grain: only where a run is validated
    from ghostvis_jax.data.length_grouping import check_group_steps

    try:
        check_length_buckets(c.data.length_buckets, c.data.max_length)
        check_group_steps(c.data.length_group_steps)
    except ValueError as e:
        raise ConfigError(f"config.data.{e}") from None
    try:
        data, fsdp, _ = mesh_shape(c.mesh.data, c.mesh.fsdp, c.mesh.tensor, num_devices)
    except ValueError as e:
        raise ConfigError(f"config.mesh: {e}") from None
    batch_divisor = data * fsdp
    local_rows = c.data.batch_size
    if (local_rows * num_processes) % batch_divisor:
        raise ConfigError(f"config.data.batch_size={local_rows} (x {num_processes} processes) is not divisible by the "
                          f"batch axes data x fsdp = {batch_divisor}")
    images = c.data.max_images_per_batch or local_rows
    if (images * num_processes) % batch_divisor:
        raise ConfigError(f"config.data.max_images_per_batch={images} (x {num_processes} processes) is not divisible "
                          f"by the batch axes data x fsdp = {batch_divisor}")
    for group in ("projector_lr", "resampler_lr", "llm_lr", "weight_decay", "clip_norm"):
        if c.optim[group] < 0:
            raise ConfigError(f"config.optim.{group} must be >= 0, got {c.optim[group]}")
