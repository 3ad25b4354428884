"""One tiny checkpoint, one loaded model and one in-process server (loopback, free port) for the serve tests."""

import threading

import numpy as np
import pytest
from PIL import Image

import ghostvis_jax as gv
from ghostvis_jax.serve import Limits, make_server

# Small limits, so the over-limit cases are cheap to send.
LIMITS = Limits(max_body_bytes=400_000, max_image_bytes=150_000, max_images=4, max_new_tokens=32,
                default_max_new_tokens=6, max_queue=32)


@pytest.fixture(scope="session")
def checkpoint(tiny_checkpoint):
    return tiny_checkpoint


@pytest.fixture(scope="session")
def limits():
    return LIMITS


@pytest.fixture(scope="session")
def model(checkpoint):
    return gv.load(checkpoint)


@pytest.fixture(scope="session")
def server(model):
    """(base URL, server); the model is shared with the tests, so they compute expected replies between requests."""
    srv = make_server(model, "127.0.0.1", 0, LIMITS, quiet=True)
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    host, port = srv.server_address[:2]
    yield f"http://{host}:{port}", srv
    srv.shutdown()
    srv.server_close()
    thread.join(timeout=10)


@pytest.fixture(scope="session")
def photo(tmp_path_factory):
    path = tmp_path_factory.mktemp("serve_files") / "photo.png"
    rng = np.random.default_rng(4)
    Image.fromarray(rng.integers(0, 256, (30, 36, 3), dtype=np.uint8)).save(path)
    return path
