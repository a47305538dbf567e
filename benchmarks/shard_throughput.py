"""Sharding throughput beside a plain `tar` of the same files (the bound when nothing is re-encoded).

    python benchmarks/shard_throughput.py [--images 3000] [--workers 1 2]

Generates an ImageFolder tree of JPEGs (ImageNet-like 500x375 photos are ~110 kB; these are
smaller noise-and-gradient images of similar pixel count), then times, each on a warm page cache:
`tar cf` of the tree, and data_tools.shard with each worker count. Prints one JSON line per run:
samples/s, MB/s, and the ratio to tar.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def photo_like_jpeg(i: int, rng: np.random.Generator) -> bytes:
    """The i-th 500x375 noise-and-gradient JPEG (~105 kB, like ImageNet's photos)."""
    yy, xx = np.mgrid[0:375, 0:500]
    base = ((xx * (i % 7 + 1) + yy * (i % 5 + 1)) % 256).astype(np.uint8)
    pixels = np.stack([base, base[::-1], base[:, ::-1]], -1) + rng.integers(0, 24, (375, 500, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", quality=90)
    return out.getvalue()


def make_tree(root: Path, images: int, classes: int = 50) -> int:
    rng = np.random.default_rng(0)
    total = 0
    for i in range(images):
        folder = root / f"n{i % classes:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        data = photo_like_jpeg(i, rng)
        (folder / f"img_{i}.JPEG").write_bytes(data)
        total += len(data)
    return total


def timed(command: list[str], cwd: Path) -> float:
    start = time.perf_counter()
    subprocess.run(command, cwd=cwd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--images", type=int, default=3000)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--shard-size", default="16MB")
    args = p.parse_args()
    repo = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        size = make_tree(tmp / "src", args.images)
        subprocess.run(["tar", "cf", "/dev/null", "src"], cwd=tmp, check=True)  # warm the page cache
        seconds = timed(["tar", "cf", str(tmp / "plain.tar"), "src"], tmp)
        base = {"images": args.images, "mb": round(size / 1e6, 1)}
        print(json.dumps({"run": "tar cf", **base, "seconds": round(seconds, 2),
                          "samples_per_s": round(args.images / seconds), "mb_per_s": round(size / 1e6 / seconds, 1)}))
        for workers in args.workers:
            out = tmp / f"shards-{workers}"
            s = timed([sys.executable, "-m", "data_tools.shard", str(tmp / "src"), str(out),
                       "--workers", str(workers), "--shard-size", args.shard_size], repo)
            print(json.dumps({"run": f"data_tools.shard --workers {workers}", **base, "seconds": round(s, 2),
                              "samples_per_s": round(args.images / s), "mb_per_s": round(size / 1e6 / s, 1),
                              "x_tar_time": round(s / seconds, 2)}))
            shutil.rmtree(out)


if __name__ == "__main__":
    main()
