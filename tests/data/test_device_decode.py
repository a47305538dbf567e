"""data.decode=device on the CPU (the same code decodes with nvJPEG on a GPU): the workers pass JPEG bytes and
crops, the training process decodes, and the views match the host path's."""

from __future__ import annotations

import io
import time
from itertools import islice

import numpy as np
import pytest
import torch
from PIL import Image

from pretrain.data.device_decode import DeviceDecoded, JpegBatch, device_views
from pretrain.data.shards import resolve
from pretrain.data.stream import TrainStream, loader
from pretrain.data.transforms import HostBatch
from pretrain.errors import UserError

SIZE, MICRO, MIN_SCALE = 32, 16, 0.35
CPU = torch.device("cpu")


def first_batches(urls: list[str], decode: str, n: int) -> list[dict]:
    batches = loader(TrainStream(urls, SIZE, MICRO, 0, 0, 1, MIN_SCALE, decode=decode), 2, pin=False)
    try:
        return list(islice(batches, n))
    finally:
        batches.close()


def test_device_views_match_the_host_views(small_shards):
    urls = resolve(small_shards["train"]).urls
    host, device = first_batches(urls, "host", 4), first_batches(urls, "device", 4)
    for a, b in zip(host, device):
        assert "image" not in b and len(b["jpeg"]) == MICRO and (a["reader"], a["state"]) == (b["reader"], b["state"])
        assert torch.equal(a["labels"], b["labels"])
        views, failed = device_views(b, SIZE, CPU)
        assert failed == [] and views.shape == a["image"].shape and views.dtype == torch.uint8
        diff = (views.float() - a["image"].float()).abs()
        assert diff.max() <= 2 and diff.mean() < 0.5  # the same crops; resampling rounds differently


def encoded(pixels: np.ndarray, fmt: str, mode: str = "RGB") -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(out, fmt)
    return out.getvalue()


@pytest.fixture
def mixed() -> list[dict]:
    """RGB and greyscale JPEGs, a CMYK JPEG, a PNG, and a JPEG whose header reads but whose data is garbage."""
    rng = np.random.default_rng(0)
    pixels = [rng.integers(0, 255, (40 + 3 * i, 50, 3), dtype=np.uint8) for i in range(6)]
    good = encoded(pixels[0], "JPEG")
    garbage = good[: good.index(b"\xff\xda")] + bytes(rng.integers(0, 255, 300, dtype=np.uint8))
    members = [("jpg", encoded(pixels[1], "JPEG")), ("jpg", encoded(pixels[2], "JPEG", "L")),
               ("jpg", encoded(pixels[3], "JPEG", "CMYK")), ("png", encoded(pixels[4], "PNG")),
               ("jpg", garbage), ("jpg", encoded(pixels[5], "JPEG"))]
    return [{"__key__": f"s{i}", "__url__": "shards/train-000003.tar", ext: data, "cls": str(i).encode()}
            for i, (ext, data) in enumerate(members)]


def test_images_the_device_decoder_does_not_take_are_decoded_in_the_worker(mixed):
    device, host = JpegBatch(SIZE, MIN_SCALE), HostBatch(SIZE, MIN_SCALE)
    for i, sample in enumerate(mixed):
        assert device.add(sample, [0, i]) == [i]
    batch = device.take()
    assert batch["jpeg_rows"].tolist() == [0, 1, 4, 5] and batch["host_rows"].tolist() == [2, 3]  # CMYK, PNG
    views, failed = device_views(batch, SIZE, CPU)
    assert views.shape == (6, 3, SIZE, SIZE)
    assert [where for where, _ in failed] == ["shards/train-000003.tar: sample s4"]
    assert failed[0][1].startswith("has an image that does not decode (OSError: ")
    for i in (0, 1, 2, 3, 5):
        host.add(mixed[i], [0, i])
    expected = host.take()["image"]
    for row, want in zip((0, 1, 2, 3, 5), expected):
        assert (views[row].float() - want.float()).abs().max() <= 2, row
    assert torch.equal(views[4], views[0]), "the undecodable JPEG's row is another view of the batch"


def test_a_jpeg_stored_turned_is_decoded_upright_in_the_worker():
    """nvJPEG does not apply the EXIF orientation, so the worker decodes such a JPEG, upright, as the host path does."""
    pixels = np.random.default_rng(0).integers(0, 255, (30, 60, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", exif=exif.tobytes())
    sample = {"__key__": "portrait", "jpg": buffer.getvalue(), "cls": b"0"}
    device, host = JpegBatch(SIZE, MIN_SCALE), HostBatch(SIZE, MIN_SCALE)
    device.add(sample, [0, 1])
    host.add(sample, [0, 1])
    batch = device.take()
    assert batch["jpeg_rows"].tolist() == [] and batch["host_rows"].tolist() == [0]
    assert torch.equal(device_views(batch, SIZE, CPU)[0], host.take()["image"])


def test_a_batch_of_only_undecodable_jpegs_gives_zeros_and_counts_them(mixed):
    device = JpegBatch(SIZE, MIN_SCALE)
    device.add(mixed[4], [0, 4])
    views, failed = device_views(device.take(), SIZE, CPU)
    assert len(failed) == 1 and not views.any()


class Source:
    """Micro-batches of JPEGs, then an error, as the data workers would hand them over; it counts what is asked."""

    def __init__(self, batches: list[dict], error: Exception):
        self.batches, self.error, self.asked, self.closed = iter(batches), error, 0, False

    def __next__(self) -> dict:
        self.asked += 1
        batch = next(self.batches, None)
        if batch is None:
            raise self.error
        return batch

    def close(self) -> None:
        self.closed = True


def test_the_decode_thread_works_one_batch_ahead_in_order_and_passes_errors_on(mixed):
    batches = []
    for start in (0, 3):
        jpegs = JpegBatch(SIZE, MIN_SCALE)
        for i in range(start, start + 3):
            jpegs.add(mixed[i], [1, i])
        unread = [("shards/x.tar: sample y", "has no image member")]
        batches.append({**jpegs.take(), "bad_samples": 2, "unread": unread})
    expected = [device_views(b, SIZE, CPU) for b in batches]
    source = Source(batches, UserError("shard 7 is damaged"))
    decoded = DeviceDecoded(source, SIZE, CPU)
    first = next(decoded)
    assert torch.equal(first["image"], expected[0][0]) and first["bad_samples"] == 2
    deadline = time.monotonic() + 10
    while source.asked < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert source.asked == 2, "the next micro-batch is decoded while the current one trains"
    second = next(decoded)
    assert torch.equal(second["image"], expected[1][0]) and second["bad_samples"] == 2 + 1  # the garbage JPEG
    assert [where for where, _ in second["unread"]] == ["shards/x.tar: sample y", "shards/train-000003.tar: sample s4"]
    with pytest.raises(UserError, match="shard 7 is damaged"):
        next(decoded)
    decoded.close()
    assert source.closed
