"""The training run end to end on 8 fake CPU devices: resume, checkpoints across meshes, config errors."""

import functools
import json
import logging
import os
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import traverse_util

from ghostvis_jax import checkpoint, sharding
from ghostvis_jax.testing.tiny_training import random_batch, tiny_model_config, tiny_train_config
from ghostvis_jax.train import setup as train_setup
from ghostvis_jax.train.checkpointing import TrainCheckpointer, abstract_like
from ghostvis_jax.train.config import ConfigError
from ghostvis_jax.train.loop import run
from ghostvis_jax.train.step import stack_micro_batches

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _losses(workdir):
    """Per-step train loss; after a resume the last record of a step wins (and must equal the first)."""
    out = {}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            if r["kind"] == "train":
                out[r["step"]] = r["loss"]
    return out


def _model_params(workdir):
    params = checkpoint.load_params(os.path.join(workdir, "model"), checkpoint.read_config(
        os.path.join(workdir, "model")))
    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(params).items()}


@pytest.fixture(scope="module")
def stopped_and_resumed(tmp_path_factory):
    """An uninterrupted run (16 rows per step as 2 micro-batches of 8) and the same run stopped after step 3 and
    resumed; the stopped run's step-3 checkpoint is also kept aside."""
    tmp = tmp_path_factory.mktemp("resume")
    config = functools.partial(tiny_train_config, grad_accum_steps=2)
    straight, split = str(tmp / "straight"), str(tmp / "split")
    run(config(straight))
    first = run(config(split, max_steps_per_run=3))
    shutil.copytree(os.path.join(split, "checkpoints", "3"), str(tmp / "step3"))
    with pytest.raises(ConfigError, match="already holds checkpoints up to step 3"):
        run(config(split))
    second = run(config(split, resume=True))
    return {"tmp": tmp, "straight": straight, "split": split, "first": first, "second": second}


def test_stop_and_resume_is_bitwise_identical(stopped_and_resumed):
    r = stopped_and_resumed
    straight, split = r["straight"], r["split"]
    assert r["first"]["step"] == 3 and "stopped_by" in r["first"]
    assert r["second"]["step"] == 6
    assert _losses(straight) == _losses(split)
    a, b = _model_params(straight), _model_params(split)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    records = [json.loads(x) for x in open(os.path.join(split, "metrics.jsonl"))]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert os.path.exists(os.path.join(split, "loss_curve.png"))


def test_resume_with_another_batch_split_and_length_buckets_continues_the_run(stopped_and_resumed, caplog):
    """The step-3 checkpoint of 2 micro-batches of 8 resumed as one batch of 16 (a move to a mesh where they fit,
    here 2 rows on each of 8 devices for 16 rows per step), and with a length bucket: the rows here hold 30-37 of
    64 tokens, so steps 4-6 run at 48 positions. The same rows train steps 4-6, so the losses match the unsplit,
    unbucketed run's to float32 summation order (an update that depended on the cut padding would show in steps 5
    and 6). Several lengths in one run: test_launch.py."""
    moved = str(stopped_and_resumed["tmp"] / "moved")
    shutil.copytree(str(stopped_and_resumed["tmp"] / "step3"), os.path.join(moved, "checkpoints", "3"))
    with caplog.at_level(logging.WARNING, logger="ghostvis_jax.train.loop"):
        cfg = tiny_train_config(moved, resume=True, rows_per_device=2, global_batch_size=16, log_every=1,
                                eval_every=5, **{"data.batch_size": 0, "data.length_buckets": (16, 48)})
        out = run(cfg)
    assert out["step"] == 6 and not [r for r in caplog.records if "rows per step" in r.getMessage()]
    assert (cfg.data.batch_size, cfg.grad_accum_steps) == (0, 1)  # resolved on a copy: run(cfg) can run again
    want, got = _losses(stopped_and_resumed["straight"]), _losses(moved)
    assert sorted(got) == [4, 5, 6]
    np.testing.assert_allclose([got[s] for s in (4, 5, 6)], [want[s] for s in (4, 5, 6)], rtol=1e-5)
    train = [json.loads(x) for x in open(os.path.join(moved, "metrics.jsonl")) if '"train"' in x]
    assert [r["seq_len"] for r in train] == [48, 48, 48] and list(out["compile_s_per_length"]) == [48]
    assert all(0.6 < r["token_fill"] <= 1.0 for r in train)  # 30-37 real tokens of 48 positions
    assert '"eval", "step": 5' in open(os.path.join(moved, "metrics.jsonl")).read()  # held-out batches cut too
    straight = [json.loads(x) for x in open(os.path.join(stopped_and_resumed["straight"], "metrics.jsonl"))]
    assert all(r["seq_len"] == 64 and r.get("token_fill", 0) < 0.6 for r in straight if r["kind"] == "train")


