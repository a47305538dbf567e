"""Writing one shard: read each sample's bytes, check (or re-encode) the image, append it to a tar.

Runs in the worker processes of data_tools.shard. A tar is byte-for-byte reproducible (fixed
mtime, owner and mode, members in a fixed order), so a rerun writes the same sha256. The tar is
written with the standard library's tarfile rather than webdataset.TarWriter, whose import pulls
in torch: 1.5 s in every worker process for a 20-line wrapper.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import warnings
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from fsspec.core import url_to_fs
from fsspec.utils import get_protocol
from PIL import Image, UnidentifiedImageError

from .pixels import to_rgb, upright_size
from .sources import Item
from .storage import Location

# MPO: the JPEG of a phone or a stereo camera with further pictures appended, which every JPEG decoder reads as its
# first picture.
FORMATS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tif"}


@dataclass(frozen=True)
class Options:
    multi_label: bool
    check: str  # "header": PIL parses the header (and PNG checksums, and decodes a JPEG that lacks its end marker);
    # "decode": every pixel is decoded
    resize_short: int  # 0: keep the bytes as they are
    quality: int  # JPEG quality when re-encoding


class BadImage(Exception):
    pass


class HashingWriter:
    """Counts and hashes what passes through to ``raw``."""

    def __init__(self, raw):
        self.raw, self.sha256, self.bytes = raw, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.sha256.update(data)
        self.bytes += len(data)
        return self.raw.write(data)

    def flush(self) -> None:
        self.raw.flush()


class SourceReader:
    """Reads samples; keeps a few outer ImageNet-21k tars open, since a shard draws from many."""

    def __init__(self, max_open: int = 16):
        self.open_tars: OrderedDict[str, object] = OrderedDict()
        self.max_open = max_open

    def read(self, item: Item) -> bytes:
        if item.size < 0:
            raise FileNotFoundError(f"{item.url} was not found when the corpus was listed")
        if item.offset < 0:
            if get_protocol(item.url) == "file":  # most corpora: skip fsspec's per-file overhead
                with open(item.url.removeprefix("file://"), "rb") as f:
                    return f.read()
            fs, path = url_to_fs(item.url)
            return fs.cat_file(path)
        f = self._tar(item.url)
        f.seek(item.offset)
        data = f.read(item.size)
        if len(data) != item.size:
            raise OSError(f"{item.url} ends inside member {item.key}")
        return data

    def _tar(self, url: str):
        if url in self.open_tars:
            self.open_tars.move_to_end(url)
            return self.open_tars[url]
        if len(self.open_tars) >= self.max_open:
            self.open_tars.popitem(last=False)[1].close()
        fs, path = url_to_fs(url)
        self.open_tars[url] = fs.open(path, "rb")
        return self.open_tars[url]

    def close(self) -> None:
        for f in self.open_tars.values():
            f.close()
        self.open_tars.clear()


def checked_image(data: bytes, options: Options) -> tuple[str, bytes]:
    """(extension, bytes to store), or BadImage with the reason."""
    try:
        with warnings.catch_warnings():
            # PIL warns above 89 megapixels (a 12000x8000 panorama) and refuses above twice that, as training would.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                if img.format not in FORMATS and not options.resize_short:  # which re-encodes any format as JPEG
                    raise BadImage(f"unsupported image format {img.format} (shards hold JPEG, PNG, WebP, GIF, BMP or "
                                   f"TIFF; --resize-short N re-encodes any format PIL reads as JPEG)")
                if options.resize_short:
                    return "jpg", _resized(img, options.resize_short, options.quality)
                # A JPEG without its end marker is most often cut short (some have data after it): decoded to tell.
                unended = img.format in ("JPEG", "MPO") and not data.rstrip(b"\0").endswith(b"\xff\xd9")
                if options.check == "decode" or unended:
                    img.load()
                else:
                    img.verify()
                return FORMATS[img.format], data
    except BadImage:
        raise
    except UnidentifiedImageError:
        raise BadImage("not an image (PIL cannot identify its format)") from None
    except Image.DecompressionBombError as e:
        raise BadImage(f"too large: {e.args[0].split(', could')[0]} (PIL's guard against decompression bombs, "
                       f"which training would meet too)") from None
    except Exception as e:  # PIL raises many types for damaged files
        raise BadImage(f"not a readable image ({type(e).__name__}: {e})") from None


def _resized(img: Image.Image, short: int, quality: int) -> bytes:
    width, height = upright_size(img)
    scale = short / min(width, height)
    if scale < 1:
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        img.draft("RGB", size if img.size == (width, height) else size[::-1])  # JPEG: libjpeg decodes at 1/2-1/8 first
        img = to_rgb(img).resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)
    out = io.BytesIO()
    to_rgb(img).save(out, "JPEG", quality=quality)
    return out.getvalue()


class ShardTar:
    """A tar of samples, each ``{key}.{label ext}`` then ``{key}.{image ext}``, written straight through.

    tarfile builds the headers; the blocks go to ``stream`` directly, since tarfile's own stream
    mode re-buffers every member in 10 kB slices (a third of the time of sharding a JPEG).
    """

    def __init__(self, stream):
        self.stream = stream
        self.written = 0

    def add(self, key: str, members: dict[str, bytes]) -> None:
        for ext, data in members.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), 0, 0o444
            self._write(_header(info))
            self._write(data)
            self._write(tarfile.NUL * (-len(data) % tarfile.BLOCKSIZE))

    def close(self) -> None:
        end = 2 * tarfile.BLOCKSIZE  # two zero blocks, then zeros up to a whole record, as tarfile does
        self._write(tarfile.NUL * (end + -(self.written + end) % tarfile.RECORDSIZE))

    def _write(self, data: bytes) -> None:
        self.stream.write(data)
        self.written += len(data)


def _header(info: tarfile.TarInfo) -> bytes:
    """A ustar header (what our keys need, and half the cost of pax); pax for long or non-ASCII names."""
    try:
        return info.tobuf(tarfile.USTAR_FORMAT, "ascii", "strict")
    except (ValueError, UnicodeEncodeError):
        return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def label_member(labels: tuple[int, ...], multi_label: bool) -> tuple[str, bytes]:
    if multi_label:
        return "labels.json", json.dumps(list(labels)).encode()
    return "cls", str(labels[0]).encode()


def write_shard(
    out_url: str, name: str, items: list[Item], options: Options, progress: Callable[[int, int], None]
) -> dict:
    """Write ``items`` into ``out_url``/``name``; the record of what it holds and what was skipped."""
    out = Location(out_url)
    reader = SourceReader()
    counts: Counter[int] = Counter()
    skipped, samples, pending_items, pending_bytes = [], 0, 0, 0
    try:
        with out.open_atomic(name) as raw:
            stream = HashingWriter(raw)
            writer = ShardTar(stream)
            for item in items:
                try:
                    ext, data = checked_image(reader.read(item), options)
                except (BadImage, OSError) as e:
                    skipped.append({"shard": name, "key": item.key, "source": item.where, "reason": str(e)})
                else:
                    label_ext, label = label_member(item.labels, options.multi_label)
                    writer.add(item.key, {label_ext: label, ext: data})
                    counts.update(item.labels)
                    samples += 1
                    pending_bytes += len(data)
                pending_items += 1
                if pending_items >= 64:
                    progress(pending_items, pending_bytes)
                    pending_items = pending_bytes = 0
            writer.close()
    finally:
        reader.close()
    progress(pending_items, pending_bytes)
    return {
        "name": name,
        "samples": samples,
        "bytes": stream.bytes,
        "sha256": stream.sha256.hexdigest(),
        "class_counts": {str(k): v for k, v in sorted(counts.items())},
        "skipped": skipped,
    }
