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
import dataclasses
import json
import sys
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any

from ghostvis_jax.data.chat import IMAGE_PLACEHOLDER
from ghostvis_jax.serve.requests import (ACCEPTED_FORMATS, DRAIN_LIMIT, ClientGone, Limits, ModelRunner,
                                         RequestError, decode_image, parse_chat)


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
