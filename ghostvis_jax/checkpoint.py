"""Self-contained model checkpoints: what `tools/convert_torch_weights.py` and the end of a training stage write,
and what `ghostvis_jax.load` and the next stage read.

    DIR/params/                Orbax checkpoint of the parameters (nested dict, paths as in the NNX model)
    DIR/tokenizer/             HF tokenizer files, when known
    DIR/ghostvis_config.json   the GhostVisConfig; written last, so its presence marks a complete checkpoint
"""

from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx, traverse_util

from ghostvis_jax.config import GhostVisConfig
from ghostvis_jax.model.vlm import GhostVisModel

CONFIG_FILE = "ghostvis_config.json"
PARAMS_DIR = "params"
TOKENIZER_DIR = "tokenizer"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                   "special_tokens_map.json", "added_tokens.json", "chat_template.jinja", "generation_config.json")


class CheckpointError(ValueError):
    """A model checkpoint folder that is missing, incomplete or does not match its config."""


def abstract_model(config: GhostVisConfig, *, dtype=jnp.float32, param_dtype=jnp.float32) -> GhostVisModel:
    """The model with ShapeDtypeStruct leaves: shapes without memory (the 1.5B model costs nothing)."""
    return nnx.eval_shape(lambda: GhostVisModel(config, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype))


def flat_param_shapes(config: GhostVisConfig) -> dict[tuple, tuple[int, ...]]:
    state = nnx.state(abstract_model(config), nnx.Param)
    return {path: tuple(v.shape) for path, v in nnx.to_flat_state(state)}


def save_model(out_dir: str, config: GhostVisConfig, params: dict, *, tokenizer_dir: str | None = None) -> None:
    """params: nested dict (nnx pure dict) or flat {path tuple: array}. Overwrites `out_dir` contents."""
    if params and all(isinstance(k, tuple) for k in params):
        params = traverse_util.unflatten_dict(params)
    _check_finite(params)
    os.makedirs(out_dir, exist_ok=True)
    config_path = os.path.join(out_dir, CONFIG_FILE)
    if os.path.exists(config_path):
        os.remove(config_path)  # the folder is incomplete until the new config is written
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.abspath(os.path.join(out_dir, PARAMS_DIR)), params, force=True)
    checkpointer.wait_until_finished()
    if tokenizer_dir is not None:
        copy_tokenizer(tokenizer_dir, os.path.join(out_dir, TOKENIZER_DIR))
    if jax.process_index() == 0:
        tmp = config_path + ".tmp"
        with open(tmp, "w") as f:
            f.write(config.to_json())
        os.replace(tmp, config_path)


def copy_tokenizer(src: str, dst: str) -> bool:
    names = [n for n in TOKENIZER_FILES if os.path.exists(os.path.join(src, n))]
    if not names:
        return False
    os.makedirs(dst, exist_ok=True)
    for n in names:
        shutil.copy2(os.path.join(src, n), os.path.join(dst, n))
    return True


def all_finite(tree) -> bool:
    """True when every floating leaf is finite; works for arrays spread over several processes."""
    leaves = [x for x in jax.tree_util.tree_leaves(tree) if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating)]
    if not leaves:
        return True
    return bool(jax.jit(lambda xs: jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in xs])))(leaves))


def _check_finite(params: dict) -> None:
    if all_finite(params):
        return
    for path, x in traverse_util.flatten_dict(params).items():
        if not all_finite(x):
            raise CheckpointError(f"refusing to write non-finite parameter {'/'.join(map(str, path))}")


def read_config(path: str) -> GhostVisConfig:
    config_path = os.path.join(path, CONFIG_FILE)
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: no such checkpoint folder")
    if not os.path.exists(config_path):
        raise CheckpointError(f"{path}: incomplete checkpoint — {CONFIG_FILE} is missing (a save that did not "
                              f"finish, or not a GhostVis checkpoint)")
    with open(config_path) as f:
        return GhostVisConfig.from_dict(json.load(f))


