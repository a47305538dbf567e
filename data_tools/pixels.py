"""How an image becomes RGB pixels, alike in the shard tools (re-encoding, verify, inspect) and in training."""

from __future__ import annotations

import numpy as np
from PIL import ExifTags, Image, ImageOps

TURNED = (5, 6, 7, 8)  # EXIF orientations that swap width and height


def orientation(img: Image.Image) -> int:
    """The EXIF orientation of an opened image (1: stored upright), read from its header."""
    return img.getexif().get(ExifTags.Base.Orientation, 1)


def upright_size(img: Image.Image) -> tuple[int, int]:
    """(width, height) of an opened image once its EXIF orientation is applied."""
    return img.size[::-1] if orientation(img) in TURNED else img.size


def to_rgb(img: Image.Image) -> Image.Image:
    """``img.convert("RGB")``, upright, with 16-bit greyscale scaled to 8 bits.

    Upright: the EXIF orientation a camera or phone writes is applied, as browsers, PIL's ``ImageOps.exif_transpose``
    and Hugging Face's ``load_image`` do, so that a photo is not learned on its side. 16-bit greyscale (PNG, TIFF:
    PIL mode I;16 or I) is divided by 256 whatever its content, where PIL's convert clips it to white.
    """
    if orientation(img) != 1:
        img = ImageOps.exif_transpose(img)
    if img.mode.startswith("I"):
        pixels = np.asarray(img).astype(np.int64) >> 8
        img = Image.fromarray(pixels.clip(0, 255).astype(np.uint8), "L")
    return img.convert("RGB")
