"""Converted tiny HF / torch models give the same numbers in JAX (float32, relative error ≤ 1e-4)."""


import jax.numpy as jnp
import numpy as np
import pytest
import torch

import ghostvis_jax as gv
from ghostvis_jax.config import ProjectorConfig, ResamplerConfig
from ghostvis_jax.testing import tiny_models
from ghostvis_jax.weights.convert import convert

NUM_LATENTS = 4


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    qwen = tiny_models.build_qwen(str(root / "qwen"), tie_word_embeddings=True)
    siglip = tiny_models.build_siglip(str(root / "siglip"), full_model=True)
    adapters = tiny_models.TorchGhostVisAdapters(64, 64, num_latents=NUM_LATENTS, heads=4, proj_hidden=48)
    torch.save(adapters.state_dict(), root / "adapters.pt")
    out = str(root / "ckpt")
    report = convert(str(root / "qwen"), str(root / "siglip"), out, adapters=str(root / "adapters.pt"),
                     resampler=ResamplerConfig(num_latents=NUM_LATENTS, num_heads=4),
                     projector=ProjectorConfig(hidden_size=48))
    return dict(root=root, qwen=qwen, siglip=siglip, adapters=adapters, ckpt=out, report=report, model=gv.load(out))


def _ids_with_images(model, num_images, length=24, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, model.config.llm.vocab_size - 10, size=(2, length))
    ids[ids == model.config.image_token_id] = 5
    n = model.config.num_image_tokens
    ids[0, 2:2 + n] = model.config.image_token_id          # image 0 in row 0
    if num_images > 1:
        ids[1, 5:5 + n] = model.config.image_token_id      # image 1 in row 1
        ids[1, 12:12 + n] = model.config.image_token_id    # image 2 in row 1
    return ids


def test_converter_lists_ignored_keys_and_copies_tokenizer(tiny):
    ignored = " ".join(tiny["report"].ignored_keys)
    assert "text_model." in ignored and "head." in ignored  # full SiglipModel: text tower and pooling head
    assert tiny["model"].tokenizer is not None
    assert tiny["model"].config.image_token_id == tiny["model"].tokenizer.convert_tokens_to_ids("<|image_pad|>")


def test_decoder_logits_match_hf(tiny):
    ids = np.random.default_rng(1).integers(0, tiny["model"].config.llm.vocab_size, size=(2, 16))
    want = tiny["qwen"](torch.as_tensor(ids)).logits.detach().numpy()
    got = tiny["model"].forward(ids)
    assert rel_err(got, want) <= 1e-4


def test_tower_patch_tokens_match_hf(tiny):
    px = np.random.default_rng(2).normal(size=(3, 32, 32, 3)).astype(np.float32)
    want = tiny["siglip"](pixel_values=torch.as_tensor(px).permute(0, 3, 1, 2)).last_hidden_state.detach().numpy()
    got = tiny["model"].vision_features(px)
    assert got.shape == (3, 16, 64)
    assert rel_err(got, want) <= 1e-4


def test_image_text_forward_matches_torch(tiny):
    model = tiny["model"]
    ids = _ids_with_images(model, num_images=3)
    px = np.random.default_rng(3).normal(size=(3, 32, 32, 3)).astype(np.float32)
    want = tiny_models.torch_reference_logits(tiny["qwen"], tiny["siglip"], tiny["adapters"], ids, px,
                                              model.config.image_token_id)
    got = model.forward(ids, px)
    assert rel_err(got, want) <= 1e-4
    emb = model.encode_images(px)
    with torch.no_grad():
        ref = tiny["adapters"](tiny["siglip"](pixel_values=torch.as_tensor(px).permute(0, 3, 1, 2)).last_hidden_state)
    assert emb.shape == (3, NUM_LATENTS, 64) and rel_err(emb, ref.numpy()) <= 1e-4


