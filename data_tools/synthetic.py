"""python -m data_tools.synthetic OUT: the demo's embedded dataset, drawn procedurally.

Ten classes of shapes and textures (circle, square, triangle, ring, cross, horizontal / vertical
stripes, diagonal bar, checkerboard, dots), each at a random position, size and colour on a noisy
background of another colour, saved as JPEG ImageFolder trees OUT/train and OUT/val. The same
seed draws the same images, so the demo is reproducible; a small ViT learns them in minutes on a CPU.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from pretrain.cli import OneLineParser, command, finish, whole
from pretrain.errors import UserError

CLASSES = ["circle", "square", "triangle", "ring", "cross", "hstripes", "vstripes", "diagonal", "checker", "dots"]


def _colours(rng: np.random.Generator) -> tuple[tuple[int, ...], tuple[int, ...]]:
    while True:
        fg, bg = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        if np.abs(fg - bg).sum() > 200:  # keep the shape visible
            return tuple(int(c) for c in fg), tuple(int(c) for c in bg)


def draw(label: int, size: int, rng: np.random.Generator) -> Image.Image:
    fg, bg = _colours(rng)
    noise = rng.normal(0, 12, (size, size, 3))
    img = Image.fromarray(np.clip(np.array(bg) + noise, 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(img)
    r = rng.uniform(0.25, 0.42) * size
    cx, cy = rng.uniform(r, size - r, 2)
    box = [cx - r, cy - r, cx + r, cy + r]
    period = max(int(rng.uniform(0.12, 0.22) * size), 3)
    name = CLASSES[label]
    if name == "circle":
        d.ellipse(box, fill=fg)
    elif name == "square":
        d.rectangle(box, fill=fg)
    elif name == "triangle":
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fg)
    elif name == "ring":
        d.ellipse(box, outline=fg, width=max(int(r / 3), 2))
    elif name == "cross":
        w = max(r / 3, 1.5)
        d.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fg)
        d.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fg)
    elif name in ("hstripes", "vstripes"):
        for t in range(0, size, period):
            d.rectangle([0, t, size, t + period // 2] if name == "hstripes" else [t, 0, t + period // 2, size], fill=fg)
    elif name == "diagonal":
        d.line([(0, 0), (size, size)] if rng.random() < 0.5 else [(0, size), (size, 0)], fill=fg, width=max(int(r / 2), 3))
    elif name == "checker":
        for y in range(0, size, period):
            for x in range((y // period % 2) * period, size, 2 * period):
                d.rectangle([x, y, x + period - 1, y + period - 1], fill=fg)
    else:  # dots
        for y in range(period // 2, size, period):
            for x in range(period // 2, size, period):
                d.ellipse([x - 1.5, y - 1.5, x + 1.5, y + 1.5], fill=fg)
    return img


def write_split(root: Path, per_class: int, size: int, seed: int) -> int:
    """Writes the split over an earlier one: its images beyond ``per_class`` (a run with more) go."""
    rng = np.random.default_rng(seed)
    for label, name in enumerate(CLASSES):
        folder = root / name
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise UserError(f"{folder} cannot be a folder (a file is in its way); give an OUTPUT folder") from None
        written = set()
        for i in range(per_class):
            out = io.BytesIO()
            draw(label, size, rng).save(out, "JPEG", quality=90)
            path = folder / f"{name}_{i:05d}.jpg"
            path.write_bytes(out.getvalue())
            written.add(path)
        for earlier in set(folder.glob(f"{name}_[0-9][0-9][0-9][0-9][0-9].jpg")) - written:
            earlier.unlink()
    return per_class * len(CLASSES)


@command
def main(argv: list[str] | None = None) -> int:
    p = OneLineParser(prog="python -m data_tools.synthetic", description=__doc__.split("\n\n")[1])
    p.add_argument("output", help="folder for the train/ and val/ ImageFolder trees")
    p.add_argument("--train-per-class", type=whole(1), default=400)
    p.add_argument("--val-per-class", type=whole(1), default=50)
    p.add_argument("--size", type=whole(8), default=40, help="image side in pixels")
    p.add_argument("--seed", type=whole(0), default=0)
    args = p.parse_args(argv)
    out = Path(args.output)
    n = write_split(out / "train", args.train_per_class, args.size, args.seed)
    m = write_split(out / "val", args.val_per_class, args.size, args.seed + 1)
    print(f"wrote {n} training and {m} validation images of {len(CLASSES)} classes to {out}")
    return 0


if __name__ == "__main__":
    finish(main())
