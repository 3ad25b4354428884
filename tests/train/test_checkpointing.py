"""The train-state checkpointer: a state of other shapes is refused from the stored metadata, naming the array and
both shapes, before any array is read."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ghostvis_jax.train.checkpointing import StateMismatchError, TrainCheckpointer, abstract_like


def _state(width):
    return {"params": {"dense": {"kernel": jnp.arange(4.0 * width).reshape(4, width)}, "scale": jnp.ones(2)},
            "step": jnp.asarray(7, jnp.int32)}


@pytest.fixture
def saved(tmp_path):
    ckpt = TrainCheckpointer(str(tmp_path / "checkpoints"), keep=2, async_save=False)
    assert ckpt.save(7, _state(3), {"position": 12}, {"config": {}})
    ckpt.wait()
    return ckpt


def test_restore_gives_back_the_saved_state(saved):
    state, data, meta = saved.restore(7, abstract_like(_state(3)))
    np.testing.assert_array_equal(state["params"]["dense"]["kernel"], _state(3)["params"]["dense"]["kernel"])
    assert int(state["step"]) == 7 and data == {"position": 12} and meta == {"config": {}}


def test_other_shapes_are_refused_by_name_before_reading(saved, monkeypatch):
    def no_reads(*args, **kwargs):
        raise AssertionError("orbax restore started")

    monkeypatch.setattr(saved.manager, "restore", no_reads)
    with pytest.raises(StateMismatchError, match=r"^params/dense/kernel is \(4, 3\) in the checkpoint, this run "
                                                 r"builds \(4, 5\)$"):
        saved.restore(7, abstract_like(_state(5)))


def test_another_tree_is_still_refused_as_a_mismatch(saved):
    other = _state(3)
    other["params"]["extra"] = jnp.zeros(3)
    with pytest.raises(StateMismatchError):
        saved.restore(7, jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), other))
