"""The grain input pipeline: source -> per-process shard -> shuffle -> token-balanced mixture -> decode +
resize + normalize (+ augment) -> render -> pad -> fixed-shape batches.

Entry points for the trainer / eval:
  make_train_iterator(data_config, tokenizer, model_config, *, seed, process_index=None, process_count=None)
  make_eval_iterator(data_config, tokenizer, model_config, *, process_index=None, process_count=None)
  eval_conversations(data_config, *, process_index=None, process_count=None, image_size=None)

Both iterators yield the batch dict {input_ids, targets, loss_mask, pixel_values, num_images, lengths} (numpy; see
`batching.py`) and have `get_state()` (JSON-serializable) / `set_state()` / `counts()`.

Data config (a plain dict or an ml_collections ConfigDict; every key optional, defaults in DEFAULT_DATA_CONFIG):
  recipe                 named recipe from recipes.RECIPES (e.g. "vision_sft_minimal", "synthetic_sft") or None
  datasets               {name: {...}} entries that extend / override the recipe's, by name. Per dataset:
      weight             share of answer tokens (renormalized over the recipe)
      split              training split ("train"); eval_split: held-out split (default "validation",
                         "heldout" for synthetic_*)
      path / eval_path   local folder or file (parquet / arrow / json / webdataset tars / save_to_disk); no
                         path: loaded by hub id (tasks.TASKS), or hub_id / hub_config / hub_split given here
      image_root         folder the rows' image file names are under (LLaVA-Instruct, ShareGPT4V)
      schema             row schema to use instead of the split's default adapter (a tasks.NATIVE_ADAPTERS key)
      num_examples       synthetic only: examples in the split (train default synthetic.num_examples)
  batch_size             rows per process per batch
  max_length             tokens per row (T)
  length_buckets         shorter lengths a training step may be cut to (increasing, each < max_length; () for
                         none): the trainer cuts each step's batch to the shortest that holds its longest row
                         (batching.bucket_length), so short rows do not pay for max_length
  length_group_steps     0: rows in stream order. N: rows regrouped by length within windows of N steps
                         (length_grouping.py), so that a step's rows have similar lengths
  rows_per_step          rows this process gives one step (default batch_size; the trainer sets batch_size x
                         grad_accum_steps): the chunk that length grouping keeps together
  max_images_per_batch   B_img, image entries per batch (default: batch_size)
  augment                train-time random resized crop / flip where allowed / light color jitter
  system_prompt          optional system turn prepended to every conversation
  num_threads, prefetch_buffer_size   grain read threads and their buffer
  worker_count, worker_buffer_size    grain worker processes (0: none) for decoding
  token_estimate_samples rows sampled per dataset to estimate mean answer tokens; cache_dir caches them
  mixture_block_size     stratification block of the mixture (see mixing.py)
  synthetic              {"num_examples", "eval_examples", "seed", "image_size" (None: tower size)}
  eval                   {"batch_size" (None: batch_size), "max_examples_per_dataset" (None: all)}
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from typing import Any

import grain
import numpy as np

from ghostvis_jax.data import chat, mixing, recipes, synthetic
from ghostvis_jax.data.batching import ImageBudgetBatchIterDataset, ImageSpec, PrepareExample, check_length_buckets
from ghostvis_jax.data.length_grouping import LengthGroupedIterDataset, check_group_steps
from ghostvis_jax.data.sources import TaskSource

log = logging.getLogger(__name__)

DEFAULT_DATA_CONFIG: dict[str, Any] = {
    "recipe": "synthetic_sft",
    "datasets": {},
    "batch_size": 8,
    "max_length": 256,
    "length_buckets": (),
    "length_group_steps": 0,
    "rows_per_step": None,
    "max_images_per_batch": None,
    "augment": False,
    "system_prompt": None,
    "num_threads": 4,
    "prefetch_buffer_size": 16,
    "worker_count": 0,
    "worker_buffer_size": 2,
    "token_estimate_samples": 256,
    "cache_dir": None,
    "mixture_block_size": 1000,
    "synthetic": {"num_examples": 20_000, "eval_examples": 500, "seed": 0, "image_size": None},
    "eval": {"batch_size": None, "max_examples_per_dataset": None},
}

SYNTHETIC_PREFIX = "synthetic_"


def resolve_data_config(data_config: Any) -> dict[str, Any]:
    """Defaults + the given config (dict or ConfigDict), with the recipe expanded into `datasets`."""
    given = data_config.to_dict() if hasattr(data_config, "to_dict") else dict(data_config or {})
    unknown = set(given) - set(DEFAULT_DATA_CONFIG)
    if unknown:
        raise KeyError(f"unknown data config keys {sorted(unknown)}; valid: {sorted(DEFAULT_DATA_CONFIG)}")
    cfg = copy.deepcopy(DEFAULT_DATA_CONFIG)
    for key, value in given.items():
        if isinstance(cfg.get(key), dict) and key != "datasets":
            cfg[key].update(value or {})
        else:
            cfg[key] = copy.deepcopy(value)
    datasets = recipes.get_recipe(cfg["recipe"]) if cfg["recipe"] else {}
    for name, override in (cfg["datasets"] or {}).items():
        datasets.setdefault(name, {"weight": 1.0, "split": "train"}).update(dict(override))
    if not datasets:
        raise ValueError("data config names no datasets: set `recipe` or `datasets`")
    cfg["datasets"] = datasets
    if cfg["max_images_per_batch"] is None:
        cfg["max_images_per_batch"] = cfg["batch_size"]
    cfg["length_buckets"] = check_length_buckets(cfg["length_buckets"], int(cfg["max_length"]))
    cfg["length_group_steps"] = check_group_steps(cfg["length_group_steps"])
    rows = cfg["rows_per_step"]
    if rows is not None and (not isinstance(rows, (int, np.integer)) or isinstance(rows, bool) or rows < 0):
        raise ValueError(f"rows_per_step must be an integer >= 0, got {rows!r}")
    return cfg


def _process(process_index, process_count) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    return int(process_index), int(process_count)


def build_source(name: str, spec: dict[str, Any], cfg: dict[str, Any], *, split: str, image_size: int,
                 path: str | None = None):
    """The random-access source of one dataset split (synthetic or real)."""
    if name.startswith(SYNTHETIC_PREFIX):
        syn = cfg["synthetic"]
        task = name[len(SYNTHETIC_PREFIX):]
        heldout = split != "train"
        n = spec.get("num_examples") or (syn["eval_examples"] if heldout else syn["num_examples"])
        return synthetic.SyntheticSource(task, split="heldout" if heldout else "train", num_examples=n,
                                         seed=int(syn["seed"]), image_size=int(syn["image_size"] or image_size))
    return TaskSource(name, split, path=path, image_root=spec.get("image_root"), schema=spec.get("schema"),
                      hub_id=spec.get("hub_id"), hub_config=spec.get("hub_config"), hub_split=spec.get("hub_split"))


def _check_model_config(tokenizer, model_config) -> tuple[ImageSpec, int]:
    image_pad = chat.special_ids(tokenizer).image_pad
    if int(model_config.image_token_id) != image_pad:
        raise ValueError(f"model_config.image_token_id={model_config.image_token_id} but the tokenizer's "
                         f"<|image_pad|> id is {image_pad}; the model would not find the image slots")
    return ImageSpec.from_vision_config(model_config.vision), int(model_config.num_image_tokens)


def _fingerprint(obj: Any) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _to_iter(ds: grain.MapDataset, cfg: dict[str, Any]) -> grain.IterDataset:
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=int(cfg["num_threads"]),
                                              prefetch_buffer_size=int(cfg["prefetch_buffer_size"])))
    if int(cfg["worker_count"]) > 0:
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=int(cfg["worker_count"]),
                                                         per_worker_buffer_size=int(cfg["worker_buffer_size"])))
    return it


class DataIterator:
    """Batches of one pipeline, with a JSON-serializable `get_state()` and `set_state()`."""

    def __init__(self, dataset: grain.IterDataset, info: dict[str, Any]):
        self._it = iter(dataset)
        self.info = info  # datasets, target weights, mean answer tokens, probabilities

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._it)

    def get_state(self) -> dict[str, Any]:
        return self._it.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        self._it.set_state(state)

    def counts(self) -> dict[str, Any]:
        """Rows / answer tokens used, rows skipped (bad row, unreadable image) and dropped, per dataset."""
        return self._it.counts()

    def mix_report(self) -> str:
        """Target vs achieved answer-token shares and skip / drop counts, per dataset (for the training log)."""
        return mixing.format_mix_report(self.info.get("weights", {}), self.counts())


def build_mixture(cfg: dict[str, Any], tokenizer, *, seed: int, process_index: int, process_count: int,
                  image_size: int) -> tuple[grain.MapDataset, dict[str, Any]]:
    """The sharded, shuffled, token-balanced mixture of conversations (infinite), and what it was built from."""
    names = list(cfg["datasets"])
    weights = recipes.normalized_weights(cfg["datasets"])
    mean_tokens, parents = {}, []
    for k, name in enumerate(names):
        spec = cfg["datasets"][name]
        source = build_source(name, spec, cfg, split=spec.get("split", "train"), image_size=image_size,
                              path=spec.get("path"))
        mean_tokens[name] = mixing.estimate_mean_answer_tokens(
            source, tokenizer, name=name, num_samples=int(cfg["token_estimate_samples"]), seed=seed,
            cache_dir=cfg["cache_dir"])
        shard = grain.MapDataset.source(source)[process_index::process_count]
        if len(shard) == 0:
            raise ValueError(f"dataset {name!r} has {len(source)} rows: too few for {process_count} processes")
        shuffle_seed = int(np.random.default_rng([seed, k]).integers(2**32 - 1))
        parents.append(shard.shuffle(seed=shuffle_seed).repeat())
    probs = mixing.token_balanced_probabilities(weights, mean_tokens)
    selection = mixing.TokenBalancedSelection([probs[n] for n in names], seed=seed,
                                              block_size=int(cfg["mixture_block_size"]))
    info = {"datasets": names, "weights": weights, "mean_answer_tokens": mean_tokens, "probabilities": probs}
    log.info("data mixture: %s", json.dumps(info))
    return grain.MapDataset.select_from_datasets(parents, selection), info


def make_train_iterator(data_config: Any, tokenizer, model_config, *, seed: int,
                        process_index: int | None = None, process_count: int | None = None) -> DataIterator:
    """Infinite training batches for this process (defaults: jax.process_index() / jax.process_count())."""
    cfg = resolve_data_config(data_config)
    process_index, process_count = _process(process_index, process_count)
    image_spec, num_image_tokens = _check_model_config(tokenizer, model_config)
    mixture, info = build_mixture(cfg, tokenizer, seed=seed, process_index=process_index,
                                  process_count=process_count, image_size=image_spec.image_size)
    prepare = PrepareExample(tokenizer, image_spec, num_image_tokens, cfg["max_length"], augment=cfg["augment"],
                             system_prompt=cfg["system_prompt"])
    group_steps = int(cfg["length_group_steps"])
    chunk = int(cfg["rows_per_step"] or cfg["batch_size"])
    # A window is read all at once: the read threads may prepare up to a window ahead, so the next window is
    # being prepared while this one trains (not all at the window's first step).
    read_ahead = dict(cfg, prefetch_buffer_size=max(int(cfg["prefetch_buffer_size"]), group_steps * chunk))
    ds = _to_iter(mixture.random_map(prepare, seed=seed), read_ahead)
    if group_steps:
        ds = LengthGroupedIterDataset(ds, window_rows=group_steps * chunk, chunk_rows=chunk, seed=seed)
    # What fixes the stream of rows, not how they are grouped into batches: a run may resume with another
    # batch_size (another device count, the same rows per step through gradient accumulation). The batcher's
    # saved state is the row stream's position before any carried-over row, so a regrouping reads every row once.
    fingerprint = _fingerprint([cfg["datasets"], cfg["max_length"], cfg["synthetic"], seed, process_index,
                                process_count, num_image_tokens, image_spec.image_size]
                               + (["length grouping"] if group_steps else []))  # another state layout
    # Checkpoints written before 2026-11-26 fingerprinted the batch shape too: they resume with that same shape.
    with_batch_shape = _fingerprint([cfg["datasets"], cfg["batch_size"], cfg["max_length"],
                                     cfg["max_images_per_batch"], cfg["synthetic"], seed, process_index,
                                     process_count, num_image_tokens, image_spec.image_size])
    batched = ImageBudgetBatchIterDataset(ds, batch_size=cfg["batch_size"], max_images=cfg["max_images_per_batch"],
                                          max_length=cfg["max_length"], image_size=image_spec.image_size,
                                          pad_id=prepare.pad_id, fingerprint=fingerprint,
                                          also_accepts=() if group_steps else (with_batch_shape,))
    return DataIterator(batched, info)


class _Concat:
    """Several sources one after another (grain-compatible random access)."""

    def __init__(self, sources: list):
        self._sources = sources
        self._starts = np.cumsum([0] + [len(s) for s in sources])

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, index: int):
        k = int(np.searchsorted(self._starts, index, side="right")) - 1
        return self._sources[k][int(index - self._starts[k])]


def _eval_sources(cfg: dict[str, Any], image_size: int) -> list:
    cap = cfg["eval"]["max_examples_per_dataset"]
    out = []
    for name, spec in cfg["datasets"].items():
        split = spec.get("eval_split") or ("heldout" if name.startswith(SYNTHETIC_PREFIX) else "validation")
        source = build_source(name, spec, cfg, split=split, image_size=image_size,
                              path=spec.get("eval_path") or None)
        out.append(grain.MapDataset.source(source)[: cap] if cap else source)
    return out


def eval_conversations(data_config: Any, *, process_index: int | None = None, process_count: int | None = None,
                       image_size: int = 64) -> grain.MapDataset:
    """Held-out conversations (with "answers", "question", "task", "dataset") for generation-based eval,
    this process's shard, in a fixed order. Rows that failed to load come as {"skipped": reason, ...}."""
    cfg = resolve_data_config(data_config)
    process_index, process_count = _process(process_index, process_count)
    return grain.MapDataset.source(_Concat(_eval_sources(cfg, image_size)))[process_index::process_count]