@pytest.mark.parametrize("change,named", [
    ({"num_trainable_layers": 2}, "num_trainable_layers: 1 -> 2"),                    # another tree
    ({"model.llm.intermediate_size": 96}, "model.llm.intermediate_size: 128 -> 96"),  # other shapes
], ids=["another-tree", "other-shapes"])
def test_resume_with_a_config_that_builds_another_state_is_refused_by_key(stopped_and_resumed, change, named):
    other = str(stopped_and_resumed["tmp"] / ("other_" + "_".join(change)))
    shutil.copytree(str(stopped_and_resumed["tmp"] / "step3"), os.path.join(other, "checkpoints", "3"))
    with pytest.raises(ConfigError, match=r"checkpoints/3 holds a train state that this config does not build "
                                          rf"\({re.escape(named)}\): resume with the config that wrote it"):
        run(tiny_train_config(other, resume=True, grad_accum_steps=2, **change))


def test_other_rows_per_step_on_resume_are_said(caplog):
    from ghostvis_jax.train.loop import _warn_if_rows_per_step_changed

    cfg = tiny_train_config("unused", grad_accum_steps=2)
    with caplog.at_level(logging.WARNING, logger="ghostvis_jax.train.loop"):
        _warn_if_rows_per_step_changed({"config": {"data": {"batch_size": 8}, "grad_accum_steps": 1}}, cfg)
        _warn_if_rows_per_step_changed({"config": {"data": {"batch_size": 16}, "grad_accum_steps": 1}}, cfg)
    assert [r.getMessage() for r in caplog.records] == [
        "rows per step per process changed on resume: the checkpoint's run took 8 (batch_size 8 x grad_accum_steps"
        " 1), this run takes 16 (8 x 2); the learning-rate schedule continues by step"]


def _setup(devices, **mesh):
    cfg = tiny_train_config("unused")
    cfg.seed = 3
    return train_setup.build(tiny_model_config(), cfg, sharding.make_mesh(devices=devices, **mesh), total_steps=5)


def test_checkpoint_restores_on_other_meshes(tmp_path):
    src = _setup(jax.devices(), fsdp=-1)
    batch = stack_micro_batches([random_batch(0)])
    batch = {k: jax.device_put(v, s) for (k, v), s in zip(batch.items(), src.batch_shardings(batch, micro_axis=True).values())}
    src.state, _ = src.train_step(src.state, src.frozen, batch)  # non-trivial optimizer state
    ckpt = TrainCheckpointer(str(tmp_path / "ck"), keep=2)
    assert ckpt.save(1, src.state, {"pos": 1}, {"step": 1})
    ckpt.wait()
    want = {k: np.asarray(v) for k, v in traverse_util.flatten_dict(
        jax.tree_util.tree_map(np.asarray, {"p": src.state["params"]})).items()}
    want_leaves = [np.asarray(x) for x in jax.tree_util.tree_leaves(src.state)]
    for devices, mesh in ((jax.devices(), dict(data=2, fsdp=4)), (jax.devices()[:1], dict(fsdp=-1))):
        dst = _setup(devices, **mesh)
        state, data_state, meta = ckpt.restore(1, abstract_like(dst.state))
        assert data_state == {"pos": 1} and meta == {"step": 1}
        got_leaves = [np.asarray(x) for x in jax.tree_util.tree_leaves(state)]
        assert all(np.array_equal(a, b) for a, b in zip(want_leaves, got_leaves))
        kernel = state["params"]["projector"]["fc1"]["kernel"]
        assert kernel.sharding.mesh.shape == dst.mesh.shape
    assert want


def _cli(tmp_path, *args):
    return subprocess.run([sys.executable, "-m", "ghostvis_jax.train", "--config",
                           os.path.join(REPO, "configs", "demo_align.py"), *args],
                          capture_output=True, text=True, cwd=REPO, timeout=300,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))


def test_cli_unknown_key_and_missing_checkpoint_fail_before_compiling(tmp_path):
    proc = _cli(tmp_path, "--config.num_stepz=3")
    assert proc.returncode != 0
    assert "unknown config key 'config.num_stepz'; valid keys of config: [" in proc.stderr and "'num_steps'" in proc.stderr
    proc = _cli(tmp_path, f"--config.init_checkpoint={tmp_path}/missing", f"--config.workdir={tmp_path}/w")
    assert proc.returncode != 0
    assert f"config.init_checkpoint: no such folder '{tmp_path}/missing'" in proc.stderr
    assert "compiled" not in proc.stderr + proc.stdout


