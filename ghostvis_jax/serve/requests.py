"""Chat requests of the web API: limits, image decoding, validation, and the serialized model runner."""

from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import threading
import time
from typing import Any

from ghostvis_jax.data.chat import IMAGE_PLACEHOLDER, ensure_image_placeholders, render_prompt
from ghostvis_jax.data.images import ImageDecodeError, load_image
ROLES = ("system", "user", "assistant")
ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
CHAT_KEYS = {"messages", "images", "max_new_tokens", "temperature", "top_k", "top_p", "seed", "system",
             "stream", "model"}
DRAIN_LIMIT = 256 << 20  # an over-limit body up to this size is read and dropped so the client sees the 413


@dataclasses.dataclass
class Limits:
    max_body_bytes: int = 32 << 20     # one request body (JSON with base64 images is ~4/3 of the images)
    max_image_bytes: int = 8 << 20     # one encoded image
    max_images: int = 8                # images in one conversation
    max_new_tokens: int = 1024         # the largest max_new_tokens a request may ask for
    default_max_new_tokens: int = 256
    max_queue: int = 32                # requests waiting for the model; more get 503


class RequestError(Exception):
    """A request the server refuses: an HTTP status and a message for the client."""

    def __init__(self, status: int, kind: str, message: str):
        super().__init__(message)
        self.status, self.kind, self.message = int(status), kind, message


class ClientGone(Exception):
    """The client closed the connection while its reply was streaming."""


def decode_image(raw: bytes, name: str, limits: Limits):
    """Encoded bytes → RGB PIL image, or a RequestError naming `name` and the problem."""
    if len(raw) > limits.max_image_bytes:
        raise RequestError(413, "image_too_large",
                           f"{name}: image is {len(raw)} bytes; the limit is {limits.max_image_bytes} bytes")
    if not raw:
        raise RequestError(400, "not_an_image", f"{name}: empty file, not an image")
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(raw)) as probe:
            fmt = probe.format
    except Exception:
        fmt = None  # load_image below says why it cannot be read
    if fmt is not None and fmt not in ACCEPTED_FORMATS:
        raise RequestError(415, "unsupported_format",
                           f"{name}: unsupported image format {fmt} (accepted: {', '.join(ACCEPTED_FORMATS)})")
    try:
        return load_image(raw, name=name)
    except ImageDecodeError as e:
        if isinstance(e.__cause__, UnidentifiedImageError):  # its text names a BytesIO object, not the file
            raise RequestError(400, "not_an_image", f"{name}: not an image (the data is in no image format this "
                                                    f"server reads; accepted: {', '.join(ACCEPTED_FORMATS)})") from e
        raise RequestError(400, "not_an_image", f"not a readable image: {e}") from e


def _image_item(item: Any, index: int) -> tuple[bytes, str]:
    name = f"images[{index}]"
    if isinstance(item, dict):
        name = str(item.get("name") or name)
        item = item.get("data")
    if not isinstance(item, str):
        raise RequestError(400, "bad_request", f"{name}: expected a base64 string (or {{\"data\", \"name\"}}), "
                                               f"got {type(item).__name__}")
    if item.startswith("data:"):
        header, _, item = item.partition(",")
        if ";base64" not in header:
            raise RequestError(400, "bad_request", f"{name}: a data URL must be base64-encoded")
    try:
        return base64.b64decode(item, validate=True), name
    except (binascii.Error, ValueError) as e:
        raise RequestError(400, "bad_request", f"{name}: not valid base64 ({e})") from e


def _number(body: dict, key: str, kind: type, default, lo=None, hi=None):
    value = body.get(key, default)
    if value is None:
        return default
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        ok = ok and float(value).is_integer()
    if not ok:
        raise RequestError(400, "bad_request", f"{key} must be a{'n integer' if kind is int else ' number'}, "
                                               f"got {value!r}")
    value = kind(value)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise RequestError(400, "bad_request", f"{key} must be in [{lo}, {hi}], got {value}")
    return value


@dataclasses.dataclass
class ChatRequest:
    messages: list[dict[str, str]]
    images: list  # decoded PIL images, in placeholder order
    kwargs: dict[str, Any]


