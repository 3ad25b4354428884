"""Shared pieces of the reliability suite: the hostile inputs, one tiny checkpoint, and the ledger.

Every test records what it tried and how the product handled it (`ledger.record(surface, input, outcome)`);
the session-finish hook prints the table per surface with the totals. Outcomes:
  worked        accepted and handled correctly (checked by the test: RGB, orientation, bit-identical, ...)
  clear error   refused with a message naming the file / key / cause (checked by the test)
  counted skip  left out and counted (per dataset, per reason)
  crash / silent corruption / data lost / hang   the failures the suite exists to catch (each also fails its test)
"""

from __future__ import annotations

import collections
import io
import os
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

OUTCOMES = ("worked", "clear error", "counted skip")
FAILURES = ("crash", "silent corruption", "data lost", "hang")


class Ledger:
    def __init__(self):
        self.rows: list[tuple[str, str, str, str]] = []

    def record(self, surface: str, item: str, outcome: str, detail: str = "") -> None:
        assert outcome in OUTCOMES + FAILURES, outcome
        self.rows.append((surface, item, outcome, detail))

    def table(self) -> str:
        if not self.rows:
            return ""
        per = collections.OrderedDict()
        for surface, _, outcome, _ in self.rows:
            per.setdefault(surface, collections.Counter())[outcome] += 1
        cols = OUTCOMES + FAILURES
        width = max(len(s) for s in per) + 2
        lines = ["reliability summary (inputs tried per surface, and how each was handled)",
                 f"{'surface':<{width}}{'tried':>6}" + "".join(f"{c:>19}" for c in cols)]
        total = collections.Counter()
        for surface, counts in per.items():
            total.update(counts)
            lines.append(f"{surface:<{width}}{sum(counts.values()):>6}" + "".join(f"{counts[c]:>19}" for c in cols))
        lines.append(f"{'total':<{width}}{sum(total.values()):>6}" + "".join(f"{total[c]:>19}" for c in cols))
        lines.append(f"crashes {total['crash'] + total['hang']}, silent corruptions {total['silent corruption']}, "
                     f"data lost {total['data lost']}")
        return "\n".join(lines)

    def details(self) -> str:
        return "\n".join(f"  [{s}] {i}: {o}" + (f" — {d}" if d else "") for s, i, o, d in self.rows)


LEDGER = Ledger()


@pytest.fixture(scope="session")
def ledger() -> Ledger:
    return LEDGER


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    text = LEDGER.table()
    if not text:
        return
    terminalreporter.write_sep("=", "reliability")
    terminalreporter.write_line(text)
    if config.getoption("verbose") > 0 or os.environ.get("GHOSTVIS_RELIABILITY_DETAILS"):
        terminalreporter.write_line(LEDGER.details())
    out = os.environ.get("GHOSTVIS_RELIABILITY_SUMMARY")
    if out:
        with open(out, "w") as f:
            f.write(text + "\n\n" + LEDGER.details() + "\n")


# ---- hostile images -----------------------------------------------------------------------------------------