@pytest.mark.parametrize("override,message", [
    ({"data.batch_size": 6}, r"batch_size=6 .* not divisible by the batch axes data x fsdp = 8"),
    ({"mesh.data": 3}, r"config.mesh: .* does not divide 8 devices"),
    ({"num_steps": 0}, r"config.num_steps must be a positive integer"),
    ({"stage": "pretrain"}, r"config.stage must be one of"),
    ({"data.max_images_per_batch": 4}, r"max_images_per_batch=4 .* not divisible"),
    ({"data.length_buckets": (32, 64)}, r"config.data.length_buckets must be increasing integers .*\(64\)"),
    ({"data.length_group_steps": -1}, r"config.data.length_group_steps must be an integer >= 0, got -1"),
])
def test_bad_configs_are_refused_by_name(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        run(tiny_train_config(str(tmp_path / "w"), **override))
    assert not os.path.exists(tmp_path / "w" / "checkpoints")


@pytest.mark.parametrize("devices,processes,mesh,want", [
    (8, 1, {}, (64, 4)),                      # one 8-GPU host: 8 rows each, 4 micro-batches
    (1, 1, {}, (8, 32)),                      # one GPU
    (32, 4, {}, (64, 1)),                     # four hosts: 64 rows per process, no accumulation
    (8, 1, {"data": 2, "fsdp": 2, "tensor": 2}, (32, 8)),  # tensor-parallel pairs share their rows
])
def test_rows_per_device_and_global_batch_size_give_the_same_rows_per_step_anywhere(devices, processes, mesh, want):
    from ghostvis_jax.train.config import resolve_batch_split

    cfg = tiny_train_config("unused", rows_per_device=8, global_batch_size=256, **{"data.batch_size": 0})
    for key, value in mesh.items():
        cfg.mesh[key] = value
    resolve_batch_split(cfg, devices, processes)
    assert (cfg.data.batch_size, cfg.grad_accum_steps) == want
    assert cfg.data.batch_size * cfg.grad_accum_steps * processes == 256


@pytest.mark.parametrize("config", ["ghostvis_1p5b_align.py", "ghostvis_1p5b_sft.py", "demo_sft.py"])
def test_every_config_file_parses_with_the_documented_overrides(config):
    """The real configs accept --config.init=random --config.tokenizer=tiny (validation then stops on the mesh)."""
    proc = subprocess.run([sys.executable, "-m", "ghostvis_jax.train", "--config", os.path.join(REPO, "configs", config),
                           "--config.init=random", "--config.tokenizer=tiny", "--config.workdir=/tmp/unused",
                           "--config.mesh.data=3"], capture_output=True, text=True, cwd=REPO, timeout=120,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert "error: config.mesh: mesh data=3" in proc.stderr, proc.stderr[-2000:]


def test_non_finite_streak_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    from ghostvis_jax.train import loop
    from ghostvis_jax.train.loop import TrainingDiverged

    calls = {"n": 0}
    real = loop.stack_micro_batches

    def poisoned_from_step_3(micro):
        calls["n"] += 1
        out = real(micro)
        if calls["n"] >= 3:
            out["pixel_values"] = np.full_like(out["pixel_values"], np.nan)
        return out

    monkeypatch.setattr(loop, "stack_micro_batches", poisoned_from_step_3)
    workdir = str(tmp_path / "w")
    with pytest.raises(TrainingDiverged, match=r"2 non-finite updates in a row at step 4; .*last good checkpoint is "
                                               r"step 2"):
        run(tiny_train_config(workdir, num_steps=6, checkpoint_every=2, max_bad_steps=2))
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2"]
    assert not os.path.exists(os.path.join(workdir, "model"))
    monkeypatch.undo()  # clean data again: the resumed run continues from step 2
    resumed = run(tiny_train_config(workdir, num_steps=3, resume=True))
    assert resumed["step"] == 3 and resumed["skipped_updates"] == 0


def test_empty_dataset_slots_do_not_add_datasets():
    """The 1.5B configs carry one slot per real dataset; a recipe override with no slot filled trains on that
    recipe alone (the GPU smoke run), while a filled slot still adds / overrides its dataset."""
    from ghostvis_jax.data.pipeline import resolve_data_config
    from ghostvis_jax.train.config import base_config, dataset_slots
    from ghostvis_jax.train.loop import _data_config

    c = base_config()
    c.data.datasets = dataset_slots("vision_pretrain")
    c.data.recipe = "synthetic_pretrain"
    assert list(resolve_data_config(_data_config(c))["datasets"]) == ["synthetic_shapes_caption"]
    c.data.datasets.coco_captions.path = "/data/coco"
    resolved = resolve_data_config(_data_config(c))["datasets"]
    assert sorted(resolved) == ["coco_captions", "synthetic_shapes_caption"]
    assert resolved["coco_captions"]["path"] == "/data/coco"


def test_rerun_loads_the_train_step_from_the_compilation_cache(tmp_path):
    """Two runs of the same config (separate processes): the first writes the compiled train step to
    config.compilation_cache_dir, the second finds it there and adds no new train-step entry."""
    cache = tmp_path / "xla_cache"
    script = ("import sys; from ghostvis_jax.testing.tiny_training import tiny_train_config; "
              "from ghostvis_jax.train.loop import run; "
              "run(tiny_train_config(sys.argv[1], num_steps=1, compilation_cache_dir=sys.argv[2]))")
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")

    def entries():
        return sorted(p.name for p in cache.iterdir() if p.name.startswith("jit_train_step"))

    for i in range(2):
        proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / f"w{i}"), str(cache)],
                              capture_output=True, text=True, cwd=REPO, timeout=240, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        if i == 0:
            first = entries()
            assert len(first) == 1, first
    assert entries() == first
