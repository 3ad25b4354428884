"""The one table between PyTorch checkpoint keys and GhostVis JAX parameter paths, in both directions.

Each `Entry` says how some torch tensors become some JAX parameters (`to_jax`) and back (`to_torch`): one
tensor → one parameter (most), one → three (an nn.MultiheadAttention in_proj), or several → one (our fused
q|k|v and gate|up projections). Import (tools/convert_torch_weights.py) and export (tools/export_hf.py) both
read this table, so they cannot drift apart.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ghostvis_jax.config import GhostVisConfig, QwenConfig, SiglipConfig

Path = tuple  # a parameter path inside the model state, e.g. ("llm", "layers", 0, "mlp", "down_proj", "kernel")

# How torch tensors are laid out relative to ours.
COPY = "copy"            # same array
LINEAR = "linear"        # torch Linear weight [out, in] ↔ kernel [in, out]
CONV = "conv"            # torch Conv2d weight [out, in, kh, kw] ↔ [kh, kw, in, out]
QKV_WEIGHT = "qkv_w"     # nn.MultiheadAttention in_proj_weight [3D, D] ↔ three kernels [D, D]
QKV_BIAS = "qkv_b"       # in_proj_bias [3D] ↔ three biases [D]
LATENTS = "latents"      # [1, N, D] ↔ [N, D]
STACKED = "stacked"      # k Linear weights [out, in] (or biases [out]) ↔ one [in, k, *part] kernel ([k, *part] bias)
GROUPED_QKV = "grouped"  # q, k, v Linear weights (or biases) ↔ one [in, K, G + 2, H] kernel ([K, G + 2, H] bias)


def _out_last(x: np.ndarray) -> np.ndarray:
    """A torch Linear weight [out, in] → [in, out]; a bias [out] stays."""
    return x.T if x.ndim == 2 else x


@dataclasses.dataclass(frozen=True)
class Entry:
    torch_keys: tuple[str, ...]
    paths: tuple[Path, ...]
    kind: str
    part_shape: tuple[int, ...] = ()  # STACKED: each part's output shape; GROUPED_QKV: (K, H)

    def to_jax(self, xs: tuple[np.ndarray, ...]) -> tuple[np.ndarray, ...]:
        x = xs[0]
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
        if self.kind == STACKED:
            parts = [_out_last(p) for p in xs]
            parts = [p.reshape(p.shape[:-1] + self.part_shape) for p in parts]
            return (np.stack(parts, axis=-1 - len(self.part_shape)),)
        if self.kind == GROUPED_QKV:
            kv, h = self.part_shape
            parts = [_out_last(p) for p in xs]
            return (np.concatenate([p.reshape(p.shape[:-1] + (kv, -1, h)) for p in parts], axis=-2),)
        raise AssertionError(self.kind)

    def to_torch(self, xs: tuple[np.ndarray, ...]) -> tuple[np.ndarray, ...]:
        x = xs[0]
        if self.kind == COPY:
            return (x,)
        if self.kind == LINEAR:
            return (x.T,)
        if self.kind == CONV:
            return (x.transpose(3, 2, 0, 1),)
        if self.kind == QKV_WEIGHT:
            return (np.concatenate([w.T for w in xs], axis=0),)
        if self.kind == QKV_BIAS:
            return (np.concatenate(xs, axis=0),)
        if self.kind == LATENTS:
            return (x[None],)
        if self.kind == STACKED:
            axis = x.ndim - 1 - len(self.part_shape)
            parts = [np.take(x, i, axis=axis) for i in range(x.shape[axis])]
            lead = x.shape[:axis]
            return tuple(_out_last(p.reshape(lead + (-1,))) for p in parts)
        if self.kind == GROUPED_QKV:
            group = x.shape[-2] - 2
            q, k, v = np.split(x, [group, group + 1], axis=-2)
            lead = x.shape[:-3]
            return tuple(_out_last(p.reshape(lead + (-1,))) for p in (q, k, v))
        raise AssertionError(self.kind)


def _linear(torch_prefix: str, path: Path, bias: bool) -> list[Entry]:
    out = [Entry((f"{torch_prefix}.weight",), (path + ("kernel",),), LINEAR)]
    if bias:
        out.append(Entry((f"{torch_prefix}.bias",), (path + ("bias",),), COPY))
    return out


def _fused(torch_prefixes: list[str], path: Path, bias: bool, kind: str, part_shape: tuple) -> list[Entry]:
    """Several torch Linears → one fused Dense at `path` (weights, then biases)."""
    out = [Entry(tuple(f"{t}.weight" for t in torch_prefixes), (path + ("kernel",),), kind, part_shape)]
    if bias:
        out.append(Entry(tuple(f"{t}.bias" for t in torch_prefixes), (path + ("bias",),), kind, part_shape))
    return out


def _norm(torch_prefix: str, path: Path, bias: bool) -> list[Entry]:
    out = [Entry((f"{torch_prefix}.weight",), (path + ("scale",),), COPY)]
    if bias:
        out.append(Entry((f"{torch_prefix}.bias",), (path + ("bias",),), COPY))
    return out


def qwen_entries(cfg: QwenConfig) -> list[Entry]:
    """HF Qwen2ForCausalLM keys → ("llm", ...) paths."""
    root = ("llm",)
    out = [Entry(("model.embed_tokens.weight",), (root + ("embed_tokens", "embedding"),), COPY)]
    for i in range(cfg.num_layers):
        t, p = f"model.layers.{i}", root + ("layers", i)
        out += _norm(f"{t}.input_layernorm", p + ("input_layernorm",), bias=False)
        out += _norm(f"{t}.post_attention_layernorm", p + ("post_attention_layernorm",), bias=False)
        out += _fused([f"{t}.self_attn.{n}" for n in ("q_proj", "k_proj", "v_proj")], p + ("self_attn", "qkv_proj"),
                      True, GROUPED_QKV, (cfg.num_kv_heads, cfg.head_dim))
        out += _linear(f"{t}.self_attn.o_proj", p + ("self_attn", "o_proj"), bias=False)
        out += _fused([f"{t}.mlp.gate_proj", f"{t}.mlp.up_proj"], p + ("mlp", "gate_up_proj"), False, STACKED,
                      (cfg.intermediate_size,))
        out += _linear(f"{t}.mlp.down_proj", p + ("mlp", "down_proj"), bias=False)
    out += _norm("model.norm", root + ("norm",), bias=False)
    if not cfg.tie_word_embeddings:
        out += _linear("lm_head", root + ("lm_head",), bias=False)
    return out


def siglip_entries(cfg: SiglipConfig) -> list[Entry]:
    """HF SiglipVisionModel keys (the `vision_model.` prefix removed) → ("vision", ...) paths."""
    root = ("vision",)
    out = [
        Entry(("embeddings.patch_embedding.weight",), (root + ("patch_kernel",),), CONV),
        Entry(("embeddings.patch_embedding.bias",), (root + ("patch_bias",),), COPY),
        Entry(("embeddings.position_embedding.weight",), (root + ("position_embedding",),), COPY),
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
        out.append(Entry((f"{r}.queries",), (rp + ("latents",),), LATENTS))
        for i in range(cfg.resampler.num_layers):
            t, p = f"{r}.layers.{i}", rp + ("blocks", i)
            out += _norm(f"{t}.norm1", p + ("norm1",), bias=True)
            out += _norm(f"{t}.norm2", p + ("norm2",), bias=True)
            qkv = tuple(p + ("cross_attn", n) for n in ("q_proj", "k_proj", "v_proj"))
            out.append(Entry((f"{t}.cross_attn.in_proj_weight",), tuple(q + ("kernel",) for q in qkv), QKV_WEIGHT))
            out.append(Entry((f"{t}.cross_attn.in_proj_bias",), tuple(q + ("bias",) for q in qkv), QKV_BIAS))
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