def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bomb_png(width: int = 50_000, height: int = 50_000) -> bytes:
    """A valid PNG header claiming width x height RGB pixels, with a few bytes of data (decompression bomb)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1024)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def exif_rotated_jpeg() -> bytes:
    """40 wide x 20 high: left half red, right half blue; EXIF orientation 6 (display rotated 90° clockwise,
    so the decoded image must be 20 wide x 40 high with red on top)."""
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :20] = (255, 0, 0)
    arr[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    return _save(Image.fromarray(arr), "JPEG", quality=95, exif=exif.tobytes())


def make_hostile_images(root) -> dict[str, tuple[str, str]]:
    """{name: (path, expected)}; expected is "ok" (decodes to RGB) or "reject" (ImageDecodeError naming it)."""
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (32, 48, 3), dtype=np.uint8))
    jpeg = _save(rgb, "JPEG")
    gif_frames = [Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).convert("P") for _ in range(3)]
    gif = io.BytesIO()
    gif_frames[0].save(gif, "GIF", save_all=True, append_images=gif_frames[1:], duration=50, loop=0)
    rgba = np.zeros((12, 12, 4), np.uint8)
    rgba[..., :3] = 37  # colour under zero alpha must not leak through
    items = {
        "truncated JPEG": ("truncated.jpg", jpeg[: len(jpeg) // 2], "reject"),
        "zero-byte file": ("empty.png", b"", "reject"),
        "non-image bytes, .jpg name": ("page.jpg", b"<!doctype html><html><body>403 Forbidden</body></html>",
                                       "reject"),
        "CMYK JPEG": ("cmyk.jpg", _save(rgb.convert("CMYK"), "JPEG"), "ok"),
        "16-bit grayscale PNG": ("gray16.png", _save(Image.fromarray(
            (np.arange(24 * 24).reshape(24, 24) * 100).astype(np.uint16)), "PNG"), "ok"),
        "palette PNG": ("palette.png", _save(rgb.convert("P", palette=Image.Palette.ADAPTIVE), "PNG"), "ok"),
        "fully transparent RGBA PNG": ("transparent.png", _save(Image.fromarray(rgba, "RGBA"), "PNG"), "ok"),
        "1x1 PNG": ("one.png", _save(Image.new("RGB", (1, 1), (9, 200, 30)), "PNG"), "ok"),
        "4000x3 PNG": ("wide.png", _save(Image.new("RGB", (4000, 3), (120, 10, 10)), "PNG"), "ok"),
        "animated GIF": ("anim.gif", gif.getvalue(), "ok"),
        "TIFF": ("image.tiff", _save(rgb, "TIFF"), "ok"),
        "WebP": ("image.webp", _save(rgb, "WEBP"), "ok"),
        "BMP": ("image.bmp", _save(rgb, "BMP"), "ok"),
        "EXIF-rotated JPEG": ("rotated.jpg", exif_rotated_jpeg(), "ok"),
        "PNG header claiming 50000x50000": ("bomb.png", bomb_png(), "reject"),
    }
    out = {}
    os.makedirs(root, exist_ok=True)
    for name, (fname, data, expected) in items.items():
        path = os.path.join(root, fname)
        with open(path, "wb") as f:
            f.write(data)
        out[name] = (path, expected)
    return out


def check_decoded(name: str, img: Image.Image) -> None:
    """What a correctly handled image must look like after load_image (beyond being RGB)."""
    arr = np.asarray(img)
    assert img.mode == "RGB" and arr.ndim == 3 and arr.shape[2] == 3, (name, img.mode, arr.shape)
    if name == "EXIF-rotated JPEG":
        assert img.size == (20, 40), f"EXIF orientation not applied: {img.size}"
        top, bottom = arr[:15].reshape(-1, 3).mean(0), arr[-15:].reshape(-1, 3).mean(0)
        assert top[0] > 200 and top[2] < 60 and bottom[2] > 200 and bottom[0] < 60, (top, bottom)
    if name == "fully transparent RGBA PNG":
        assert (arr == 255).all(), "transparent pixels must become the white background"
    if name == "16-bit grayscale PNG":
        assert arr.min() == 0 and arr.max() == 255, "16-bit range must be scaled, not clipped"
    if name == "4000x3 PNG":
        assert img.size == (4000, 3)


@pytest.fixture(scope="session")
def hostile_images(tmp_path_factory):
    return make_hostile_images(str(tmp_path_factory.mktemp("hostile_images")))


# ---- one tiny converted checkpoint per session (shared with the generate / chat tests' layout) ---------------

@pytest.fixture(scope="session")
def tiny_model(tiny_checkpoint):
    import ghostvis_jax as gv

    return gv.load(tiny_checkpoint)


@pytest.fixture(scope="session")
def hf_folders(tiny_checkpoint, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.getbasetemp() / "tiny_generate_ckpt"
    return {"qwen": str(root / "qwen"), "siglip": str(root / "siglip")}


@pytest.fixture(scope="session")
def check_decoded_fn():
    return check_decoded
