"""Images per second of each stage of the two training-view paths, on this machine's CPU and GPU.

    python benchmarks/decode_throughput.py [--images 512] [--batch 256] [--size 224]

host: one data worker's whole path (``HostBatch.add``: PIL decode, random-resized crop, flip), one process.
device: the training process's side of ``data.decode=device`` on a micro-batch the workers made
(``JpegBatch``): ``decode_jpeg`` of the batch alone (nvJPEG on a GPU), then the whole ``device_views``
(decode, crops, resize, flips). Each prints one JSON line; the images are ImageNet-like 500x375 JPEGs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_jpeg

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shard_throughput import photo_like_jpeg  # noqa: E402

from pretrain.data.device_decode import JpegBatch, device_views  # noqa: E402
from pretrain.data.transforms import HostBatch  # noqa: E402


def samples(n: int) -> list[dict]:
    """n webdataset samples of ImageNet-like JPEGs."""
    rng = np.random.default_rng(0)
    return [{"__key__": f"{i:06d}", "jpg": photo_like_jpeg(i, rng), "cls": str(i % 50).encode()} for i in range(n)]


def timed(fn, repeats: int) -> float:
    """Seconds of the fastest of ``repeats`` calls, after one untimed call."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch", type=int, default=256, help="images per device micro-batch")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    data = samples(args.images)
    dev = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    head = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "size": args.size}

    def host() -> None:
        views = HostBatch(args.size, 0.08)
        for i, s in enumerate(data):
            views.add(s, [0, 0, 0, i])
        views.take()

    seconds = timed(host, args.repeats)
    print(json.dumps({"run": "host", **head, "processes": 1, "img_per_s": round(len(data) / seconds, 1)}), flush=True)

    batches = []
    for start in range(0, len(data) - args.batch + 1, args.batch):
        jpegs = JpegBatch(args.size, 0.08)
        for i, s in enumerate(data[start : start + args.batch]):
            jpegs.add(s, [0, 0, 0, start + i])
        batches.append(jpegs.take())
    images = len(batches) * args.batch

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    def decode_only() -> None:
        for b in batches:
            decode_jpeg(b["jpeg"], mode=ImageReadMode.RGB, device=dev)
        sync()

    def views() -> None:
        for b in batches:
            device_views(b, args.size, dev)
        sync()

    for name, fn in (("device_decode_jpeg", decode_only), ("device_views", views)):
        seconds = timed(fn, args.repeats)
        print(json.dumps({"run": name, **head, "batch": args.batch, "img_per_s": round(images / seconds, 1)}),
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
