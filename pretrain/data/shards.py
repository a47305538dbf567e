"""Shard sets: the URLs a recipe's data.train / data.val name, and reading one shard's samples."""

from __future__ import annotations

import io
import math
import sys
import tarfile
import time
from dataclasses import dataclass

import fsspec
from braceexpand import braceexpand
from webdataset.tariterators import group_by_keys, tar_file_expander

from data_tools import manifest as mf
from data_tools.storage import register_webdataset_schemes

from ..errors import UserError


@dataclass(frozen=True)
class ShardSet:
    urls: list[str]
    classes: list[str] | None  # None: a brace pattern without a manifest
    multi_label: bool
    counts: list[int] | None  # samples in each shard, from the manifest
    class_counts: list[int] | None = None  # samples (multi-label: labels) of each class, from the manifest

    @property
    def num_samples(self) -> int | None:
        return None if self.counts is None else sum(self.counts)


def resolve(spec: str, what: str = "data.train") -> ShardSet:
    """``spec``: a manifest.json, a folder holding one, or a brace pattern like shards/train-{000000..000127}.tar."""
    if not spec:
        raise UserError(f"{what} is empty; set it to the OUTPUT of python -m data_tools.shard (a folder or manifest.json)")
    if spec.startswith("[") and spec.endswith("]"):
        raise UserError(f"{what}={spec} is a list; it takes one shard set (a folder, its manifest.json or a brace "
                        f"pattern): shard the sources together with python -m data_tools.shard, or give one")
    if "{" in spec:
        return ShardSet(list(braceexpand(spec)), None, False, None)
    try:
        where, manifest = mf.load(spec)
    except UserError as e:
        raise UserError(f"{what}: {e}") from None
    return ShardSet([where.url_of(s.name) for s in manifest.shards], manifest.classes, manifest.multi_label,
                    [s.samples for s in manifest.shards], manifest.class_counts)


def looks_multi_label(shard_set: ShardSet) -> bool:
    """Whether a shard set is multi-label: its manifest's word, or for a brace pattern (no manifest) whether a sample
    of its first shard has more than one label (this reads that shard)."""
    if shard_set.classes is not None:
        return shard_set.multi_label
    samples, _ = read_shard(shard_set.urls[0])
    for sample in samples:
        try:
            if len(mf.label_ids(sample)) > 1:
                return True
        except (KeyError, ValueError):
            continue  # a bad sample: counted where it is read
    return False


def check_same_classes(reference: ShardSet, reference_spec: str, other: ShardSet, other_spec: str) -> None:
    """A sample's label is an index into its manifest's classes, so two shard sets agree on labels only when they
    list the same classes in the same order (one without a manifest is not checked)."""
    mine, theirs = reference.classes, other.classes
    if mine is None or theirs is None or mine == theirs:
        return
    if len(mine) != len(theirs):
        detail = f"{len(theirs)} classes against {len(mine)}"
    else:
        i = next(i for i, (a, b) in enumerate(zip(mine, theirs, strict=True)) if a != b)
        detail = f"label {i} is '{theirs[i]}' there and '{mine[i]}' in {reference_spec}"
    raise UserError(f"{other_spec} labels its samples by other classes than {reference_spec} ({detail}); shard it "
                    f"again with python -m data_tools.shard ... --classes {reference_spec}")


OUTAGE_S = 600.0  # how long storage that does not answer is asked again for a shard before the run stops
RETRY_S = (2, 5, 10, 30, 60)  # the waits between those attempts; the last repeats


def transient(e: BaseException) -> bool:
    """Whether storage may answer again: no connection, a timeout, a server error (5xx) or throttling (429). Not a
    missing or forbidden object (404, 403: gcsfs raises OSError('Forbidden')), credentials or a wrong URL."""
    status = getattr(e, "status", None) or getattr(e, "code", None)  # aiohttp's, gcsfs's HttpError
    if isinstance(status, int) and 100 <= status < 600:
        return status >= 500 or status == 429
    names = {c.__name__ for c in type(e).__mro__}  # aiohttp's own, without importing it
    return isinstance(e, (ConnectionError, TimeoutError)) or bool(names & {"ClientConnectionError", "ServerTimeoutError"})


class StorageUnreachable(Exception):
    """A shard's storage did not answer for OUTAGE_S: not the shard's fault, so not skipped like a damaged one."""


def read_shard(url: str, outage_s: float | None = None) -> tuple[list[dict], str | None]:
    """All samples of one shard (raw bytes by extension) and, if it is damaged or missing, why.

    The shard is fetched whole (one read from a bucket); a truncated tar yields the samples before the damage. A
    bucket that does not answer (``transient``) is asked again, with a warning on stderr each time, for ``outage_s``
    (default ``OUTAGE_S``), then ``StorageUnreachable``: skipping the shards of an outage would train on other data
    than a resumed run.
    """
    outage_s = OUTAGE_S if outage_s is None else outage_s
    register_webdataset_schemes()
    started, attempt = time.monotonic(), 0
    while True:
        try:
            with fsspec.open(url, "rb") as f:
                data = f.read()
            break
        except Exception as e:  # noqa: BLE001 (gcsfs and s3fs raise their own HTTP errors, not OSError)
            cause = e.__cause__ or e  # fsspec's http turns a refused connection into FileNotFoundError from it
            reason = f"{type(cause).__name__}: {(str(cause).strip().splitlines() or [''])[0]}"
            if "://" not in url or not transient(cause):
                missing = isinstance(e, FileNotFoundError) and getattr(cause, "status", 404) == 404
                return [], f"{url}: not found" if missing else f"{url}: cannot be read ({reason})"
            waited = time.monotonic() - started
            if waited >= outage_s:
                raise StorageUnreachable(f"{url} could not be read for {waited:.0f} s ({reason})") from None
            pause = min(RETRY_S[min(attempt, len(RETRY_S) - 1)], math.ceil(outage_s - waited))
            print(f"warning: {url} cannot be read ({reason}); asking again in {pause} s ({waited:.0f} s so far; the "
                  f"run stops at {outage_s:.0f} s)", file=sys.stderr, flush=True)
            time.sleep(pause)
            attempt += 1
    samples: list[dict] = []
    try:
        for sample in group_by_keys(tar_file_expander([{"url": url, "stream": io.BytesIO(data)}])):
            samples.append(sample)
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:
        reason = e.args[0].split(" @ <")[0] if e.args and isinstance(e.args[0], str) else e  # not the BytesIO's repr
        return samples, f"{url}: damaged after {len(samples)} samples ({reason})"
    if not _ends_with_end_of_archive(data):
        return samples, f"{url}: cut short after {len(samples)} samples (no end-of-archive blocks)"
    return samples, None


def _ends_with_end_of_archive(data: bytes) -> bool:
    """Whether the zero blocks every tar writer puts after the last member are there.

    A tar cut between two members parses without error; only the missing end marker tells.
    """
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        members = tar.getmembers()
    end = members[-1].offset_data + -(-members[-1].size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE if members else 0
    return data[end : end + 2 * tarfile.BLOCKSIZE] == bytes(2 * tarfile.BLOCKSIZE)
