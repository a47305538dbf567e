"""python -m data_tools.verify OUTPUT [--decode] [--workers N]

Checks a shard set against its manifest: every shard is there, unchanged (size and sha256), a readable tar with the
listed number of samples, each sample with one image and one label of the manifest's kind and classes; --decode also
decodes every image.
Prints one line per problem and a summary; exit status 0 if clean, 1 if damaged, 2 if OUTPUT is not a shard set.
"""

from __future__ import annotations

import hashlib
import io
import os
import sys
import tarfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO

import fsspec
from PIL import Image
from tqdm import tqdm
from webdataset.tariterators import group_by_keys, tar_file_iterator

from pretrain.cli import OneLineParser, command, finish, plural

from .manifest import IMAGE_EXTENSIONS, LABEL_EXTENSIONS, SHARD_NAME, Manifest, Shard, label_ids, load
from .pixels import to_rgb
from .pool import ProcessPool
from .storage import Location, as_tuple

MAX_LINES_PER_SHARD = 10  # a shard with a systematic fault would otherwise print one line per sample
REWRITE = "delete it and re-run the data_tools.shard command that wrote the set, which writes missing shards again"
RESHARD = "shard the source again into an empty folder"
UNREADABLE = (tarfile.TarError, ValueError, OSError, EOFError)  # tarfile, webdataset grouping, storage, compression


class HashingReader(io.RawIOBase):
    """A read-only stream that hashes and counts every byte read through it, so a shard is read only once."""

    def __init__(self, raw: IO[bytes]):
        self.raw, self.sha256, self.size = raw, hashlib.sha256(), 0

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self.sha256.update(data)
        self.size += len(data)
        return data

    def drain(self) -> None:
        """Read to the end: tarfile stops at the end-of-archive marker, before the record padding."""
        while self.read(1 << 20):
            pass


def read_samples(stream: IO[bytes]) -> Iterator[dict]:
    """The samples of a tar stream as webdataset groups them: {"__key__": key, extension: bytes, ...}."""
    files = ({**member, "__url__": ""} for member in tar_file_iterator(stream))
    return group_by_keys(files)


def reason(error: Exception) -> str:
    """The message of a tar reading error, without the stream's repr that webdataset appends to it."""
    return str(error).split(" @ ")[0]


def image_extensions(sample: dict) -> list[str]:
    return [ext for ext in sample if ext in IMAGE_EXTENSIONS]


def check_sample(sample: dict, num_classes: int, decode: bool) -> tuple[list[str], list[int]]:
    """Problems of one sample (without the shard and key) and its class ids, if readable (those out of range
    included: the set's labels and classes are compared as a whole, in ``label_problems``)."""
    images = image_extensions(sample)
    labels = [ext for ext in LABEL_EXTENSIONS if ext in sample]
    problems = []
    if len(images) != 1:
        problems.append(f"{len(images)} image members ({', '.join(images) or 'none'}); expected exactly one")
    elif decode:
        try:
            to_rgb(Image.open(io.BytesIO(sample[images[0]])))
        except Exception as e:  # PIL raises a different type for each kind of bad data
            problems.append(f"image does not decode ({type(e).__name__}: {e}); training skips and counts it "
                            f"(bad_samples), and data_tools.shard --check decode leaves such images out")
    if len(labels) != 1:
        found = ", ".join(labels) or "none"
        problems.append(f"{len(labels)} label members ({found}); expected one .cls or .labels.json")
        return problems, []
    try:
        ids = label_ids(sample)
    except ValueError as e:
        return problems + [f"label does not parse ({e})"], []
    return problems, ids


@dataclass
class Job:
    """One shard to check, as sent to a worker process."""

    url: str
    shard: Shard
    num_classes: int
    decode: bool


@dataclass
class ShardReport:
    """What a worker found in one shard: problem lines (the first few), counts, and whether it read to the end."""

    name: str
    samples: int = 0
    bytes_read: int = 0
    lines: list[str] = field(default_factory=list)
    problems: int = 0
    class_counts: Counter = field(default_factory=Counter)
    label_kinds: Counter = field(default_factory=Counter)  # samples labelled .cls, .labels.json
    beyond: int = 0  # samples with a class id outside the manifest's classes
    first: dict[str, str] = field(default_factory=dict)  # "beyond", "cls", "labels.json": the first such sample
    readable: bool = True
    changed: bool = False  # not the bytes the manifest describes (size or sha256)

    def add(self, line: str, first: bool = False) -> None:
        """Count a problem; keep its line if there is room (lines with ``first`` go ahead of those of samples)."""
        self.problems += 1
        self.lines.insert(0 if first else len(self.lines), line)
        del self.lines[MAX_LINES_PER_SHARD:]


