"""Tiny random PyTorch / HF models in the real formats: numerical references for tests and the offline demo.

Builds (all offline, seconds on a CPU):
  * an HF Qwen2ForCausalLM folder (tied or untied embeddings) with the tiny tokenizer saved beside it,
  * an HF SigLIP folder (SiglipVisionModel, or a full SiglipModel with a text tower),
  * `TorchGhostVisAdapters`: the original GhostVis resampler + projector in its state-dict key layout,
  * `torch_reference_logits`: the full image+text forward done in torch.
Every parameter is re-drawn at random (HF zero-initializes biases), so a dropped bias or a transposed weight
changes the numbers.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from torch import nn

from ghostvis_jax.testing.tiny_tokenizer import build_tiny_tokenizer


def randomize_(module: nn.Module, seed: int, std: float = 0.08) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * std
            is_norm_scale = p.ndim == 1 and ("norm" in name or "layernorm" in name) and name.endswith("weight")
            p.copy_(1.0 + noise if is_norm_scale else noise)


def build_qwen(out_dir: str, *, tie_word_embeddings: bool = True, seed: int = 0, hidden_size: int = 64,
               num_layers: int = 2, with_tokenizer: bool = True, vocab_size: int | None = None):
    """Save a tiny Qwen2ForCausalLM (+ tokenizer) to out_dir; returns the torch model (eval mode, float32)."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    os.makedirs(out_dir, exist_ok=True)
    if with_tokenizer:
        build_tiny_tokenizer(out_dir)
        vocab_size = vocab_size or len(AutoTokenizer.from_pretrained(out_dir))
    cfg = Qwen2Config(vocab_size=vocab_size or 256, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                      num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, rope_theta=10000.0, rms_norm_eps=1e-6,
                      tie_word_embeddings=tie_word_embeddings)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(cfg).eval()
    randomize_(model, seed)
    if tie_word_embeddings:
        model.tie_weights()
    model.save_pretrained(out_dir)
    return model


def build_siglip(out_dir: str, *, seed: int = 1, full_model: bool = False, image_size: int = 32,
                 patch_size: int = 8, hidden_size: int = 64, num_layers: int = 2):
    """Save a tiny SigLIP tower to out_dir; returns the torch vision model (whose output is the reference)."""
    from transformers import SiglipConfig, SiglipModel, SiglipVisionConfig, SiglipVisionModel

    vcfg = SiglipVisionConfig(image_size=image_size, patch_size=patch_size, hidden_size=hidden_size,
                              intermediate_size=2 * hidden_size, num_hidden_layers=num_layers, num_attention_heads=4)
    torch.manual_seed(seed)
    if full_model:
        cfg = SiglipConfig(vision_config=vcfg.to_dict(),
                           text_config=dict(vocab_size=64, hidden_size=32, intermediate_size=64,
                                            num_hidden_layers=1, num_attention_heads=2))
        model = SiglipModel(cfg).eval()
    else:
        model = SiglipVisionModel(vcfg).eval()
    randomize_(model, seed)
    model.save_pretrained(out_dir)
    return model.vision_model if full_model else model


class _PerceiverLayer(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.cross_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, q, ctx):
        q = q + self.cross_attn(self.norm1(q), ctx, ctx, need_weights=False)[0]
        return q + self.mlp(self.norm2(q))


class _Resampler(nn.Module):
    def __init__(self, dim: int, num_latents: int, depth: int, heads: int):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(1, num_latents, dim) * 0.02)
        self.layers = nn.ModuleList([_PerceiverLayer(dim, heads) for _ in range(depth)])

    def forward(self, ctx):
        q = self.queries.expand(ctx.shape[0], -1, -1)
        for layer in self.layers:
            q = layer(q, ctx)
        return q


class _Projector(nn.Module):
    def __init__(self, in_dim: int, hidden: int, out_dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Dropout(0.0), nn.Linear(hidden, out_dim),
                                 nn.LayerNorm(out_dim))

    def forward(self, x):
        return self.mlp(x)


class TorchGhostVisAdapters(nn.Module):
    """The original GhostVis adapters; state-dict keys `vision_resampler.*` and `vision_projector.mlp.*`."""

    def __init__(self, vision_dim: int, llm_dim: int, *, num_latents: int = 4, depth: int = 2, heads: int = 4,
                 proj_hidden: int = 48, seed: int = 2):
        super().__init__()
        self.vision_resampler = _Resampler(vision_dim, num_latents, depth, heads)
        self.vision_projector = _Projector(vision_dim, proj_hidden, llm_dim)
        randomize_(self, seed)
        self.eval()

    def forward(self, patch_tokens):
        return self.vision_projector(self.vision_resampler(patch_tokens))


@torch.no_grad()
def torch_reference_logits(qwen, siglip, adapters, input_ids: np.ndarray, pixel_values_nhwc: np.ndarray | None,
                           image_token_id: int) -> np.ndarray:
    """The GhostVis forward in torch: image embeddings into the slots, then Qwen2ForCausalLM(inputs_embeds=...)."""
    ids = torch.as_tensor(np.asarray(input_ids), dtype=torch.long)
    embeds = qwen.get_input_embeddings()(ids)
    if pixel_values_nhwc is not None:
        px = torch.as_tensor(np.asarray(pixel_values_nhwc)).permute(0, 3, 1, 2).float()
        image_embeds = adapters(siglip(pixel_values=px).last_hidden_state)
        slots = ids == image_token_id
        embeds = embeds.clone()
        embeds[slots] = image_embeds.reshape(-1, image_embeds.shape[-1]).to(embeds.dtype)
    return qwen(inputs_embeds=embeds).logits.float().numpy()
