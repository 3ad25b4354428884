"""`python -m ghostvis_jax.chat` driven through stdin: an image, two turns, a bad image, /reset, /quit."""

import io
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import ghostvis_jax as gv
from ghostvis_jax.chat import ChatSession, run

MAX_NEW = 5


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint):
    return tiny_checkpoint


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat_files")
    rng = np.random.default_rng(4)
    Image.fromarray(rng.integers(0, 256, (30, 36, 3), dtype=np.uint8)).save(root / "photo.png")
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    return root


def expected_replies(model, image):
    first = {"messages": [{"role": "user", "content": "<image>\nWhat is in the picture?"}], "images": [image]}
    r1 = model.generate(first, max_new_tokens=MAX_NEW)[0]
    second = {"messages": first["messages"] + [{"role": "assistant", "content": r1},
                                               {"role": "user", "content": "What color is it?"}],
              "images": [image]}
    r2 = model.generate(second, max_new_tokens=MAX_NEW, seed=1)[0]
    r3 = model.generate("hi", max_new_tokens=MAX_NEW, seed=0)[0]
    return r1, r2, r3


def test_chat_cli_through_stdin(checkpoint, files):
    script = (f"/image {files / 'photo.png'}\nWhat is in the picture?\n/image {files / 'broken.jpg'}\n"
              f"What color is it?\n/reset\nhi\n/quit\nnever read\n")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", "ghostvis_jax.chat", "--checkpoint", checkpoint,
                           "--max-new-tokens", str(MAX_NEW)], input=script, capture_output=True, text=True,
                          env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    r1, r2, r3 = expected_replies(gv.load(checkpoint), Image.open(files / "photo.png"))
    expected_order = [f"[image attached: {files / 'photo.png'}]\n", r1 + "\n",
                      "[error] image not attached: ", "broken.jpg", r2 + "\n", "[conversation reset]\n", r3 + "\n"]
    position = 0
    for piece in expected_order:
        found = out.find(piece, position)
        assert found >= 0, f"{piece!r} missing after position {position} in {out!r}"
        position = found + len(piece)
    assert out.endswith(r3 + "\n")  # /quit stopped reading


class Recorder(io.StringIO):
    def __init__(self):
        super().__init__()
        self.writes = []

    def write(self, s):
        self.writes.append(s)
        return super().write(s)


def test_reply_is_streamed_in_pieces_and_errors_do_not_end_the_session(checkpoint, files):
    model = gv.load(checkpoint)
    out = Recorder()
    session = ChatSession(model, out, max_new_tokens=MAX_NEW)
    run(session, io.StringIO("/image\n/image /no/such/file.png\n<image> no image attached\nhi\n"), False)
    text = out.getvalue()
    assert "usage: /image PATH" in text and "/no/such/file.png" in text and "[error] no reply" in text
    reply = model.generate("hi", max_new_tokens=MAX_NEW)[0]
    assert text.endswith(reply + "\n")
    pieces_after_error = out.writes[[i for i, w in enumerate(out.writes) if "no reply" in w][0] + 1:]
    assert len([p for p in pieces_after_error if p.strip()]) >= 2  # several streamed pieces, not one print
