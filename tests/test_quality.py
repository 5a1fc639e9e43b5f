"""Image-quality hints (core/quality.py) on drawn images: a textured lesion passes; the same
blurred, darkened or shrunk gets the matching hint and only that one.

    python -m pytest -q tests/test_quality.py
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageFilter

from core.quality import quality_hints

from conftest import draw_lesion


def textured(size=(640, 480), seed=0) -> Image.Image:
    """A drawn lesion with skin-like fine texture (pixel noise), as a phone photo has."""
    img = draw_lesion(size)
    noise = np.random.default_rng(seed).normal(0, 12, (size[1], size[0], 1))
    return Image.fromarray((np.asarray(img, dtype=float) + noise).clip(0, 255).astype("uint8"))


def test_a_good_photo_gets_no_hint():
    assert quality_hints(textured()) == []
    assert quality_hints(textured((2400, 1800))) == []


@pytest.mark.parametrize("spoil, word", [
    (lambda im: im.filter(ImageFilter.GaussianBlur(3)), "blurred"),
    (lambda im: im.resize((1600, 1200)).filter(ImageFilter.GaussianBlur(8)), "blurred"),
    (lambda im: ImageEnhance.Brightness(im).enhance(0.15), "dark"),
    (lambda im: im.resize((160, 120)), "small"),
])
def test_each_problem_gets_its_hint(spoil, word):
    hints = quality_hints(spoil(textured()))
    assert len(hints) == 1 and word in hints[0], hints
