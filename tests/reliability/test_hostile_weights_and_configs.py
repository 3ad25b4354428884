"""Hostile weight files and checkpoint folders (refused with a message naming the file, never loaded half-way),
and hostile training configs / CLI arguments (a clear error naming the key, before anything is compiled)."""

import json
import os
import shutil
import struct
import subprocess
import sys

import numpy as np
import orbax.checkpoint as ocp
import pytest
import torch
from flax import traverse_util

import ghostvis_jax as gv
from ghostvis_jax import checkpoint
from ghostvis_jax.config import ProjectorConfig, ResamplerConfig
from ghostvis_jax.testing.tiny_training import tiny_train_config
from ghostvis_jax.train.config import ConfigError
from ghostvis_jax.train.loop import run
from ghostvis_jax.weights.convert import ConversionError, convert
from ghostvis_jax.weights.readers import WeightFileError, read_weight_file

pytestmark = pytest.mark.timeout(300)
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SURFACE_W = "checkpoints & weights"
SURFACE_C = "configs & CLI args"


def _refused(ledger, surface, item, fn, exc, must_name):
    try:
        fn()
    except exc as e:
        ok = all(n in str(e) for n in must_name)
        ledger.record(surface, item, "clear error" if ok else "crash", str(e).splitlines()[0][:110])
        assert ok, (item, str(e))
        return str(e)
    except Exception as e:  # noqa: BLE001
        ledger.record(surface, item, "crash", repr(e)[:110])
        raise
    ledger.record(surface, item, "silent corruption", "accepted")
    raise AssertionError(f"{item}: accepted")


def _safetensors(path, tensors: dict[str, tuple[str, tuple, bytes]]):
    header, data = {}, b""
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    h = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + data)


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ.get('GHOSTVIS_PWNED', '/tmp/ghostvis_pwned')}",))


def test_weight_files(tmp_path, ledger, monkeypatch):
    good = tmp_path / "good.safetensors"
    _safetensors(good, {"w": ("F32", (4, 4), np.ones((4, 4), np.float32).tobytes())})
    assert read_weight_file(str(good))["w"].shape == (4, 4)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-20])
    _refused(ledger, SURFACE_W, "truncated safetensors", lambda: read_weight_file(str(truncated)), WeightFileError,
             [str(truncated), "truncated"])
    header_only = tmp_path / "cut_in_header.safetensors"
    header_only.write_bytes(good.read_bytes()[:30])
    _refused(ledger, SURFACE_W, "safetensors cut inside its header", lambda: read_weight_file(str(header_only)),
             WeightFileError, [str(header_only)])
    odd = tmp_path / "fp8.safetensors"
    _safetensors(odd, {"w": ("F8_E4M3", (4,), b"\x00" * 4)})
    _refused(ledger, SURFACE_W, "safetensors with an unsupported dtype (F8_E4M3)", lambda: read_weight_file(str(odd)),
             WeightFileError, [str(odd), "F8_E4M3"])
    marker = tmp_path / "pwned"
    monkeypatch.setenv("GHOSTVIS_PWNED", str(marker))
    evil = tmp_path / "pytorch_model.pt"
    torch.save({"w": torch.ones(2), "x": _Payload()}, str(evil))
    _refused(ledger, SURFACE_W, ".pt with a code-running pickle payload", lambda: read_weight_file(str(evil)),
             WeightFileError, [str(evil), "refused"])
    assert not marker.exists(), "the pickle payload ran"
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\x80\x04 not a torch file")
    _refused(ledger, SURFACE_W, "pytorch_model.bin that is not a torch file", lambda: read_weight_file(str(junk)),
             WeightFileError, [str(junk)])


def _copy_hf(src, dst, edit):
    """A copy of an HF folder whose model.safetensors has tensor `edit[0]` replaced by `edit[1](array)`."""
    from safetensors.numpy import load_file, save_file

    shutil.copytree(src, dst)
    tensors = load_file(os.path.join(dst, "model.safetensors"))
    name = next(k for k in tensors if edit[0] in k)
    tensors[name] = edit[1](tensors[name])
    save_file(tensors, os.path.join(dst, "model.safetensors"))
    return name


def test_conversion_refuses_wrong_dtypes_and_nan(hf_folders, tmp_path, ledger):
    kw = dict(resampler=ResamplerConfig(num_latents=4, num_heads=4), projector=ProjectorConfig(hidden_size=48))
    for item, key, edit, pattern in [
        ("weights stored as int32", "embed_tokens", lambda a: (a * 100).astype(np.int32), "int32"),
        ("NaN weights", "layers.0.mlp.down_proj", lambda a: np.full_like(a, np.nan), "non-finite"),
    ]:
        src = str(tmp_path / item.replace(" ", "_"))
        name = _copy_hf(hf_folders["qwen"], src, (key, edit))
        out = str(tmp_path / (item.replace(" ", "_") + "_out"))
        _refused(ledger, SURFACE_W, f"HF folder with {item} ({name})",
                 lambda: convert(src, hf_folders["siglip"], out, **kw), (ConversionError, checkpoint.CheckpointError),
                 [pattern])
        assert not os.path.exists(os.path.join(out, checkpoint.CONFIG_FILE))