def check_shard(job: Job) -> ShardReport:
    """Read one shard as a stream and report everything wrong with it; runs in a worker process."""
    shard = job.shard
    report = ShardReport(shard.name)
    try:
        with fsspec.open(job.url, "rb") as raw:
            stream = HashingReader(raw)
            try:
                for sample in read_samples(stream):
                    report.samples += 1
                    problems, ids = check_sample(sample, job.num_classes, job.decode)
                    report.class_counts.update(i for i in ids if 0 <= i < job.num_classes)
                    where = f"{shard.name} key {sample['__key__']}"
                    kind = next((ext for ext in LABEL_EXTENSIONS if ext in sample), None)
                    if kind:
                        report.label_kinds[kind] += 1
                        report.first.setdefault(kind, where)
                    if any(not 0 <= i < job.num_classes for i in ids):
                        report.beyond += 1
                        report.first.setdefault("beyond", where)
                    for problem in problems:
                        report.add(f"{shard.name} key {sample['__key__']}: {problem}")
            except UNREADABLE as e:
                report.readable = False
                read = plural(report.samples, "sample")
                report.add(f"{shard.name}: not a readable tar after {read} ({reason(e)}); {REWRITE}")
            stream.drain()
    except OSError as e:
        report.readable = False
        report.add(f"{shard.name}: cannot be read ({e})")
        return report
    report.bytes_read = stream.size
    report.changed = stream.size != shard.bytes or stream.sha256.hexdigest() != shard.sha256
    if stream.size != shard.bytes:
        size = f"{stream.size} bytes, the manifest says {shard.bytes}"
        report.add(f"{shard.name}: {size} (truncated or replaced?); re-run the data_tools.shard command that wrote the "
                   f"set, which writes shards of another size than the manifest's again", first=True)
    elif report.changed:
        report.add(f"{shard.name}: sha256 mismatch (the file changed after sharding; {REWRITE})", first=True)
    if report.readable and report.samples != shard.samples:
        report.add(f"{shard.name}: {plural(report.samples, 'sample')}, the manifest says {shard.samples}; {REWRITE}")
    return report


def run_jobs(jobs: list[Job], workers: int) -> Iterator[ShardReport]:
    """Check shards in a pool of spawned processes (fork and fsspec's event loops do not mix), or here if workers=1."""
    if workers <= 1 or len(jobs) <= 1:
        yield from map(check_shard, jobs)
        return
    with ProcessPool(min(workers, len(jobs))) as pool:
        for future in pool.completed([pool.submit(check_shard, job) for job in jobs]):
            yield future.result()


def check_all(where: Location, manifest: Manifest, present: set[str], decode: bool, workers: int,
              moved: dict[str, str]) -> list[ShardReport]:
    """A report per shard in manifest order, missing shards included (``moved``: those found under another name),
    with a progress bar on stderr."""
    jobs = [Job(where.url_of(s.name), s, len(manifest.classes), decode) for s in manifest.shards if s.name in present]
    if "memory" in as_tuple(where.fs.protocol):
        workers = 1  # memory:// lives in this process only
    reports = {}
    with tqdm(total=sum(j.shard.bytes for j in jobs), unit="B", unit_scale=True, desc="verify", file=sys.stderr) as bar:
        for report in run_jobs(jobs, workers):
            reports[report.name] = report
            bar.update(report.bytes_read)
            bar.set_postfix_str(f"{len(reports)}/{len(jobs)} shards", refresh=False)
    for shard in manifest.shards:
        if shard.name not in present:
            reports[shard.name] = ShardReport(shard.name, readable=False)
            if shard.name in moved:
                reports[shard.name].add(f"{shard.name}: missing from {where.url}, but {moved[shard.name]} holds it (the "
                                        f"same sha256): rename that file back to {shard.name}")
                continue
            reports[shard.name].add(f"{shard.name}: missing from {where.url}; re-run the data_tools.shard command that "
                                    f"wrote the set, which writes missing shards again, or restore the file")
    return [reports[s.name] for s in manifest.shards]


def stray_shards(names: list[str], manifest: Manifest, moved: dict[str, str]) -> list[str]:
    """Files named like shards that the manifest does not list (left over from an earlier run, or copied in), but
    for those that are a listed shard renamed (named with it)."""
    listed = {s.name for s in manifest.shards} | set(moved.values())
    return [
        f"{name}: looks like a shard but is not in the manifest (left over from an earlier run?); delete it"
        for name in names
        if SHARD_NAME.fullmatch(name) and name not in listed
    ]


