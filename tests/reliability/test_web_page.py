"""The web page's API on 127.0.0.1 (ghostvis_jax/serve/): hostile images, an oversized upload, a wrong content
type, and many concurrent chat requests; answers stay correct and the server stays up."""

import base64
import concurrent.futures
import json
import os
import threading
import urllib.error
import urllib.request

import pytest

serve = pytest.importorskip("ghostvis_jax.serve")
pytestmark = pytest.mark.timeout(300)
SURFACE = "web page (loopback)"


@pytest.fixture(scope="module")
def server(tiny_model):
    limits = serve.Limits(max_body_bytes=1 << 20, max_image_bytes=256 << 10, max_queue=32)
    srv = serve.make_server(tiny_model, "127.0.0.1", 0, limits=limits, quiet=True)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def _post(url, data: bytes, ctype: str, headers=None):
    req = urllib.request.Request(url, data=data, method="POST", headers={"Content-Type": ctype, **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def _chat(base, text, images=(), max_new_tokens=2):
    body = {"messages": [{"role": "user", "content": text}], "max_new_tokens": max_new_tokens,
            "images": [{"data": base64.b64encode(b).decode(), "name": n} for n, b in images]}
    return _post(base + "/v1/chat", json.dumps(body).encode(), "application/json")


def test_hostile_images_through_the_page(server, hostile_images, tiny_model, ledger):
    for name, (path, expected) in hostile_images.items():
        fname = os.path.basename(path)
        status, body = _chat(server, "<image>\nWhat is this?", [(fname, open(path, "rb").read())])
        if status == 200:
            ok = isinstance(body.get("reply"), str)
            ledger.record(SURFACE, name, "worked" if ok else "crash")
        else:
            msg = json.dumps(body)
            ok = 400 <= status < 500 and fname in msg
            ledger.record(SURFACE, name, "clear error" if ok else "crash", f"{status} {msg[:90]}")
        assert ok, (name, status, body)


def test_oversized_upload_and_wrong_content_type(server, ledger):
    big = os.urandom(2 << 20)  # over max_body_bytes
    status, body = _post(server + "/v1/chat", big, "application/json")
    ok = status == 413 and "limit" in json.dumps(body)
    ledger.record(SURFACE, "2 MiB body over a 1 MiB limit", "clear error" if ok else "crash", f"{status}")
    assert ok, (status, body)
    status, body = _post(server + "/v1/images/check", os.urandom(300 << 10), "application/octet-stream",
                         {"X-Filename": "huge.png"})
    ok = status == 413
    ledger.record(SURFACE, "300 KiB image over a 256 KiB limit", "clear error" if ok else "crash", f"{status}")
    assert ok, (status, body)
    status, body = _post(server + "/v1/chat", b"messages=hi", "application/x-www-form-urlencoded")
    ok = status == 415 and "application/json" in json.dumps(body)
    ledger.record(SURFACE, "wrong content type (form-encoded)", "clear error" if ok else "crash", f"{status}")
    assert ok, (status, body)
    status, body = _post(server + "/v1/chat", b"{not json", "application/json")
    ok = status == 400
    ledger.record(SURFACE, "malformed JSON", "clear error" if ok else "crash", f"{status}")
    assert ok, (status, body)


def test_many_concurrent_requests_stay_correct(server, tiny_model, ledger):
    prompts = [f"question number {i}" for i in range(6)]
    want = {p: tiny_model.generate(p, max_new_tokens=2) [0] for p in prompts}
    jobs = [prompts[i % len(prompts)] for i in range(24)]
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        results = list(pool.map(lambda p: (p, _chat(server, p)), jobs))
    wrong = [(p, s, b) for p, (s, b) in results if s != 200 or b.get("reply") != want[p]]
    busy = [r for r in wrong if r[1] == 503]
    status, _ = _chat(server, prompts[0])
    ok = not [w for w in wrong if w[1] != 503] and status == 200
    ledger.record(SURFACE, "24 concurrent chat requests (12 clients)", "worked" if ok else "silent corruption",
                  f"{24 - len(wrong)} answered = generate(), {len(busy)} told busy (503); server up after")
    assert ok, wrong[:3]