def parse_chat(body: Any, model, limits: Limits) -> ChatRequest:
    """Validate a /v1/chat body and decode its images; every problem is a 4xx RequestError."""
    if not isinstance(body, dict):
        raise RequestError(400, "bad_request", "the body must be a JSON object")
    unknown = sorted(set(body) - CHAT_KEYS)
    if unknown:
        raise RequestError(400, "bad_request", f"unknown field(s) {unknown}; accepted: {sorted(CHAT_KEYS)}")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "bad_request", "messages must be a non-empty list of {\"role\", \"content\"}")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise RequestError(400, "bad_request",
                               f"messages[{i}] must be {{\"role\": one of {list(ROLES)}, \"content\": a string}}")
        if m["role"] == "assistant" and IMAGE_PLACEHOLDER in m["content"]:
            raise RequestError(400, "bad_request", f"messages[{i}]: an assistant message cannot hold "
                                                   f"{IMAGE_PLACEHOLDER}")
        clean.append({"role": m["role"], "content": m["content"]})
    if clean[-1]["role"] != "user":
        raise RequestError(400, "bad_request", "the last message must be the user's")
    items = body.get("images") or []
    if not isinstance(items, list):
        raise RequestError(400, "bad_request", "images must be a list")
    if len(items) > limits.max_images:
        raise RequestError(413, "too_many_images", f"{len(items)} images; the limit is {limits.max_images}")
    images = [decode_image(*_image_item(item, i), limits) for i, item in enumerate(items)]
    placeholders = sum(m["content"].count(IMAGE_PLACEHOLDER) for m in clean)
    if placeholders and placeholders != len(images):
        raise RequestError(400, "image_count", f"the messages hold {placeholders} {IMAGE_PLACEHOLDER} "
                                               f"placeholder(s) but {len(images)} image(s) were sent")
    if images and not placeholders and not any(m["role"] == "user" for m in clean):
        raise RequestError(400, "image_count", "images given but no user message to attach them to")
    system = body.get("system")
    if system is not None and not isinstance(system, str):
        raise RequestError(400, "bad_request", "system must be a string")
    kwargs = dict(
        max_new_tokens=_number(body, "max_new_tokens", int, limits.default_max_new_tokens, 1, limits.max_new_tokens),
        temperature=_number(body, "temperature", float, 0.0, 0.0, 10.0),
        top_k=_number(body, "top_k", int, 0, 0, None),
        top_p=_number(body, "top_p", float, 1.0, 0.0, 1.0),
        seed=_number(body, "seed", int, 0, 0, 2**31 - 1),
        system_prompt=system,
    )
    if model.tokenizer is not None:  # a too-long conversation is the client's problem: say so before streaming
        try:
            ids = render_prompt(model.tokenizer, ensure_image_placeholders(clean, len(images)),
                                model.config.num_image_tokens, system_prompt=system)
        except ValueError as e:
            raise RequestError(400, "bad_request", str(e)) from e
        positions = model.config.llm.max_position_embeddings
        if len(ids) + kwargs["max_new_tokens"] > positions:
            raise RequestError(400, "too_long", f"the conversation is {len(ids)} tokens; with max_new_tokens "
                                                f"{kwargs['max_new_tokens']} it exceeds the model's {positions}")
    return ChatRequest(clean, images, kwargs)


class ModelRunner:
    """One model; `generate` runs one request at a time, and at most `max_queue` requests wait for it."""

    def __init__(self, model, limits: Limits):
        self.model, self.limits = model, limits
        self.lock = threading.Lock()
        self._waiting = threading.BoundedSemaphore(limits.max_queue + 1)

    def generate(self, req: ChatRequest, stream=None):
        if not self._waiting.acquire(blocking=False):
            raise RequestError(503, "busy", f"the server is busy ({self.limits.max_queue} requests waiting); "
                                            "try again shortly")
        try:
            with self.lock:
                start = time.perf_counter()
                out = self.model.generate({"messages": req.messages, "images": req.images}, stream=stream,
                                          return_tokens=True, **req.kwargs)[0]
                return out, time.perf_counter() - start
        finally:
            self._waiting.release()
