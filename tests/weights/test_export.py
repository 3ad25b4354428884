"""Export: torch folders → convert → export gives back the original tensors bit for bit, converts back to the same
checkpoint, and transformers loads the exported folders and reproduces the JAX numbers."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from flax import traverse_util
from safetensors.torch import load_file

import ghostvis_jax as gv
from ghostvis_jax import checkpoint
from ghostvis_jax.config import ProjectorConfig, QwenConfig, ResamplerConfig
from ghostvis_jax.testing import tiny_models
from ghostvis_jax.weights import mapping
from ghostvis_jax.weights.convert import convert
from ghostvis_jax.weights.export import ExportError, export

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NUM_LATENTS = 4
SMALL = dict(resampler=ResamplerConfig(num_latents=NUM_LATENTS, num_heads=4), projector=ProjectorConfig(hidden_size=48))


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def assert_same_tensors(got: dict, want: dict) -> None:
    """Same keys, and per key the same dtype, shape and bits."""
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, k
        assert torch.equal(got[k], want[k]), f"{k} differs"


def flat_params(ckpt: str) -> dict:
    config = checkpoint.read_config(ckpt)
    params = checkpoint.load_params(ckpt, config)
    return {p: np.asarray(x) for p, x in traverse_util.flatten_dict(params).items()}


def assert_same_checkpoint(got: str, want: str) -> None:
    assert checkpoint.read_config(got) == checkpoint.read_config(want)
    a, b = flat_params(got), flat_params(want)
    assert sorted(a) == sorted(b)
    for p in b:
        assert np.array_equal(a[p].view(np.uint32), b[p].view(np.uint32)), "/".join(map(str, p))


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Tiny torch originals: tied Qwen + full SiglipModel, untied Qwen + SiglipVisionModel, and adapters."""
    root = tmp_path_factory.mktemp("sources")
    out = {"root": root}
    out["qwen_tied"] = tiny_models.build_qwen(str(root / "qwen_tied"), tie_word_embeddings=True)
    out["qwen_untied"] = tiny_models.build_qwen(str(root / "qwen_untied"), tie_word_embeddings=False, seed=5)
    out["siglip_full"] = tiny_models.build_siglip(str(root / "siglip_full"), full_model=True)
    out["siglip_vision"] = tiny_models.build_siglip(str(root / "siglip_vision"), seed=3)
    out["adapters"] = tiny_models.TorchGhostVisAdapters(64, 64, num_latents=NUM_LATENTS, heads=4, proj_hidden=48)
    torch.save(out["adapters"].state_dict(), root / "adapters.pt")
    return out


CASES = {"tied": ("qwen_tied", "siglip_full"), "untied": ("qwen_untied", "siglip_vision")}


@pytest.fixture(scope="module", params=sorted(CASES))
def exported(request, sources, tmp_path_factory):
    """One case converted (float32) and exported with default settings."""
    qwen, siglip = CASES[request.param]
    root, work = sources["root"], tmp_path_factory.mktemp(request.param)
    ckpt, out = str(work / "ckpt"), str(work / "export")
    convert(str(root / qwen), str(root / siglip), ckpt, adapters=str(root / "adapters.pt"), **SMALL)
    report = export(ckpt, out)
    return dict(case=request.param, qwen_dir=root / qwen, siglip_dir=root / siglip, qwen=sources[qwen],
                siglip=sources[siglip], adapters=sources["adapters"], adapters_pt=root / "adapters.pt",
                ckpt=ckpt, out=out, report=report, work=work)


# ---- (1) bit-exact round trip -------------------------------------------------------------------------------------

def test_decoder_tensors_are_the_originals(exported):
    original = load_file(str(exported["qwen_dir"] / "model.safetensors"))
    cfg = QwenConfig.from_hf(json.load(open(exported["qwen_dir"] / "config.json")))
    want = {k: v for k, v in original.items() if not mapping.ignored_qwen_key(k, cfg)}
    got = load_file(os.path.join(exported["out"], "llm", "model.safetensors"))
    assert_same_tensors(got, want)
    assert ("lm_head.weight" in got) == (exported["case"] == "untied")


