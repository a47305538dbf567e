"""python -m data_tools.inspect OUTPUT [--keys N] [--grid out.png --grid-samples 16] [--recount]

Shows what went into a shard set: the manifest's summary, the commonest and rarest classes, the first keys with their
labels; --grid draws the first images with their class names into a PNG, --recount counts the labels in the shards.
"""

from __future__ import annotations

import argparse
import io
import itertools
import math
import sys
from collections import Counter
from collections.abc import Iterator

import fsspec
from PIL import Image, ImageDraw, ImageFont, ImageOps
from tqdm import tqdm

from pretrain.cli import OneLineParser, command, finish, plural, whole
from pretrain.errors import UserError

from .manifest import REPORT, Manifest, Shard, load
from .pixels import to_rgb
from .storage import Location
from .manifest import label_ids
from .verify import UNREADABLE, check_sample, image_extensions, read_samples, reason

TILE = 128  # pixels, the side of each thumbnail in the grid
CAPTION = 16  # pixels under each thumbnail for its class names
EXTREMES = 5  # classes shown at each end of the ranking
MAX_DISAGREEMENTS = 20


def summary(where: Location, manifest: Manifest) -> list[str]:
    """What the manifest says about the set as a whole."""
    size = sum(s.bytes for s in manifest.shards)
    kind = "multi-label" if manifest.multi_label else "single-label"
    lines = [
        f"{manifest.name}: {plural(manifest.num_samples, 'sample')} in {plural(len(manifest.shards), 'shard')} "
        f"({size / 2**20:.1f} MiB), {plural(len(manifest.classes), 'class', 'classes')}, {kind}",
        f"source: {manifest.source} ({manifest.source_kind})",
    ]
    skipped = f"skipped: {manifest.skipped}"
    if where.exists(REPORT):
        skipped += f" (listed in {where.url_of(REPORT)})"
    lines.append(skipped)
    if manifest.tool:
        lines.append(f"written by: {manifest.tool}")
    if manifest.options:
        lines.append("options: " + ", ".join(f"{k}={v}" for k, v in manifest.options.items()))
    return lines


def class_lines(classes: list[str], counts: list[int]) -> list[str]:
    """Classes with samples ranked by count: all of them if few, else the top and bottom few; then the empty ones,
    counted and the first few named."""
    ranked = sorted((c for c in range(len(classes)) if counts[c]), key=lambda c: (-counts[c], c))
    shown = ranked if len(ranked) <= 2 * EXTREMES else ranked[:EXTREMES] + [None] + ranked[-EXTREMES:]
    lines = ["samples per class (count, id, name):"]
    lines += ["  ..." if c is None else f"  {counts[c]:>9}  {c:>6}  {classes[c]}" for c in shown]
    empty = [c for c in range(len(classes)) if not counts[c]]
    if empty:
        named = ", ".join(f"{c} {classes[c]}" for c in empty[:EXTREMES]) + (", ..." if len(empty) > EXTREMES else "")
        lines.append(f"  {len(empty)} of {len(classes)} classes have no samples ({named})")
    return lines


def shard_samples(where: Location, shard: Shard) -> Iterator[dict]:
    """The samples of one shard, read as a stream; a damaged shard is a UserError that points to verify."""
    try:
        with where.fs.open(where.path(shard.name), "rb") as stream:
            yield from read_samples(stream)
    except UNREADABLE as e:
        raise UserError(
            f"{where.url_of(shard.name)} cannot be read ({reason(e)}); check the set with "
            f"python -m data_tools.verify {where.url}"
        ) from None


def first_samples(where: Location, manifest: Manifest, n: int) -> list[tuple[str, dict]]:
    """(shard name, sample) of the first n samples of the set, reading no further than needed."""
    pairs = ((s.name, sample) for s in manifest.shards for sample in shard_samples(where, s))
    return list(itertools.islice(pairs, n))


def labels_text(sample: dict, classes: list[str]) -> str:
    """'3 n01484850' per class id of the sample, or what is wrong with its label (verify tells more)."""
    try:
        ids = label_ids(sample)
    except (KeyError, ValueError):
        return "(no readable label)"
    return ", ".join(f"{i} {classes[i]}" if 0 <= i < len(classes) else f"{i} (out of range)" for i in ids)


def key_lines(samples: list[tuple[str, dict]], classes: list[str]) -> list[str]:
    lines = [f"first {len(samples)} keys (shard, key, image, labels):"]
    for shard, sample in samples:
        image = ",".join(image_extensions(sample)) or "no image"
        lines.append(f"  {shard}  {sample['__key__']}  {image}  {labels_text(sample, classes)}")
    return lines


def recount(where: Location, manifest: Manifest) -> list[int]:
    """Samples per class counted from the label members of every shard, with a progress bar on stderr."""
    counts = Counter()
    for shard in tqdm(manifest.shards, unit="shard", desc="recount", file=sys.stderr):
        for sample in shard_samples(where, shard):
            counts.update(check_sample(sample, len(manifest.classes), decode=False)[1])  # ids in range
    return [counts[c] for c in range(len(manifest.classes))]


