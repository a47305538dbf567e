"""python -m data_tools.shard SOURCE OUTPUT [options]

Turns a corpus into WebDataset shards ``{name}-000000.tar ...`` plus manifest.json. SOURCE is an
ImageFolder tree, a folder of per-synset tars (ImageNet-21k) or an image list with labels
(JFT-style, with --classes); OUTPUT is a folder or any fsspec URL (gs://, s3://, memory://).
Samples are shuffled across shards with --seed. An interrupted run is resumed by running the same
command again: finished shards are kept after their sha256 is checked, the rest are written.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.metadata
import json
import multiprocessing
import queue
import re
import sys
from collections import Counter
from collections.abc import Iterator

import numpy as np
from tqdm import tqdm

from pretrain.cli import OneLineParser, command, finish, plural, whole
from pretrain.errors import UserError

from . import sources
from .manifest import MANIFEST, REPORT, Damaged, Manifest, Shard, shard_name
from .pool import ProcessPool, terminate_as_interrupt
from .sources import Corpus, Item
from .storage import Location, first_contact
from .writer import Options, write_shard

PARTS = "_parts"  # per-shard records of an unfinished run; removed when manifest.json is written


def parse_size(text: str) -> int:
    """'1GB', '512MB', '500M', '1e9' -> bytes; as file sizes are counted by ls -h and du, 1GB is 2^30 bytes."""
    m = re.fullmatch(r"\s*([\d.e+]+)\s*([kmgt]?)i?b?\s*", text.lower())
    try:
        size = int(float(m[1]) * 1024 ** " kmgt".index(m[2] or " ")) if m else 0
    except ValueError:  # 1.5.5GB
        size = 0
    if size <= 0:
        raise argparse.ArgumentTypeError(f"'{text}' is not a size like 1GB or 512MB")
    return size


def prefix(text: str) -> str:
    """--name: the start of the shards' file names, in OUTPUT itself."""
    if not text or "/" in text or "\\" in text or text.startswith(".") or "{" in text:
        raise argparse.ArgumentTypeError(f"'{text}' is not a file name prefix (no '/', '{{' or leading '.')")
    return text


def list_corpus(source: str, kind: str, classes_file: str | None, workers: int) -> Corpus:
    sources.check_not_shard_set(source)
    kind = sources.detect_kind(source) if kind == "auto" else kind
    if kind == "imagefolder":
        return sources.list_imagefolder(source, classes_file)
    if kind == "list":
        return sources.list_images_file(source, classes_file)
    tars, ignored, hidden = sources.list_i21k_tars(source)
    stems = [t.rsplit("/", 1)[-1][: -len(".tar")] for t in tars]
    classes = sources.fixed_labels(stems, sources.read_classes(classes_file) if classes_file else None, classes_file,
                                   "synset tar")
    index = {sources.nfc(name): label for label, name in enumerate(classes)}
    labels = [index[sources.nfc(stem)] for stem in stems]
    items, refused, members = [], [], Counter()
    with ProcessPool(workers) as pool:
        listed = pool.results([pool.submit(sources.list_tar, tar, label) for tar, label in zip(tars, labels)])
        for found, bad, ignored_members in tqdm(listed, total=len(tars), desc="listing tars", unit="tar"):
            items += found
            refused += bad
            members += ignored_members
    first: dict[str, Item] = {}
    for item in items:  # in tar and member order; a tar's members cannot be renamed in place: skip them, not stop
        if item.key in first:
            refused.append({"source": item.where, "reason": f"makes the same sample key '{item.key}' as "
                            f"{first[item.key].where} (a key drops the extension and folders inside a tar), which is kept"})
        else:
            first[item.key] = item
    return Corpus("i21k", classes, False, [it for it in items if first[it.key] is it], refused, ignored, hidden,
                  members)


