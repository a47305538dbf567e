"""Decoding and augmentation: Inception-style crop + flip for training, resize + centre crop for eval.

Images leave the workers as uint8 (3, S, S) tensors: a quarter of the bytes of float32 to pin and
copy; the step normalises them on the device (mean 0.5, std 0.5). Training randomness comes from a
seed per sample (run seed, epoch, shard, index), so a resumed stream augments exactly as before.

torchvision is imported by the functions that use it: the training process, which decodes nothing on the host,
then starts without it and the torch._dynamo it imports (2 s of every start on a small CPU). The data workers'
fork server imports it beforehand (``server_preload``).
"""

from __future__ import annotations

import io
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from data_tools.manifest import IMAGE_EXTENSIONS, label_ids
from data_tools.pixels import to_rgb

EVAL_CROP = 0.875  # resize the shorter side to size / 0.875, then centre-crop size (the usual ImageNet eval)


class BadSample(Exception):
    pass


def open_sample(sample: dict) -> tuple[Image.Image, bytes, list[int]]:
    """A raw webdataset sample's image, opened (its header read, its pixels not yet decoded), the image's encoded
    bytes and the label ids; BadSample if either member is missing or unreadable."""
    ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
    if ext is None:
        raise BadSample("has no image member")
    try:
        labels = label_ids(sample)
    except (KeyError, ValueError):
        raise BadSample("has no readable label member (.cls or .labels.json)") from None
    try:
        return Image.open(io.BytesIO(sample[ext])), sample[ext], labels
    except Exception as e:  # PIL raises many types for damaged images
        raise BadSample(undecodable(e)) from None


def undecodable(e: Exception) -> str:
    if isinstance(e, UnidentifiedImageError):
        return "has no image PIL can identify"
    return f"has an image that does not decode ({type(e).__name__}: {(str(e).splitlines() or [''])[0]})"


def decode(img: Image.Image) -> Image.Image:
    """The pixels of an opened image, as RGB; BadSample if they do not decode."""
    try:
        img.load()
        return to_rgb(img)
    except Exception as e:
        raise BadSample(undecodable(e)) from None


def image_and_labels(sample: dict) -> tuple[Image.Image, list[int]]:
    """The decoded RGB image and label ids of a raw webdataset sample; BadSample if either is missing."""
    img, _, labels = open_sample(sample)
    return decode(img), labels


class Crop(NamedTuple):
    top: int
    left: int
    height: int
    width: int
    flip: bool


def crop_params(img: Image.Image, min_scale: float, seed: list[int]) -> Crop:
    """The Inception crop (scale [min_scale, 1], ratio [3/4, 4/3]) and flip of one sample; needs only the image's
    size, so an image opened but not decoded will do."""
    from torchvision.transforms import RandomResizedCrop

    rng = np.random.default_rng(seed)
    with torch.random.fork_rng(devices=[]):  # torchvision samples from torch's global RNG
        # The CPU generator alone: torch.manual_seed also queues a seed for every CUDA and XPU device, formatting
        # a stack trace each time, which was half of this function's time (the same crops either way).
        torch.default_generator.manual_seed(int(rng.integers(2**63)))
        top, left, h, w = RandomResizedCrop.get_params(img, [min_scale, 1.0], [3 / 4, 4 / 3])
    return Crop(top, left, h, w, bool(rng.random() < 0.5))


def train_view(img: Image.Image, size: int, min_scale: float, seed: list[int]) -> torch.Tensor:
    """The sample's crop of ``img``, resized to size x size (bilinear, antialiased), maybe flipped."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as F

    c = crop_params(img, min_scale, seed)
    out = F.resized_crop(img, c.top, c.left, c.height, c.width, [size, size], InterpolationMode.BILINEAR, antialias=True)
    return F.pil_to_tensor(F.hflip(out) if c.flip else out)


def eval_resize(size: int) -> int:
    """The shorter side an image is resized to before its centre ``size`` x ``size`` crop is evaluated."""
    return round(size / EVAL_CROP)


def eval_view(img: Image.Image, size: int) -> torch.Tensor:
    """The centre crop, its offsets rounded down as Hugging Face's image processors do (torchvision rounds half to
    even), so that an exported model's processor feeds it exactly these pixels."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as F

    img = F.resize(img, eval_resize(size), InterpolationMode.BILINEAR, antialias=True)
    return F.pil_to_tensor(F.crop(img, (img.height - size) // 2, (img.width - size) // 2, size, size))


def labels_tensor(batch_labels: list[list[int]]) -> torch.Tensor:
    """(B, K) class ids padded with -1: compact on the host, made multi-hot on the device when needed."""
    k = max(len(ls) for ls in batch_labels)
    out = torch.full((len(batch_labels), k), -1, dtype=torch.long)
    for i, ls in enumerate(batch_labels):
        out[i, : len(ls)] = torch.tensor(ls)
    return out


class HostBatch:
    """A worker's micro-batch in the making, decoded and augmented in the worker (``data.decode: host``)."""

    def __init__(self, size: int, min_scale: float):
        self.size, self.min_scale, self.images = size, min_scale, []

    def __len__(self) -> int:
        return len(self.images)

    def add(self, sample: dict, seed: list[int]) -> list[int]:
        """Take one sample; its label ids. BadSample if it has no readable image or label."""
        img, labels = image_and_labels(sample)
        self.images.append(train_view(img, self.size, self.min_scale, seed))
        return labels

    def take(self) -> dict:
        out = {"image": torch.stack(self.images)}
        self.images = []
        return out
