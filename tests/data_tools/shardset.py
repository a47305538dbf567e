"""Shard sets written directly, not by data_tools.shard: PIL-made JPEG and PNG images in tars, and a manifest."""

import hashlib
import io
import json

import webdataset as wds
from PIL import Image, ImageDraw

from data_tools.manifest import MANIFEST, Manifest, Shard
from data_tools.storage import Location

CLASSES = ["n01440764", "n01443537", "n01484850"]
SIZES = [(64, 48), (32, 32), (120, 80), (17, 90)]


def image_bytes(size: tuple[int, int], fmt: str, seed: int) -> bytes:
    """A small picture with some structure, so that JPEG has real data to compress."""
    image = Image.new("RGB", size, (40 * seed % 256, 90, 200))
    ImageDraw.Draw(image).ellipse((2, 2, size[0] - 3, size[1] - 3), fill=(255, 30 * seed % 256, 0))
    out = io.BytesIO()
    image.save(out, format="JPEG" if fmt == "jpg" else "PNG")
    return out.getvalue()


def make_samples(n: int, start: int = 0, multi_label: bool = False) -> list[dict]:
    """n samples of the three classes, JPEG and PNG alternating, of several sizes."""
    samples = []
    for i in range(start, start + n):
        c = i % len(CLASSES)
        fmt = "jpg" if i % 2 == 0 else "png"
        sample = {"__key__": f"{CLASSES[c]}/{CLASSES[c]}_{i:05d}", fmt: image_bytes(SIZES[i % len(SIZES)], fmt, i)}
        if multi_label:
            sample["labels.json"] = json.dumps(sorted({c, (c + 1) % len(CLASSES)})).encode()
        else:
            sample["cls"] = str(c).encode()
        samples.append(sample)
    return samples


def class_counts(shards: list[list[dict]]) -> list[int]:
    """Per class, the samples that name it; labels that tests damaged on purpose count for nothing."""
    counts = [0] * len(CLASSES)
    for sample in (s for shard in shards for s in shard):
        try:
            ids = json.loads(sample["labels.json"]) if "labels.json" in sample else [int(sample["cls"])]
        except (KeyError, ValueError):
            continue
        for i in ids if isinstance(ids, list) else []:
            if i in range(len(counts)):
                counts[i] += 1
    return counts


def write_shard_set(url: str, shards: list[list[dict]], name: str = "train", multi_label: bool = False) -> Manifest:
    """Write {name}-NNNNNN.tar per list of samples and then a manifest.json that matches them, at url."""
    where = Location(url)
    entries = []
    for i, samples in enumerate(shards):
        buf = io.BytesIO()
        with wds.TarWriter(buf, encoder=False, mtime=0) as writer:
            for sample in samples:
                writer.write(sample)
        data = buf.getvalue()
        entries.append(Shard(f"{name}-{i:06d}.tar", len(samples), len(data), hashlib.sha256(data).hexdigest()))
        where.write_bytes(entries[-1].name, data)
    manifest = Manifest(name, "/corpus/train", "imagefolder", CLASSES, multi_label, entries, class_counts(shards))
    where.write_bytes(MANIFEST, manifest.to_json().encode())
    return manifest