def plan(items: list[Item], seed: int, shard_samples: int, shard_bytes: int) -> list[list[Item]]:
    """Shuffle with the seed (a class never sits in one shard), then cut by sample count or size."""
    ordered = sorted(items, key=lambda it: it.key)  # unique: each layout's listing sees to it
    shuffled = [ordered[i] for i in np.random.default_rng(seed).permutation(len(ordered))]
    shards, current, size = [], [], 0
    for item in shuffled:
        current.append(item)
        size += max(item.size, 0)
        if (shard_samples and len(current) >= shard_samples) or (not shard_samples and size >= shard_bytes):
            shards.append(current)
            current, size = [], 0
    return shards + [current] if current else shards


def plan_digest(names: list[str], shards: list[list[Item]]) -> str:
    h = hashlib.sha256()
    for name, items in zip(names, shards):
        h.update(name.encode())
        for it in items:
            # surrogateescape: the folder above a tree may have a name that is not UTF-8; its files' names are
            h.update(f"\0{it.key}\0{it.where}\0{it.size}\0{it.offset}\0{it.labels}".encode(errors="surrogateescape"))
    return h.hexdigest()


def classes_canonical(spec: str | None) -> str | None:
    """--classes as the run records it: 'classes.txt' run from another folder, and a shard set named by its folder or
    its manifest.json, are the same."""
    if spec is None:
        return None
    if spec.rstrip("/").rsplit("/", 1)[-1] == MANIFEST:
        spec = spec.rstrip("/")[: -len(MANIFEST)] or "."
    return Location(spec).canonical


def comparable(options: dict) -> dict:
    """An earlier run's options as this one records them (its --classes was recorded as typed until 2026-12)."""
    return {**options, "classes": classes_canonical(options.get("classes"))}


def differences(options: dict, source: str, run: dict) -> str:
    """How an earlier command (its options and source) differs from this one, e.g. '--seed 0 there, 1 here'."""
    parts = [f"source {source} there, {run['source']} here"] if source != run["source"] else []
    options = comparable(options)
    parts += [f"--{key.replace('_', '-')} {options.get(key)} there, {value} here"
              for key, value in run["options"].items() if key != "plan_sha256" and options.get(key) != value]
    return "; ".join(parts) or "the same options, but the source's files changed since"


def renamed(there: list[str], here: list[str]) -> str:
    """The first difference of two class lists, e.g. "class 0 'cat' there, 'kitty' here"."""
    i = next((i for i, (a, b) in enumerate(zip(there, here)) if a != b), None)
    if i is None:
        return f"{plural(len(there), 'class', 'classes')} there, {len(here)} here"
    return f"class {i} '{there[i]}' there, '{here[i]}' here"


def check_output(out: Location, run: dict, names: list[str], classes: list[str]) -> Manifest | None:
    """The finished manifest of this same run, None to go on; refuses a folder that holds anything else, or this
    run's set labelled by other class names (a --classes file edited since). A set this tool finished (its
    skipped.jsonl is there) whose manifest.json is damaged or gone is written again, if the folder holds nothing but
    this run's shards."""
    entries = [n for n in out.names() if not n.startswith(".")]
    ours = REPORT in entries and set(entries) <= {*names, MANIFEST, REPORT, PARTS}
    damaged = False
    if MANIFEST in entries:
        try:
            done = Manifest.from_json(out.read_bytes(MANIFEST), out.url_of(MANIFEST))
        except Damaged as e:
            if not ours:
                raise UserError(f"{str(e).split('; re-run')[0]}, and {out.url} holds other files than this run's "
                                f"shards; move them away to have the set written again, or pick an empty OUTPUT") from None
            damaged = True
        else:
            if done.source == run["source"] and comparable(done.options) == run["options"]:
                if done.classes != classes:
                    spec = run["options"]["classes"]
                    raise UserError(f"{out.url} holds the shards of this command, but its {MANIFEST} names other "
                                    f"classes than {f'--classes {spec}' if spec else 'the source'} now does "
                                    f"({renamed(done.classes, classes)}); delete {out.url_of(MANIFEST)} to have the set "
                                    f"written again with these names, or pick an empty OUTPUT")
                return done
            how = differences(done.options, done.source, run)
            raise UserError(f"{out.url} already holds the shards of another command ({how}); pick an empty OUTPUT")
    if PARTS in entries and out.exists(f"{PARTS}/run.json"):
        earlier = json.loads(out.read_bytes(f"{PARTS}/run.json"))
        if earlier["source"] != run["source"] or comparable(earlier["options"]) != run["options"]:
            how = differences(earlier["options"], earlier["source"], run)
            finish = ("restore the source as it was to finish that run" if how.startswith("the same options")
                      else "rerun that command to finish it")
            raise UserError(f"{out.url} holds an unfinished run of another command ({how}); {finish}, or pick an "
                            f"empty OUTPUT")
    elif set(entries) & set(names) and ours:
        print(f"{out.url} holds shards named as this run's and {'a damaged' if damaged else 'no'} {MANIFEST} to "
              f"check them by; writing them again")
    elif entries and not ours:
        raise UserError(f"{out.url} is not empty and holds no run of data_tools.shard; pick an empty OUTPUT (nothing was written)")
    return None


