"""A GhostVis checkpoint → HF / PyTorch files (the logic behind tools/export_hf.py); the inverse of convert.py.

    OUT/llm/                   HF Qwen2ForCausalLM folder: config.json, model.safetensors, tokenizer files
    OUT/vision/                HF SiglipVisionModel folder: config.json, preprocessor_config.json, model.safetensors
    OUT/adapters.safetensors   resampler + projector in the original GhostVis key layout
    OUT/adapters.pt            the same state dict, for torch.load

Every tensor goes through `Entry.to_torch` of the table in mapping.py, the same table convert.py reads with
`Entry.to_jax`, so `convert → export` gives back the original tensors bit for bit.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

from ghostvis_jax import checkpoint
from ghostvis_jax.config import GhostVisConfig, SiglipConfig
from ghostvis_jax.weights import mapping
from ghostvis_jax.weights.convert import DTYPES

log = logging.getLogger(__name__)

LLM_DIR = "llm"
VISION_DIR = "vision"
ADAPTERS_SAFETENSORS = "adapters.safetensors"
ADAPTERS_PT = "adapters.pt"
SIGLIP_VISION_PREFIX = "vision_model."  # SiglipVisionModel's state-dict keys; mapping.py's table has them bare


class ExportError(ValueError):
    """An export that cannot be done (bad checkpoint, output folder in the way); the message names the thing."""


@dataclasses.dataclass
class ExportReport:
    config: GhostVisConfig
    dtype: str
    llm_dir: str
    vision_dir: str
    adapter_files: list[str]
    tokenizer_copied: bool


def stored_dtype(ckpt_dir: str) -> str:
    """The dtype the checkpoint's parameters are stored in: "float32" or "bfloat16" (float32 when mixed)."""
    params_dir = os.path.abspath(os.path.join(ckpt_dir, checkpoint.PARAMS_DIR))
    if not os.path.isdir(params_dir):
        raise ExportError(f"{ckpt_dir}: no {checkpoint.PARAMS_DIR}/ folder")
    metadata = ocp.StandardCheckpointer().metadata(params_dir)
    dtypes = {str(leaf.dtype) for leaf in jax.tree_util.tree_leaves(metadata.item_metadata.tree)}
    return "bfloat16" if dtypes == {"bfloat16"} else "float32"


def to_torch_tensor(array, dtype: str):
    """A numpy / JAX array → a contiguous CPU torch tensor of `dtype` (bfloat16 through its bit pattern)."""
    import torch

    array = np.ascontiguousarray(np.asarray(array).astype(DTYPES[dtype]))
    if dtype == "bfloat16":
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)


def torch_state_dict(entries: list[mapping.Entry], flat_params: dict[tuple, np.ndarray], dtype: str,
                     key_prefix: str = "") -> dict:
    """{torch key: tensor} for `entries`, each built by `Entry.to_torch` from the JAX parameters it covers."""
    out = {}
    for e in entries:
        tensors = e.to_torch(tuple(np.asarray(flat_params[p]) for p in e.paths))
        out.update({key_prefix + k: to_torch_tensor(t, dtype) for k, t in zip(e.torch_keys, tensors)})
    return out


def qwen_hf_config(config: GhostVisConfig, dtype: str) -> dict:
    # `dtype` is what transformers 5 reads, `torch_dtype` what earlier releases read.
    return dict(config.llm.to_hf(), dtype=dtype, torch_dtype=dtype)


def siglip_hf_config(vision: SiglipConfig, dtype: str) -> dict:
    # The pooling head is not part of GhostVis: without `vision_use_head: false` HF would initialize one at random.
    return dict(vision.to_hf(), vision_use_head=False, dtype=dtype, torch_dtype=dtype)


def siglip_preprocessor_config(vision: SiglipConfig) -> dict:
    """SiglipImageProcessor settings matching data/images.py: bicubic resize to a square, /255, mean/std."""
    return {
        "image_processor_type": "SiglipImageProcessor",
        "do_resize": True,
        "size": {"height": vision.image_size, "width": vision.image_size},
        "resample": 3,  # PIL bicubic
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(vision.image_mean),
        "image_std": list(vision.image_std),
        "do_convert_rgb": True,
    }


def _write_json(path: str, obj: dict) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def _save_safetensors(state: dict, path: str) -> None:
    from safetensors.torch import save_file

    save_file(state, path, metadata={"format": "pt"})  # the marker transformers checks before loading


def _check_out_dir(out_dir: str, ckpt_dir: str, force: bool) -> None:
    if os.path.realpath(out_dir) == os.path.realpath(ckpt_dir):
        raise ExportError(f"{out_dir}: the output folder is the checkpoint itself; choose another --out")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ExportError(f"{out_dir}: exists and is not a folder")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not force:
        raise ExportError(f"{out_dir}: output folder is not empty (pass --force to overwrite the export in it)")