def test_tower_tensors_are_the_originals_in_siglip_vision_layout(exported):
    """The pooling head (and, from a full SiglipModel, the text tower) are not GhostVis and are not written."""
    original = load_file(str(exported["siglip_dir"] / "model.safetensors"))
    want = {"vision_model." + k: v for k, v in mapping.strip_vision_prefix(original).items()
            if not mapping.ignored_siglip_key(k)}
    got = load_file(os.path.join(exported["out"], "vision", "model.safetensors"))
    assert_same_tensors(got, want)


def test_adapters_are_the_original_state_dict(exported):
    want = torch.load(exported["adapters_pt"], weights_only=True)
    assert_same_tensors(torch.load(os.path.join(exported["out"], "adapters.pt"), weights_only=True), want)
    assert_same_tensors(load_file(os.path.join(exported["out"], "adapters.safetensors")), want)
    # ... and loads strictly into the original modules.
    tiny_models.TorchGhostVisAdapters(64, 64, num_latents=NUM_LATENTS, heads=4, proj_hidden=48,
                                      seed=9).load_state_dict(want, strict=True)


def test_converting_the_export_gives_the_same_checkpoint(exported):
    out, again = exported["out"], str(exported["work"] / "ckpt_again")
    convert(os.path.join(out, "llm"), os.path.join(out, "vision"), again,
            adapters=os.path.join(out, "adapters.pt"), **SMALL)
    assert_same_checkpoint(again, exported["ckpt"])


def test_bfloat16_checkpoint_exports_bfloat16_and_round_trips(sources, tmp_path):
    root = sources["root"]
    ckpt, out, again = str(tmp_path / "ckpt"), str(tmp_path / "export"), str(tmp_path / "again")
    convert(str(root / "qwen_untied"), str(root / "siglip_vision"), ckpt, adapters=str(root / "adapters.pt"),
            dtype="bfloat16", **SMALL)
    report = export(ckpt, out)  # default: the stored dtype
    assert report.dtype == "bfloat16"
    assert json.load(open(os.path.join(out, "llm", "config.json")))["torch_dtype"] == "bfloat16"
    want = {k: v.to(torch.bfloat16) for k, v in load_file(str(root / "qwen_untied" / "model.safetensors")).items()}
    assert_same_tensors(load_file(os.path.join(out, "llm", "model.safetensors")), want)
    convert(os.path.join(out, "llm"), os.path.join(out, "vision"), again, adapters=os.path.join(out, "adapters.pt"),
            dtype="bfloat16", **SMALL)
    a, b = flat_params(again), flat_params(ckpt)
    assert all(np.array_equal(a[p], b[p]) for p in b)


def test_float32_export_of_a_bfloat16_checkpoint_is_exact(sources, tmp_path):
    root = sources["root"]
    convert(str(root / "qwen_tied"), str(root / "siglip_vision"), str(tmp_path / "ckpt"), dtype="bfloat16", **SMALL)
    export(str(tmp_path / "ckpt"), str(tmp_path / "bf16"))
    export(str(tmp_path / "ckpt"), str(tmp_path / "f32"), dtype="float32")
    bf16 = load_file(str(tmp_path / "bf16" / "vision" / "model.safetensors"))
    f32 = load_file(str(tmp_path / "f32" / "vision" / "model.safetensors"))
    assert all(f32[k].dtype == torch.float32 and torch.equal(f32[k], bf16[k].float()) for k in bf16)


def test_avgpool_checkpoint_exports_the_projector_only(sources, tmp_path):
    root = sources["root"]
    avgpool = dict(SMALL, resampler=ResamplerConfig(mode="avgpool", num_latents=NUM_LATENTS))
    ckpt, again = str(tmp_path / "ckpt"), str(tmp_path / "again")
    convert(str(root / "qwen_tied"), str(root / "siglip_vision"), ckpt, **avgpool)  # fresh projector
    export(ckpt, str(tmp_path / "export"))
    state = torch.load(tmp_path / "export" / "adapters.pt", weights_only=True)
    assert state and all(k.startswith("vision_projector.mlp.") for k in state)
    convert(str(tmp_path / "export" / "llm"), str(tmp_path / "export" / "vision"), again,
            adapters=str(tmp_path / "export" / "adapters.pt"), **avgpool)
    assert_same_checkpoint(again, ckpt)


# ---- (2) transformers loads the export and reproduces the JAX numbers ---------------------------------------------