def make_eval_iterator(data_config: Any, tokenizer, model_config, *, process_index: int | None = None,
                       process_count: int | None = None) -> DataIterator:
    """One pass over the held-out splits (no shuffle, no augmentation); the last batch is padded with empty
    rows (loss_mask 0, no images)."""
    cfg = resolve_data_config(data_config)
    process_index, process_count = _process(process_index, process_count)
    image_spec, num_image_tokens = _check_model_config(tokenizer, model_config)
    ds = grain.MapDataset.source(_Concat(_eval_sources(cfg, image_spec.image_size)))[process_index::process_count]
    prepare = PrepareExample(tokenizer, image_spec, num_image_tokens, cfg["max_length"], augment=False,
                             system_prompt=cfg["system_prompt"])
    batch_size = cfg["eval"]["batch_size"] or cfg["batch_size"]
    fingerprint = _fingerprint(["eval", cfg["datasets"], batch_size, cfg["max_length"], process_index, process_count])
    batched = ImageBudgetBatchIterDataset(
        _to_iter(ds.random_map(prepare, seed=0), cfg), batch_size=batch_size,
        max_images=cfg["max_images_per_batch"], max_length=cfg["max_length"], image_size=image_spec.image_size,
        pad_id=prepare.pad_id, fingerprint=fingerprint)
    info = {"datasets": list(cfg["datasets"]), "weights": recipes.normalized_weights(cfg["datasets"])}
    return DataIterator(batched, info)
