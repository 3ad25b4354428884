"""The Qwen2 / Qwen2.5 decoder: embedding, RMSNorm, RoPE, grouped-query attention with q/k/v biases,
SwiGLU MLP, tied or untied LM head. Layers are unrolled so any suffix of them can be trained alone.

A fixed-size KV cache is optional: pass `cache` (one {"k", "v"} dict of [B, S, K, H] per layer) and
`cache_index` (where the T new tokens are written) and an explicit attention `mask`: boolean [B, 1, T, S], or a
`KeyRange` for a decode step (model/attention.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ghostvis_jax.config import QwenConfig
from ghostvis_jax.model.attention import KeyRange, attention, pick_implementation
from ghostvis_jax.model.layers import Dense, Embed, RMSNorm, use
from ghostvis_jax.model.rope import rope_cos_sin, split_qkv_rope
from ghostvis_jax.model.swiglu import swiglu
from ghostvis_jax.sharding import constrain_batch

KVCache = list[dict[str, jax.Array]]


class Qwen2Attention(nnx.Module):
    """q, k and v come from one fused projection laid out per kv head: kernel [D, K, G + 2, H] holds, for kv
    head j, its G = N / K query heads (HF's q heads j·G … j·G + G − 1), then k_j, then v_j. One GEMM instead of
    three, RoPE in one pass over [q|k], and sharding over kv heads keeps each group on one device."""

    def __init__(self, cfg: QwenConfig, *, rngs: nnx.Rngs, dtype, param_dtype):
        d, h, kv = cfg.hidden_size, cfg.head_dim, cfg.num_kv_heads
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.group = cfg.num_heads // kv
        self.qkv_proj = Dense(d, (kv, self.group + 2, h), use_bias=True, axes=("embed", "kv_heads", None, None),
                              **kw)
        self.o_proj = Dense(cfg.num_heads * h, d, use_bias=False, axes=("heads", "embed"), **kw)
        self.num_heads, self.head_dim = cfg.num_heads, h
        self.attn_impl: str | None = None

    def __call__(self, x, cos, sin, mask=None, cache=None, cache_index=None):
        b, t, _ = x.shape
        qkv = self.qkv_proj.decode_step(x) if cache is not None and t == 1 else self.qkv_proj(x)  # [B,T,K,G+2,H]
        if cache is not None and self._fused_decode_step(qkv, cache["k"], mask):
            # One kernel: RoPE on q and the new k, both cache writes, attention (the step's key range must be
            # the row's earlier keys and the new token at cache_index, as generate/decoding.py builds it).
            from ghostvis_jax.model.decode_attention import decode_step_attention  # Pallas: only where used

            out, k, v = decode_step_attention(qkv[:, 0], cos[:, 0], sin[:, 0], cache["k"], cache["v"], mask.start,
                                              cache_index)
            return self.o_proj.decode_step(out.reshape(b, t, self.num_heads * self.head_dim)), {"k": k, "v": v}
        q, k, v = split_qkv_rope(qkv, cos, sin)  # [B, T, N, H], [B, T, K, H] x 2
        if cache is not None:
            k = jax.lax.dynamic_update_slice_in_dim(cache["k"], k.astype(cache["k"].dtype), cache_index, axis=1)
            v = jax.lax.dynamic_update_slice_in_dim(cache["v"], v.astype(cache["v"].dtype), cache_index, axis=1)
            cache = {"k": k, "v": v}
            out = attention(q, k.astype(q.dtype), v.astype(q.dtype), causal=False, mask=mask,
                            implementation=self.attn_impl)
        else:
            out = attention(q, k, v, causal=True, mask=mask, implementation=self.attn_impl)
        return self.o_proj(out.reshape(b, t, self.num_heads * self.head_dim)), cache

    def _fused_decode_step(self, qkv, k_cache, mask) -> bool:
        """A decode step that attention() would give the Pallas kernel, in a shape the fused kernel takes."""
        if not isinstance(mask, KeyRange) or qkv.shape[1] != 1:
            return False
        q = jax.ShapeDtypeStruct((qkv.shape[0], 1, self.num_heads, self.head_dim), qkv.dtype)
        if (self.attn_impl or pick_implementation(q, k_cache, mask)) != "pallas":
            return False
        from ghostvis_jax.model.decode_attention import step_supported

        return step_supported(qkv.shape[:1] + qkv.shape[2:], k_cache.shape, qkv.dtype)


class Qwen2MLP(nnx.Module):
    """SwiGLU with gate and up fused into one [D, 2, I] projection (one GEMM forward, one for the input gradient);
    the activation's backward is one pass (model/swiglu.py)."""

    def __init__(self, cfg: QwenConfig, *, rngs: nnx.Rngs, dtype, param_dtype):
        d, i = cfg.hidden_size, cfg.intermediate_size
        kw = dict(use_bias=False, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.gate_up_proj = Dense(d, (2, i), axes=("embed", None, "mlp"), **kw)
        self.down_proj = Dense(i, d, axes=("mlp", "embed"), **kw)

    def __call__(self, x, decode_step: bool = False):
        if decode_step:  # few rows: gate|up, the SwiGLU product and down_proj as two Pallas kernels on a GPU
            from ghostvis_jax.model import skinny_matmul

            (d, _, i), dtype, rows = self.gate_up_proj.kernel.shape, self.gate_up_proj.dtype, x.size // x.shape[-1]
            if skinny_matmul.mlp_applies(rows, d, i, dtype):
                y = skinny_matmul.decode_mlp(x.reshape(rows, d).astype(dtype), use(self.gate_up_proj.kernel, dtype),
                                             use(self.down_proj.kernel, dtype))
                return y.reshape(x.shape)
        return self.down_proj(swiglu(self.gate_up_proj(x)))


class Qwen2Layer(nnx.Module):
    def __init__(self, cfg: QwenConfig, *, rngs: nnx.Rngs, dtype, param_dtype):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, **kw)
        self.self_attn = Qwen2Attention(cfg, rngs=rngs, **kw)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, **kw)
        self.mlp = Qwen2MLP(cfg, rngs=rngs, **kw)

    def __call__(self, x, cos, sin, mask=None, cache=None, cache_index=None, pending=None):
        """pending: the previous layer's MLP output, not yet added to x. Each residual add happens in the norm
        after it (one pass with the norm on a GPU), so this returns x and this layer's MLP output, unadded."""
        x, h = self.input_layernorm.add_and_norm(x, pending)
        h, cache = self.self_attn(h, cos, sin, mask, cache, cache_index)
        x, h = self.post_attention_layernorm.add_and_norm(x, h)
        return x, self.mlp(h, decode_step=cache is not None and x.shape[1] == 1), cache