def damaged_shards(out: Location, manifest: Manifest) -> list[str]:
    """The shards of a finished set that are missing or of another size than its manifest says (cut short,
    replaced); one listing, no reads. A shard changed in place at its size is verify's to find, by its sha256."""
    sizes = {e["name"].rstrip("/").rsplit("/", 1)[-1]: e.get("size") for e in out.fs.ls(out.root, detail=True)}
    return [s.name for s in manifest.shards if sizes.get(s.name) != s.bytes]


def repair(out: Location, manifest: Manifest, damaged: list[str], planned: dict[str, list[Item]], options: Options,
           workers: int) -> Manifest:
    """Write ``damaged`` shards of a finished set again, from the same plan, and their sizes and hashes into the
    manifest; a shard that comes out with another number of samples means the source changed since."""
    listed = ", ".join(damaged[:3]) + (f" and {len(damaged) - 3} more" if len(damaged) > 3 else "")
    print(f"{out.url} holds this run, but {listed} {'is' if len(damaged) == 1 else 'are'} missing or of another size than manifest.json says; "
          f"writing them again")
    todo = [(name, planned[name]) for name in damaged]
    records = {r["name"]: r for r in write_all(out, todo, options, workers, sum(len(items) for _, items in todo))}
    for s in manifest.shards:
        if (r := records.get(s.name)) is None:
            continue
        if r["samples"] != s.samples:
            raise UserError(f"{out.url_of(s.name)} now holds {r['samples']} samples and held {s.samples}: the source "
                            f"changed since the set was written; shard it again into an empty OUTPUT")
        s.bytes, s.sha256 = r["bytes"], r["sha256"]
    out.write_bytes(MANIFEST, manifest.to_json().encode())
    out.remove(PARTS)
    print(f"rewrote {len(damaged)} of {len(manifest.shards)} shards in {out.url}; manifest.json updated")
    return manifest


