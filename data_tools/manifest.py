"""manifest.json: what a shard set holds, written last by data_tools.shard, read by everything else.

Sample layout inside a shard: ``{key}.{jpg,png,...}`` (the image bytes) and either ``{key}.cls``
(one class id as decimal text) or ``{key}.labels.json`` (a JSON list of class ids, multi-label).
"""

from __future__ import annotations

import json
import posixpath
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from pretrain.errors import UserError

from .storage import Location, first_contact

FORMAT = "vit-pretrain/shards/1"
MANIFEST = "manifest.json"
REPORT = "skipped.jsonl"
IMAGE_EXTENSIONS = ("jpg", "png", "webp", "bmp", "gif", "tif")
LABEL_EXTENSIONS = ("cls", "labels.json")
SHARD_NAME = re.compile(r".+-\d{6}\.tar")


def shard_name(prefix: str, index: int) -> str:
    return f"{prefix}-{index:06d}.tar"


def label_ids(sample: dict) -> list[int]:
    """The class ids of a sample's label member: ``.cls`` (decimal text) or ``.labels.json`` (a JSON list).

    ValueError if the member is unparsable, KeyError if there is none.
    """
    if "cls" in sample:
        return [int(sample["cls"].decode().strip())]
    ids = json.loads(sample["labels.json"])
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise ValueError(f"{ids!r} is not a JSON list of class ids")
    return ids


class Damaged(UserError):
    """A manifest.json that cannot be read as one (not UTF-8, not JSON, fields missing or inconsistent)."""


@dataclass
class Shard:
    name: str
    samples: int
    bytes: int
    sha256: str


@dataclass
class Manifest:
    name: str
    source: str
    source_kind: str
    classes: list[str]
    multi_label: bool
    shards: list[Shard]
    class_counts: list[int]
    skipped: int = 0
    options: dict[str, Any] = field(default_factory=dict)
    tool: str = ""
    format: str = FORMAT

    @property
    def num_samples(self) -> int:
        return sum(s.samples for s in self.shards)

    def to_json(self) -> str:
        data = asdict(self)
        data["num_samples"] = self.num_samples
        return json.dumps(data, indent=1)

    @classmethod
    def from_json(cls, text: str | bytes, where: str) -> Manifest:
        """``text``: the file's bytes, or its text; not UTF-8, not JSON or not a manifest's fields is ``Damaged``."""
        try:
            data = json.loads(text)
            if not isinstance(data, dict):
                raise ValueError(f"a JSON {type(data).__name__}, not an object")
        except ValueError as e:  # UnicodeDecodeError too
            raise Damaged(f"{where} is damaged ({e}); re-run data_tools.shard to rewrite it") from None
        if data.get("format") != FORMAT:
            raise UserError(f"{where} is not a manifest of this tool (format {data.get('format')!r}, expected {FORMAT})")
        try:
            data.pop("num_samples", None)
            data["shards"] = [Shard(**s) for s in data["shards"]]
            manifest = cls(**data)
        except (KeyError, TypeError) as e:
            raise Damaged(f"{where} is damaged ({e}); re-run data_tools.shard to rewrite it") from None
        if len(manifest.class_counts) != len(manifest.classes) or any(
            s.samples < 0 or s.bytes < 0 for s in manifest.shards
        ):
            raise Damaged(f"{where} is inconsistent (class counts or shard sizes); re-run data_tools.shard to rewrite it")
        return manifest


def load(url: str) -> tuple[Location, Manifest]:
    """The manifest of a shard folder (or of the manifest.json URL itself) and the folder."""
    if url.rstrip("/").endswith(".json"):
        head, _, name = url.rstrip("/").rpartition("/")
        url = head or "."
    else:
        name = MANIFEST
    where = Location(url)
    try:
        with first_contact(where):
            return _load(where, name)
    except OSError as e:  # unreachable (no network, a stopped emulator), no permission
        raise UserError(f"{where.url_of(name)} cannot be read ({type(e).__name__}: {e}); check the address, the "
                        f"network and the credentials") from None


def _load(where: Location, name: str) -> tuple[Location, Manifest]:
    if not where.exists(name):
        if where.root.endswith(".tar") and where.fs.isfile(where.root):
            folder, shard = posixpath.split(where.url)
            prefix = re.sub(r"-\d+\.tar$", "", shard)
            raise UserError(f"{where.url} is one shard; give its folder ({folder or '.'}, with manifest.json), or shards "
                            f"by a brace pattern such as {posixpath.join(folder, prefix)}-{{000000..000009}}.tar")
        if not where.fs.exists(where.root):
            raise UserError(f"{where.url} does not exist; give the OUTPUT folder of python -m data_tools.shard")
        names = where.names()
        if names and not any(n.endswith(".tar") for n in names) and all(where.fs.isdir(where.path(n)) for n in names):
            raise UserError(f"{where.url} holds folders, not shards; if it is an image folder, shard it first: "
                            f"python -m data_tools.shard {where.url} OUTPUT")
        raise UserError(f"no {name} in {where.url}; is it the OUTPUT of python -m data_tools.shard, and did that run finish?")
    return where, Manifest.from_json(where.read_bytes(name), where.url_of(name))