def moved_shards(where: Location, manifest: Manifest, names: list[str]) -> dict[str, str]:
    """Missing shards that a file named like a shard but not listed holds, by size and sha256: {listed: file}."""
    listed = {s.name for s in manifest.shards}
    missing = [s for s in manifest.shards if s.name not in names]
    strays = [n for n in names if SHARD_NAME.fullmatch(n) and n not in listed]
    if not missing or not strays:
        return {}
    sizes = {e["name"].rstrip("/").rsplit("/", 1)[-1]: e.get("size") for e in where.fs.ls(where.root, detail=True)}
    moved = {}
    for name in strays:
        if same_size := [s for s in missing if s.name not in moved and s.bytes == sizes.get(name)]:
            digest = sha256_of(where, name)
            if twin := next((s for s in same_size if s.sha256 == digest), None):
                moved[twin.name] = name
    return moved


def sha256_of(where: Location, name: str) -> str:
    h = hashlib.sha256()
    with where.fs.open(where.path(name), "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def label_problems(manifest: Manifest, reports: list[ShardReport]) -> list[str]:
    """Labels that do not fit the manifest as a whole: class ids beyond its classes, or labels of the other kind
    than its multi_label says (a manifest edited, or not the one written with these shards)."""
    lines = []
    fix = "restore the manifest.json written with these shards, or " + RESHARD
    beyond = sum(r.beyond for r in reports)
    if beyond:
        first = next(r.first["beyond"] for r in reports if r.beyond)
        shards = plural(sum(r.beyond > 0 for r in reports), "shard")
        lines.append(f"{plural(beyond, 'sample')} in {shards} {'carries' if beyond == 1 else 'carry'} class ids beyond "
                     f"the manifest's {plural(len(manifest.classes), 'class', 'classes')} (the first: {first}); {fix}")
    wrong = "cls" if manifest.multi_label else "labels.json"
    count = sum(r.label_kinds[wrong] for r in reports)
    if count:
        first = next(r.first[wrong] for r in reports if r.label_kinds[wrong])
        carry = "carries" if count == 1 else "carry"
        lines.append(f"manifest.json says multi_label {str(manifest.multi_label).lower()}, but {plural(count, 'sample')} "
                     f"{carry} .{wrong} labels (the first: {first}), as a {'single' if wrong == 'cls' else 'multi'}-label "
                     f"set's do; {fix}")
    return lines


def count_problems(manifest: Manifest, reports: list[ShardReport]) -> list[str]:
    """Disagreement between the manifest's class_counts and the labels read, once every shard could be read and
    is as written (a shard that changed is named already, and rewriting it mends the counts too)."""
    if len(manifest.class_counts) != len(manifest.classes):
        counts, classes = len(manifest.class_counts), len(manifest.classes)
        return [f"manifest.json: {counts} class_counts for {classes} classes; {RESHARD}"]
    if not all(r.readable and not r.changed for r in reports):
        return []
    counted = sum((r.class_counts for r in reports), Counter())
    differ = sum(counted[c] != n for c, n in enumerate(manifest.class_counts))
    if not differ:
        return []
    return [
        f"manifest.json: class_counts disagree with the labels in the shards for {differ} classes "
        f"(python -m data_tools.inspect --recount lists them); {RESHARD}"
    ]


def verify(where: Location, manifest: Manifest, decode: bool, workers: int) -> tuple[list[str], int, int]:
    """The problem lines to print, the number of problems (lines beyond the per-shard limit included) and of samples."""
    names = where.names()
    moved = moved_shards(where, manifest, names)
    reports = check_all(where, manifest, set(names), decode, workers, moved)
    lines = [line for r in reports for line in r.lines]
    lines += stray_shards(names, manifest, moved) + label_problems(manifest, reports) + count_problems(manifest, reports)
    problems = len(lines) + sum(r.problems - len(r.lines) for r in reports)
    if problems > len(lines):
        lines.append(f"(and {problems - len(lines)} more problems: at most {MAX_LINES_PER_SHARD} lines per shard)")
    return lines, problems, sum(r.samples for r in reports)


@command
def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="python -m data_tools.verify", description=__doc__.split("\n\n")[1])
    parser.add_argument("output", help="the shard folder (local path or fsspec URL) or its manifest.json")
    parser.add_argument("--decode", action="store_true", help="also decode every image with PIL (slower)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes reading shards in parallel")
    args = parser.parse_args(argv)
    where, manifest = load(args.output)
    lines, problems, samples = verify(where, manifest, args.decode, args.workers)
    for line in lines:
        print(line)
    verdict = plural(problems, "problem") if problems else "OK"
    print(f"verified {plural(len(manifest.shards), 'shard')}, {plural(samples, 'sample')}: {verdict}")
    return 1 if problems else 0


if __name__ == "__main__":
    finish(main())
