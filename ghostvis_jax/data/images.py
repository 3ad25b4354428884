"""Image decoding and preprocessing for the vision tower (used by training, generate, chat and the web page).

`load_image(src)` turns a path / bytes / file object / PIL image / HF `{"bytes", "path"}` dict into an RGB
PIL image (EXIF orientation applied; palette, CMYK, 16-bit, grayscale and alpha handled; decompression bombs
and unreadable data rejected). `preprocess_image(img, vision_config)` resizes and normalizes it to float32
[H, W, 3] with the tower's mean/std. Every failure is an `ImageDecodeError` naming the file.
"""

from __future__ import annotations

import io
import os
import warnings
from typing import Any

import numpy as np
from PIL import Image, ImageOps

# Largest accepted image, in pixels (PIL's default warns at ~89M and errors at 2x that; we reject at this).
MAX_IMAGE_PIXELS = 64_000_000


class ImageDecodeError(ValueError):
    """An image that cannot be decoded or is not acceptable (too large, corrupt, unsupported)."""


def _describe(src: Any, name: str | None) -> str:
    if name:
        return name
    if isinstance(src, (str, os.PathLike)):
        return os.fspath(src)
    if isinstance(src, dict):
        return src.get("path") or "<image bytes>"
    if isinstance(src, (bytes, bytearray, memoryview)):
        return f"<{len(src)} image bytes>"
    return f"<{type(src).__name__}>"


def _open(src: Any, what: str) -> Image.Image:
    if isinstance(src, Image.Image):
        return src
    if isinstance(src, dict):  # HF datasets Image(decode=False) value
        if src.get("bytes") is not None:
            src = src["bytes"]
        elif src.get("path"):
            src = src["path"]
        else:
            raise ImageDecodeError(f"{what}: image dict has neither 'bytes' nor 'path'")
    if isinstance(src, (bytes, bytearray, memoryview)):
        return Image.open(io.BytesIO(bytes(src)))
    if isinstance(src, (str, os.PathLike)) or hasattr(src, "read"):
        return Image.open(src)
    raise ImageDecodeError(f"{what}: unsupported image source type {type(src).__name__}")


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit / int / float grayscale: scale the actual range to 8 bits instead of clipping.
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        img = Image.fromarray(arr.astype(np.uint8), mode="L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "RGBa"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode != "RGB":
        img = img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV
    return img


def load_image(src: Any, *, name: str | None = None) -> Image.Image:
    """Decode `src` to an RGB PIL image, or raise `ImageDecodeError` naming the file (or `name`)."""
    what = _describe(src, name)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = _open(src, what)
            width, height = img.size
            if width * height > MAX_IMAGE_PIXELS:
                raise ImageDecodeError(f"{what}: {width}x{height} image exceeds {MAX_IMAGE_PIXELS} pixels "
                                       "(possible decompression bomb)")
            if width < 1 or height < 1:
                raise ImageDecodeError(f"{what}: empty image ({width}x{height})")
            img = ImageOps.exif_transpose(img)
            img.load()
            return _to_rgb(img)
    except ImageDecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageDecodeError(f"{what}: rejected as a decompression bomb ({e})") from e
    except FileNotFoundError as e:
        raise ImageDecodeError(f"{what}: file not found") from e
    except Exception as e:  # PIL raises many types (UnidentifiedImageError, OSError, SyntaxError, ...)
        raise ImageDecodeError(f"{what}: cannot decode image ({type(e).__name__}: {e})") from e


def _normalize(img: Image.Image, vision_config) -> np.ndarray:
    arr = np.asarray(img, dtype=np.float32) / 255.0
    mean = np.asarray(vision_config.image_mean, np.float32)
    std = np.asarray(vision_config.image_std, np.float32)
    return (arr - mean) / std


def preprocess_image(img: Any, vision_config, *, rng: np.random.Generator | None = None,
                     augment: bool = False, allow_flip: bool = False) -> np.ndarray:
    """Resize to the tower's square `image_size` and normalize with its mean/std: float32 [H, W, 3].

    `img` may be anything `load_image` accepts. With `augment` (training only, needs `rng`): a random
    resized crop keeping 80-100% of the area, a horizontal flip when `allow_flip` (not for text, charts,
    or left/right questions), and light brightness/contrast jitter.
    """
    if not isinstance(img, Image.Image) or img.mode != "RGB":
        img = load_image(img)
    size = int(vision_config.image_size)
    if augment:
        if rng is None:
            raise ValueError("preprocess_image(augment=True) needs an rng")
        img = _random_resized_crop(img, rng)
        if allow_flip and rng.random() < 0.5:
            img = ImageOps.mirror(img)
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BICUBIC)
    if augment:
        arr = np.asarray(img, dtype=np.float32) / 255.0
        brightness = float(rng.uniform(-0.1, 0.1))
        contrast = float(rng.uniform(0.9, 1.1))
        arr = np.clip((arr - arr.mean()) * contrast + arr.mean() + brightness, 0.0, 1.0)
        mean = np.asarray(vision_config.image_mean, np.float32)
        std = np.asarray(vision_config.image_std, np.float32)
        return ((arr - mean) / std).astype(np.float32)
    return _normalize(img, vision_config)


def _random_resized_crop(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    w, h = img.size
    area = float(rng.uniform(0.8, 1.0))
    aspect = float(np.exp(rng.uniform(np.log(0.9), np.log(1.1))))
    cw = max(1, min(w, int(round(w * np.sqrt(area * aspect)))))
    ch = max(1, min(h, int(round(h * np.sqrt(area / aspect)))))
    x0 = int(rng.integers(0, w - cw + 1))
    y0 = int(rng.integers(0, h - ch + 1))
    return img.crop((x0, y0, x0 + cw, y0 + ch))