def test_slot_count_mismatch_is_a_clear_error(tiny):
    model = tiny["model"]
    ids = _ids_with_images(model, num_images=3)
    px = np.zeros((2, 32, 32, 3), np.float32)
    with pytest.raises(ValueError, match=r"12 image slots .* 2 image\(s\)"):
        model.forward(ids, px)


def test_untied_embeddings_match_hf(tmp_path):
    qwen = tiny_models.build_qwen(str(tmp_path / "qwen"), tie_word_embeddings=False, seed=5)
    tiny_models.build_siglip(str(tmp_path / "siglip"))  # SiglipVisionModel: no prefix
    convert(str(tmp_path / "qwen"), str(tmp_path / "siglip"), str(tmp_path / "ckpt"),
            resampler=ResamplerConfig(num_latents=NUM_LATENTS, num_heads=4), projector=ProjectorConfig(hidden_size=48))
    model = gv.load(str(tmp_path / "ckpt"))
    assert model.model.llm.lm_head is not None
    ids = np.arange(20, 40).reshape(2, 10)
    assert rel_err(model.forward(ids), qwen(torch.as_tensor(ids)).logits.detach().numpy()) <= 1e-4


@pytest.mark.parametrize("corruption", ["transpose_q_proj", "drop_k_bias"])
def test_parity_check_catches_a_corrupted_weight(tiny, tmp_path, corruption):
    """The same comparison fails when a weight is transposed or a bias dropped: the tests can fail."""
    model = gv.load(tiny["ckpt"])
    attn = model.model.llm.layers[0].self_attn
    w, g = attn.qkv_proj.kernel[...], attn.group
    if corruption == "transpose_q_proj":  # q as [D, N*H] is square (64x64): a shape-preserving corruption
        q = w[:, :, :g].reshape(w.shape[0], -1)
        attn.qkv_proj.kernel[...] = w.at[:, :, :g].set(q.T.reshape(w[:, :, :g].shape))
    else:
        attn.qkv_proj.bias[...] = attn.qkv_proj.bias[...].at[:, g].set(0.0)
    corrupted = gv.GhostVis(model.model, model.config)
    ids = np.random.default_rng(1).integers(0, model.config.llm.vocab_size, size=(2, 16))
    want = tiny["qwen"](torch.as_tensor(ids)).logits.detach().numpy()
    assert rel_err(corrupted.forward(ids), want) > 1e-3


def test_avgpool_resampler_matches_torch_adaptive_pool():
    from flax import nnx

    from ghostvis_jax.model.resampler import AvgPoolResampler

    x = np.random.default_rng(4).normal(size=(2, 729, 8)).astype(np.float32)  # 27x27 grid → 8x8: uneven bins
    pool = AvgPoolResampler(729, ResamplerConfig(mode="avgpool", num_latents=64))
    got = pool(jnp.asarray(x))
    grid = torch.as_tensor(x).reshape(2, 27, 27, 8).permute(0, 3, 1, 2)
    want = torch.nn.functional.adaptive_avg_pool2d(grid, 8).permute(0, 2, 3, 1).reshape(2, 64, 8).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert not nnx.state(pool, nnx.Param)


def test_tower_with_remainder_pixels_matches_hf(tiny, tmp_path):
    """36 px with 8 px patches: like So400m/14 at 384 px, the convolution drops the remainder."""
    siglip = tiny_models.build_siglip(str(tmp_path / "siglip36"), image_size=36)
    convert(str(tiny["root"] / "qwen"), str(tmp_path / "siglip36"), str(tmp_path / "ckpt"),
            resampler=ResamplerConfig(num_latents=NUM_LATENTS, num_heads=4), projector=ProjectorConfig(hidden_size=48))
    px = np.random.default_rng(6).normal(size=(2, 36, 36, 3)).astype(np.float32)
    want = siglip(pixel_values=torch.as_tensor(px).permute(0, 3, 1, 2)).last_hidden_state.detach().numpy()
    assert rel_err(gv.load(str(tmp_path / "ckpt")).vision_features(px), want) <= 1e-4
