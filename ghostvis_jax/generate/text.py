"""`generate` for loaded models: conversations and images in, text out.

Prompts are rendered with the ChatML renderer (`data/chat.render_prompt`), images decoded with `load_image`
(a bad file raises `ImageDecodeError` naming it) and embedded through the LRU cache, then `decode` runs.
"""

from __future__ import annotations

import dataclasses
import weakref
from typing import Any, Callable, Sequence

import jax.numpy as jnp
import numpy as np

from ghostvis_jax.data.chat import ensure_image_placeholders, render_prompt
from ghostvis_jax.data.images import load_image
from ghostvis_jax.generate.decoding import Decoder, Sampling, bucket, decode
from ghostvis_jax.generate.image_cache import image_key

DEFAULT_STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")


@dataclasses.dataclass
class Generation:
    text: str
    token_ids: list[int]   # without the stop token
    finish_reason: str     # "stop" or "length"


def _is_conversation(x: Any) -> bool:
    return isinstance(x, dict) or (isinstance(x, (list, tuple)) and len(x) > 0 and isinstance(x[0], dict))


def _as_list(images: Any) -> list:
    if images is None:
        return []
    if isinstance(images, (list, tuple)):
        return list(images)
    return [images]


def _messages(prompt: Any, index: int) -> tuple[list[dict], list]:
    """(messages, images named by the prompt itself) of a str, a message list or a {"messages", "images"} dict."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}], []
    if isinstance(prompt, dict):
        if "messages" not in prompt:
            raise ValueError(f"prompt {index}: a dict prompt needs 'messages'")
        return list(prompt["messages"]), _as_list(prompt.get("images"))
    if _is_conversation(prompt):
        return list(prompt), []
    raise TypeError(f"prompt {index}: expected a str, a list of messages or a conversation dict, "
                    f"got {type(prompt).__name__}")


def stop_token_ids(tokenizer, stop: Sequence[str | int] | None) -> list[int]:
    ids = []
    for s in DEFAULT_STOP_TOKENS if stop is None else stop:
        if isinstance(s, (int, np.integer)):
            ids.append(int(s))
            continue
        tid = tokenizer.convert_tokens_to_ids(s)
        if tid is None or tid == getattr(tokenizer, "unk_token_id", None):
            raise ValueError(f"stop token {s!r} is not a token of this tokenizer")
        ids.append(int(tid))
    return ids


def embed_images(gv, images: Sequence[Any]):
    """Decoded PIL images → [I, N, D] embeddings, through `gv.image_cache` (misses run the tower together)."""
    if not images:
        return None
    cache = gv.image_cache
    keys = [image_key(im) for im in images]
    found = {}
    missing = {}
    for key, im in zip(keys, images):
        if key in found or key in missing:
            cache.hits += 1  # a repeat inside this call is served by the same tower run
            continue
        value = cache.get(key)
        if value is None:
            missing[key] = im
        else:
            found[key] = value
    if missing:
        pixels = gv.preprocess_images(list(missing.values()))
        padded = bucket(len(pixels))  # one compiled tower per power of two
        pixels = np.concatenate([pixels, np.zeros((padded - len(pixels),) + pixels.shape[1:], pixels.dtype)])
        embeds = gv.encode_images(pixels)
        for i, key in enumerate(missing):
            found[key] = embeds[i]
            cache.put(key, embeds[i])
    return jnp.stack([found[k] for k in keys])


_DECODERS: "weakref.WeakKeyDictionary[Any, Decoder]" = weakref.WeakKeyDictionary()


def decoder_for(gv) -> Decoder:
    """The model's Decoder, built on first use (flattening the parameters once)."""
    if gv not in _DECODERS:
        _DECODERS[gv] = Decoder(gv._graphdef, gv._state)
    return _DECODERS[gv]


class _StreamText:
    """Turns each row's growing token list into text deltas (holding back an incomplete UTF-8 character)."""

    def __init__(self, tokenizer, num_rows: int, stop_ids: set[int], callback: Callable[[int, str], None]):
        self.tokenizer, self.stop_ids, self.callback = tokenizer, stop_ids, callback
        self.tokens = [[] for _ in range(num_rows)]
        self.sent = [""] * num_rows
        self.finished = [False] * num_rows

    def __call__(self, step_tokens: np.ndarray, done: np.ndarray) -> None:
        for row, token in enumerate(step_tokens.tolist()):
            if self.finished[row] or token < 0:
                continue
            if token in self.stop_ids:
                self.finished[row] = True
                continue
            self.tokens[row].append(token)
            text = self.tokenizer.decode(self.tokens[row], skip_special_tokens=True)
            if text.endswith("\ufffd"):
                continue
            if text.startswith(self.sent[row]) and len(text) > len(self.sent[row]):
                self.callback(row, text[len(self.sent[row]):])
                self.sent[row] = text


def generate(gv, prompts, images=None, max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, seed: int = 0, *, stop: Sequence[str | int] | None = None,
             system_prompt: str | None = None, return_tokens: bool = False,
             stream: Callable[[int, str], None] | None = None) -> list:
    """Generate a reply for each prompt; see `GhostVis.generate`."""
    if gv.tokenizer is None:
        raise ValueError("this checkpoint has no tokenizer; generate needs one to render prompts")
    single = isinstance(prompts, str) or isinstance(prompts, dict) or (
        _is_conversation(prompts) and "role" in prompts[0])
    if single:
        prompts, images = [prompts], [images]
    prompts = list(prompts)
    per_prompt_images = [None] * len(prompts) if images is None else list(images)
    if len(per_prompt_images) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but images for {len(per_prompt_images)}")
    n_tokens = gv.config.num_image_tokens
    all_ids, all_images = [], []
    for i, (prompt, imgs) in enumerate(zip(prompts, per_prompt_images)):
        messages, own_images = _messages(prompt, i)
        imgs = _as_list(imgs) or own_images
        decoded = [load_image(im) for im in imgs]
        messages = ensure_image_placeholders(messages, len(decoded))
        ids = render_prompt(gv.tokenizer, messages, n_tokens, system_prompt=system_prompt)
        slots = sum(1 for t in ids if t == gv.config.image_token_id)
        if slots != n_tokens * len(decoded):
            raise ValueError(f"prompt {i}: {slots // n_tokens} <image> placeholder(s) but {len(decoded)} image(s)")
        all_ids.append(ids)
        all_images += decoded
    stops = stop_token_ids(gv.tokenizer, stop)
    sampling = Sampling(float(temperature), int(top_k), float(top_p), int(seed))
    streamer = None if stream is None else _StreamText(gv.tokenizer, len(prompts), set(stops), stream)
    results = decode(decoder_for(gv), gv.config, all_ids, embed_images(gv, all_images),
                     max_new_tokens=int(max_new_tokens), sampling=sampling, stop_ids=stops, on_step=streamer)
    texts = [gv.tokenizer.decode(r.tokens, skip_special_tokens=True) for r in results]
    if return_tokens:
        return [Generation(t, r.tokens, r.finish_reason) for t, r in zip(texts, results)]
    return texts
