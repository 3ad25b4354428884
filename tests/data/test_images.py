import io

import numpy as np
import pytest
from PIL import Image

from ghostvis_jax.config import SiglipConfig
from ghostvis_jax.data import images


def _png(img):
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_modes_become_rgb(tmp_path):
    rgba = Image.new("RGBA", (6, 4), (255, 0, 0, 0))  # fully transparent -> white background
    assert images.load_image(_png(rgba)).getpixel((0, 0)) == (255, 255, 255)
    pal = Image.new("RGB", (6, 4), (10, 200, 30)).convert("P")
    assert images.load_image(_png(pal)).mode == "RGB"
    cmyk = Image.new("CMYK", (6, 4), (0, 255, 255, 0))
    buf = io.BytesIO()
    cmyk.save(buf, format="JPEG")
    out = images.load_image(buf.getvalue())
    assert out.mode == "RGB" and out.getpixel((2, 2))[0] > 200
    g16 = Image.fromarray(np.array([[0, 65535], [1000, 30000]], dtype=np.uint16))
    out = images.load_image(_png(g16))
    assert out.mode == "RGB" and out.getpixel((1, 0)) == (255, 255, 255) and out.getpixel((0, 0)) == (0, 0, 0)


def test_exif_orientation_applied():
    img = Image.new("RGB", (8, 4), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif)
    assert images.load_image(buf.getvalue()).size == (4, 8)


def test_errors_name_the_file(tmp_path, monkeypatch):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(images.ImageDecodeError, match="broken.jpg"):
        images.load_image(str(bad))
    with pytest.raises(images.ImageDecodeError, match="missing.png"):
        images.load_image(str(tmp_path / "missing.png"))
    with pytest.raises(images.ImageDecodeError, match="row 3"):
        images.load_image(b"\x89PNG garbage", name="row 3")
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(images.ImageDecodeError, match="decompression bomb"):
        images.load_image(_png(Image.new("RGB", (20, 20))))


def test_preprocess_shape_and_normalization():
    cfg = SiglipConfig(image_size=16)
    out = images.preprocess_image(Image.new("RGB", (40, 30), (255, 0, 128)), cfg)
    assert out.shape == (16, 16, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out[0, 0], [1.0, -1.0, 128 / 255 * 2 - 1], atol=1e-6)
    rng = np.random.default_rng(0)
    aug = images.preprocess_image(Image.new("RGB", (40, 30), (255, 0, 128)), cfg, rng=rng, augment=True)
    assert aug.shape == (16, 16, 3) and aug.dtype == np.float32 and np.all(np.abs(aug) <= 1.0 + 1e-6)
