"""Small real corpora for the data_tools tests: JPEG/PNG files of several sizes, a few bad ones."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ["n01440764", "n01443537", "n01484850"]


def image_bytes(rng: np.random.Generator, fmt: str = "JPEG", size: tuple[int, int] | None = None) -> bytes:
    h, w = size or (int(rng.integers(24, 80)), int(rng.integers(24, 80)))
    pixels = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, fmt)
    return out.getvalue()


def image_folder(root: Path, per_class: int = 12, seed: int = 0) -> dict[str, int]:
    """class/xxx.jpg|png; returns {sample key: class id} of the good images. Adds two bad images and a text file."""
    rng = np.random.default_rng(seed)
    good = {}
    for label, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            ext, fmt = ("png", "PNG") if i % 3 == 0 else ("JPEG", "JPEG")
            (root / name / f"{name}_{i}.{ext}").write_bytes(image_bytes(rng, fmt))
            good[f"{name}/{name}_{i}"] = label
    (root / CLASSES[0] / "readme.txt").write_text("not an image, and not named as one")
    (root / CLASSES[0] / "notes.png").write_text("not an image")
    (root / CLASSES[1] / "cut.jpg").write_bytes(image_bytes(rng)[:40])
    return good


def i21k_tars(root: Path, per_class: int = 10, seed: int = 0) -> dict[str, int]:
    """One tar of JPEGs per synset, as the ImageNet-21k release ships; one unsafe and one corrupt member."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    good = {}
    for label, name in enumerate(CLASSES):
        with tarfile.open(root / f"{name}.tar", "w") as tar:
            members = {f"{name}_{i}.JPEG": image_bytes(rng) for i in range(per_class)}
            if label == 0:
                members["../escape.JPEG"] = image_bytes(rng)
                members[f"{name}_bad.JPEG"] = b"\x00" * 100
            for member, data in members.items():
                info = tarfile.TarInfo(member)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
                if not member.startswith("..") and "bad" not in member:
                    good[f"{name}/{member.rsplit('.', 1)[0]}"] = label
    return good


def image_list(root: Path, n: int = 30, seed: int = 0, jsonl: bool = False) -> dict[str, tuple[int, ...]]:
    """A JFT-style list with multi-label targets and a class list; returns {key: label ids}."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    lines, good = [], {}
    for i in range(n):
        (root / "images" / f"im{i}.jpg").write_bytes(image_bytes(rng))
        ids = tuple(sorted(set(int(x) for x in rng.integers(0, len(CLASSES), int(rng.integers(1, 4))))))
        names = [CLASSES[j] for j in ids]
        lines.append(json.dumps({"path": f"images/im{i}.jpg", "labels": names}) if jsonl else f"images/im{i}.jpg, {' '.join(names)}")
        good[f"images/im{i}"] = ids
    (root / ("list.jsonl" if jsonl else "list.csv")).write_text("\n".join(lines) + "\n")
    return good
