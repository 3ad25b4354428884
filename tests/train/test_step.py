"""The functional train step on 8 fake CPU devices: sharding, freezing, accumulation."""

import jax
import numpy as np
import pytest
from flax import traverse_util

from ghostvis_jax import sharding
from ghostvis_jax.testing.tiny_training import random_batch, tiny_model_config
from ghostvis_jax.train import setup as train_setup
from ghostvis_jax.train.config import base_config
from ghostvis_jax.train.step import stack_micro_batches


def _cfg(stage="sft", **kw):
    c = base_config()
    c.stage, c.init, c.seed, c.num_trainable_layers = stage, "random", 0, 1
    c.compute_dtype = c.frozen_param_dtype = "float32"
    c.optim.warmup_steps, c.optim.projector_lr, c.optim.resampler_lr, c.optim.llm_lr = 1, 1e-2, 1e-2, 1e-2
    # Some gradients are exactly zero in exact arithmetic (the cross-attention key bias shifts every logit of a
    # query equally); Adam with a tiny eps turns their rounding noise into full-size steps. A larger eps keeps
    # comparisons between reduction orders meaningful without touching the real gradients.
    c.optim.eps = 1e-4
    for k, v in kw.items():
        c[k] = v
    return c


def _run(setup, batches):
    losses = []
    for micro in batches:
        batch = stack_micro_batches(micro)
        shardings = setup.batch_shardings(batch, micro_axis=True)
        batch = {k: jax.device_put(v, shardings[k]) for k, v in batch.items()}
        with jax.set_mesh(setup.mesh):  # as the loop does: attention inputs get their batch sharding
            setup.state, metrics = setup.train_step(setup.state, setup.frozen, batch)
        losses.append(float(metrics["loss"]))
    return losses


def _flat(tree):
    return {k: np.asarray(jax.device_get(v)) for k, v in traverse_util.flatten_dict(tree).items()}


@pytest.mark.parametrize("data,tensor", [(1, 1), (2, 2)])  # (8,) fsdp; (2, 2, 2) data x fsdp x tensor
def test_sharded_step_equals_single_device(data, tensor):
    batches = [[random_batch(0)]] * 3  # the same batch: the loss must fall
    results = []
    for devices in (jax.devices()[:1], jax.devices()):
        mesh = sharding.make_mesh(data=data if len(devices) > 1 else 1, fsdp=-1,
                                  tensor=tensor if len(devices) > 1 else 1, devices=devices)
        setup = train_setup.build(tiny_model_config(), _cfg(), mesh, total_steps=10)
        losses = _run(setup, batches)
        results.append((losses, _flat(setup.state["params"])))
    (l1, p1), (l8, p8) = results
    np.testing.assert_allclose(l1, l8, rtol=1e-5)
    assert l1[-1] < l1[0]
    for k in p1:
        np.testing.assert_allclose(p1[k], p8[k], rtol=1e-5, atol=1e-5, err_msg=str(k))


