"""The one table between PyTorch checkpoint keys and GhostVis JAX parameter paths, in both directions.

Each `Entry` says how one torch tensor becomes one or more JAX parameters (`to_jax`) and back (`to_torch`),
so import (tools/convert_torch_weights.py) and export (tools/export_hf.py) cannot drift apart.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ghostvis_jax.config import GhostVisConfig, QwenConfig, SiglipConfig

Path = tuple  # a parameter path inside the model state, e.g. ("llm", "layers", 0, "mlp", "up_proj", "kernel")

# How a torch tensor is laid out relative to ours.
COPY = "copy"            # same array
LINEAR = "linear"        # torch Linear weight [out, in] ↔ kernel [in, out]
CONV = "conv"            # torch Conv2d weight [out, in, kh, kw] ↔ [kh, kw, in, out]
QKV_WEIGHT = "qkv_w"     # nn.MultiheadAttention in_proj_weight [3D, D] ↔ three kernels [D, D]
QKV_BIAS = "qkv_b"       # in_proj_bias [3D] ↔ three biases [D]
LATENTS = "latents"      # [1, N, D] ↔ [N, D]


@dataclasses.dataclass(frozen=True)
class Entry:
    torch_key: str
    paths: tuple[Path, ...]
    kind: str

    def to_jax(self, x: np.ndarray) -> tuple[np.ndarray, ...]:
        if self.kind == COPY:
            return (x,)
        if self.kind == LINEAR:
            return (x.T,)
        if self.kind == CONV:
            return (x.transpose(2, 3, 1, 0),)
        if self.kind == QKV_WEIGHT:
            return tuple(w.T for w in np.split(x, 3, axis=0))
        if self.kind == QKV_BIAS:
            return tuple(np.split(x, 3, axis=0))
        if self.kind == LATENTS:
            return (x.reshape(x.shape[-2:]),)
        raise AssertionError(self.kind)

    def to_torch(self, xs: tuple[np.ndarray, ...]) -> np.ndarray:
        if self.kind == COPY:
            return xs[0]
        if self.kind == LINEAR:
            return xs[0].T
        if self.kind == CONV:
            return xs[0].transpose(3, 2, 0, 1)
        if self.kind == QKV_WEIGHT:
            return np.concatenate([w.T for w in xs], axis=0)
        if self.kind == QKV_BIAS:
            return np.concatenate(xs, axis=0)
        if self.kind == LATENTS:
            return xs[0][None]
        raise AssertionError(self.kind)


def _linear(torch_prefix: str, path: Path, bias: bool) -> list[Entry]:
    out = [Entry(f"{torch_prefix}.weight", (path + ("kernel",),), LINEAR)]
    if bias:
        out.append(Entry(f"{torch_prefix}.bias", (path + ("bias",),), COPY))
    return out


def _norm(torch_prefix: str, path: Path, bias: bool) -> list[Entry]:
    out = [Entry(f"{torch_prefix}.weight", (path + ("scale",),), COPY)]
    if bias:
        out.append(Entry(f"{torch_prefix}.bias", (path + ("bias",),), COPY))
    return out


def qwen_entries(cfg: QwenConfig) -> list[Entry]:
    """HF Qwen2ForCausalLM keys → ("llm", ...) paths."""
    root = ("llm",)
    out = [Entry("model.embed_tokens.weight", (root + ("embed_tokens", "embedding"),), COPY)]
    for i in range(cfg.num_layers):
        t, p = f"model.layers.{i}", root + ("layers", i)
        out += _norm(f"{t}.input_layernorm", p + ("input_layernorm",), bias=False)
        out += _norm(f"{t}.post_attention_layernorm", p + ("post_attention_layernorm",), bias=False)
        for name in ("q_proj", "k_proj", "v_proj"):
            out += _linear(f"{t}.self_attn.{name}", p + ("self_attn", name), bias=True)
        out += _linear(f"{t}.self_attn.o_proj", p + ("self_attn", "o_proj"), bias=False)
        for name in ("gate_proj", "up_proj", "down_proj"):
            out += _linear(f"{t}.mlp.{name}", p + ("mlp", name), bias=False)
    out += _norm("model.norm", root + ("norm",), bias=False)
    if not cfg.tie_word_embeddings:
        out += _linear("lm_head", root + ("lm_head",), bias=False)
    return out


def siglip_entries(cfg: SiglipConfig) -> list[Entry]:
    """HF SiglipVisionModel keys (the `vision_model.` prefix removed) → ("vision", ...) paths."""
    root = ("vision",)
    out = [
        Entry("embeddings.patch_embedding.weight", (root + ("patch_kernel",),), CONV),
        Entry("embeddings.patch_embedding.bias", (root + ("patch_bias",),), COPY),
        Entry("embeddings.position_embedding.weight", (root + ("position_embedding",),), COPY),
    ]
    for i in range(cfg.num_layers):
        t, p = f"encoder.layers.{i}", root + ("layers", i)
        out += _norm(f"{t}.layer_norm1", p + ("layer_norm1",), bias=True)
        out += _norm(f"{t}.layer_norm2", p + ("layer_norm2",), bias=True)
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            out += _linear(f"{t}.self_attn.{name}", p + ("self_attn", name), bias=True)
        out += _linear(f"{t}.mlp.fc1", p + ("mlp", "fc1"), bias=True)
        out += _linear(f"{t}.mlp.fc2", p + ("mlp", "fc2"), bias=True)
    out += _norm("post_layernorm", root + ("post_layernorm",), bias=True)
    return out


def adapter_entries(cfg: GhostVisConfig) -> list[Entry]:
    """The original GhostVis (nanovision) adapter keys → ("resampler", ...) / ("projector", ...) paths."""
    out = []
    if cfg.resampler.mode == "perceiver":
        r, rp = "vision_resampler", ("resampler",)
        out.append(Entry(f"{r}.queries", (rp + ("latents",),), LATENTS))
        for i in range(cfg.resampler.num_layers):
            t, p = f"{r}.layers.{i}", rp + ("blocks", i)
            out += _norm(f"{t}.norm1", p + ("norm1",), bias=True)
            out += _norm(f"{t}.norm2", p + ("norm2",), bias=True)
            qkv = tuple(p + ("cross_attn", n) for n in ("q_proj", "k_proj", "v_proj"))
            out.append(Entry(f"{t}.cross_attn.in_proj_weight", tuple(q + ("kernel",) for q in qkv), QKV_WEIGHT))
            out.append(Entry(f"{t}.cross_attn.in_proj_bias", tuple(q + ("bias",) for q in qkv), QKV_BIAS))
            out += _linear(f"{t}.cross_attn.out_proj", p + ("cross_attn", "out_proj"), bias=True)
            out += _linear(f"{t}.mlp.0", p + ("fc1",), bias=True)
            out += _linear(f"{t}.mlp.2", p + ("fc2",), bias=True)
    j, jp = "vision_projector.mlp", ("projector",)
    out += _linear(f"{j}.0", jp + ("fc1",), bias=True)
    out += _linear(f"{j}.3", jp + ("fc2",), bias=True)
    out += _norm(f"{j}.4", jp + ("norm",), bias=True)
    return out


# Keys present in real checkpoints that are deliberately not imported.
def ignored_qwen_key(key: str, cfg: QwenConfig) -> bool:
    return key.endswith("rotary_emb.inv_freq") or (cfg.tie_word_embeddings and key == "lm_head.weight")


def ignored_siglip_key(key: str) -> bool:
    """SigLIP's attention-pooling head, the text tower, the contrastive scale/bias, position-id buffers."""
    return (key.startswith(("head.", "text_model.")) or key in ("logit_scale", "logit_bias")
            or key.endswith("position_ids"))


def strip_vision_prefix(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Accept full SiglipModel (`vision_model.` / `text_model.` prefixes) and bare SiglipVisionModel keys."""
    out = {}
    for k, v in state.items():
        out[k[len("vision_model."):] if k.startswith("vision_model.") else k] = v
    return out
