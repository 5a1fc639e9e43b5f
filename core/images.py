"""Image intake: whatever a person uploads becomes a clean, content-addressed RGB PNG.

`normalise` applies the EXIF orientation, converts every mode (RGBA, palette,
greyscale, 16-bit confocal tiles, CMYK, float) to 8-bit RGB and drops all metadata;
`intake` also stores the result under `<home>/images/<sha[:2]>/<sha>.png`, where the
SHA-256 is of the normalised pixels (plus size), so the same picture uploaded twice,
under any file name or with other metadata, is stored once. The uploaded file name
is never kept.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from core.errors import ImageError

ImageSource = Union[str, os.PathLike, bytes, Image.Image, np.ndarray]


@dataclass(frozen=True)
class StoredImage:
    sha256: str
    path: Path  # where the clean PNG lies
    width: int
    height: int
    nbytes: int  # size of the stored PNG
    image: Image.Image  # the normalised RGB image itself


def image_path(images_dir: Path, sha256: str) -> Path:
    return Path(images_dir) / sha256[:2] / f"{sha256}.png"


def load_stored(images_dir: Path, sha256: str) -> Image.Image:
    path = image_path(images_dir, sha256)
    if not path.exists():
        raise ImageError(f"stored image {sha256[:12]}… is missing from {images_dir}")
    with Image.open(path) as img:
        return img.convert("RGB")


def normalise(src: ImageSource, *, max_pixels: int = 40_000_000, max_bytes: int = 50_000_000) -> tuple[Image.Image, str]:
    """Return (clean 8-bit RGB image without metadata, SHA-256 of its pixels)."""
    img = _open(src, max_pixels=max_pixels, max_bytes=max_bytes)
    try:
        img = ImageOps.exif_transpose(img)  # orientation first: it lives in the metadata we drop
        rgb = _to_rgb8(img)
    except (OSError, ValueError, SyntaxError) as e:
        raise ImageError(f"the image is truncated or corrupt ({e})") from None
    # Rebuild from raw pixels so no EXIF, GPS, ICC, text chunk or other info survives.
    clean = Image.frombytes("RGB", rgb.size, rgb.tobytes())
    digest = hashlib.sha256(f"{clean.width}x{clean.height}:".encode() + clean.tobytes()).hexdigest()
    return clean, digest


def intake(src: ImageSource, images_dir: Path, *, max_pixels: int = 40_000_000, max_bytes: int = 50_000_000) -> StoredImage:
    """Normalise `src` and store it content-addressed (idempotent, atomic)."""
    clean, digest = normalise(src, max_pixels=max_pixels, max_bytes=max_bytes)
    path = image_path(images_dir, digest)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        # Write then rename: a killed process never leaves a half-written image under its hash.
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                clean.save(f, format="PNG")
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return StoredImage(digest, path, clean.width, clean.height, path.stat().st_size, clean)


def intake_many(
    sources: Iterable[ImageSource], images_dir: Path, *, max_images: int, max_pixels: int = 40_000_000, max_bytes: int = 50_000_000
) -> list[StoredImage]:
    """Check every image before storing any, so a bad one in a batch stores nothing."""
    sources = list(sources)
    if len(sources) > max_images:
        raise ImageError(f"{len(sources)} images given; at most {max_images} per question")
    for src in sources:
        normalise(src, max_pixels=max_pixels, max_bytes=max_bytes)
    return [intake(s, images_dir, max_pixels=max_pixels, max_bytes=max_bytes) for s in sources]


def _open(src: ImageSource, *, max_pixels: int, max_bytes: int) -> Image.Image:
    if isinstance(src, Image.Image):
        img = src
    elif isinstance(src, np.ndarray):
        try:
            img = Image.fromarray(src)
        except (TypeError, ValueError) as e:
            raise ImageError(f"the array is not an image ({e})") from None
    else:
        data = _read_bytes(src, max_bytes)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                img = Image.open(io.BytesIO(data))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise ImageError(f"the image is too large (more than {max_pixels:,} pixels)") from None
        except UnidentifiedImageError:
            raise ImageError("the file is not an image (JPEG, PNG, TIFF, WebP, BMP or GIF expected)") from None
    if img.width * img.height > max_pixels:
        raise ImageError(f"the image is too large: {img.width}x{img.height} is more than {max_pixels:,} pixels")
    if img.width < 1 or img.height < 1:
        raise ImageError("the image has no pixels")
    try:
        img.load()
    except (OSError, ValueError, SyntaxError) as e:
        raise ImageError(f"the image is truncated or corrupt ({e})") from None
    return img


def _read_bytes(src: str | os.PathLike | bytes, max_bytes: int) -> bytes:
    if isinstance(src, (bytes, bytearray)):
        data = bytes(src)
    else:
        path = Path(src)
        if not path.is_file():
            raise ImageError("the uploaded file could not be found")
        if path.stat().st_size > max_bytes:
            raise ImageError(f"the file is too large (more than {max_bytes // 1_000_000} MB)")
        data = path.read_bytes()
    if not data:
        raise ImageError("the file is empty")
    if len(data) > max_bytes:
        raise ImageError(f"the file is too large (more than {max_bytes // 1_000_000} MB)")
    return data


def _to_rgb8(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        return _high_depth_to_rgb8(img)
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("LA", "PA", "La", "RGBa"):
        img = img.convert("RGBA")
    if img.mode == "RGBA":
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, img).convert("RGB")
    return img.convert("RGB")


def _high_depth_to_rgb8(img: Image.Image) -> Image.Image:
    """16/32-bit or float greyscale -> 8-bit without clipping to white or black.

    Integer data is scaled by the bit depth its maximum implies (a 12-bit confocal
    tile in a 16-bit container uses the full 8-bit range); float data by its range.
    """
    arr = np.asarray(img).astype(np.float64)
    if img.mode == "F":
        lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
        scaled = (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
    else:
        arr = np.clip(arr, 0, None)
        bits = max(8, int(np.ceil(np.log2(arr.max() + 1)))) if arr.size and arr.max() > 0 else 8
        scaled = arr / (2**bits - 1)
    grey = np.round(np.nan_to_num(scaled) * 255).clip(0, 255).astype(np.uint8)
    return Image.fromarray(grey, mode="L").convert("RGB")
