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

from ghostvis_jax.checkpoint import all_finite

log = logging.getLogger(__name__)


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
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(),
                                  meta=ocp.args.JsonRestore())
        out = self.manager.restore(step, args=args)
        return out["state"], out["data"], out["meta"]

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
