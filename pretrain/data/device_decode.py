"""``data.decode: device``: the data workers read JPEG headers only; the training process decodes on its device.

For when the CPUs cannot keep up with the accelerator: a worker opens each image's header, draws the sample's
crop and flip exactly as the host path does (``transforms.crop_params``, same seed), and passes on the JPEG bytes
with them. A thread of the training process (``DeviceDecoded``) decodes the next batch at once
(``torchvision.io.decode_jpeg``: nvJPEG on a GPU) and crops, resizes (bilinear, antialiased) and flips there while
the current batch trains. Images the device decoder does not take (PNG and other formats, CMYK JPEGs) and JPEGs
stored turned (an EXIF orientation, which nvJPEG does not apply) are decoded and cropped by the worker, as on the
host path.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from PIL import Image
from torch.nn.functional import interpolate

from data_tools.pixels import orientation

from .transforms import BadSample, Crop, crop_params, decode, open_sample, train_view, undecodable

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
        self.where: list[str] = []  # each JPEG's shard and key, to name one that does not decode
        self.images: list[torch.Tensor] = []
        self.image_rows: list[int] = []

    def __len__(self) -> int:
        return len(self.jpeg_rows) + len(self.image_rows)

    def add(self, sample: dict, seed: list[int]) -> list[int]:
        """Take one sample; its label ids. BadSample if it has no readable image or label."""
        img, data, labels = open_sample(sample)
        row = len(self)
        if img.format == "JPEG" and img.mode in DEVICE_MODES and orientation(img) == 1:
            self.jpegs.append(torch.frombuffer(bytearray(data), dtype=torch.uint8))
            self.crops.append(crop_params(img, self.min_scale, seed))
            self.jpeg_rows.append(row)
            self.where.append(f"{sample.get('__url__')}: sample {sample.get('__key__')}")
        else:
            self.images.append(train_view(decode(img), self.size, self.min_scale, seed))
            self.image_rows.append(row)
        return labels

    def take(self) -> dict:
        out = {"jpeg": self.jpegs, "crop": torch.tensor(self.crops, dtype=torch.long).reshape(-1, 5),
               "jpeg_rows": torch.tensor(self.jpeg_rows, dtype=torch.long), "jpeg_where": self.where,
               "host_image": torch.stack(self.images) if self.images else torch.empty(0, 3, self.size, self.size,
                                                                                     dtype=torch.uint8),
               "host_rows": torch.tensor(self.image_rows, dtype=torch.long)}
        self.clear()
        return out


def _decode_each(jpegs: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | str]:
    """One at a time, after the batch failed: the device, then PIL; why, where neither decodes."""
    from torchvision.io import ImageReadMode, decode_jpeg
    from torchvision.transforms import functional as F

    out: list[torch.Tensor | str] = []
    for data in jpegs:
        try:
            out.append(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
        except RuntimeError:
            try:
                img = decode(Image.open(io.BytesIO(data.numpy().tobytes())))
                out.append(F.pil_to_tensor(img).to(device))
            except BadSample as e:
                out.append(str(e))
            except OSError as e:
                out.append(undecodable(e))
    return out


def device_views(batch: dict, size: int, device: torch.device) -> tuple[torch.Tensor, list[tuple[str, str]]]:
    """The micro-batch's (B, 3, size, size) uint8 views on ``device``, and its JPEGs that did not decode: (shard and
    key, why).

    Two kernels an image (a float copy of the crop, an antialiased bilinear resize) and one more when it flips:
    on a GPU the host's share of the work is launching them. A JPEG that decodes neither on the device nor with
    PIL is replaced by another view of the batch (the batch keeps its size, and so the compiled step its shapes)
    and counted as a bad sample.
    """
    from torchvision.io import ImageReadMode, decode_jpeg  # imported here: see transforms

    jpegs = batch["jpeg"]
    try:
        decoded = decode_jpeg(jpegs, mode=ImageReadMode.RGB, device=device) if jpegs else []
    except RuntimeError:
        decoded = _decode_each(jpegs, device)
    resized: list[torch.Tensor | None] = []
    failed = []
    for img, (top, left, h, w, flip), where in zip(decoded, batch["crop"].tolist(), batch["jpeg_where"]):
        if isinstance(img, str):
            resized.append(None)
            failed.append((where, img))
            continue
        view = interpolate(img[None, :, top : top + h, left : left + w].float(), size=(size, size), mode="bilinear",
                           antialias=True)
        resized.append(view.flip(-1) if flip else view)
    if failed:
        blank = torch.zeros(1, 3, size, size, device=device)
        stand_in = next((v for v in resized if v is not None), blank)
        resized = [stand_in if v is None else v for v in resized]
    views = torch.cat(resized).round_().clamp_(0, 255).to(torch.uint8) if resized else None
    if len(batch["host_rows"]):
        out = torch.empty(len(resized) + len(batch["host_rows"]), 3, size, size, dtype=torch.uint8, device=device)
        out[batch["host_rows"].to(device, non_blocking=True)] = batch["host_image"].to(device, non_blocking=True)
        if views is not None:
            out[batch["jpeg_rows"].to(device, non_blocking=True)] = views
        views = out
    return views, failed


class DeviceDecoded:
    """The training process's side of ``data.decode: device``: batches of JPEGs in, batches of views out.

    A thread of its own decodes and augments the next micro-batch while the current one trains: nvJPEG releases
    the GIL and runs on the GPU's JPEG engines, so the decode overlaps the step. On a GPU the thread works on a
    stream of its own, and the step's stream waits for it through an event.
    """

    def __init__(self, batches: Iterator[dict], size: int, device: torch.device):
        self.batches, self.size, self.device = batches, size, device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.thread = ThreadPoolExecutor(1, thread_name_prefix="device-decode")
        self.pending: Future | None = None

    def __iter__(self) -> DeviceDecoded:
        return self

    def __next__(self) -> dict:
        current = self.pending or self.thread.submit(self._decode_next)
        self.pending = self.thread.submit(self._decode_next)
        batch, ready = current.result()
        if ready is not None:
            step_stream = torch.cuda.current_stream(self.device)
            step_stream.wait_event(ready)
            batch["image"].record_stream(step_stream)  # made on the decode stream, freed after the step's use
        return batch

    def _decode_next(self) -> tuple[dict, torch.cuda.Event | None]:
        batch = next(self.batches)
        if self.stream is None:
            return self._views(batch), None
        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            # nvJPEG writes on a stream of its own without waiting for the stream it allocated its output on
            # (pytorch/vision#9606); with nothing queued on this one, no block the allocator hands out is in use.
            self.stream.synchronize()
            return self._views(batch), self.stream.record_event()

    def _views(self, batch: dict) -> dict:
        image, failed = device_views(batch, self.size, self.device)
        return {**batch, "image": image, "bad_samples": batch["bad_samples"] + len(failed),
                "unread": batch.get("unread", []) + failed}

    def close(self) -> None:
        """Let the batch in hand finish (its JPEGs may be on the GPU's engines), then stop the data workers."""
        self.thread.shutdown(wait=True, cancel_futures=True)
        self.batches.close()
