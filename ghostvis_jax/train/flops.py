"""Frozen-aware matmul FLOPs, the formula of the shared benchmark README (so MFU compares like for like)."""

from __future__ import annotations

from ghostvis_jax.config import GhostVisConfig, QwenConfig, SiglipConfig

PEAK_BF16_FLOPS = 989e12  # H100 / H200 SXM dense bf16


def llm_flops_per_token(cfg: QwenConfig, seq: int, trainable_layers: int, *, full: bool) -> float:
    """Forward + activation gradients down to the input (the adapters sit below the decoder) + weight gradients
    of the trainable layers; `full`: every layer trains (3x forward)."""
    d, L, V = cfg.hidden_size, cfg.num_layers, cfg.vocab_size
    kv = cfg.num_kv_heads * cfg.head_dim
    q = cfg.num_heads * cfg.head_dim
    layer = 2 * (d * q + 2 * d * kv + q * d + 3 * d * cfg.intermediate_size)
    attn = 2 * seq * d  # QK^T and AV over the causal half
    head = 2 * d * V
    fwd = L * (layer + attn) + head
    if full:
        return 3 * fwd
    return fwd + (L * (layer + 2 * attn) + head) + trainable_layers * layer


def vision_flops_per_image(cfg: SiglipConfig) -> float:
    n, d, i = cfg.num_patches, cfg.hidden_size, cfg.intermediate_size
    return cfg.num_layers * (2 * n * (4 * d * d + 2 * d * i) + 4 * n * n * d)


def adapter_params(cfg: GhostVisConfig) -> int:
    dv, dl, h = cfg.vision.hidden_size, cfg.llm.hidden_size, cfg.projector.hidden_size
    proj = dv * h + h + h * dl + dl + 2 * dl
    res = 0
    if cfg.resampler.mode == "perceiver":
        per_block = 4 * (dv * dv + dv) + 2 * (2 * dv) + 2 * dv * cfg.resampler.mlp_ratio * dv + \
            dv * cfg.resampler.mlp_ratio + dv
        res = cfg.resampler.num_latents * dv + cfg.resampler.num_layers * per_block
    return proj + res


def train_step_flops(cfg: GhostVisConfig, *, stage: str, batch: int, seq: int, num_images: int,
                     trainable_layers: int) -> float:
    """FLOPs of one train step on `batch` rows of `seq` tokens holding `num_images` images."""
    full = stage == "full"
    unfrozen = trainable_layers if stage == "sft" else (cfg.llm.num_layers if full else 0)
    llm = llm_flops_per_token(cfg.llm, seq, unfrozen, full=full) * batch * seq
    if num_images == 0:
        return llm
    adapters = 6 * adapter_params(cfg) * num_images * cfg.num_image_tokens
    return llm + adapters + vision_flops_per_image(cfg.vision) * num_images