def _remove_previous_export(out_dir: str) -> None:
    """With --force: what an earlier export wrote goes (stale shards must not mix with the new files)."""
    for name in (LLM_DIR, VISION_DIR):
        shutil.rmtree(os.path.join(out_dir, name), ignore_errors=True)
    for name in (ADAPTERS_SAFETENSORS, ADAPTERS_PT):
        if os.path.exists(os.path.join(out_dir, name)):
            os.remove(os.path.join(out_dir, name))


def load_flat_params(ckpt_dir: str, config: GhostVisConfig, dtype: str) -> dict[tuple, np.ndarray]:
    """{parameter path: host array} as stored (float32 or bfloat16; bfloat16 → float32 is exact)."""
    param_dtype = jnp.bfloat16 if dtype == "bfloat16" else jnp.float32
    params = checkpoint.load_params(ckpt_dir, config, param_dtype=param_dtype)
    return {path: np.asarray(jax.device_get(x)) for path, x in traverse_util.flatten_dict(params).items()}


def export(ckpt_dir: str, out_dir: str, *, dtype: str | None = None, force: bool = False) -> ExportReport:
    """Write the checkpoint at `ckpt_dir` as HF folders + an adapter state dict under `out_dir`.

    dtype: "float32" or "bfloat16" for every written tensor; None keeps the dtype the checkpoint stores.
    """
    if dtype is not None and dtype not in DTYPES:
        raise ExportError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    try:
        config = checkpoint.read_config(ckpt_dir)
    except checkpoint.CheckpointError as e:
        raise ExportError(str(e)) from None
    stored = stored_dtype(ckpt_dir)
    dtype = dtype or stored
    _check_out_dir(out_dir, ckpt_dir, force)
    try:
        params = load_flat_params(ckpt_dir, config, stored)
    except checkpoint.CheckpointError as e:
        raise ExportError(str(e)) from None
    _remove_previous_export(out_dir)
    os.makedirs(out_dir, exist_ok=True)

    llm_dir = os.path.join(out_dir, LLM_DIR)
    os.makedirs(llm_dir)
    _save_safetensors(torch_state_dict(mapping.qwen_entries(config.llm), params, dtype),
                      os.path.join(llm_dir, "model.safetensors"))
    _write_json(os.path.join(llm_dir, "config.json"), qwen_hf_config(config, dtype))
    tokenizer_dir = checkpoint.tokenizer_path(ckpt_dir)
    tokenizer_copied = tokenizer_dir is not None and checkpoint.copy_tokenizer(tokenizer_dir, llm_dir)
    if not tokenizer_copied:
        log.warning("%s has no tokenizer/ folder: %s has weights and config only", ckpt_dir, llm_dir)

    vision_dir = os.path.join(out_dir, VISION_DIR)
    os.makedirs(vision_dir)
    _save_safetensors(torch_state_dict(mapping.siglip_entries(config.vision), params, dtype,
                                       key_prefix=SIGLIP_VISION_PREFIX),
                      os.path.join(vision_dir, "model.safetensors"))
    _write_json(os.path.join(vision_dir, "config.json"), siglip_hf_config(config.vision, dtype))
    _write_json(os.path.join(vision_dir, "preprocessor_config.json"), siglip_preprocessor_config(config.vision))

    adapter_files = []
    adapter_state = torch_state_dict(mapping.adapter_entries(config), params, dtype)
    if adapter_state:
        import torch

        adapter_files = [os.path.join(out_dir, ADAPTERS_SAFETENSORS), os.path.join(out_dir, ADAPTERS_PT)]
        _save_safetensors(adapter_state, adapter_files[0])
        torch.save(adapter_state, adapter_files[1])
    return ExportReport(config=config, dtype=dtype, llm_dir=llm_dir, vision_dir=vision_dir,
                        adapter_files=adapter_files, tokenizer_copied=tokenizer_copied)


def convert_back_command(report: ExportReport) -> str:
    """The tools/convert_torch_weights.py call that turns this export back into the same checkpoint (the
    resampler's depth and head count are not flags there: a non-default one must be passed to `convert()`)."""
    cfg = report.config
    parts = ["python tools/convert_torch_weights.py", f"--llm {report.llm_dir}", f"--vision {report.vision_dir}"]
    if report.adapter_files:
        parts.append(f"--adapters {report.adapter_files[1]}")
    parts += [f"--out CKPT --dtype {report.dtype}", f"--resampler {cfg.resampler.mode}",
              f"--num-image-tokens {cfg.resampler.num_latents}", f"--projector-hidden {cfg.projector.hidden_size}"]
    return " ".join(parts)
