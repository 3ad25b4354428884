"""A local web page and JSON API for a checkpoint: `python -m ghostvis_jax.serve --checkpoint CKPT`.

Endpoints (standard library only: `http.server.ThreadingHTTPServer`, loopback by default):
  GET  /                  the chat page: attach an image, ask, watch the reply stream in, ask again
  GET  /v1/info           the limits and defaults this server runs with (JSON)
  POST /v1/chat           {"messages": [{"role", "content"}], "images": [base64 | data URL | {"data", "name"}],
                           "max_new_tokens", "temperature", "top_k", "top_p", "seed", "system"}
                          → {"reply", "finish_reason", "completion_tokens", "elapsed_s"};
                          with "stream": true the answer comes as server-sent events (as /v1/chat/stream)
  POST /v1/chat/stream    the same body → `text/event-stream`: `data: {"type": "delta", "text"}` events, then
                          one `data: {"type": "done", "reply", ...}` (or `{"type": "error", "error"}`)
  POST /v1/images/check   raw image bytes (name in the X-Filename header) → {"width", "height", "format"}, or
                          the same 4xx message the chat endpoint would give for that image

`<image>` in a message marks where an image goes (one per image, in order); with none, the images go at the
start of the first user turn (as in `generate`). One model, one generation at a time (a lock); the others wait
in a bounded queue. Errors are JSON `{"error": {"type", "message"}}` with a 4xx status naming the problem
(not an image, too large, unsupported format, wrong content type, bad JSON); no request stops the server.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import dataclasses
import io
import json
import sys
import threading
import time
import urllib.parse
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
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


def page_html(limits: Limits) -> bytes:
    html = resources.files("ghostvis_jax").joinpath("static/index.html").read_text(encoding="utf-8")
    config = {"maxImageBytes": limits.max_image_bytes, "maxImages": limits.max_images,
              "maxNewTokens": limits.max_new_tokens, "defaultMaxNewTokens": limits.default_max_new_tokens,
              "imagePlaceholder": IMAGE_PLACEHOLDER, "acceptedFormats": list(ACCEPTED_FORMATS)}
    return html.replace("__GHOSTVIS_CONFIG__", json.dumps(config).replace("<", "\\u003c")).encode("utf-8")


def _content_length(headers) -> int:
    value = headers.get("Content-Length") or ""
    return int(value) if value.isdigit() else 0


class Handler(BaseHTTPRequestHandler):
    server_version = "ghostvis-serve/0.1"
    timeout = 120  # seconds a silent client may hold its connection (a socket timeout, not a reply limit)
    runner: ModelRunner  # set on the subclass made by make_server
    page: bytes
    quiet = False

    # ---- plumbing -------------------------------------------------------------------------------------------
    def log_message(self, fmt, *args):
        if not self.quiet:
            sys.stderr.write("%s - %s\n" % (self.address_string(), fmt % args))

    def _send(self, status: int, body: bytes, content_type: str, extra: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, obj: Any) -> None:
        self._send(status, json.dumps(obj).encode("utf-8"), "application/json")

    def _error(self, err: RequestError) -> None:
        self._json(err.status, {"error": {"type": err.kind, "message": err.message}})

    def _drain(self, length: int) -> None:
        """Read and drop an unread body, so the client gets our 4xx instead of a reset connection."""
        if 0 < length <= DRAIN_LIMIT:
            try:
                while length > 0:
                    chunk = self.rfile.read(min(length, 1 << 20))
                    if not chunk:
                        break
                    length -= len(chunk)
            except OSError:
                pass

    def _body(self, limit: int, what: str) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            raise RequestError(411, "length_required", "send the body with a Content-Length, not chunked")
        raw_length = self.headers.get("Content-Length")
        if raw_length is None:
            raise RequestError(411, "length_required", "a Content-Length header is required")
        try:
            length = int(raw_length)
            if length < 0:
                raise ValueError
        except ValueError:
            raise RequestError(400, "bad_request", f"bad Content-Length {raw_length!r}") from None
        if length > limit:
            self._unread = length
            raise RequestError(413, "body_too_large", f"{what} of {length} bytes exceeds the limit of {limit} bytes")
        data = self.rfile.read(length)
        if len(data) != length:
            raise RequestError(400, "bad_request", f"body ended after {len(data)} of {length} bytes")
        return data

    def _route(self, method: str) -> None:
        self._unread = 0
        path = urllib.parse.urlsplit(self.path).path
        routes = {"/": ("GET", self._page), "/index.html": ("GET", self._page), "/v1/info": ("GET", self._info),
                  "/v1/chat": ("POST", self._chat), "/v1/chat/stream": ("POST", self._chat_stream),
                  "/v1/images/check": ("POST", self._check_image)}
        try:
            if path not in routes:
                raise RequestError(404, "not_found", f"no such page or endpoint: {path}")
            allowed, fn = routes[path]
            if method != allowed and not (method == "HEAD" and allowed == "GET"):
                raise RequestError(405, "method_not_allowed", f"{path} takes {allowed}, not {method}")
            fn()
        except RequestError as e:
            self._error(e)
            self._drain(self._unread)
        except (ClientGone, BrokenPipeError, ConnectionResetError):
            pass
        except Exception as e:  # a bug in a reply must not end the server; say what happened
            self.log_error("error handling %s %s: %s: %s", method, path, type(e).__name__, e)
            try:
                self._json(500, {"error": {"type": "internal", "message": f"{type(e).__name__}: {e}"}})
            except OSError:
                pass

    def do_GET(self):
        self._route("GET")

    def do_HEAD(self):
        self._route("HEAD")

    def do_POST(self):
        self._route("POST")

    def do_PUT(self):
        self._route("PUT")

    def do_DELETE(self):
        self._route("DELETE")

    # ---- endpoints ------------------------------------------------------------------------------------------
    def _page(self) -> None:
        self._send(200, self.page, "text/html; charset=utf-8")

    def _info(self) -> None:
        limits = self.runner.limits
        self._json(200, {"model": str(getattr(self.runner.model, "path", None)),
                         "limits": dataclasses.asdict(limits), "image_placeholder": IMAGE_PLACEHOLDER,
                         "accepted_formats": list(ACCEPTED_FORMATS)})

    def _chat_body(self) -> dict:
        ctype = self.headers.get("Content-Type", "")
        if ctype.split(";")[0].strip().lower() != "application/json":
            self._unread = _content_length(self.headers)
            raise RequestError(415, "unsupported_media_type",
                               f"send the chat request as Content-Type: application/json (got {ctype or 'none'}); "
                               "images go inside it, base64-encoded")
        raw = self._body(self.runner.limits.max_body_bytes, "request body")
        try:
            return json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise RequestError(400, "bad_json", f"the body is not valid JSON ({e})") from None

    def _chat(self) -> None:
        body = self._chat_body()
        if isinstance(body, dict) and body.get("stream"):
            return self._stream(body)
        req = parse_chat(body, self.runner.model, self.runner.limits)
        try:
            out, elapsed = self.runner.generate(req)
        except ValueError as e:  # the model refused the conversation (render / length checks)
            raise RequestError(400, "bad_request", str(e)) from e
        self._json(200, {"reply": out.text, "finish_reason": out.finish_reason,
                         "completion_tokens": len(out.token_ids), "elapsed_s": round(elapsed, 3)})

    def _chat_stream(self) -> None:
        self._stream(self._chat_body())

    def _stream(self, body: Any) -> None:
        req = parse_chat(body, self.runner.model, self.runner.limits)  # 4xx before any event
        started = False

        def event(obj: dict) -> None:
            try:
                self.wfile.write(b"data: " + json.dumps(obj).encode("utf-8") + b"\n\n")
                self.wfile.flush()
            except OSError as e:
                raise ClientGone() from e

        def start() -> None:
            nonlocal started
            if not started:
                started = True
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream; charset=utf-8")
                self.send_header("Cache-Control", "no-store")
                self.send_header("X-Accel-Buffering", "no")
                self.send_header("Connection", "close")
                self.end_headers()
                self.close_connection = True

        def on_delta(_row: int, text: str) -> None:
            start()
            event({"type": "delta", "text": text})

        try:
            out, elapsed = self.runner.generate(req, stream=on_delta)
        except ValueError as e:
            if not started:
                raise RequestError(400, "bad_request", str(e)) from e
            event({"type": "error", "error": {"type": "bad_request", "message": str(e)}})
            return
        except (RequestError, ClientGone):
            raise
        except Exception as e:
            if not started:
                raise
            self.log_error("generation failed: %s: %s", type(e).__name__, e)
            event({"type": "error", "error": {"type": "internal", "message": f"{type(e).__name__}: {e}"}})
            return
        start()
        event({"type": "done", "reply": out.text, "finish_reason": out.finish_reason,
               "completion_tokens": len(out.token_ids), "elapsed_s": round(elapsed, 3)})

    def _check_image(self) -> None:
        limits = self.runner.limits
        name = urllib.parse.unquote(self.headers.get("X-Filename") or "upload")[:200]
        length = _content_length(self.headers)
        if length > limits.max_image_bytes:
            self._unread = length
            raise RequestError(413, "image_too_large",
                               f"{name}: image is {length} bytes; the limit is {limits.max_image_bytes} bytes")
        raw = self._body(limits.max_image_bytes, f"{name}: image")
        img = decode_image(raw, name, limits)
        self._json(200, {"name": name, "width": img.size[0], "height": img.size[1], "bytes": len(raw)})


def make_server(model, host: str = "127.0.0.1", port: int = 8000, limits: Limits | None = None,
                quiet: bool = False) -> ThreadingHTTPServer:
    """A ready-to-run server (call `serve_forever`; port 0 picks a free port: see `server.server_address`)."""
    limits = limits or Limits()
    handler = type("GhostVisHandler", (Handler,), {"runner": ModelRunner(model, limits), "page": page_html(limits),
                                                   "quiet": quiet})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m ghostvis_jax.serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"))
    defaults = Limits()
    p.add_argument("--max-body-mb", type=float, default=defaults.max_body_bytes / 2**20)
    p.add_argument("--max-image-mb", type=float, default=defaults.max_image_bytes / 2**20)
    p.add_argument("--max-images", type=int, default=defaults.max_images)
    p.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens,
                   help="the largest max_new_tokens a request may ask for")
    p.add_argument("--default-max-new-tokens", type=int, default=defaults.default_max_new_tokens)
    p.add_argument("--max-queue", type=int, default=defaults.max_queue)
    p.add_argument("--quiet", action="store_true", help="no per-request log lines")
    args = p.parse_args(argv)
    limits = Limits(max_body_bytes=int(args.max_body_mb * 2**20), max_image_bytes=int(args.max_image_mb * 2**20),
                    max_images=args.max_images, max_new_tokens=args.max_new_tokens,
                    default_max_new_tokens=min(args.default_max_new_tokens, args.max_new_tokens),
                    max_queue=args.max_queue)

    import jax

    import ghostvis_jax as gv

    dtype = args.dtype if args.dtype != "auto" else ("float32" if jax.default_backend() == "cpu" else "bfloat16")
    model = gv.load(args.checkpoint, dtype=dtype)
    if model.tokenizer is None:
        p.error(f"{args.checkpoint} has no tokenizer; the server needs one to render conversations")
    server = make_server(model, args.host, args.port, limits, quiet=args.quiet)
    host, port = server.server_address[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"GhostVis serving {args.checkpoint} on http://{shown}:{port}/ (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
