"""Build everything the loop needs from a config: abstract model → trainable/frozen split → shardings →
parameters (converted checkpoint or random) → optimizer → train state → the jitted step, compiled once."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx, traverse_util
from jax.sharding import Mesh

from ghostvis_jax import checkpoint, sharding
from ghostvis_jax.config import GhostVisConfig
from ghostvis_jax.model.layers import DTYPES
from ghostvis_jax.model.vlm import GhostVisModel
from ghostvis_jax.train import optim
from ghostvis_jax.train.step import initial_state, make_eval_step, make_train_step

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
}


@dataclasses.dataclass
class TrainSetup:
    mesh: Mesh
    model_config: GhostVisConfig
    graphdef: Any
    labels: dict
    tx: Any
    state: dict
    frozen: dict
    state_shardings: Any
    frozen_shardings: Any
    train_step: Callable
    eval_step: Callable

    def batch_shardings(self, batch: dict, *, micro_axis: bool) -> dict:
        lead = 1 if micro_axis else 0
        return {k: sharding.batch_sharding(self.mesh, v.ndim, leading_unsharded=lead) for k, v in batch.items()}

    def full_params(self) -> dict:
        """Trainable + frozen parameters as one nested dict (what a model checkpoint holds)."""
        flat = dict(traverse_util.flatten_dict(self.frozen))
        flat.update(traverse_util.flatten_dict(self.state["params"]))
        return traverse_util.unflatten_dict(flat)


def _state_shardings(tx, trainable, trainable_sh, mesh: Mesh, seed: int) -> dict:
    """Optimizer moments are sharded like their parameters (ZeRO); counters and the RNG are replicated.

    An optimizer-state leaf belongs to the parameter whose path ends its dict-key path (optax nests the
    parameter tree inside its own state containers) and whose shape it has.
    """
    abstract = jax.eval_shape(lambda p: initial_state(p, tx, seed), trainable)
    flat_sh = traverse_util.flatten_dict(trainable_sh)
    flat_shapes = {k: v.shape for k, v in traverse_util.flatten_dict(trainable).items()}
    replicated = sharding.replicated(mesh)

    def leaf_sharding(path, leaf):
        keys = tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))
        for start in range(len(keys)):
            suffix = keys[start:]
            if suffix in flat_sh and flat_shapes[suffix] == leaf.shape:
                return flat_sh[suffix]
        return replicated

    out = jax.tree_util.tree_map_with_path(leaf_sharding, abstract)
    out["params"] = trainable_sh
    return out


def random_params(model_config: GhostVisConfig, shardings: dict, *, seed: int, dtype) -> dict:
    """Random weights at the real shapes, created eagerly on the first local device and then laid out.

    One jit over the whole threefry initializer compiled for minutes on an H100 ("very slow compile" at 1.5B);
    eager creation with XLA's RngBitGenerator ("rbg" keys) compiles one small kernel per distinct shape. Every
    process computes the same values from the seed, so each contributes its own shards.
    """
    with jax.default_device(jax.local_devices()[0]):
        rngs = nnx.Rngs(params=jax.random.key(seed, impl="rbg"))
        model = GhostVisModel(model_config, rngs=rngs, dtype=dtype, param_dtype=jnp.float32)
        params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return jax.tree_util.tree_map(
        lambda x, s: jax.make_array_from_callback(x.shape, s, lambda index: x[index]), params, shardings)


def split_by_labels(params: dict, labels: dict) -> tuple[dict, dict]:
    flat, flat_labels = traverse_util.flatten_dict(params), traverse_util.flatten_dict(labels)
    trainable = {p: x for p, x in flat.items() if flat_labels[p] != optim.FROZEN}
    frozen = {p: x for p, x in flat.items() if flat_labels[p] == optim.FROZEN}
    return traverse_util.unflatten_dict(trainable), traverse_util.unflatten_dict(frozen)


def build(model_config: GhostVisConfig, cfg: Any, mesh: Mesh, *, total_steps: int) -> TrainSetup:
    """cfg: the training ConfigDict (stage, num_trainable_layers, init, init_checkpoint, seed, compute_dtype,
    frozen_param_dtype, remat, loss_chunk_tokens, mesh.shard_frozen, optim.*)."""
    compute = DTYPES[cfg.compute_dtype]
    abstract = checkpoint.abstract_model(model_config, dtype=compute, param_dtype=jnp.float32)
    abstract.llm.remat_policy = REMAT_POLICIES[cfg.remat]
    layer_kw = dict(stage=cfg.stage, num_layers=model_config.llm.num_layers,
                    num_trainable_layers=cfg.num_trainable_layers)
    graphdef, abstract_params = nnx.split(abstract, nnx.Param)
    full_shardings = sharding.param_shardings(abstract_params, mesh)
    labels_full = optim.labels_for(nnx.to_pure_dict(abstract_params), **layer_kw)
    if not cfg.mesh.get("shard_frozen", True):  # frozen weights are loaded / created whole on every device
        full_shardings = jax.tree_util.tree_map(
            lambda s, label: sharding.without_fsdp(s) if label == optim.FROZEN else s, full_shardings, labels_full)

    if cfg.init == "checkpoint":
        params = checkpoint.load_params(cfg.init_checkpoint, model_config, param_dtype=jnp.float32,
                                        shardings=full_shardings)
    else:
        params = random_params(model_config, full_shardings, seed=cfg.seed, dtype=compute)

    trainable, frozen = split_by_labels(params, labels_full)
    labels, _ = split_by_labels(labels_full, labels_full)
    if not trainable:
        raise ValueError(f"stage {cfg.stage!r} leaves no parameter to train")
    trainable_sh, frozen_sh = split_by_labels(full_shardings, labels_full)
    frozen_dtype = DTYPES[cfg.frozen_param_dtype]
    frozen = jax.jit(lambda f: jax.tree_util.tree_map(lambda x: x.astype(frozen_dtype), f),
                     out_shardings=frozen_sh, donate_argnums=0)(frozen)

    tx = optim.make_optimizer(cfg.optim, labels, total_steps=total_steps)
    state_sh = _state_shardings(tx, trainable, trainable_sh, mesh, cfg.seed)
    state = jax.jit(lambda p: initial_state(p, tx, cfg.seed), in_shardings=(trainable_sh,),
                    out_shardings=state_sh)(trainable)

    # Frozen parameters are not passed through the train step's outputs; the step reads them only.
    train_graphdef = nnx.split(abstract, optim.trainable_filter(**layer_kw), ...)[0]
    step_fn = make_train_step(train_graphdef, tx, chunk_tokens=cfg.loss_chunk_tokens,
                              dropout=model_config.projector.dropout > 0)
    train_step = jax.jit(step_fn, in_shardings=(state_sh, frozen_sh, None), out_shardings=(state_sh, None),
                         donate_argnums=(0,))
    eval_step = jax.jit(make_eval_step(train_graphdef, chunk_tokens=cfg.loss_chunk_tokens),
                        in_shardings=(trainable_sh, frozen_sh, None))
    del graphdef
    return TrainSetup(mesh=mesh, model_config=model_config, graphdef=train_graphdef, labels=labels, tx=tx,
                      state=state, frozen=frozen, state_shardings=state_sh, frozen_shardings=frozen_sh,
                      train_step=train_step, eval_step=eval_step)
