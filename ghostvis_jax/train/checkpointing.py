"""Training checkpoints (Orbax CheckpointManager): train state, data-iterator state and run metadata per step.

Saves are asynchronous; a step becomes visible only once Orbax has committed it, so a run killed mid-save
resumes from the previous complete step. A failed save (e.g. a full disk) is reported and the run goes on;
earlier checkpoints stay intact.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import traverse_util

from ghostvis_jax.checkpoint import all_finite, describe_mismatch, shape_mismatches, stored_tree

log = logging.getLogger(__name__)

# The config keys that decide the train state's tree and shapes (what a resume must keep).
STATE_KEYS = ("stage", "num_trainable_layers", "model_preset", "model")


class StateMismatchError(ValueError):
    """A checkpoint's train state has another tree or other shapes than this run builds."""


def state_key_differences(saved_config: dict, cfg) -> list[str]:
    """`key: saved -> now` for each leaf under STATE_KEYS that the checkpoint's run set otherwise."""
    out = []
    for key in STATE_KEYS:
        if key not in saved_config:
            continue
        now = cfg[key].to_dict() if hasattr(cfg[key], "to_dict") else cfg[key]
        before, after = (traverse_util.flatten_dict({key: v}, sep=".") for v in (saved_config[key], now))
        out += [f"{k}: {before.get(k, '(unset)')!r} -> {after.get(k, '(unset)')!r}"
                for k in sorted(set(before) | set(after)) if before.get(k) != after.get(k)]
    return out


class TrainCheckpointer:
    def __init__(self, directory: str, *, keep: int, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        self.failed_saves = 0

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: dict, data_state: Any, meta: dict) -> bool:
        if not all_finite(state["params"]):
            log.error("not saving step %d: the parameters hold NaN or Inf", step)
            return False
        try:
            self.wait()
            args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
                                      meta=ocp.args.JsonSave(meta))
            return bool(self.manager.save(step, args=args, force=True))
        except OSError as e:
            self.failed_saves += 1
            log.error("checkpoint save at step %d failed (%s); the previous checkpoint (step %s) is intact",
                      step, e, self.latest_step())
            return False

    def restore(self, step: int, abstract_state: Any) -> tuple[dict, Any, dict]:
        mismatch = shape_mismatches(stored_tree(os.path.join(self.directory, str(step), "state")), abstract_state)
        if mismatch:  # refused before orbax starts reads it would abandon (their errors surface later as noise)
            raise StateMismatchError(describe_mismatch(mismatch, stored_in="the checkpoint",
                                                       wanted_by="this run builds"))
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(),
                                  meta=ocp.args.JsonRestore())
        try:
            out = self.manager.restore(step, args=args)
        except ValueError as e:  # orbax: the stored tree or its shapes differ from the abstract state
            raise StateMismatchError(str(e).split("\n", 1)[0]) from None
        return out["state"], out["data"], out["meta"]

    def restore_meta(self, step: int) -> dict:
        """The run metadata of a step alone (what config wrote it), without reading its arrays."""
        try:
            return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"] or {}
        except Exception:  # noqa: BLE001 — best effort: only used to explain another error
            return {}

    def wait(self) -> None:
        try:
            self.manager.wait_until_finished()
        except OSError as e:
            self.failed_saves += 1
            log.error("an asynchronous checkpoint save failed (%s); latest complete step: %s", e, self.latest_step())

    def close(self) -> None:
        self.wait()
        self.manager.close()


def abstract_like(state: Any) -> Any:
    """ShapeDtypeStructs carrying the current shardings: restore places every array on this run's mesh."""
    return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
