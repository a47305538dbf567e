"""``data.decode: device``: the data workers read JPEG headers only; the training process decodes on its device.

For when the CPUs cannot keep up with the accelerator: a worker opens each image's header, draws the sample's
crop and flip exactly as the host path does (``transforms.crop_params``, same seed), and passes on the JPEG bytes
with them. The training process decodes the batch at once (``torchvision.io.decode_jpeg``: nvJPEG on a GPU) and
crops, resizes (bilinear, antialiased) and flips there. Images the device decoder does not take (PNG and other
formats, CMYK JPEGs) are decoded and cropped by the worker, as on the host path.
"""

from __future__ import annotations

import io

import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F

from .transforms import BadSample, Crop, crop_params, decode, open_sample, train_view

DEVICE_MODES = ("RGB", "L")  # JPEG colour modes decode_jpeg turns into RGB


class JpegBatch:
    """A worker's micro-batch in the making: JPEG bytes and crops, and the views it had to decode itself."""

    def __init__(self, size: int, min_scale: float):
        self.size, self.min_scale = size, min_scale
        self.clear()

    def clear(self) -> None:
        self.jpegs: list[torch.Tensor] = []
        self.crops: list[Crop] = []
        self.jpeg_rows: list[int] = []
        self.images: list[torch.Tensor] = []
        self.image_rows: list[int] = []

    def __len__(self) -> int:
        return len(self.jpeg_rows) + len(self.image_rows)

    def add(self, sample: dict, seed: list[int]) -> list[int]:
        """Take one sample; its label ids. BadSample if it has no readable image or label."""
        img, data, labels = open_sample(sample)
        row = len(self)
        if img.format == "JPEG" and img.mode in DEVICE_MODES:
            self.jpegs.append(torch.frombuffer(bytearray(data), dtype=torch.uint8))
            self.crops.append(crop_params(img, self.min_scale, seed))
            self.jpeg_rows.append(row)
        else:
            self.images.append(train_view(decode(img), self.size, self.min_scale, seed))
            self.image_rows.append(row)
        return labels

    def take(self) -> dict:
        out = {"jpeg": self.jpegs, "crop": torch.tensor(self.crops, dtype=torch.long).reshape(-1, 5),
               "jpeg_rows": torch.tensor(self.jpeg_rows, dtype=torch.long),
               "host_image": torch.stack(self.images) if self.images else torch.empty(0, 3, self.size, self.size,
                                                                                     dtype=torch.uint8),
               "host_rows": torch.tensor(self.image_rows, dtype=torch.long)}
        self.clear()
        return out


def _decode_each(jpegs: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
    """One at a time, after the batch failed: the device, then PIL; None where neither decodes."""
    out: list[torch.Tensor | None] = []
    for data in jpegs:
        try:
            out.append(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
        except RuntimeError:
            try:
                img = decode(Image.open(io.BytesIO(data.numpy().tobytes())))
                out.append(F.pil_to_tensor(img).to(device))
            except (BadSample, OSError):
                out.append(None)
    return out


def device_views(batch: dict, size: int, device: torch.device) -> tuple[torch.Tensor, int]:
    """The micro-batch's (B, 3, size, size) uint8 views on ``device``, and how many of its JPEGs did not decode.

    A JPEG that decodes neither on the device nor with PIL is replaced by another view of the batch (the batch
    keeps its size, and so the compiled step its shapes) and counted as a bad sample.
    """
    jpegs = batch["jpeg"]
    try:
        decoded = decode_jpeg(jpegs, mode=ImageReadMode.RGB, device=device) if jpegs else []
    except RuntimeError:
        decoded = _decode_each(jpegs, device)
    views: list[torch.Tensor | None] = [None] * (len(jpegs) + len(batch["host_rows"]))
    for img, (top, left, h, w, flip), row in zip(decoded, batch["crop"].tolist(), batch["jpeg_rows"].tolist()):
        if img is not None:
            view = F.resized_crop(img, top, left, h, w, [size, size], InterpolationMode.BILINEAR, antialias=True)
            views[row] = F.hflip(view) if flip else view
    host = batch["host_image"].to(device, non_blocking=True)
    for i, row in enumerate(batch["host_rows"].tolist()):
        views[row] = host[i]
    failed = sum(v is None for v in views)
    if failed:
        blank = torch.zeros(3, size, size, dtype=torch.uint8, device=device)
        stand_in = next((v for v in views if v is not None), blank)
        views = [stand_in if v is None else v for v in views]
    return torch.stack(views), failed