def test_model_folders(tiny_checkpoint, tmp_path, ledger):
    half = str(tmp_path / "half_written")
    shutil.copytree(tiny_checkpoint, half)
    os.remove(os.path.join(half, checkpoint.CONFIG_FILE))
    _refused(ledger, SURFACE_W, "model folder without its commit marker (ghostvis_config.json)",
             lambda: gv.load(half), checkpoint.CheckpointError, [half, "incomplete"])
    nan = str(tmp_path / "nan_params")
    shutil.copytree(tiny_checkpoint, nan)
    config = checkpoint.read_config(nan)
    params = checkpoint.load_params(nan, config)
    flat = traverse_util.flatten_dict(params)
    first = sorted(flat)[0]
    flat[first] = np.full(flat[first].shape, np.nan, np.float32)
    saver = ocp.StandardCheckpointer()
    saver.save(os.path.abspath(os.path.join(nan, "params")),
               traverse_util.unflatten_dict({k: np.asarray(v) for k, v in flat.items()}), force=True)
    saver.wait_until_finished()
    _refused(ledger, SURFACE_W, "model folder whose parameters hold NaN", lambda: gv.load(nan),
             checkpoint.CheckpointError, [nan, "NaN"])
    wrong = str(tmp_path / "wrong_config")
    shutil.copytree(tiny_checkpoint, wrong)
    cfg = json.load(open(os.path.join(wrong, checkpoint.CONFIG_FILE)))
    cfg["llm"]["hidden_size"] *= 2
    json.dump(cfg, open(os.path.join(wrong, checkpoint.CONFIG_FILE), "w"))
    _refused(ledger, SURFACE_W, "model folder whose parameters do not match its config", lambda: gv.load(wrong),
             checkpoint.CheckpointError,
             [wrong, "do not match", "llm/embed_tokens/embedding is (", "the config gives ("])
    old = str(tmp_path / "unfused_layout")
    shutil.copytree(tiny_checkpoint, old)
    unfused = {}
    for k, v in traverse_util.flatten_dict(checkpoint.load_params(old, config)).items():
        if "qkv_proj" in k:  # the layout before fusion: [D, N·H] / [D, K·H] kernels
            parts = np.split(np.asarray(v), [v.shape[-2] - 2, v.shape[-2] - 1], axis=-2)
            for name, part in zip(("q_proj", "k_proj", "v_proj"), parts):
                unfused[k[:-2] + (name, k[-1])] = part.reshape(part.shape[:-3] + (-1,)) if k[-1] == "kernel" \
                    else part.reshape(-1)
        elif "gate_up_proj" in k:
            unfused[k[:-2] + ("gate_proj", k[-1])], unfused[k[:-2] + ("up_proj", k[-1])] = np.asarray(v)[:, 0], \
                np.asarray(v)[:, 1]
        else:
            unfused[k] = np.asarray(v)
    saver.save(os.path.abspath(os.path.join(old, "params")), traverse_util.unflatten_dict(unfused), force=True)
    saver.wait_until_finished()
    _refused(ledger, SURFACE_W, "model folder from before the fused q|k|v and gate|up projections",
             lambda: gv.load(old), checkpoint.CheckpointError, [old, "gate_proj", "convert_torch_weights"])


BAD_CONFIGS = [
    ({"num_steps": 0}, r"config.num_steps must be a positive integer"),
    ({"num_steps": -5}, r"config.num_steps must be a positive integer"),
    ({"num_steps": "100"}, r"config.num_steps must be a positive integer"),
    ({"checkpoint_every": 2.5}, r"config.checkpoint_every must be a positive integer"),
    ({"data.batch_size": 0}, r"config.data.batch_size must be a positive integer"),
    ({"data.max_length": -1}, r"config.data.max_length must be a positive integer"),
    ({"max_steps_per_run": -1}, r"config.max_steps_per_run must be an integer >= 0"),
    ({"optim.llm_lr": -1e-3}, r"config.optim.llm_lr must be >= 0"),
    ({"mesh.data": 3}, r"config.mesh: .*does not divide 8 devices"),
    ({"mesh.tensor": 0}, r"config.mesh"),
    ({"data.batch_size": 6}, r"batch_size=6 .*not divisible by the batch axes data x fsdp = 8"),
    ({"mesh.data": 2, "mesh.fsdp": 4, "data.batch_size": 4}, r"batch_size=4 .*not divisible"),
    ({"stage": "pretrain"}, r"config.stage must be one of"),
    ({"init": "checkpoint", "init_checkpoint": "/no/such/model"}, r"no such folder '/no/such/model'"),
    ({"rows_per_device": 2}, r"data.batch_size=8 and config.rows_per_device=2 both set the rows per micro-batch"),
    ({"global_batch_size": 16, "grad_accum_steps": 2}, r"grad_accum_steps=2 and config.global_batch_size=16 both"),
    ({"global_batch_size": 20}, r"global_batch_size=20 is not a multiple of the rows per micro-batch, 8 "
                                r"\(data.batch_size 8 x 1 processes\)"),
    ({"rows_per_device": -1}, r"config.rows_per_device must be an integer >= 0, got -1"),
    ({"loss_chunk_tokens": 0}, r"config.loss_chunk_tokens must be a positive integer"),
    ({"loss_chunk_size": 2048}, r"config.loss_chunk_size \(tokens per row\) was replaced by config.loss_chunk_tokens"),
]