def recount_lines(classes: list[str], listed: list[int], counted: list[int]) -> list[str]:
    """Whether the recount agrees with the manifest, and where it does not."""
    differ = [c for c in range(len(classes)) if listed[c] != counted[c]]
    if not differ:
        return ["recount: the labels in the shards agree with the manifest's class_counts"]
    lines = [f"recount: {len(differ)} classes disagree with the manifest's class_counts (id, name, manifest, shards):"]
    lines += [f"  {c:>6}  {classes[c]}  {listed[c]}  {counted[c]}" for c in differ[:MAX_DISAGREEMENTS]]
    if len(differ) > MAX_DISAGREEMENTS:
        lines.append(f"  ... and {len(differ) - MAX_DISAGREEMENTS} more")
    return lines


def thumbnail(data: bytes) -> Image.Image | None:
    """The image scaled to fit a tile, or None if it does not decode; a small one is enlarged pixel by pixel
    (nearest), so that what the model would see stays visible."""
    try:
        image = to_rgb(Image.open(io.BytesIO(data)))
    except Exception:  # PIL raises a different type for each kind of bad data
        return None
    if max(image.size) < TILE:
        return ImageOps.contain(image, (TILE, TILE), Image.Resampling.NEAREST)
    image.thumbnail((TILE, TILE))
    return image


def fit(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont | ImageFont.FreeTypeFont) -> str:
    """text, shortened with '...' until it fits under a tile."""
    while text and draw.textlength(text, font=font) > TILE - 4:
        text = text[:-4] + "..." if len(text) > 3 else ""
    return text


def grid(samples: list[tuple[str, dict]], classes: list[str]) -> Image.Image:
    """A near-square grid of thumbnails, each centred in its tile with its class names under it."""
    cols = math.ceil(math.sqrt(len(samples)))
    rows = math.ceil(len(samples) / cols)
    canvas = Image.new("RGB", (cols * TILE, rows * (TILE + CAPTION)), "white")
    draw, font = ImageDraw.Draw(canvas), ImageFont.load_default()
    for i, (_, sample) in enumerate(samples):
        x, y = i % cols * TILE, i // cols * (TILE + CAPTION)
        images = image_extensions(sample)
        thumb = thumbnail(sample[images[0]]) if images else None
        if thumb is None:
            draw.rectangle((x, y, x + TILE - 1, y + TILE - 1), fill="gray")
            draw.text((x + 4, y + TILE // 2), "no image" if not images else "does not decode", fill="white", font=font)
        else:
            canvas.paste(thumb, (x + (TILE - thumb.width) // 2, y + (TILE - thumb.height) // 2))
        draw.text((x + 2, y + TILE + 2), fit(draw, labels_text(sample, classes), font), fill="black", font=font)
    return canvas


def write_image(image: Image.Image, url: str) -> None:
    """In the format its name's ending says (grid.jpg a JPEG), PNG for any other."""
    Image.init()
    ending = "." + url.rsplit(".", 1)[-1].lower() if "." in url.rsplit("/", 1)[-1] else ""
    fmt = Image.registered_extensions().get(ending, "PNG")
    out = io.BytesIO()
    try:
        image.save(out, format=fmt)
    except (OSError, KeyError, ValueError):  # a format PIL reads but does not write
        image.save(out, format="PNG")
    try:
        with fsspec.open(url, "wb") as f:
            f.write(out.getvalue())
    except OSError as e:
        raise UserError(f"cannot write the grid to {url} ({e.strerror or e}); give --grid a PNG path in a folder you "
                        f"can write") from None


def show(args: argparse.Namespace) -> int:
    """Print what the command line asks for; 1 if --recount disagrees with the manifest."""
    where, manifest = load(args.output)
    classes = manifest.classes
    listed = (manifest.class_counts + [0] * len(classes))[: len(classes)]  # tolerate a manifest with too few counts
    print("\n".join(summary(where, manifest) + class_lines(classes, listed)))
    agree = True
    if args.recount:
        counted = recount(where, manifest)
        agree = counted == listed
        print("\n".join(recount_lines(classes, listed, counted)))
    samples = first_samples(where, manifest, max(args.keys, args.grid_samples if args.grid else 0))
    print("\n".join(key_lines(samples[: args.keys], classes)))
    if args.grid and samples:
        write_image(grid(samples[: args.grid_samples], classes), args.grid)
        print(f"grid of {min(len(samples), args.grid_samples)} samples written to {args.grid}")
    elif args.grid:
        print(f"no grid written to {args.grid}: the set holds no sample")
    return 0 if agree else 1


@command
def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="python -m data_tools.inspect", description=__doc__.split("\n\n")[1])
    parser.add_argument("output", help="the shard folder (local path or fsspec URL) or its manifest.json")
    parser.add_argument("--keys", type=whole(0), default=10, metavar="N",
                        help="show the first N keys and their labels")
    parser.add_argument("--grid", metavar="PNG", help="draw the first samples with their class names into this PNG")
    parser.add_argument("--grid-samples", type=whole(1), default=16, metavar="N", help="samples in the grid")
    parser.add_argument("--recount", action="store_true", help="count the labels in the shards anew")
    return show(parser.parse_args(argv))


if __name__ == "__main__":
    finish(main())