class Qwen2Decoder(nnx.Module):
    def __init__(self, cfg: QwenConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.config = cfg
        self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size, rngs=rngs, **kw)
        self.layers = nnx.List([Qwen2Layer(cfg, rngs=rngs, **kw) for _ in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, **kw)
        self.lm_head = None if cfg.tie_word_embeddings else Dense(
            cfg.hidden_size, cfg.vocab_size, use_bias=False, axes=("embed", "vocab"), rngs=rngs, std=0.02, **kw)
        # jax.checkpoint policy applied around each layer in training (None: keep every activation).
        self.remat_policy = None

    def embed(self, input_ids: jax.Array) -> jax.Array:
        return self.embed_tokens(input_ids)

    def __call__(self, x: jax.Array, positions: jax.Array | None = None, mask=None,
                 cache: KVCache | None = None, cache_index=None) -> tuple[jax.Array, KVCache | None]:
        """x: input embeddings [B, T, D] → final-normed hidden states [B, T, D] (and the updated cache)."""
        b, t, _ = x.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        cos, sin = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta)
        new_cache = [] if cache is not None else None
        pending = None  # the last MLP output, added to x in the next norm
        for i, layer in enumerate(self.layers):
            layer_cache = cache[i] if cache is not None else None
            if self.remat_policy is not None and cache is None:
                x, pending, _ = nnx.remat(lambda lyr, y, p, c, s: lyr(y, c, s, mask, pending=p),
                                          policy=self.remat_policy)(layer, x, pending, cos, sin)
            else:
                x, pending, layer_cache = layer(x, cos, sin, mask, layer_cache, cache_index, pending)
            x, pending = constrain_batch(x), constrain_batch(pending)
            if new_cache is not None:
                new_cache.append(layer_cache)
        return self.norm.add_and_norm(x, pending)[1], new_cache

    def head_weight(self) -> jax.Array:
        """The LM head as [vocab, hidden]: the embedding table when tied (the training loss multiplies by it)."""
        if self.lm_head is None:
            return use(self.embed_tokens.embedding)
        return use(self.lm_head.kernel).T

    def logits(self, hidden: jax.Array) -> jax.Array:
        dtype = self.embed_tokens.dtype
        return jnp.dot(hidden.astype(dtype), self.head_weight().astype(dtype).T)


def init_kv_cache(cfg: QwenConfig, batch: int, length: int, dtype=jnp.bfloat16) -> KVCache:
    shape = (batch, length, cfg.num_kv_heads, cfg.head_dim)
    return [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)} for _ in range(cfg.num_layers)]