def test_parameters_are_really_sharded_over_fsdp():
    mesh = sharding.make_mesh(fsdp=-1)
    setup = train_setup.build(tiny_model_config(), _cfg(), mesh, total_steps=10)
    kernel = setup.frozen["llm"]["layers"][0]["mlp"]["gate_up_proj"]["kernel"]
    assert kernel.sharding.spec[0] == "fsdp"
    assert kernel.addressable_shards[0].data.shape == (64 // 8, 2, 128)
    mu = setup.state["opt_state"][1].inner_states["projector"].inner_state[0].mu["projector"]["fc1"]["kernel"]
    assert mu.addressable_shards[0].data.shape[0] == 64 // 8


def test_fsdp_gathers_parameters_not_activations():
    """ZeRO-3 moves weights, never rows: every all-gather in the compiled step is a parameter being gathered
    (2 H100s ran at 31% per GPU when GSPMD gathered the batch-sharded activations instead)."""
    import re

    mesh = sharding.make_mesh(fsdp=-1)
    setup = train_setup.build(tiny_model_config(), _cfg(), mesh, total_steps=10)
    batch = stack_micro_batches([random_batch(0, rows=8, length=8)])  # activations smaller than weights
    batch = {k: jax.device_put(v, s) for (k, v), s in
             zip(batch.items(), setup.batch_shardings(batch, micro_axis=True).values())}
    with jax.set_mesh(mesh):
        hlo = setup.train_step.lower(setup.state, setup.frozen, batch).compile().as_text()
    param_shapes = {tuple(x.shape) for x in jax.tree_util.tree_leaves((setup.state["params"], setup.frozen))}
    gathered = [tuple(int(d) for d in dims.split(",") if d) for dims in
                re.findall(r"= \w+\[([\d,]*)\]\{[^}]*\} all-gather(?:-start)?\(", hlo)]
    assert gathered, "expected FSDP all-gathers of the sharded weights"
    # Allowed: the projected image embeddings [images * N, D], gathered once for the slot scatter (images are
    # placed in row-major slot order across the whole batch; 1.5 MB a step at the 1.5B shapes), and the
    # per-row slot counts [rows] that give each row its first slot.
    cfg = tiny_model_config()
    image_embeds = (8 * cfg.num_image_tokens, cfg.llm.hidden_size)
    activations = [shape for shape in gathered if shape not in param_shapes and shape not in (image_embeds, (8,))]
    assert not activations, f"all-gathers of non-parameter arrays (activations?): {activations}"
    # No token-level array crosses devices: a cumsum over the flattened, row-sharded slot mask gathered the
    # mask [rows * T] and ran as a sequential scan on the GPU (one kernel per token, 2 H100s at 41% each).
    token_level = re.findall(r"= (?:s32|pred|u32)\[(\d+)[\d,]*\]\{[^}]*\} all-gather", hlo)
    assert all(int(n) == 8 for n in token_level), token_level


def test_replicated_frozen_weights_skip_their_all_gathers_and_train_the_same():
    """mesh.shard_frozen=False: frozen weights whole on every device (no gather for them), trainable ones and the
    optimizer state still sharded; the same losses and updates as ZeRO-3 over everything."""
    import re

    mesh = sharding.make_mesh(fsdp=-1)
    batch = stack_micro_batches([random_batch(0)])
    results = {}
    for shard_frozen in (True, False):
        cfg = _cfg()
        cfg.mesh.shard_frozen = shard_frozen
        setup = train_setup.build(tiny_model_config(), cfg, mesh, total_steps=10)
        placed = {k: jax.device_put(v, s) for (k, v), s in
                  zip(batch.items(), setup.batch_shardings(batch, micro_axis=True).values())}
        with jax.set_mesh(mesh):
            hlo = setup.train_step.lower(setup.state, setup.frozen, placed).compile().as_text()
        gathers = len(re.findall(r"all-gather(?:-start)?\(", hlo))
        frozen_kernel = setup.frozen["llm"]["layers"][0]["mlp"]["gate_up_proj"]["kernel"]
        trained_kernel = setup.state["params"]["llm"]["layers"][2]["mlp"]["gate_up_proj"]["kernel"]
        assert trained_kernel.addressable_shards[0].data.shape[0] == trained_kernel.shape[0] // 8
        assert (frozen_kernel.addressable_shards[0].data.shape == frozen_kernel.shape) is not shard_frozen
        losses = _run(setup, [[random_batch(0)]] * 2)
        results[shard_frozen] = (gathers, losses, _flat(setup.state["params"]))
    (g_sharded, l_sharded, p_sharded), (g_whole, l_whole, p_whole) = results[True], results[False]
    assert g_whole < g_sharded
    np.testing.assert_allclose(l_whole, l_sharded, rtol=1e-6)
    for k in p_sharded:
        np.testing.assert_allclose(p_whole[k], p_sharded[k], rtol=1e-6, atol=1e-6, err_msg=str(k))


@pytest.mark.parametrize("stage,trainable_prefixes", [
    ("align", {("projector",), ("resampler",)}),
    ("sft", {("projector",), ("resampler",), ("llm", "layers", 2)}),
])
def test_frozen_parameters_bitwise_unchanged_and_optimizer_holds_only_trainable(stage, trainable_prefixes):
    mesh = sharding.make_mesh(fsdp=-1)
    setup = train_setup.build(tiny_model_config(), _cfg(stage), mesh, total_steps=10)
    frozen_before = _flat(setup.frozen)
    trainable_before = _flat(setup.state["params"])
    assert {k[:len(p)] for k in trainable_before for p in trainable_prefixes if k[:len(p)] == p} == trainable_prefixes
    assert all(any(k[:len(p)] == p for p in trainable_prefixes) for k in trainable_before)
    assert not any(k[0] == "vision" for k in trainable_before)
    _run(setup, [[random_batch(i)] for i in range(2)])
    assert all(np.array_equal(frozen_before[k], v) for k, v in _flat(setup.frozen).items())
    after = _flat(setup.state["params"])
    assert all(not np.array_equal(trainable_before[k], after[k]) for k in after if k[-1] == "kernel")
    # Adam's mu and nu: exactly the trainable leaves, nothing for frozen ones.
    opt_leaves = jax.tree_util.tree_leaves(setup.state["opt_state"])
    param_bytes = sum(x.nbytes for x in trainable_before.values())
    array_leaves = [x for x in opt_leaves if x.ndim > 0]
    assert sum(x.nbytes for x in array_leaves) == 2 * param_bytes
    assert len(array_leaves) == 2 * len(trainable_before)


def test_gradient_accumulation_equals_one_big_batch():
    """Also what lets a step of short rows run as fewer, larger micro-batches: the two halves joined
    (`batching.join_batches`) are exactly the big batch."""
    from ghostvis_jax.data.batching import join_batches

    mesh = sharding.make_mesh(fsdp=-1)
    big = random_batch(7, rows=16)
    halves = [{k: v[:8] for k, v in big.items()}, {k: v[8:] for k, v in big.items()}]
    (joined,) = join_batches(halves, 2)
    assert joined.keys() == big.keys() and all(np.array_equal(joined[k], big[k]) for k in big)
    a = train_setup.build(tiny_model_config(), _cfg(), mesh, total_steps=10)
    la = _run(a, [halves, halves])
    b = train_setup.build(tiny_model_config(), _cfg(), mesh, total_steps=10)
    lb = _run(b, [[big], [big]])
    np.testing.assert_allclose(la, lb, rtol=1e-5)
    pa, pb = _flat(a.state["params"]), _flat(b.state["params"])
    for k in pa:
        np.testing.assert_allclose(pa[k], pb[k], rtol=1e-4, atol=1e-5, err_msg=str(k))


def test_non_finite_batch_skips_the_update():
    mesh = sharding.make_mesh(fsdp=-1)
    setup = train_setup.build(tiny_model_config(), _cfg(), mesh, total_steps=10)
    before = _flat(setup.state["params"])
    bad = random_batch(1)
    bad["pixel_values"][0, 0, 0, 0] = np.nan
    _run(setup, [[bad]])
    assert int(setup.state["skipped"]) == 1 and int(setup.state["bad_streak"]) == 1
    assert all(np.array_equal(before[k], v) for k, v in _flat(setup.state["params"]).items())
    _run(setup, [[random_batch(2)]])
    assert int(setup.state["skipped"]) == 1 and int(setup.state["bad_streak"]) == 0


def test_remat_policy_changes_memory_not_numbers():
    mesh = sharding.make_mesh(fsdp=-1)
    batches = [[random_batch(3)]] * 2
    plain = train_setup.build(tiny_model_config(), _cfg(), mesh, total_steps=10)
    remat = train_setup.build(tiny_model_config(), _cfg(remat="dots"), mesh, total_steps=10)
    assert remat.graphdef != plain.graphdef  # the policy is part of the compiled model
    np.testing.assert_allclose(_run(plain, batches), _run(remat, batches), rtol=1e-6)

