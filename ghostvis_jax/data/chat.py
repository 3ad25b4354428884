"""Qwen2.5 ChatML rendering with image slots and the assistant-only loss mask.

A conversation is `{"images": [...], "messages": [{"role": "system"|"user"|"assistant", "content": str}]}`.
`<image>` in a message marks where each image goes (one per image, in order). Each message renders as
`<|im_start|>{role}\\n{content}<|im_end|>\\n`; each image as `<|vision_start|>` + N x `<|image_pad|>` +
`<|vision_end|>`. Special-token ids come from the tokenizer. Text pieces are tokenized separately from the
special tokens, so user text can never produce a header or an image slot.

Training rendering and generation-prompt rendering (`render_prompt`) share `_render_messages`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

IMAGE_PLACEHOLDER = "<image>"
ROLES = ("system", "user", "assistant")


@dataclasses.dataclass(frozen=True)
class SpecialIds:
    pad: int
    im_start: int
    im_end: int
    vision_start: int
    vision_end: int
    image_pad: int

    @classmethod
    def from_tokenizer(cls, tokenizer) -> "SpecialIds":
        names = {"pad": "<|endoftext|>", "im_start": "<|im_start|>", "im_end": "<|im_end|>",
                 "vision_start": "<|vision_start|>", "vision_end": "<|vision_end|>", "image_pad": "<|image_pad|>"}
        ids = {}
        for field, token in names.items():
            tid = tokenizer.convert_tokens_to_ids(token)
            if tid is None or tid == getattr(tokenizer, "unk_token_id", None):
                raise ValueError(f"tokenizer has no {token!r} token (needed for {field}); is it a Qwen2.5 tokenizer?")
            ids[field] = int(tid)
        return cls(**ids)


_SPECIAL_IDS_CACHE: dict[int, SpecialIds] = {}


def special_ids(tokenizer) -> SpecialIds:
    key = id(tokenizer)
    if key not in _SPECIAL_IDS_CACHE:
        _SPECIAL_IDS_CACHE[key] = SpecialIds.from_tokenizer(tokenizer)
    return _SPECIAL_IDS_CACHE[key]


@dataclasses.dataclass
class RenderedExample:
    """One rendered conversation, unpadded.

    `supervised[t]` is True where token t is assistant content or the assistant's `<|im_end|>`;
    the loss mask over next-token targets is `supervised[1:]`.
    """

    input_ids: np.ndarray  # int32 [L]
    supervised: np.ndarray  # bool [L]
    num_images: int


class RenderError(ValueError):
    """A conversation that cannot be rendered (bad role, placeholder/image count mismatch, too long)."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def _encode(tokenizer, text: str) -> list[int]:
    if not text:
        return []
    # split_special_tokens: "<|im_start|>" or "<|image_pad|>" typed in user or dataset text stays plain text
    # (HF tokenizers otherwise turn it into the special id: a forged turn header or an extra image slot).
    return list(tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True))


def _render_messages(tokenizer, messages: Sequence[dict[str, Any]], num_image_tokens: int,
                     *, add_generation_prompt: bool) -> tuple[list[int], list[bool], int]:
    ids = special_ids(tokenizer)
    image_block = [ids.vision_start] + [ids.image_pad] * num_image_tokens + [ids.vision_end]
    out: list[int] = []
    sup: list[bool] = []
    num_images = 0

    def emit(tokens: list[int], supervised: bool):
        out.extend(tokens)
        sup.extend([supervised] * len(tokens))

    for i, msg in enumerate(messages):
        role, content = msg.get("role"), msg.get("content")
        if role not in ROLES:
            raise RenderError("bad_role", f"message {i}: role {role!r} is not one of {ROLES}")
        if not isinstance(content, str):
            raise RenderError("bad_content", f"message {i} ({role}): content must be a string, got {type(content)}")
        is_assistant = role == "assistant"
        emit([ids.im_start] + _encode(tokenizer, f"{role}\n"), False)
        pieces = content.split(IMAGE_PLACEHOLDER)
        if is_assistant and len(pieces) > 1:
            raise RenderError("image_in_assistant", f"message {i}: assistant content holds {IMAGE_PLACEHOLDER!r}")
        for j, piece in enumerate(pieces):
            if j > 0:
                emit(image_block, False)
                num_images += 1
            emit(_encode(tokenizer, piece), is_assistant)
        emit([ids.im_end], is_assistant)
        emit(_encode(tokenizer, "\n"), False)
    if add_generation_prompt:
        emit([ids.im_start] + _encode(tokenizer, "assistant\n"), False)
    return out, sup, num_images


