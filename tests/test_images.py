"""Image intake: normalisation, metadata stripping, content addressing, bad uploads."""

import io
import os

import numpy as np
import pytest
from PIL import Image

from core.errors import ImageError
from core.images import image_path, intake, intake_many, normalise

from conftest import draw_lesion


def _png_bytes(img: Image.Image, **save) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=save.pop("format", "PNG"), **save)
    return buf.getvalue()


def _stored_files(images_dir):
    return sorted(p for p in images_dir.rglob("*") if p.is_file()) if images_dir.exists() else []


def test_same_pixels_stored_once_and_file_name_not_kept(tmp_path):
    images = tmp_path / "images"
    img = draw_lesion()
    src = tmp_path / "Jane_Doe_back_mole.jpg"
    src.write_bytes(_png_bytes(img))
    a = intake(src, images)
    b = intake(_png_bytes(img), images)
    assert a.sha256 == b.sha256 and a.path == b.path == image_path(images, a.sha256)
    assert _stored_files(images) == [a.path]
    assert "Jane" not in str(a.path) and a.path.suffix == ".png"


def test_exif_orientation_applied_and_metadata_dropped(tmp_path):
    img = Image.new("RGB", (40, 20), (200, 30, 30))
    img.paste((20, 20, 200), (0, 0, 10, 20))  # blue stripe on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 CW to display
    exif[0x8825] = {1: "N", 2: (51.0, 30.0, 0.0)}  # GPS
    exif[0x010F] = "PhoneMaker"
    data = _png_bytes(img, format="JPEG", exif=exif, quality=95)
    stored = intake(data, tmp_path / "images")
    assert (stored.width, stored.height) == (20, 40)  # rotated
    top = np.asarray(stored.image)[2, 10]
    assert top[2] > 150 and top[0] < 100  # the stripe is now at the top
    with Image.open(stored.path) as reread:
        assert not reread.getexif()
        assert "exif" not in reread.info and "icc_profile" not in reread.info
    raw = stored.path.read_bytes()
    assert b"PhoneMaker" not in raw and b"Exif" not in raw


def test_png_text_chunks_dropped(tmp_path):
    from PIL.PngImagePlugin import PngInfo

    meta = PngInfo()
    meta.add_text("Patient", "Jane Doe, DOB 1970-01-01")
    stored = intake(_png_bytes(draw_lesion(), pnginfo=meta), tmp_path / "images")
    assert b"Jane Doe" not in stored.path.read_bytes()


@pytest.mark.parametrize("mode", ["RGBA", "P", "L", "LA", "CMYK", "1"])
def test_every_mode_becomes_rgb(mode):
    img = draw_lesion().convert(mode)
    clean, _ = normalise(img)
    assert clean.mode == "RGB" and clean.size == img.size


def test_rgba_composited_over_white():
    img = Image.new("RGBA", (10, 10), (0, 0, 0, 0))
    img.putpixel((5, 5), (255, 0, 0, 255))
    clean, _ = normalise(img)
    assert clean.getpixel((0, 0)) == (255, 255, 255)
    assert clean.getpixel((5, 5)) == (255, 0, 0)


def test_16bit_greyscale_keeps_contrast(tmp_path):
    # A 12-bit confocal-like tile in a 16-bit container: naive 8-bit conversion clips it.
    ramp = np.tile(np.linspace(0, 4095, 64, dtype=np.uint16), (32, 1))
    src = tmp_path / "tile.png"
    Image.fromarray(ramp).save(src)
    assert Image.open(src).mode.startswith("I")
    stored = intake(src, tmp_path / "images")
    grey = np.asarray(stored.image)[:, :, 0]
    assert grey.min() <= 5 and grey.max() >= 250  # full range, not all white or black
    assert np.all(np.diff(grey[0].astype(int)) >= 0)  # the ramp stays a ramp


def test_full_range_16bit_maps_by_high_byte():
    arr = np.array([[0, 32768, 65535]], dtype=np.uint16)
    clean, _ = normalise(Image.fromarray(arr))
    assert [clean.getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", "empty"),
        (b"%PDF-1.7\n1 0 obj << /Type /Catalog >> endobj\n", "not an image"),
        (b"hello, this is a text file renamed to .jpg", "not an image"),
    ],
)
def test_bad_files_rejected_and_nothing_written(tmp_path, data, message):
    src = tmp_path / "upload.jpg"
    src.write_bytes(data)
    with pytest.raises(ImageError, match=message):
        intake(src, tmp_path / "images")
    assert _stored_files(tmp_path / "images") == []


def test_truncated_image_rejected(tmp_path):
    data = _png_bytes(draw_lesion(size=(300, 300)), format="JPEG", quality=90)
    with pytest.raises(ImageError, match="truncated or corrupt"):
        intake(data[: len(data) // 2], tmp_path / "images")
    assert _stored_files(tmp_path / "images") == []


def test_decompression_bomb_rejected_before_decoding(tmp_path):
    big = Image.new("L", (5000, 5000))  # 25 Mpx, compresses to almost nothing
    data = _png_bytes(big)
    with pytest.raises(ImageError, match="too large"):
        intake(data, tmp_path / "images", max_pixels=10_000_000)
    assert _stored_files(tmp_path / "images") == []


def test_oversized_file_rejected(tmp_path):
    src = tmp_path / "huge.png"
    src.write_bytes(_png_bytes(draw_lesion()))
    with pytest.raises(ImageError, match="file is too large"):
        intake(src, tmp_path / "images", max_bytes=100)


def test_too_many_images_or_one_bad_in_batch_stores_nothing(tmp_path):
    images = tmp_path / "images"
    good = [draw_lesion(colour=(i * 40, 50, 50)) for i in range(3)]
    with pytest.raises(ImageError, match="at most 2"):
        intake_many(good, images, max_images=2)
    with pytest.raises(ImageError, match="not an image"):
        intake_many([good[0], b"not an image at all"], images, max_images=4)
    assert _stored_files(images) == []
    assert len(intake_many(good, images, max_images=4)) == 3


def test_no_temp_files_left(tmp_path):
    images = tmp_path / "images"
    intake(draw_lesion(), images)
    assert not [p for p in _stored_files(images) if p.suffix == ".tmp"]
    assert all(os.access(p, os.R_OK) for p in _stored_files(images))