def load_params(path: str, config: GhostVisConfig, *, param_dtype=jnp.float32, shardings=None) -> dict:
    """Nested pure dict of parameters cast to `param_dtype`; `shardings` (same tree) places them."""
    params_dir = os.path.abspath(os.path.join(path, PARAMS_DIR))
    if not os.path.isdir(params_dir):
        raise CheckpointError(f"{path}: no {PARAMS_DIR}/ folder")
    abstract = nnx.to_pure_dict(nnx.state(abstract_model(config, param_dtype=param_dtype), nnx.Param))
    if shardings is not None:
        abstract = jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                          abstract, shardings)
    stored = stored_tree(params_dir)
    mismatch = shape_mismatches(stored, abstract)
    if mismatch:  # refused before orbax starts reads it would abandon (their errors surface later as noise)
        raise CheckpointError(f"{path}: parameters do not match {CONFIG_FILE}: "
                              + describe_mismatch(mismatch, stored_in=f"{PARAMS_DIR}/", wanted_by="the config gives"))
    try:
        params = ocp.StandardCheckpointer().restore(params_dir, abstract)
    except Exception as e:  # noqa: BLE001 — orbax raises many types for a tree that does not match
        unfused = _unfused_projections(stored)
        if unfused:
            raise CheckpointError(
                f"{path}: written by an earlier ghostvis_jax with separate decoder projections ({', '.join(unfused)}); "
                f"the decoder now stores q|k|v and gate|up fused. Convert the original weights again with "
                f"tools/convert_torch_weights.py (or export this folder with that earlier version first)") from None
        raise CheckpointError(f"{path}: parameters do not match {CONFIG_FILE} or are unreadable: {e}") from None
    if not all_finite(params):
        bad = [p for p, x in traverse_util.flatten_dict(params).items() if not all_finite(x)]
        raise CheckpointError(f"{path}: parameter {'/'.join(map(str, bad[0]))} holds NaN or Inf")
    return params


def stored_tree(directory: str):
    """The tree of array metadata (shapes, dtypes) of an orbax item folder (a model's params/, a train
    checkpoint's state/), or None where it cannot be read. Reads no arrays."""
    from etils import epath

    try:
        return ocp.StandardCheckpointHandler().metadata(epath.Path(directory))
    except Exception:  # noqa: BLE001 — unreadable metadata: the caller reports the restore error instead
        return None


def _leaves_by_path(tree) -> dict[tuple[str, ...], object]:
    """A pytree's leaves by their path of names (dict keys as given, other keys as printed)."""
    return {tuple(str(getattr(k, "key", k)) for k in p): leaf
            for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def shape_mismatches(stored, abstract) -> list[tuple[str, tuple]]:
    """(name, (stored shape, abstract's shape)) for every array both trees hold with different shapes; `stored`
    from `stored_tree` (None: nothing known, no mismatch)."""
    if stored is None:
        return []
    shapes = {path: tuple(getattr(leaf, "shape", ()) or ()) for path, leaf in _leaves_by_path(stored).items()}
    return [("/".join(path), (shapes[path], tuple(leaf.shape))) for path, leaf in _leaves_by_path(abstract).items()
            if path in shapes and shapes[path] != tuple(leaf.shape)]


def describe_mismatch(mismatch: list[tuple[str, tuple]], *, stored_in: str, wanted_by: str) -> str:
    """The first of `shape_mismatches` in words: "NAME is GOT in STORED_IN, WANTED_BY WANT (and N more)"."""
    (name, (got, want)), more = mismatch[0], len(mismatch) - 1
    return f"{name} is {got} in {stored_in}, {wanted_by} {want}" + (f" (and {more} more)" if more else "")


def _unfused_projections(stored_tree) -> list[str]:
    """Names of the pre-fusion decoder projections (q_proj, gate_proj, …) in a stored parameter tree, if any."""
    if stored_tree is None:
        return []
    old_names = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
    return sorted({n for p in _leaves_by_path(stored_tree) if p[:1] == ("llm",) for n in p if n in old_names})


def load_model(path: str, *, dtype=jnp.float32, param_dtype=jnp.float32) -> tuple[GhostVisConfig, GhostVisModel]:
    config = read_config(path)
    params = load_params(path, config, param_dtype=param_dtype)
    model = abstract_model(config, dtype=dtype, param_dtype=param_dtype)
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, params)
    nnx.update(model, state)
    return config, model


def tokenizer_path(path: str) -> str | None:
    p = os.path.join(path, TOKENIZER_DIR)
    return p if os.path.isdir(p) else None