def finished_record(out: Location, name: str) -> dict | None:
    """The record of a shard an earlier run finished, if the shard is still intact."""
    record_name = f"{PARTS}/{name}.json"
    if not (out.exists(record_name) and out.exists(name)):
        return None
    record = json.loads(out.read_bytes(record_name))
    h = hashlib.sha256()
    with out.fs.open(out.path(name), "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return record if h.hexdigest() == record["sha256"] else None


_progress_queue = None


def _init_worker(q) -> None:
    global _progress_queue
    _progress_queue = q
    q.cancel_join_thread()  # progress only: a worker that stops while nobody reads it must not wait to flush it


def _report(samples: int, nbytes: int) -> None:
    _progress_queue.put((samples, nbytes))


def _write_in_worker(out_url: str, name: str, items: list[Item], options: Options) -> dict:
    return write_shard(out_url, name, items, options, _report)


def write_all(out: Location, todo: list[tuple[str, list[Item]]], options: Options, workers: int, total: int) -> list[dict]:
    bar = tqdm(total=total, unit="img", unit_scale=True, desc="sharding", smoothing=0.1)
    written = [0]

    def advance(samples: int, nbytes: int) -> None:
        bar.update(samples)
        written[0] += nbytes
        bar.set_postfix_str(f"{written[0] / max(bar.format_dict['elapsed'], 1e-9) / 1e6:.1f} MB/s", refresh=False)

    def finish(record: dict) -> dict:
        out.write_bytes(f"{PARTS}/{record['name']}.json", json.dumps(record).encode())
        return record

    records = []
    try:
        if workers <= 1 or "memory" in out.fs.protocol:  # memory:// lives in this process only
            for name, items in todo:
                records.append(finish(write_shard(out.url, name, items, options, advance)))
            return records
        progress = multiprocessing.get_context("spawn").Queue()  # handed to each worker as it starts
        futures, recorded = [], set()
        try:
            with ProcessPool(workers, initializer=_init_worker, initargs=(progress,)) as pool:
                futures = [pool.submit(_write_in_worker, out.url, name, items, options) for name, items in todo]
                try:
                    for f in pool.completed(futures, every=lambda: _drain(progress, advance)):
                        _drain(progress, advance)
                        records.append(finish(f.result()))
                        recorded.add(f)
                except KeyboardInterrupt:
                    bar.write("stopping: the shards being written are finished first (press Ctrl-C again to stop at "
                              "once)", file=sys.stderr)
                    raise
                _drain(progress, advance)
        finally:  # an interrupt, or a worker's death, waited for the others' shards: they count as finished
            for f in futures:
                if f not in recorded and f.done() and not f.cancelled() and f.exception() is None:
                    records.append(finish(f.result()))
        return records
    finally:
        bar.close()


def _drain(q, advance) -> None:
    while True:
        try:
            advance(*q.get_nowait())
        except queue.Empty:
            return


def shard(args: argparse.Namespace) -> Manifest:
    out = Location(args.output)
    with written_to(out), first_contact(out):
        try:
            is_file = out.fs.info(out.root)["type"] == "file"
        except FileNotFoundError:  # not isfile, which would take a store that does not answer for no file
            is_file = False
    if is_file:
        raise UserError(f"OUTPUT {args.output} is a file; give the folder (or URL) to write the shards into")
    corpus = list_corpus(args.source, args.kind, args.classes, args.workers)
    if corpus.ignored:
        n, endings = corpus.ignored.total(), ", ".join(f"{end} {k}" for end, k in corpus.ignored.most_common())
        what = "an image" if corpus.kind == "imagefolder" else "a synset tar"
        like = ", as torchvision's ImageFolder does" if corpus.kind == "imagefolder" else ""
        print(f"ignored {plural(n, 'file')} not named as {what} ({endings}){like}")
    if corpus.ignored_members:
        endings = ", ".join(f"{end} {k}" for end, k in corpus.ignored_members.most_common())
        print(f"ignored {plural(corpus.ignored_members.total(), 'tar member')} not named as an image ({endings}), as "
              f"torchvision's ImageFolder does")
    if corpus.hidden:
        names = ", ".join(f"{name} {k}" for name, k in corpus.hidden.most_common(5))
        print(f"ignored {plural(corpus.hidden.total(), 'hidden file or folder', 'hidden files and folders')} (a name "
              f"starting with '.': {names}{', ...' if len(corpus.hidden) > 5 else ''})")
    if not corpus.items:
        tars = "; it holds .tar files in a folder: give the folder that holds the synset tars (an ImageNet-21k " \
               "release unpacks them into one)" if corpus.kind == "imagefolder" and ".tar" in corpus.ignored else ""
        raise UserError(f"{args.source} holds no images to shard{tars}")
    options = Options(corpus.multi_label, args.check, args.resize_short, args.quality)
    shards = plan(corpus.items, args.seed, args.shard_samples, args.shard_size)
    names = [shard_name(args.name, i) for i in range(len(shards))]
    cli = {k: getattr(args, k) for k in ("kind", "classes", "name", "shard_samples", "shard_size", "seed", "resize_short", "quality", "check")}
    run = {"source": Location(args.source).canonical,
           "options": {**cli, "classes": classes_canonical(args.classes), "kind": corpus.kind,
                       "plan_sha256": plan_digest(names, shards)}}
    with written_to(out):
        return write_set(out, run, corpus, names, shards, options, args)


@contextlib.contextmanager
def written_to(out: Location) -> Iterator[None]:
    """The output's storage failing (a bucket that does not exist, an endpoint that does not answer) in one
    sentence."""
    try:
        yield
    except OSError as e:
        if isinstance(e, FileNotFoundError) and out.is_local and ".tmp" in f"{e.filename} {e}":
            # Our own temporary file gone before its rename: another process writes the same names here.
            raise UserError(f"{out.url} is being written by another data_tools.shard command as well (a file of this "
                            f"one was taken from under it); let one finish, then run the same command again to check "
                            f"the set") from None
        reason = (str(e).strip().splitlines() or [""])[0]
        raise UserError(f"{out.url} cannot be written ({type(e).__name__}: {reason}); check that it exists (a "
                        f"bucket must be created first), the address, the network and the credentials, then run the "
                        f"same command again: it keeps the shards already finished") from None


def write_set(out: Location, run: dict, corpus: Corpus, names: list[str], shards: list[list[Item]], options: Options,
              args: argparse.Namespace) -> Manifest:
    """Write the planned shards into ``out`` (those an earlier run left intact are kept), then the manifest."""
    done = check_output(out, run, names, corpus.classes)
    if done is not None:
        damaged = damaged_shards(out, done)
        if damaged:
            return repair(out, done, damaged, dict(zip(names, shards)), options, args.workers)
        print(f"{out.url} already holds this run: {plural(len(done.shards), 'shard')}, "
              f"{plural(done.num_samples, 'sample')}; nothing to do")
        return done
    out.write_bytes(f"{PARTS}/run.json", json.dumps(run).encode())

    records = {n: r for n in names if (r := finished_record(out, n)) is not None}
    if records:
        print(f"resuming: {len(records)} of {len(names)} shards were finished by an earlier run and are intact")
    todo = [(n, s) for n, s in zip(names, shards) if n not in records]
    for record in write_all(out, todo, options, args.workers, sum(len(s) for _, s in todo)):
        records[record["name"]] = record

    ordered = [records[n] for n in names]
    counts = Counter()
    for r in ordered:
        counts.update({int(k): v for k, v in r["class_counts"].items()})
    skipped = corpus.refused + [s for r in ordered for s in r["skipped"]]
    if not any(r["samples"] for r in ordered):  # the shards go: a rerun once the source is mended writes them all
        for name in names:
            out.remove(name)
        out.remove(PARTS)
        out.write_bytes(REPORT, "".join(json.dumps(s) + "\n" for s in skipped).encode())
        first = f" ({skipped[0]['source']}: {skipped[0]['reason']})" if skipped else ""
        raise UserError(f"none of the {len(corpus.items)} images of {args.source} could be read{first}; every "
                        f"reason is in {out.url_of(REPORT)}")
    manifest = Manifest(
        name=args.name,
        source=run["source"],
        source_kind=corpus.kind,
        classes=corpus.classes,
        multi_label=corpus.multi_label,
        shards=[Shard(r["name"], r["samples"], r["bytes"], r["sha256"]) for r in ordered],
        class_counts=[counts.get(i, 0) for i in range(len(corpus.classes))],
        skipped=sum(not s.get("tar") for s in skipped),
        options=run["options"],
        tool=f"data_tools.shard {tool_version()}",
    )
    out.write_bytes(REPORT, "".join(json.dumps(s) + "\n" for s in skipped).encode())
    out.write_bytes(MANIFEST, manifest.to_json().encode())
    out.remove(PARTS)
    empty = [c for c, n in zip(corpus.classes, manifest.class_counts) if not n]
    if empty:
        shown = ", ".join(f"'{c}'" for c in empty[:5]) + (f" and {len(empty) - 5} more" if len(empty) > 5 else "")
        header = corpus.classes[0] if args.classes and empty[0] == corpus.classes[0] else None
        hint = f" ('{header}', the first, may be a header line of --classes {args.classes}: remove it)" if header else ""
        print(f"warning: {len(empty)} of {len(corpus.classes)} classes have no sample: {shown}{hint}")
    size = sum(s.bytes for s in manifest.shards)
    tars = len(skipped) - manifest.skipped
    damaged = f", {plural(tars, 'tar')} read in part or not at all" if tars else ""
    print(
        f"wrote {plural(len(names), 'shard')} ({len(names) - len(todo)} kept from an earlier run), "
        f"{plural(manifest.num_samples, 'sample')}, {size / 2**30:.2f} GiB to {out.url}; {plural(manifest.skipped, 'image')} "
        f"skipped{damaged}"
        + (f" (listed in {out.url_of(REPORT)})" if skipped else "")
    )
    return manifest


def tool_version() -> str:
    """The installed package's version, or "source" when run from a checkout that was never installed."""
    try:
        return importlib.metadata.version("vit-pretrain")
    except importlib.metadata.PackageNotFoundError:
        return "source"


@command(interrupted="interrupted; the finished shards are kept, and the same command carries on from them")
def main(argv: list[str] | None = None) -> int:
    p = OneLineParser(prog="python -m data_tools.shard", description=__doc__.split("\n\n")[1])
    p.add_argument("source", help="ImageFolder tree, folder of per-class .tar files, or image list (.csv / .jsonl)")
    p.add_argument("output", help="output folder or fsspec URL (gs://bucket/shards, s3://...)")
    p.add_argument("--kind", choices=["auto", "imagefolder", "i21k", "list"], default="auto", help="layout of SOURCE (default: detect)")
    p.add_argument("--classes", help="the classes, in label order: a file with one name per line or a shard set "
                   "(its manifest's); required for image lists, and for folders and tars it labels a split as the "
                   "split it names, e.g. --classes shards/train for the validation images")
    p.add_argument("--name", type=prefix, default="train", help="shard name prefix: NAME-000000.tar (default: train)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--shard-samples", type=whole(1), default=0, help="samples per shard")
    size.add_argument("--shard-size", type=parse_size, default=parse_size("1GB"),
                      help="target shard size, counted in the source's image bytes (default 1GB, 2^30 bytes; with --resize-short "
                           "shards come out smaller by as much as the images shrink)")
    p.add_argument("--seed", type=whole(0), default=0, help="seed of the shuffle across shards")
    p.add_argument("--workers", type=whole(1), default=max(1, multiprocessing.cpu_count()), help="processes (default: all cores)")
    p.add_argument("--check", choices=["header", "decode"], default="header",
                   help="how hard to check each image: header (the header, PNG checksums, the end of a JPEG; a JPEG "
                        "cut short is decoded to tell) or decode (every pixel)")
    p.add_argument("--resize-short", type=whole(0), default=0, help="re-encode as JPEG with this shorter side (0: keep bytes)")
    p.add_argument("--quality", type=whole(1, 100), default=95, help="JPEG quality when re-encoding")
    args = p.parse_args(argv)
    with terminate_as_interrupt():
        shard(args)
    return 0


if __name__ == "__main__":
    finish(main())
