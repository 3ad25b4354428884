"""The JSON API of `ghostvis_jax.serve` on loopback: replies equal `model.generate`, streaming, bad requests get
clear 4xx messages and the server keeps answering, concurrent requests, and the command line."""

import base64
import http.client
import io
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

MAX_NEW = 6


def post(url, body, content_type="application/json", headers=None, timeout=120):
    data = json.dumps(body).encode() if not isinstance(body, bytes) else body
    req = urllib.request.Request(url, data=data, method="POST",
                                 headers={"Content-Type": content_type, **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.headers.get("Content-Type"), resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type"), e.read()


def post_json(url, body, **kw):
    status, ctype, raw = post(url, body, **kw)
    assert ctype == "application/json", (status, ctype, raw[:200])
    return status, json.loads(raw)


def b64(path_or_bytes):
    raw = path_or_bytes if isinstance(path_or_bytes, bytes) else open(path_or_bytes, "rb").read()
    return base64.b64encode(raw).decode()


def sse_events(raw: bytes):
    events = []
    for chunk in raw.decode().split("\n\n"):
        data = [line[6:] for line in chunk.split("\n") if line.startswith("data: ")]
        if data:
            events.append(json.loads("\n".join(data)))
    return events


def two_turns(photo, first_reply):
    first = [{"role": "user", "content": "<image>\nWhat is in the picture?"}]
    second = first + [{"role": "assistant", "content": first_reply}, {"role": "user", "content": "What color is it?"}]
    return first, second


def test_chat_equals_generate_over_two_turns_and_streams_the_same_reply(server, model, photo):
    url, _ = server
    image = Image.open(photo)
    first, _ = two_turns(photo, "")
    status, out = post_json(url + "/v1/chat", {"messages": first, "images": [b64(photo)], "max_new_tokens": MAX_NEW})
    expected1 = model.generate({"messages": first, "images": [image]}, max_new_tokens=MAX_NEW)[0]
    assert status == 200 and out["reply"] == expected1, out
    assert out["completion_tokens"] >= 1 and out["finish_reason"] in ("stop", "length")

    _, second = two_turns(photo, out["reply"])
    data_url = "data:image/png;base64," + b64(photo)
    body = {"messages": second, "images": [{"name": "photo.png", "data": data_url}], "max_new_tokens": MAX_NEW,
            "seed": 1}
    status, ctype, raw = post(url + "/v1/chat/stream", body)
    expected2 = model.generate({"messages": second, "images": [image]}, max_new_tokens=MAX_NEW, seed=1)[0]
    assert status == 200 and ctype.startswith("text/event-stream")
    events = sse_events(raw)
    deltas = [e["text"] for e in events if e["type"] == "delta"]
    assert events[-1]["type"] == "done" and events[-1]["reply"] == expected2
    assert "".join(deltas) == expected2 and len(deltas) >= 2  # streamed in pieces

    status, ctype, raw = post(url + "/v1/chat", dict(body, stream=True))  # the same stream from /v1/chat
    assert ctype.startswith("text/event-stream") and sse_events(raw)[-1]["reply"] == expected2


def test_bad_requests_get_clear_4xx_messages_and_the_server_keeps_answering(server, model, photo, limits):
    url, _ = server
    LIMITS = limits
    chat = url + "/v1/chat"
    ask = [{"role": "user", "content": "<image>\nWhat is in the picture?"}]

    def error(status, body, **kw):
        code, out = post_json(chat if "path" not in kw else url + kw.pop("path"), body, **kw)
        assert code == status, (code, out)
        return out["error"]["message"]

    noise = np.random.default_rng(0).integers(0, 256, LIMITS.max_image_bytes + 10_000, dtype=np.uint8).tobytes()
    msg = error(413, {"messages": ask, "images": [{"name": "huge.png", "data": b64(noise)}]})
    assert "huge.png" in msg and "limit" in msg and str(LIMITS.max_image_bytes) in msg
    msg = error(413, b"x" * (LIMITS.max_body_bytes + 1))  # refused from its Content-Length, then drained
    assert "exceeds the limit" in msg and str(LIMITS.max_body_bytes) in msg
    msg = error(400, {"messages": ask, "images": [{"name": "notes.txt", "data": b64(b"just some text\n")}]})
    assert "notes.txt" in msg and "not an image" in msg
    ico = io.BytesIO()
    Image.open(photo).save(ico, format="ICO")
    msg = error(415, {"messages": ask, "images": [{"name": "icon.ico", "data": b64(ico.getvalue())}]})
    assert "icon.ico" in msg and "unsupported image format ICO" in msg
    truncated = open(photo, "rb").read()[:150]
    msg = error(400, {"messages": ask, "images": [{"name": "cut.png", "data": b64(truncated)}]})
    assert "cut.png" in msg
    msg = error(400, {"messages": ask, "images": ["%%% not base64"]})
    assert "images[0]" in msg and "base64" in msg
    msg = error(415, b"messages=hi", content_type="application/x-www-form-urlencoded")
    assert "application/json" in msg
    assert "not valid JSON" in error(400, b"{not json")
    assert "messages" in error(400, {"images": []})
    assert "2 <image> placeholder" in error(400, {"messages": [{"role": "user", "content": "<image><image>"}],
                                                  "images": [b64(photo)]})
    assert "last message" in error(400, {"messages": [{"role": "assistant", "content": "hi"}]})
    assert "max_new_tokens" in error(400, {"messages": ask[:0] + [{"role": "user", "content": "hi"}],
                                           "max_new_tokens": LIMITS.max_new_tokens + 1})
    assert "unknown field" in error(400, {"messages": [{"role": "user", "content": "hi"}], "prompt": "x"})
    assert "notes.txt" in error(400, b"plain text", content_type="text/plain", path="/v1/images/check",
                                headers={"X-Filename": "notes.txt"})
    code, info = post_json(url + "/v1/images/check", open(photo, "rb").read(), content_type="image/png")
    assert code == 200 and (info["width"], info["height"]) == (36, 30)
    with urllib.request.urlopen(url + "/v1/info", timeout=30) as resp:
        assert json.loads(resp.read())["limits"]["max_image_bytes"] == LIMITS.max_image_bytes
    for method, path, status in (("GET", "/v1/chat", 405), ("GET", "/nowhere", 404)):
        conn = http.client.HTTPConnection(url.split("//")[1], timeout=30)
        conn.request(method, path)
        resp = conn.getresponse()
        assert resp.status == status and "error" in json.loads(resp.read())
        conn.close()
    # A client that leaves mid-stream.
    conn = http.client.HTTPConnection(url.split("//")[1], timeout=60)
    conn.request("POST", "/v1/chat/stream", json.dumps({"messages": [{"role": "user", "content": "hi"}]}),
                 {"Content-Type": "application/json"})
    conn.getresponse().read(10)
    conn.close()

    status, out = post_json(chat, {"messages": ask, "images": [b64(photo)], "max_new_tokens": MAX_NEW})
    expected = model.generate({"messages": ask, "images": [Image.open(photo)]}, max_new_tokens=MAX_NEW)[0]
    assert status == 200 and out["reply"] == expected


def test_sixteen_concurrent_requests_all_get_their_own_answer(server, model, photo):
    url, _ = server
    image = Image.open(photo)
    requests = []
    for i in range(16):
        messages = [{"role": "user", "content": f"{'<image>' if i % 2 else ''}Question {i}: what is shown?"}]
        requests.append((messages, [image] if i % 2 else []))
    expected = [model.generate({"messages": m, "images": im}, max_new_tokens=MAX_NEW)[0] for m, im in requests]
    assert len(set(expected)) > 1  # the answers differ, so a mix-up would show

    def ask(i):
        messages, images = requests[i]
        return post_json(url + "/v1/chat", {"messages": messages, "images": [b64(photo)] if images else [],
                                             "max_new_tokens": MAX_NEW}, timeout=300)

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(ask, range(16)))
    assert [s for s, _ in results] == [200] * 16
    assert [out["reply"] for _, out in results] == expected


def test_command_line_binds_loopback_and_serves(checkpoint, photo):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.Popen([sys.executable, "-m", "ghostvis_jax.serve", "--checkpoint", checkpoint, "--port", "0",
                             "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        assert "http://127.0.0.1:" in line, (line, proc.stderr.read() if proc.poll() is not None else "")
        base = line.split("http://")[1].split("/")[0]
        with urllib.request.urlopen(f"http://{base}/", timeout=30) as resp:
            assert resp.status == 200 and b"<title>GhostVis" in resp.read()
        code, out = post_json(f"http://{base}/v1/images/check", b"GIF89a broken", content_type="image/gif",
                              headers={"X-Filename": "anim.gif"})
        assert code == 400 and "anim.gif" in out["error"]["message"]
        assert proc.poll() is None  # still serving
    finally:
        proc.terminate()
        proc.wait(timeout=30)
