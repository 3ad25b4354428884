"""PyTorch / HF weights → a GhostVis checkpoint (the logic behind tools/convert_torch_weights.py).

Strict: every missing, unexpected or wrong-shaped key is collected and reported together; the keys that are
deliberately not imported (SigLIP's pooling head and text tower, tied lm_head copies, rotary buffers) are listed.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os

import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from ghostvis_jax import checkpoint
from ghostvis_jax.config import GhostVisConfig, ProjectorConfig, QwenConfig, ResamplerConfig, SiglipConfig
from ghostvis_jax.model.projector import MLPProjector
from ghostvis_jax.model.resampler import PerceiverResampler
from ghostvis_jax.weights import mapping
from ghostvis_jax.weights.readers import WeightFileError, read_hf_folder, read_weight_file

log = logging.getLogger(__name__)
IMAGE_PAD_TOKEN = "<|image_pad|>"
DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}
# Weights must be stored as floats: an integer or bool tensor would be cast silently into garbage parameters.
FLOAT_DTYPES = tuple(np.dtype(d) for d in (np.float16, np.float32, np.float64, ml_dtypes.bfloat16))


class ConversionError(ValueError):
    """Weights that do not fit the model; the message lists every offending key."""


@dataclasses.dataclass
class ConversionReport:
    config: GhostVisConfig
    ignored_keys: list[str]
    adapters_initialized: bool


def _read_json(path: str) -> dict:
    if not os.path.exists(path):
        raise WeightFileError(f"{path}: missing (needed to know the model's shape)")
    with open(path) as f:
        return json.load(f)


def vision_config_from_folder(folder: str) -> SiglipConfig:
    cfg = SiglipConfig.from_hf(_read_json(os.path.join(folder, "config.json")))
    pre = os.path.join(folder, "preprocessor_config.json")
    if os.path.exists(pre):
        p = _read_json(pre)
        cfg = dataclasses.replace(cfg, image_mean=tuple(p.get("image_mean", cfg.image_mean)),
                                  image_std=tuple(p.get("image_std", cfg.image_std)))
    return cfg


def image_token_id_from_folder(folder: str) -> int | None:
    """The `<|image_pad|>` id of the tokenizer in `folder`, or None when the folder has no tokenizer."""
    if not any(os.path.exists(os.path.join(folder, n)) for n in ("tokenizer.json", "vocab.json")):
        return None
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    token_id = tok.convert_tokens_to_ids(IMAGE_PAD_TOKEN)
    if token_id is None or token_id == tok.unk_token_id:
        raise ConversionError(f"{folder}: the tokenizer has no {IMAGE_PAD_TOKEN} token for image slots")
    return int(token_id)


def _apply_entries(entries, state, source, ignored, expected, out, problems, ignored_found):
    used = set()
    for e in entries:
        used.update(k for k in e.torch_keys if k in state)  # a fused group's present keys are expected ones
        missing = [k for k in e.torch_keys if k not in state]
        for k in missing:
            problems.append(f"{source}: missing key {k!r} (model parameter shape {expected.get(e.paths[0])})")
        if missing:
            continue
        tensors = tuple(np.asarray(state[k]) for k in e.torch_keys)
        bad = [(k, t.dtype) for k, t in zip(e.torch_keys, tensors) if t.dtype not in FLOAT_DTYPES]
        for k, dtype in bad:
            problems.append(f"{source}: key {k!r} has dtype {dtype}, not a floating-point weight")
        if bad:
            continue
        have = ", ".join(f"key {k!r} has shape {tuple(t.shape)}" for k, t in zip(e.torch_keys, tensors))
        try:
            arrays = e.to_jax(tensors)
        except ValueError as err:  # parts that do not reshape / stack into the fused parameter
            problems.append(f"{source}: {have}, which do not form {'/'.join(map(str, e.paths[0]))} "
                            f"(expects {expected.get(e.paths[0])}): {err}")
            continue
        for path, arr in zip(e.paths, arrays):
            want = expected.get(path)
            if want != tuple(arr.shape):
                problems.append(f"{source}: {have}, giving {tuple(arr.shape)} for {'/'.join(map(str, path))}, "
                                f"which expects {want}")
            out[path] = arr
    for k in sorted(set(state) - used):
        if ignored(k):
            ignored_found.append(f"{source}: {k}")
        else:
            problems.append(f"{source}: unexpected key {k!r} with shape {tuple(state[k].shape)}")


def fresh_adapters(config: GhostVisConfig, seed: int) -> dict[tuple, np.ndarray]:
    rngs = nnx.Rngs(seed)
    out = {}
    if config.resampler.mode == "perceiver":
        r = PerceiverResampler(config.vision.hidden_size, config.resampler, rngs=rngs)
        out.update({("resampler",) + p: np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(r, nnx.Param))})
    j = MLPProjector(config.vision.hidden_size, config.llm.hidden_size, config.projector, rngs=rngs)
    out.update({("projector",) + p: np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(j, nnx.Param))})
    return out


def convert(llm_dir: str, vision_dir: str, out_dir: str, *, adapters: str | None = None, dtype: str = "float32",
            resampler: ResamplerConfig = ResamplerConfig(), projector: ProjectorConfig = ProjectorConfig(),
            seed: int = 0) -> ConversionReport:
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    llm_cfg = QwenConfig.from_hf(_read_json(os.path.join(llm_dir, "config.json")))
    image_token_id = image_token_id_from_folder(llm_dir)
    config = GhostVisConfig(llm=llm_cfg, vision=vision_config_from_folder(vision_dir), resampler=resampler,
                            projector=projector,
                            image_token_id=image_token_id if image_token_id is not None else 151655)
    if image_token_id is None:
        log.warning("%s has no tokenizer; using the Qwen2.5 <|image_pad|> id %d", llm_dir, config.image_token_id)
    expected = checkpoint.flat_param_shapes(config)
    out, problems, ignored = {}, [], []

    _apply_entries(mapping.qwen_entries(llm_cfg), read_hf_folder(llm_dir), llm_dir,
                   lambda k: mapping.ignored_qwen_key(k, llm_cfg), expected, out, problems, ignored)
    _apply_entries(mapping.siglip_entries(config.vision), mapping.strip_vision_prefix(read_hf_folder(vision_dir)),
                   vision_dir, mapping.ignored_siglip_key, expected, out, problems, ignored)
    if adapters is not None:
        _apply_entries(mapping.adapter_entries(config), read_weight_file(adapters), adapters, lambda k: False,
                       expected, out, problems, ignored)
    else:
        out.update(fresh_adapters(config, seed))
    if problems:
        raise ConversionError(f"{len(problems)} problem(s) converting the weights:\n  " + "\n  ".join(problems))
    not_filled = sorted(set(expected) - set(out))
    if not_filled:
        raise ConversionError("no weights for model parameters: " + ", ".join("/".join(map(str, p))
                                                                              for p in not_filled))
    params = {p: jnp.asarray(np.asarray(a, dtype=np.float32).astype(DTYPES[dtype])) for p, a in out.items()}
    checkpoint.save_model(out_dir, config, params, tokenizer_dir=llm_dir)
    return ConversionReport(config=config, ignored_keys=ignored, adapters_initialized=adapters is None)
