"""Which parameters train in each stage, and the parameter-masked optax optimizer.

Every parameter path gets a label: a trainable group ("projector", "resampler", "llm") or "frozen". The model is
split on that label, the gradient is taken over the trainable tree only, and the optimizer (AdamW per group with
its own warmup + cosine schedule, after global-norm clipping) holds state for exactly those leaves. Frozen
parameters therefore get no gradient, no optimizer state and no weight decay.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import optax

STAGES = ("align", "sft", "full")
GROUPS = ("projector", "resampler", "llm")
FROZEN = "frozen"


def param_group(path: tuple, *, stage: str, num_layers: int, num_trainable_layers: int) -> str:
    """align: adapters; sft: adapters + the last N decoder layers; full: the whole decoder (text-only fine-tune).

    The vision tower never trains (and encode_images stops the gradient at its output).
    """
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    top = path[0]
    if top in ("projector", "resampler"):
        return FROZEN if stage == "full" else top
    if top == "llm":
        if stage == "full":
            return "llm"
        if stage == "sft" and path[1] == "layers" and int(path[2]) >= num_layers - num_trainable_layers:
            return "llm"
    return FROZEN


def trainable_filter(stage: str, num_layers: int, num_trainable_layers: int) -> Callable:
    """An NNX filter (path, variable) → bool selecting the trainable parameters."""
    from flax import nnx

    def is_trainable(path, variable) -> bool:
        return isinstance(variable, nnx.Param) and param_group(
            tuple(path), stage=stage, num_layers=num_layers, num_trainable_layers=num_trainable_layers) != FROZEN

    return is_trainable


def labels_for(params: dict, **kw) -> dict:
    """Same nested structure as `params`, each leaf replaced by its group label."""
    return jax.tree_util.tree_map_with_path(lambda p, _: param_group(_keys(p), **kw), params)


def _keys(path) -> tuple:
    return tuple(getattr(k, "key", getattr(k, "idx", k)) for k in path)


def decays(path, leaf) -> bool:
    """Weight decay on matrices and embedding tables only; never on biases, norm scales or latents."""
    name = _keys(path)[-1]
    return leaf.ndim >= 2 and name in ("kernel", "embedding", "patch_kernel")


def learning_rate_schedule(peak: float, *, warmup_steps: int, total_steps: int, min_lr_ratio: float):
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=peak, warmup_steps=warmup_steps,
        decay_steps=max(total_steps, warmup_steps + 1), end_value=peak * min_lr_ratio)


def group_learning_rates(optim_cfg: Any) -> dict[str, float]:
    return {"projector": optim_cfg.projector_lr, "resampler": optim_cfg.resampler_lr, "llm": optim_cfg.llm_lr}


def make_optimizer(optim_cfg: Any, labels: dict, *, total_steps: int) -> optax.GradientTransformation:
    """optim_cfg: projector_lr, resampler_lr, llm_lr, weight_decay, b1, b2, eps, warmup_steps, min_lr_ratio,
    clip_norm. `labels`: the label tree of the trainable parameters."""
    present = sorted(set(jax.tree_util.tree_leaves(labels)))  # sorted: the same traced program in every process
    if FROZEN in present:
        raise ValueError("the optimizer is built over trainable parameters only; a frozen leaf was passed")

    def adamw(peak: float) -> optax.GradientTransformation:
        schedule = learning_rate_schedule(peak, warmup_steps=optim_cfg.warmup_steps, total_steps=total_steps,
                                          min_lr_ratio=optim_cfg.min_lr_ratio)
        return optax.adamw(schedule, b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps,
                           weight_decay=optim_cfg.weight_decay,
                           mask=lambda tree: jax.tree_util.tree_map_with_path(decays, tree))

    lrs = group_learning_rates(optim_cfg)
    return optax.chain(
        optax.clip_by_global_norm(optim_cfg.clip_norm),
        optax.multi_transform({g: adamw(lrs[g]) for g in present}, labels),
    )