def test_transformers_decoder_reproduces_jax_logits(exported):
    from transformers import AutoTokenizer, Qwen2ForCausalLM

    hf, info = Qwen2ForCausalLM.from_pretrained(os.path.join(exported["out"], "llm"), output_loading_info=True)
    assert not any(info.values()), info  # nothing missing, unexpected or freshly initialized
    assert hf.config.tie_word_embeddings == (exported["case"] == "tied")
    model = gv.load(exported["ckpt"])
    ids = np.random.default_rng(1).integers(0, model.config.llm.vocab_size, size=(2, 16))
    ids[ids == model.config.image_token_id] = 5
    with torch.no_grad():
        want = hf.eval()(torch.as_tensor(ids)).logits.numpy()
    assert rel_err(model.forward(ids), want) <= 1e-4
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(exported["out"], "llm"))
    assert tokenizer.convert_tokens_to_ids("<|image_pad|>") == model.config.image_token_id


def test_transformers_tower_reproduces_jax_patch_tokens(exported):
    from transformers import AutoImageProcessor, SiglipVisionModel

    vision_dir = os.path.join(exported["out"], "vision")
    hf, info = SiglipVisionModel.from_pretrained(vision_dir, output_loading_info=True)
    assert not any(info.values()), info
    model = gv.load(exported["ckpt"])
    px = np.random.default_rng(2).normal(size=(3, 32, 32, 3)).astype(np.float32)
    with torch.no_grad():
        want = hf.eval()(pixel_values=torch.as_tensor(px).permute(0, 3, 1, 2)).last_hidden_state.numpy()
    assert rel_err(model.vision_features(px), want) <= 1e-4
    processor = AutoImageProcessor.from_pretrained(vision_dir)
    vision = model.config.vision
    assert tuple(processor.image_mean) == vision.image_mean and tuple(processor.image_std) == vision.image_std
    assert processor.size["height"] == processor.size["width"] == vision.image_size


def test_exported_adapters_reproduce_jax_image_embeddings(exported):
    adapters = tiny_models.TorchGhostVisAdapters(64, 64, num_latents=NUM_LATENTS, heads=4, proj_hidden=48, seed=9)
    adapters.load_state_dict(torch.load(os.path.join(exported["out"], "adapters.pt"), weights_only=True))
    model = gv.load(exported["ckpt"])
    px = np.random.default_rng(3).normal(size=(2, 32, 32, 3)).astype(np.float32)
    with torch.no_grad():
        want = adapters(torch.as_tensor(np.array(model.vision_features(px)))).numpy()
    assert rel_err(model.encode_images(px), want) <= 1e-4


# ---- (3) errors name the thing ------------------------------------------------------------------------------------

def test_non_empty_output_needs_force(exported, tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match=r"busy: output folder is not empty .*--force"):
        export(exported["ckpt"], str(out))
    export(exported["ckpt"], str(out), force=True)
    export(exported["ckpt"], str(out), force=True)  # over an earlier export
    assert (out / "notes.txt").read_text() == "mine" and (out / "llm" / "model.safetensors").exists()


def test_incomplete_checkpoint_is_named(exported, tmp_path):
    (tmp_path / "half").mkdir()
    with pytest.raises(ExportError, match=r"half: incomplete checkpoint — ghostvis_config\.json is missing"):
        export(str(tmp_path / "half"), str(tmp_path / "out"))
    with pytest.raises(ExportError, match=r"--dtype must be one of"):
        export(exported["ckpt"], str(tmp_path / "out"), dtype="float16")
    with pytest.raises(ExportError, match=r"the output folder is the checkpoint itself"):
        export(exported["ckpt"], exported["ckpt"], force=True)


def test_cli_missing_checkpoint_exit_code_and_message(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(REPO, "tools", "export_hf.py"),
                           "--checkpoint", str(tmp_path / "nope"), "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 1
    assert proc.stderr.strip() == f"error: {tmp_path / 'nope'}: no such checkpoint folder"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("exported", ["tied"], indirect=True)
def test_cli_writes_the_export(exported, tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(REPO, "tools", "export_hf.py"),
                           "--checkpoint", exported["ckpt"], "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert "in float32" in proc.stdout and "to convert back: python tools/convert_torch_weights.py" in proc.stdout
    for name in ("llm/config.json", "llm/model.safetensors", "llm/tokenizer.json", "vision/config.json",
                 "vision/preprocessor_config.json", "vision/model.safetensors", "adapters.pt",
                 "adapters.safetensors"):
        assert (tmp_path / "out" / name).exists(), name
