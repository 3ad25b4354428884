"""Batched decoding over a fixed-size KV cache.

One jitted prefill writes the left-padded prompts (text + image embeddings in their slots) into the cache;
then one jitted loop picks the first token from the prefill's logits and, in a `lax.while_loop`, runs the last
token through the decoder and picks the next, until every row has produced a stop token or `max_new_tokens`
tokens exist. It stops right after a pick, so n tokens cost n - 1 decoder steps (a 2-token answer, one).
Streaming runs the same pieces as jitted functions from Python instead, one host round-trip per token.

Shapes are bucketed (batch → powers of two from MIN_DECODE_ROWS, image count → powers of two; prompt and cache
length → half-octave steps 2^k or 3·2^(k-1), so a 192-token prompt is not padded to 256: the decode step reads
the whole cache), and max_new_tokens, temperature, top-k, top-p and the seed are traced values, so repeated
calls reuse the compiled functions (greedy and sampling decoding are two programs).

The loop body runs `unroll` decode steps per iteration. Each iteration of a GPU `while` copies its predicate to
the host, and the device then waits for the host's next launches; unrolling pays that once per `unroll` steps,
at the price of up to unroll - 1 steps run after every row has stopped (docs/LOG.md, twelfth session). Steps
past max_new_tokens inside the last iteration write only past the returned columns.

Left padding: row b's real tokens sit at the end of the prompt block; `valid` marks them. Positions count
from 0 at each row's first real token; a query attends to valid keys at or before it. Padded queries attend
only to themselves (their outputs are never used), which keeps every softmax row non-empty.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ghostvis_jax.generate.sampling import greedy_tokens, sampled_tokens
from ghostvis_jax.model.attention import KeyRange
from ghostvis_jax.model.qwen2 import init_kv_cache

MIN_PROMPT_BUCKET = 16
MIN_CACHE_BUCKET = 32
# The decode loop runs at least this many rows (the prefill only the prompts' bucket; the cache is widened after
# it). With one row a projection is a matrix-vector product, and XLA's GPU backend rewrites the smaller ones
# (Qwen2.5-1.5B's q|k|v and o_proj, not gate|up or down_proj) into a multiply and a reduce, o_proj through a
# materialized [1536, 1536] product: a batch-1 step took 1.95 ms, 1.75 ms once padded to 8 rows, on an H100
# (docs/LOG.md). The cost: a KV cache for 8 rows (0.9 GB at 4k positions for the 1.5B).
MIN_DECODE_ROWS = 8


def bucket(n: int, minimum: int = 1) -> int:
    """The smallest power of two >= max(n, minimum)."""
    n = max(int(n), minimum, 1)
    return 1 << (n - 1).bit_length()


def length_bucket(n: int, minimum: int = 1) -> int:
    """The smallest 2^k or 3·2^(k-1) >= max(n, minimum): at most 1.5x padding, two compiles per octave."""
    power = bucket(n, minimum)
    three_quarters = 3 * power // 4
    return three_quarters if power >= 4 and three_quarters >= max(int(n), minimum) else power


@dataclasses.dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = no limit), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    def arrays(self):
        """The knobs as numpy scalars: jitted calls take them as traced values, with no eager op per call."""
        return (np.float32(self.temperature), np.int32(self.top_k), np.float32(self.top_p))


@dataclasses.dataclass
class Decoded:
    tokens: list[int]      # generated tokens, without the stop token
    finish_reason: str     # "stop" (a stop token) or "length" (max_new_tokens)


# ---- jitted pieces ------------------------------------------------------------------------------------------

def _prefill(model, ids, valid, image_embeds, cache_len: int):
    b, p = ids.shape
    positions = jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0).astype(jnp.int32)
    causal = jnp.tril(jnp.ones((p, p), bool))
    mask = (causal[None] & valid[:, None, :]) | jnp.eye(p, dtype=bool)[None]
    mask = jnp.pad(mask, ((0, 0), (0, 0), (0, cache_len - p)))[:, None]
    cache = init_kv_cache(model.llm.config, b, cache_len, model.llm.embed_tokens.dtype)
    hidden, cache = model.hidden_states(ids, image_embeds=image_embeds, positions=positions, mask=mask,
                                        cache=cache, cache_index=0)
    return cache, model.llm.logits(hidden[:, -1])


def _choose(logits, out, done, step, row_keys, sampling, stop_ids, greedy: bool):
    """Token `step` of every row from `logits` (argmax, or a draw when not `greedy`; -1 for finished rows),
    recorded in `out`; rows that produced a stop token are done. Greedy is static: a traced choice would be a
    `lax.cond`, whose predicate the GPU reads back to the host every step."""
    if greedy:
        token = greedy_tokens(logits)
    else:
        keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(row_keys, step)
        token = sampled_tokens(logits, keys, *sampling)
    token = jnp.where(done, -1, token)
    return token, out.at[:, step].set(token), done | jnp.isin(token, stop_ids)


def _first(cache, logits, done, num_valid, seed_key, sampling, stop_ids, greedy: bool):
    """The first token, from the prefill's logits: the loop's carry. Built inside the jit, so a call pays no
    eager ops for it (a host-side vmap of fold_in alone took ~1 ms per call)."""
    batch, cache_len = done.shape[0], cache[0]["k"].shape[1]
    out = jnp.full((batch, cache_len), -1, jnp.int32)  # only the first max_new_tokens columns are used
    row_keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(seed_key, jnp.arange(batch))
    token, out, done = _choose(logits, out, done, 0, row_keys, sampling, stop_ids, greedy)
    return (cache, token, out, done, jnp.int32(1), num_valid, row_keys), token


def _step(model, carry, sampling, stop_ids, prompt_len, greedy: bool):
    """Run the last token through the decoder and pick the next one from its logits. The loop stops right after
    a pick, so no call runs the decoder on a token whose logits would go unused (its last one, or a stop)."""
    cache, token, out, done, step, num_valid, row_keys = carry
    index = prompt_len + step - 1  # the last token's cache slot
    # A row's keys are contiguous: its left-padded prompt's real tokens, then every token decoded so far.
    keys_in_view = KeyRange(start=prompt_len - num_valid, end=jnp.broadcast_to(index + 1, num_valid.shape))
    hidden, cache = model.hidden_states(jnp.maximum(token, 0)[:, None], positions=(num_valid + step - 1)[:, None],
                                        mask=keys_in_view, cache=cache, cache_index=index)
    # Logits in the head's output dtype: argmax picks what it would on their float32 values; sampling converts.
    logits = model.llm.logits(hidden[:, 0])
    token, out, done = _choose(logits, out, done, step, row_keys, sampling, stop_ids, greedy)
    return (cache, token, out, done, step + 1, num_valid, row_keys), token


class _Jitted:
    """prefill / loop / step of one model structure. Parameters travel as a flat list of arrays: flattening an
    nnx.State costs milliseconds per call, a list microseconds (it matters once per streamed token)."""

    def __init__(self, graphdef, treedef, unroll: int):
        def model(leaves):
            return nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))

        self.prefill = jax.jit(lambda leaves, ids, valid, images, cache_len: _prefill(
            model(leaves), ids, valid, images, cache_len), static_argnames=("cache_len",))

        # prompt_len and max_new_tokens are traced: the loop compiles once per (batch, cache length). The cache is
        # donated; the prefill's logits are not (no output has their shape).
        def loop(leaves, cache, logits, done, num_valid, seed_key, max_new_tokens, sampling, stop_ids, prompt_len,
                 greedy):
            def cond(c):
                return (c[4] < max_new_tokens) & ~jnp.all(c[3])

            def body(c):
                m = model(leaves)
                for _ in range(unroll):
                    c = _step(m, c, sampling, stop_ids, prompt_len, greedy)[0]
                return c

            carry = _first(cache, logits, done, num_valid, seed_key, sampling, stop_ids, greedy)[0]
            return jax.lax.while_loop(cond, body, carry)

        self.loop = jax.jit(loop, donate_argnames=("cache",), static_argnames=("greedy",))
        self.first = jax.jit(_first, donate_argnames=("cache",), static_argnames=("greedy",))
        self.step = jax.jit(lambda leaves, carry, sampling, stop_ids, prompt_len, greedy: _step(
            model(leaves), carry, sampling, stop_ids, prompt_len, greedy), donate_argnames=("carry",),
            static_argnames=("greedy",))


@functools.partial(jax.jit, static_argnames=("rows",))
def _widen(arrays, rows: int):
    """Zero rows appended to every array (axis 0) up to `rows`: the prefill's cache and logits → the loop's."""
    return jax.tree.map(lambda a: jnp.pad(a, [(0, rows - a.shape[0])] + [(0, 0)] * (a.ndim - 1)), arrays)


@functools.lru_cache(maxsize=64)
def _seed_key(seed: int) -> jax.Array:
    return jax.random.key(seed)


@functools.lru_cache(maxsize=8)
def _jitted(graphdef, treedef, unroll: int) -> _Jitted:  # shared by every loaded model of the same structure
    return _Jitted(graphdef, treedef, unroll)


# 4 steps per iteration: 1-5% faster per step at batch 64 on an H100 when steps began with the argmax, within run
# spread once they end with it (docs/LOG.md, twelfth session); and up to 3 steps run for nothing once every row
# has stopped. A knob.
DEFAULT_UNROLL = 1


class Decoder:
    """A model's parameters, flattened once, with the jitted functions of its structure.

    unroll: decode steps per loop iteration (see the module docstring)."""

    def __init__(self, graphdef, state, unroll: int = DEFAULT_UNROLL):
        if unroll < 1:
            raise ValueError(f"unroll must be >= 1, got {unroll}")
        self.leaves, treedef = jax.tree.flatten(state)
        self.unroll = unroll
        self.jitted = _jitted(graphdef, treedef, unroll)


# ---- host side ----------------------------------------------------------------------------------------------

def left_pad(prompts: Sequence[Sequence[int]], batch: int, length: int, pad_id: int):
    """ids int32 [batch, length] and valid bool [batch, length]; rows past len(prompts) are one pad token."""
    ids = np.full((batch, length), pad_id, np.int32)
    valid = np.zeros((batch, length), bool)
    for row, prompt in enumerate(prompts):
        ids[row, length - len(prompt):] = prompt
        valid[row, length - len(prompt):] = True
    valid[len(prompts):, -1] = True
    return ids, valid


def decode(decoder: Decoder, config, prompts: Sequence[Sequence[int]], image_embeds: jax.Array | None, *,
           max_new_tokens: int, sampling: Sampling, stop_ids: Sequence[int],
           on_step: Callable[[np.ndarray, np.ndarray], None] | None = None) -> list[Decoded]:
    """Generate for token-id prompts (`config`: the GhostVisConfig). `image_embeds` [I, N, D] fill the
    prompts' image slots in order.

    `on_step(tokens [n], done [n])` (streaming) is called after every step with that step's token per row
    (-1 for rows already finished); without it the whole decode runs on the device.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one prompt, and no prompt may be empty")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    longest = max(len(p) for p in prompts)
    max_positions = config.llm.max_position_embeddings
    if longest + max_new_tokens > max_positions:
        raise ValueError(f"prompt of {longest} tokens + max_new_tokens {max_new_tokens} exceeds the model's "
                         f"{max_positions} positions")
    n = len(prompts)
    prefill_rows = bucket(n)
    batch = max(prefill_rows, MIN_DECODE_ROWS)
    prompt_len = length_bucket(longest, MIN_PROMPT_BUCKET)
    cache_len = length_bucket(prompt_len + max_new_tokens, MIN_CACHE_BUCKET)
    pad_id = 0 if config.image_token_id != 0 else 1
    ids, valid = left_pad(prompts, prefill_rows, prompt_len, pad_id)
    if image_embeds is None:
        image_embeds = np.zeros((1, config.num_image_tokens, config.llm.hidden_size), np.float32)
    image_embeds = jnp.asarray(image_embeds, jnp.float32)  # one dtype, one compile; the scatter casts it
    num_images = image_embeds.shape[0]
    padded_images = bucket(num_images)
    if padded_images > num_images:
        image_embeds = jnp.pad(image_embeds, ((0, padded_images - num_images), (0, 0), (0, 0)))

    fns, leaves = decoder.jitted, decoder.leaves
    # Host-side arrays go into the jitted calls as numpy: an eager jnp op costs a dispatch each.
    cache, logits = fns.prefill(leaves, ids, valid, image_embeds, cache_len=cache_len)
    if batch > prefill_rows:  # rows added for the loop's sake: a zero cache, done from the start
        cache, logits = _widen((cache, logits), rows=batch)
    done = np.arange(batch) >= n
    num_valid = np.ones(batch, np.int32)  # a padding row: one valid position, as left_pad makes them
    num_valid[:prefill_rows] = valid.sum(axis=1)
    stop_list = list(stop_ids)
    stops = np.full(bucket(len(stop_list), 4), -2, np.int32)  # -2 never matches; fixed length, fewer compiles
    stops[: len(stop_list)] = stop_list
    knobs, prompt_len_arr, seed_key = sampling.arrays(), np.int32(prompt_len), _seed_key(sampling.seed)
    greedy = sampling.temperature <= 0
    if on_step is None:
        carry = fns.loop(leaves, cache, logits, done, num_valid, seed_key, np.int32(max_new_tokens), knobs, stops,
                         prompt_len_arr, greedy=greedy)
    else:
        carry, token = fns.first(cache, logits, done, num_valid, seed_key, knobs, stops, greedy=greedy)
        for i in range(max_new_tokens):
            if i:
                carry, token = fns.step(leaves, carry, knobs, stops, prompt_len_arr, greedy=greedy)
            tokens, done_now = jax.device_get((token, carry[3]))
            on_step(tokens[:n], done_now[:n])
            if done_now[:n].all():
                break
    return _finish(np.asarray(carry[2])[:n, :max_new_tokens], set(stop_ids))


def _finish(out: np.ndarray, stop_ids: set[int]) -> list[Decoded]:
    results = []
    for row in out:
        tokens = []
        reason = "length"
        for t in row.tolist():
            if t < 0:
                break
            if t in stop_ids:
                reason = "stop"
                break
            tokens.append(t)
        results.append(Decoded(tokens, reason))
    return results
