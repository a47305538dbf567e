"""How an image becomes RGB pixels, alike in the shard tools (re-encoding, verify, inspect) and in training."""

from __future__ import annotations

import numpy as np
from PIL import Image


def to_rgb(img: Image.Image) -> Image.Image:
    """``img.convert("RGB")``, but 16-bit greyscale (PNG, TIFF: PIL mode I;16 or I) scaled to 8 bits first, which
    PIL's convert would clip to white."""
    if img.mode.startswith("I"):
        pixels = np.asarray(img).astype(np.int64)
        if pixels.max() > 255:
            pixels >>= 8
        img = Image.fromarray(pixels.clip(0, 255).astype(np.uint8), "L")
    return img.convert("RGB")
