"""Gentle image-quality hints shown before a clinician asks: too dark, blurred, too small.

    from core.quality import quality_hints
    quality_hints(pil_image)   # [] or ["The image looks dark: ...", ...]

Pure functions on PIL images (no model, no I/O), so they are cheap enough to run on
every upload. Hints, not rules: the question can still be asked. Brightness is the
mean luminance; sharpness the variance of a Laplacian filter on the luminance, taken
after scaling a large image down to a fixed size so thresholds depend little on resolution.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageStat

DARK_MEAN = 45.0  # mean luminance (0-255) below this: too dark to see colour and border
BLUR_VARIANCE = 10.0  # Laplacian variance (at most ANALYSIS_EDGE px) below this: little fine detail (a textured photo: 100s)
MIN_EDGE = 224  # the shorter side below this: too small (the model sees 384-512 px tiles)
ANALYSIS_EDGE = 512


@dataclass(frozen=True)
class Quality:
    brightness: float
    sharpness: float
    short_edge: int


def measure(img: Image.Image) -> Quality:
    grey = img.convert("L")
    scale = min(1.0, ANALYSIS_EDGE / max(grey.size))  # down only: upscaling would invent blur
    analysed = grey.resize((max(1, round(grey.width * scale)), max(1, round(grey.height * scale))), Image.Resampling.BILINEAR)
    a = np.asarray(analysed, dtype=np.float32)
    lap = a[1:-1, :-2] + a[1:-1, 2:] + a[:-2, 1:-1] + a[2:, 1:-1] - 4 * a[1:-1, 1:-1]  # in float: no clipping
    return Quality(ImageStat.Stat(grey).mean[0], float(lap.var()) if lap.size else 0.0, min(img.size))


def quality_hints(img: Image.Image) -> list[str]:
    """One short sentence per problem found, in the order a photographer would fix them."""
    q = measure(img)
    hints = []
    if q.short_edge < MIN_EDGE:
        hints.append(f"The image is small ({img.width}×{img.height} px): a closer or larger photo shows more detail.")
    if q.brightness < DARK_MEAN:
        hints.append("The image looks dark: more light (or no shadow over the lesion) shows colour and border better.")
    if q.sharpness < BLUR_VARIANCE:
        hints.append("The image looks blurred: hold still, tap to focus on the lesion, and take it again.")
    return hints