@pytest.mark.parametrize("override,message", BAD_CONFIGS, ids=[",".join(f"{k}={v}" for k, v in o.items())
                                                               for o, _ in BAD_CONFIGS])
def test_bad_config_is_refused_before_compiling(tmp_path, ledger, override, message):
    import re

    workdir = str(tmp_path / "w")
    item = ", ".join(f"{k}={v!r}" for k, v in override.items())
    try:
        run(tiny_train_config(workdir, **override))
    except TypeError as e:  # ml_collections' typed fields refuse a wrong type when the config is built
        key = next(iter(override)).split(".")[-1]
        ok = f"'{key}'" in str(e) and "cannot be casted" in str(e)
        ledger.record(SURFACE_C, item, "clear error" if ok else "crash", str(e)[:100])
        assert ok, str(e)
        return
    except ConfigError as e:
        ok = re.search(message, str(e)) is not None and not os.path.exists(os.path.join(workdir, "checkpoints"))
        ledger.record(SURFACE_C, item, "clear error" if ok else "crash", str(e)[:100])
        assert ok, str(e)
        return
    except Exception as e:  # noqa: BLE001
        ledger.record(SURFACE_C, item, "crash", repr(e)[:100])
        raise
    ledger.record(SURFACE_C, item, "silent corruption", "accepted")
    raise AssertionError(f"{item} accepted")


def test_cli_arguments(tmp_path, ledger, tiny_checkpoint):
    """Through the real command lines: unknown key, wrong type, bad values; each exits non-zero with a message and
    no traceback, before compiling."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    train = [sys.executable, "-m", "ghostvis_jax.train", "--config", os.path.join(REPO, "configs", "demo_align.py"),
             f"--config.workdir={tmp_path}/w", "--config.init=random", "--config.tokenizer=tiny"]
    chat = [sys.executable, "-m", "ghostvis_jax.chat", "--checkpoint", tiny_checkpoint]
    cases = [
        ("train: unknown key --config.num_stepz=3", train + ["--config.num_stepz=3"], "num_stepz"),
        ("train: wrong type --config.num_steps=abc", train + ["--config.num_steps=abc"], "num_steps"),
        ("train: --config.data.batch_size=-8", train + ["--config.data.batch_size=-8"], "config.data.batch_size"),
        ("train: --config.mesh.fsdp=3", train + ["--config.mesh.fsdp=3"], "config.mesh"),
        ("chat: --max-new-tokens abc", chat + ["--max-new-tokens", "abc"], "--max-new-tokens"),
        ("chat: missing checkpoint folder", [sys.executable, "-m", "ghostvis_jax.chat", "--checkpoint",
                                             str(tmp_path / "nope")], str(tmp_path / "nope")),
    ]
    for item, cmd, must in cases:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=REPO, env=env, input="")
        err = proc.stderr + proc.stdout
        ok = proc.returncode != 0 and must in err and "compiled" not in err
        clean = "Traceback" not in err
        outcome = "clear error" if ok and clean else "crash"
        ledger.record(SURFACE_C, item, outcome, (err.strip().splitlines() or [""])[-1][:100])
        assert ok, (item, proc.returncode, err[-2000:])
        assert clean, (item, err[-2000:])


def test_generate_arguments(tiny_model, ledger):
    for item, kwargs, must in [("temperature=-1", {"temperature": -1.0}, "temperature"),
                               ("top_p=0", {"top_p": 0.0}, "top_p"), ("top_k=-3", {"top_k": -3}, "top_k"),
                               ("max_new_tokens=0", {"max_new_tokens": 0}, "max_new_tokens"),
                               ("2 prompts, images for 1", {"images": [None]}, "prompts")]:
        prompts = ["hi", "there"] if "prompts" in must else "hi"
        _refused(ledger, SURFACE_C, f"generate({item})", lambda: tiny_model.generate(prompts, **kwargs), ValueError,
                 [must])