def render_conversation(tokenizer, conversation: dict[str, Any], num_image_tokens: int,
                        max_length: int | None = None, system_prompt: str | None = None) -> RenderedExample:
    """Render a conversation for training.

    The number of `<image>` placeholders must equal `len(conversation["images"])`.
    Longer than `max_length`: text after the last image's slots is cut; if the cut would fall inside or
    before an image block, or would leave no supervised token, `RenderError("too_long")` is raised so the
    caller drops (and counts) the example.
    """
    messages = list(conversation["messages"])
    if system_prompt and not (messages and messages[0].get("role") == "system"):
        messages = [{"role": "system", "content": system_prompt}] + messages
    tokens, sup, num_images = _render_messages(tokenizer, messages, num_image_tokens, add_generation_prompt=False)
    expected = len(conversation.get("images") or [])
    if num_images != expected:
        raise RenderError("image_count", f"{num_images} {IMAGE_PLACEHOLDER} placeholders but {expected} images")
    input_ids = np.asarray(tokens, np.int32)
    supervised = np.asarray(sup, bool)
    if max_length is not None and len(input_ids) > max_length:
        ids = special_ids(tokenizer)
        vision_ends = np.nonzero(input_ids == ids.vision_end)[0]
        last_image_end = int(vision_ends[-1]) + 1 if len(vision_ends) else 0
        if last_image_end > max_length:
            raise RenderError("too_long", f"{len(input_ids)} tokens; an image block ends at {last_image_end} "
                                          f"> max_length {max_length}")
        input_ids, supervised = input_ids[:max_length], supervised[:max_length]
    if not supervised[1:].any():
        raise RenderError("no_supervised_tokens", "no assistant token left to learn from")
    return RenderedExample(input_ids, supervised, num_images)


def render_prompt(tokenizer, messages: Sequence[dict[str, Any]], num_image_tokens: int,
                  system_prompt: str | None = None) -> list[int]:
    """Token ids of a generation prompt: the messages, then `<|im_start|>assistant\\n`.

    `messages` are the conversation so far (content may hold `<image>` placeholders, one per image, in the
    order the images will be passed to the model). Returns a plain list of ints; image slots hold the
    `<|image_pad|>` id, `num_image_tokens` per image.
    """
    messages = list(messages)
    if system_prompt and not (messages and messages[0].get("role") == "system"):
        messages = [{"role": "system", "content": system_prompt}] + messages
    tokens, _, _ = _render_messages(tokenizer, messages, num_image_tokens, add_generation_prompt=True)
    return tokens


def to_training_arrays(example: RenderedExample, max_length: int, pad_id: int) -> dict[str, np.ndarray]:
    """Pad to `max_length`: input_ids, next-token targets (last position = pad) and the float loss mask."""
    n = len(example.input_ids)
    if n > max_length:
        raise ValueError(f"rendered example has {n} tokens > max_length {max_length}; render with max_length")
    input_ids = np.full((max_length,), pad_id, np.int32)
    input_ids[:n] = example.input_ids
    targets = np.full((max_length,), pad_id, np.int32)
    targets[: n - 1] = example.input_ids[1:]
    loss_mask = np.zeros((max_length,), np.float32)
    loss_mask[: n - 1] = example.supervised[1:]
    return {"input_ids": input_ids, "targets": targets, "loss_mask": loss_mask}


def answer_token_count(tokenizer, conversation: dict[str, Any]) -> int:
    """Supervised tokens of a conversation (assistant content + its `<|im_end|>`), without images."""
    return sum(len(_encode(tokenizer, m["content"])) + 1 for m in conversation["messages"]
               if m.get("role") == "assistant")


def ensure_image_placeholders(messages: list[dict[str, Any]], num_images: int) -> list[dict[str, Any]]:
    """Adapters' rule: a row with images but no `<image>` gets them at the start of the first user turn."""
    if num_images == 0 or any(IMAGE_PLACEHOLDER in m["content"] for m in messages):
        return messages
    out = [dict(m) for m in messages]
    for m in out:
        if m["role"] == "user":
            m["content"] = IMAGE_PLACEHOLDER * num_images + "\n" + m["content"]
            return out
    raise RenderError("no_user_turn", "images given but no user turn to attach them to")
