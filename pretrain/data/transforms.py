"""Decoding and augmentation: Inception-style crop + flip for training, resize + centre crop for eval.

Images leave the workers as uint8 (3, S, S) tensors: a quarter of the bytes of float32 to pin and
copy; the step normalises them on the device (mean 0.5, std 0.5). Training randomness comes from a
seed per sample (run seed, epoch, shard, index), so a resumed stream augments exactly as before.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F

from data_tools.manifest import IMAGE_EXTENSIONS, label_ids

EVAL_CROP = 0.875  # resize the shorter side to size / 0.875, then centre-crop size (the usual ImageNet eval)


class BadSample(Exception):
    pass


def image_and_labels(sample: dict) -> tuple[Image.Image, list[int]]:
    """The decoded RGB image and label ids of a raw webdataset sample; BadSample if either is missing."""
    ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
    if ext is None:
        raise BadSample(f"{sample.get('__key__')}: no image member")
    try:
        labels = label_ids(sample)
    except (KeyError, ValueError):
        raise BadSample(f"{sample.get('__key__')}: no readable label member (.cls or .labels.json)") from None
    try:
        img = Image.open(io.BytesIO(sample[ext]))
        img.load()
        return img.convert("RGB"), labels
    except Exception as e:  # PIL raises many types for damaged images
        raise BadSample(f"{sample.get('__key__')}: image does not decode ({type(e).__name__})") from None


def train_view(img: Image.Image, size: int, min_scale: float, seed: list[int]) -> torch.Tensor:
    """Random resized crop (scale [min_scale, 1], ratio [3/4, 4/3]) to size x size, random flip."""
    rng = np.random.default_rng(seed)
    with torch.random.fork_rng(devices=[]):  # torchvision samples from torch's global RNG
        torch.manual_seed(int(rng.integers(2**63)))
        top, left, h, w = T.RandomResizedCrop.get_params(img, [min_scale, 1.0], [3 / 4, 4 / 3])
    out = F.resized_crop(img, top, left, h, w, [size, size], InterpolationMode.BILINEAR, antialias=True)
    if rng.random() < 0.5:
        out = F.hflip(out)
    return F.pil_to_tensor(out)


def eval_view(img: Image.Image, size: int) -> torch.Tensor:
    img = F.resize(img, round(size / EVAL_CROP), InterpolationMode.BILINEAR, antialias=True)
    return F.pil_to_tensor(F.center_crop(img, [size, size]))


def labels_tensor(batch_labels: list[list[int]]) -> torch.Tensor:
    """(B, K) class ids padded with -1: compact on the host, made multi-hot on the device when needed."""
    k = max(len(ls) for ls in batch_labels)
    out = torch.full((len(batch_labels), k), -1, dtype=torch.long)
    for i, ls in enumerate(batch_labels):
        out[i, : len(ls)] = torch.tensor(ls)
    return out
