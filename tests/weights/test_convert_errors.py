"""The converter refuses bad weights with messages that name every offending key / file."""

import os
import pickle
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from ghostvis_jax.config import ProjectorConfig, ResamplerConfig
from ghostvis_jax.testing import tiny_models
from ghostvis_jax.weights.convert import ConversionError, convert
from ghostvis_jax.weights.readers import WeightFileError, read_weight_file

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SMALL = dict(resampler=ResamplerConfig(num_latents=4, num_heads=4), projector=ProjectorConfig(hidden_size=48))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("w")
    tiny_models.build_qwen(str(root / "qwen"), with_tokenizer=False, vocab_size=96)
    tiny_models.build_siglip(str(root / "siglip"))
    adapters = tiny_models.TorchGhostVisAdapters(64, 64, num_latents=4, heads=4, proj_hidden=48)
    return root, adapters.state_dict()


def _adapters_file(tmp_path, state):
    path = str(tmp_path / "adapters.pt")
    torch.save(state, path)
    return path


def test_good_adapters_convert(folders, tmp_path):
    root, state = folders
    report = convert(str(root / "qwen"), str(root / "siglip"), str(tmp_path / "out"),
                     adapters=_adapters_file(tmp_path, state), **SMALL)
    assert not report.adapters_initialized


def test_missing_key_is_named(folders, tmp_path):
    root, state = folders
    state = dict(state)
    del state["vision_resampler.layers.1.norm2.bias"]
    with pytest.raises(ConversionError, match=r"missing key 'vision_resampler\.layers\.1\.norm2\.bias'"):
        convert(str(root / "qwen"), str(root / "siglip"), str(tmp_path / "out"),
                adapters=_adapters_file(tmp_path, state), **SMALL)
    assert not os.path.exists(tmp_path / "out" / "ghostvis_config.json")


def test_extra_key_is_named(folders, tmp_path):
    root, state = folders
    state = dict(state, **{"vision_projector.extra.weight": torch.zeros(3)})
    with pytest.raises(ConversionError, match=r"unexpected key 'vision_projector\.extra\.weight' with shape \(3,\)"):
        convert(str(root / "qwen"), str(root / "siglip"), str(tmp_path / "out"),
                adapters=_adapters_file(tmp_path, state), **SMALL)


def test_wrong_shape_names_both_shapes(folders, tmp_path):
    root, state = folders
    state = dict(state, **{"vision_projector.mlp.0.weight": torch.zeros(40, 64)})
    with pytest.raises(ConversionError) as err:
        convert(str(root / "qwen"), str(root / "siglip"), str(tmp_path / "out"),
                adapters=_adapters_file(tmp_path, state), **SMALL)
    msg = str(err.value)
    assert "'vision_projector.mlp.0.weight' has shape (40, 64)" in msg and "expects (64, 48)" in msg


def test_every_problem_is_reported_at_once(folders, tmp_path):
    root, state = folders
    state = {k: v for k, v in state.items() if not k.startswith("vision_projector.mlp.4")}
    with pytest.raises(ConversionError, match=r"2 problem\(s\)"):
        convert(str(root / "qwen"), str(root / "siglip"), str(tmp_path / "out"),
                adapters=_adapters_file(tmp_path, state), **SMALL)


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/ghostvis_pickle_payload_ran",))


def test_pickle_payload_is_refused_and_never_runs(folders, tmp_path):
    marker = "/tmp/ghostvis_pickle_payload_ran"
    if os.path.exists(marker):
        os.remove(marker)
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"vision_projector.mlp.0.weight": _RunsCode()}, f)
    with pytest.raises(WeightFileError, match=r"evil\.pt: refused"):
        read_weight_file(str(path))
    assert not os.path.exists(marker)


def test_truncated_safetensors_is_named(folders, tmp_path):
    root, _ = folders
    data = open(root / "siglip" / "model.safetensors", "rb").read()
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightFileError, match=r"model\.safetensors: truncated"):
        read_weight_file(str(bad))


def test_bf16_safetensors_read_without_torch_numpy(tmp_path):
    save_file({"w": torch.arange(6, dtype=torch.bfloat16).reshape(2, 3)}, str(tmp_path / "x.safetensors"))
    got = read_weight_file(str(tmp_path / "x.safetensors"))["w"]
    assert str(got.dtype) == "bfloat16" and got.astype("float32").tolist() == [[0, 1, 2], [3, 4, 5]]


def test_sharded_safetensors_folder(folders, tmp_path):
    """An HF folder split into shards with an index converts like the single-file one."""
    import json
    import shutil

    root, _ = folders
    qwen = tmp_path / "qwen_sharded"
    shutil.copytree(root / "qwen", qwen)
    tensors = load_file(str(qwen / "model.safetensors"))
    os.remove(qwen / "model.safetensors")
    keys = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, ks in shards.items():
        save_file({k: tensors[k].contiguous() for k in ks}, str(qwen / name))
    with open(qwen / "model.safetensors.index.json", "w") as f:
        json.dump({"weight_map": {k: n for n, ks in shards.items() for k in ks}}, f)
    convert(str(qwen), str(root / "siglip"), str(tmp_path / "out"), **SMALL)
    assert os.path.exists(tmp_path / "out" / "ghostvis_config.json")


def test_cli_reports_error_and_exit_code(folders, tmp_path):
    root, _ = folders
    proc = subprocess.run([sys.executable, os.path.join(REPO, "tools", "convert_torch_weights.py"),
                           "--llm", str(root / "qwen"), "--vision", str(tmp_path / "nope"), "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 1
    assert "nope" in proc.stderr and "config.json" in proc.stderr


def test_fused_group_problems_name_the_key_and_not_its_partners(folders, tmp_path):
    """q|k|v and gate|up become one parameter each: a missing member is named alone (its present partner is not
    "unexpected"), and a member of the wrong shape is named with its shape and the fused parameter's."""
    root, _ = folders
    qwen = tmp_path / "qwen"
    qwen.mkdir()
    for name in os.listdir(root / "qwen"):
        if name != "model.safetensors":
            os.symlink(root / "qwen" / name, qwen / name)
    state = load_file(str(root / "qwen" / "model.safetensors"))
    del state["model.layers.1.mlp.up_proj.weight"]
    state["model.layers.0.self_attn.k_proj.weight"] = state["model.layers.0.self_attn.k_proj.weight"][:-2]
    save_file(state, str(qwen / "model.safetensors"))
    with pytest.raises(ConversionError) as err:
        convert(str(qwen), str(root / "siglip"), str(tmp_path / "out"), **SMALL)
    msg = str(err.value)
    assert "2 problem(s)" in msg and "missing key 'model.layers.1.mlp.up_proj.weight'" in msg
    assert "gate_proj" not in msg
    assert "'model.layers.0.self_attn.k_proj.weight' has shape (30, 64)" in msg and "qkv_proj/kernel" in msg
