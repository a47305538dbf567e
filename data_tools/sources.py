"""Listing a corpus: every sample's key, where its bytes are, its labels and size.

Three layouts: an ImageFolder tree (``class_name/xxx.jpg``), the ImageNet-21k release (a folder
of per-synset tars, read in place), and a JFT-style list (CSV ``path_or_url, label label ...`` or
JSON lines ``{"path": ..., "labels": [...]}``) with a class list. Listing reads no image bytes.
"""

from __future__ import annotations

import csv
import difflib
import functools
import json
import os
import posixpath
import re
import tarfile
import unicodedata
from collections import Counter
from dataclasses import dataclass, field

import fsspec
from fsspec.core import url_to_fs
from fsspec.spec import AbstractFileSystem
from PIL import Image

from pretrain.cli import plural
from pretrain.errors import UserError

from .manifest import MANIFEST
from .manifest import load as load_manifest
from .storage import Location


@dataclass(frozen=True)
class Item:
    key: str  # unique; "class/stem" or the list's relative path, without extension and dots
    url: str  # the file (a local path or an fsspec URL), or the outer tar of an ImageNet-21k member
    labels: tuple[int, ...]
    size: int  # bytes in the source, -1 if unknown (a missing file)
    offset: int = -1  # byte offset of a member inside its outer tar; -1 for a whole file
    member: str = ""  # the member's name inside its outer tar

    @property
    def where(self) -> str:
        """For reports: the file, or tar:member."""
        return f"{self.url}:{self.member}" if self.member else self.url


@dataclass
class Corpus:
    kind: str
    classes: list[str]
    multi_label: bool
    items: list[Item]
    refused: list[dict] = field(default_factory=list)  # {"source", "reason"} found while listing; "tar": true
    # marks a whole tar that could not be read to its end (its images are not counted, being unknown)
    ignored: Counter = field(default_factory=Counter)  # files of a tree that are no samples, by ending
    hidden: Counter = field(default_factory=Counter)  # hidden files and folders left out ('.DS_Store'), by name
    ignored_members: Counter = field(default_factory=Counter)  # members of synset tars that are no images, by ending


@functools.cache
def image_endings() -> frozenset[str]:
    """File name endings ('.jpg', lower case) of the formats PIL opens; other files of a tree are not images."""
    Image.init()
    return frozenset(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN)


def detect_kind(source: str) -> str:
    fs, path = url_to_fs(source)
    if fs.isfile(path):
        if archive(fs, path):
            raise UserError(f"SOURCE {source} is an archive; unpack it first (tar xf {source} -C DIR: the ImageNet-21k "
                            f"release is a tar of per-synset tars) and give the folder that holds the synset tars")
        return "list"
    if not fs.isdir(path):
        raise UserError(f"SOURCE {source} does not exist; give an ImageFolder tree, a folder of per-class tars or an image list")
    entries = [e for e in fs.ls(path, detail=True) if not hidden(posixpath.basename(e["name"].rstrip("/")))]
    tars = [e["name"] for e in entries if e["type"] == "file" and is_tar(e["name"])]
    folders = [e["name"].rstrip("/") for e in entries if e["type"] == "directory"]
    if tars and folders:
        raise UserError(f"SOURCE {source} holds both .tar files ({posixpath.basename(tars[0])}) and folders "
                        f"({posixpath.basename(folders[0])}); pass --kind imagefolder (class folders of images) or "
                        f"--kind i21k (one tar per synset): the other kind is left out")
    return "i21k" if tars else "imagefolder"


def check_not_shard_set(source: str) -> None:
    fs, path = url_to_fs(source)
    if fs.isfile(f"{path.rstrip('/')}/{MANIFEST}"):
        raise UserError(f"SOURCE {source} is a shard set already (it holds {MANIFEST}); train on it as it is "
                        f"(data.train={source}), or shard the images it was made from")


def is_tar(name: str) -> bool:
    return name.lower().endswith(".tar")


def archive(fs: AbstractFileSystem, path: str) -> bool:
    """A tar, compressed or not (winter21_whole.tar.gz), whatever its name: 'ustar' at byte 257 of its first header,
    or gzip's, bzip2's, xz's or zstd's magic number."""
    if path.lower().endswith((".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar.zst")):
        return True
    with fs.open(path, "rb") as f:
        head = f.read(263)
    return head[257:262] == b"ustar" or head.startswith((b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00", b"\x28\xb5\x2f\xfd"))


def hidden(name: str) -> bool:
    """A file or folder that ls -a alone shows: .DS_Store, ._photo.jpg (macOS), .ipynb_checkpoints (Jupyter)."""
    return name.startswith(".")


def nfc(name: str) -> str:
    """One spelling of a name: macOS writes 'ñ' in file names as 'n' and a combining tilde (NFD), Linux as one
    character (NFC); a tree copied between them names the same class both ways."""
    return unicodedata.normalize("NFC", name)


def printable(name: str) -> str:
    """A file name for messages and JSON; one that is not UTF-8 (a Latin-1 archive's) shows its bytes: caf\\xe9."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def not_utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
        return False
    except UnicodeEncodeError:  # Python keeps undecodable bytes of file names as lone surrogates
        return True


NOT_UTF8 = "its name is not UTF-8 (an archive's Latin-1?); rename it, e.g. with convmv -f latin1 -t utf8"


def check_names(found: list[str], source: str, what: str) -> None:
    bad = next((n for n in found if not_utf8(n)), None)
    if bad is not None:
        raise UserError(f"{what} '{printable(bad)}' of {source}: {NOT_UTF8} --notest -r {source}, as its name is "
                        f"its class's")


def sample_key(relative_path: str) -> str:
    """'n01440764/n01440764_10026.JPEG' -> 'n01440764/n01440764_10026' (webdataset splits keys at dots)."""
    stem = posixpath.splitext(relative_path.lstrip("/"))[0]
    return re.sub(r"[.\s]", "_", stem)


def read_classes(spec: str) -> list[str]:
    """``--classes``: a shard set (folder or manifest.json: its classes) or a text file, one name per line."""
    fs, path = url_to_fs(spec)
    if fs.isdir(path) or spec.rstrip("/").endswith(".json"):
        try:
            classes = load_manifest(spec)[1].classes
        except UserError as e:
            raise UserError(f"--classes {spec}: {e}") from None
        if not classes:
            raise UserError(f"--classes {spec}: its manifest names no classes")
        return classes
    if not fs.isfile(path):
        raise UserError(f"--classes {spec} does not exist; give a file with one class name per line or a shard set")
    classes, lines = [], {}
    for lineno, line in enumerate(read_lines(fs, path, f"--classes {spec}"), 1):
        name = line.strip()
        if name in lines:
            raise UserError(f"--classes {spec} names '{name}' twice (lines {lines[name]} and {lineno}); a label is "
                            f"the index of its class, so list each class once")
        if name:
            classes.append(name)
            lines[name] = lineno
    if not classes:
        raise UserError(f"--classes {spec} names no class; give a file with one class name per line or a shard set")
    return classes


def read_lines(fs: AbstractFileSystem, path: str, shown: str) -> list[str]:
    """A text file's lines, without the byte-order mark that Excel and Notepad write at the start of UTF-8."""
    try:
        with fs.open(path, "rt", encoding="utf-8-sig") as f:
            return f.read().splitlines()
    except UnicodeDecodeError as e:
        raise UserError(f"{shown} is not UTF-8 text (byte {e.object[e.start]:#04x} at {e.start}); save it as UTF-8, "
                        f"e.g. with iconv -f latin1 -t utf-8 (or -f utf-16)") from None


def fixed_labels(found: list[str], classes: list[str] | None, classes_spec: str | None, what: str) -> list[str]:
    """The classes to label by: ``found`` (sorted folder or tar names) or the ``--classes`` list, which must hold
    every one found; labels then follow its order, as in the split it came from."""
    if classes is None:
        return found
    known = {nfc(c) for c in classes}
    unknown = [name for name in found if nfc(name) not in known]
    if unknown:
        raise UserError(f"{what} '{unknown[0]}' is not among the {len(classes)} classes of --classes {classes_spec}"
                        f"{f' ({len(unknown)} such)' if len(unknown) > 1 else ''}; fix the name or the class list")
    return classes


def list_imagefolder(source: str, classes_spec: str | None = None) -> Corpus:
    where = Location(source)
    ignored, hidden_names, found = Counter(), Counter(), []
    for name in where.names():
        if hidden(name):
            hidden_names[name] += 1
        elif where.fs.isdir(where.path(name)):
            found.append(name)
        else:  # the tree's own README or labels file
            ignored[posixpath.splitext(name)[1].lower() or "no ending"] += 1
    if not found:
        raise UserError(f"{source} has no class folders; an ImageFolder tree is class_name/image.jpg")
    check_names(found, source, "class folder")
    classes = fixed_labels(found, read_classes(classes_spec) if classes_spec else None, classes_spec, "class folder")
    folder_of = {}
    for f in found:
        if nfc(f) in folder_of:
            raise UserError(f"{source} has class folders '{folder_of[nfc(f)]}' and '{f}', one name spelled two ways "
                            f"(Unicode NFC and NFD: a tree copied from a Mac and from Linux); merge them into one")
        folder_of[nfc(f)] = f
    items, refused, images = [], [], image_endings()
    for label, name in enumerate(classes):
        folder = folder_of.get(nfc(name))
        if folder is None:
            continue
        top = where.path(folder)
        found_files = local_files(top) if where.is_local else where.fs.find(top, detail=True)
        for path, info in sorted(found_files.items()):
            inner = [part for part in path[len(top) + 1 :].split("/") if hidden(part)]
            if inner:
                hidden_names[inner[0]] += 1
                continue
            ending = posixpath.splitext(path)[1].lower()
            if ending not in images:  # as torchvision's ImageFolder: a README or labels.csv is no sample
                ignored[ending or "no ending"] += 1
                continue
            rel = path[len(where.root) + 1 :] if path.startswith(where.root) else path
            if not_utf8(rel):
                refused.append({"source": printable(path), "reason": NOT_UTF8})
                continue
            items.append(Item(sample_key(rel), where.url_for_path(path), (label,), info["size"]))
    check_twins(items)
    return Corpus("imagefolder", classes, False, items, refused, ignored, hidden_names)


def check_twins(items: list[Item]) -> None:
    """Files of a tree that make one sample key (a.jpg and a.png; c.01.jpg and c_01.jpg), all in one sentence."""
    ordered = sorted(items, key=lambda it: it.key)
    twins = [(a, b) for a, b in zip(ordered, ordered[1:]) if a.key == b.key]
    if twins:
        shown = "; ".join(f"{a.where} and {b.where} -> '{a.key}'" for a, b in twins[:3])
        more = f" and {len(twins) - 3} more" if len(twins) > 3 else ""
        raise UserError(f"{plural(len(twins), 'pair')} of files make the same sample key ({shown}{more}): a key drops "
                        f"the extension and turns dots and spaces into _; rename or remove one of each")


def local_files(folder: str) -> dict[str, dict]:
    """{path: {"size": bytes, -1 for a broken link}} of the files under a local folder, through linked folders as
    torchvision's ImageFolder goes (fsspec's find does not), each real folder once; hidden folders are not entered,
    and each stands for its files."""
    files, seen = {}, set()
    for top, dirs, names in os.walk(folder, followlinks=True):
        real = os.path.realpath(top)
        if real in seen:  # a link back up the tree
            dirs.clear()
            continue
        seen.add(real)
        for d in [d for d in dirs if hidden(d)]:
            dirs.remove(d)
            files[posixpath.join(top, d)] = {"size": -1}
        for n in names:
            path = posixpath.join(top, n)
            files[path] = {"size": os.stat(path).st_size if os.path.exists(path) else -1}
    return files


def list_tar(tar_url: str, label: int) -> tuple[list[Item], list[dict], Counter]:
    """Members of one per-synset tar: headers only, data offsets kept for reading in place; and the endings of the
    members not named as images, left out as ImageFolder leaves out such files."""
    fs, path = url_to_fs(tar_url)
    synset = posixpath.basename(path)[: -len(".tar")]
    items, refused, ignored, images = [], [], Counter(), image_endings()
    with fs.open(path, "rb") as f:
        try:
            tar = tarfile.open(fileobj=f, mode="r:")
        except (tarfile.TarError, EOFError) as e:
            f.seek(0)
            why = ("compressed (gzip: a .tar.gz under a .tar name); decompress it, as the synset tars are read in place"
                   if f.read(2) == b"\x1f\x8b" else f"unreadable tar ({e})")
            return [], [{"source": tar_url, "reason": why, "tar": True}], ignored
        try:
            while tar.next() is not None:
                pass
        except (tarfile.TarError, EOFError, OSError) as e:  # truncated or damaged: keep the members before it
            n = len(tar.members)
            kept = f"the {n} members before the damage are read" if n else "no member is readable"
            refused.append({"source": tar_url, "tar": True,
                            "reason": f"the rest of the tar is unreadable ({e}); {kept}"})
    for m in tar.members:
        where = f"{tar_url}:{printable(m.name)}"
        if m.name.startswith("/") or ".." in m.name.split("/"):
            refused.append({"source": where, "reason": "refused: absolute path or '..' in a tar member name"})
        elif not_utf8(m.name):
            refused.append({"source": where, "reason": "its name is not UTF-8 (an archive's Latin-1?); tar it again "
                            "under a UTF-8 name"})
        elif not m.isfile():
            if not m.isdir():
                refused.append({"source": where, "reason": "not a regular file (link or device)"})
        elif (ending := posixpath.splitext(m.name)[1].lower()) not in images:
            ignored[ending or "no ending"] += 1
        else:
            key = sample_key(f"{synset}/{posixpath.basename(m.name)}")
            items.append(Item(key, tar_url, (label,), m.size, m.offset_data, m.name))
    return items, refused, ignored


def list_i21k_tars(source: str) -> tuple[list[str], Counter, Counter]:
    """URLs of the per-synset tars, sorted (their stems are the classes), and the other entries, left out: by
    ending, and hidden ones by name."""
    where = Location(source)
    tars, ignored, hidden_names = [], Counter(), Counter()
    for name in where.names():
        if hidden(name):
            hidden_names[name] += 1
        elif is_tar(name):
            tars.append(where.url_of(name))
        else:
            ignored["folder" if where.fs.isdir(where.path(name)) else posixpath.splitext(name)[1].lower() or
                    "no ending"] += 1
    if not tars:
        raise UserError(f"{source} holds no .tar files; the ImageNet-21k layout is one n0xxxxxxx.tar per synset")
    check_names([posixpath.basename(t) for t in tars], source, "synset tar")
    first: dict[str, str] = {}
    for t in tars:
        name = posixpath.basename(t)
        if (twin := first.setdefault(nfc(name[: -len(".tar")]), name)) != name:
            raise UserError(f"{source} has synset tars '{twin}' and '{name}', one class spelled two ways (the "
                            f"ending's case, or Unicode NFC and NFD); merge them into one tar")
    return tars, ignored, hidden_names


def list_images_file(source: str, classes_file: str | None) -> Corpus:
    """A JFT-style list: every line names an image (path relative to the list, or a URL) and its labels."""
    if not classes_file:
        raise UserError(f"{source} is an image list; pass --classes FILE with one class name per line")
    fs, list_path = url_to_fs(source)
    if not fs.isfile(list_path):
        what = "a folder, not an image list" if fs.isdir(list_path) else "not there"
        raise UserError(f"SOURCE {source} is {what}; --kind list reads a CSV or JSON-lines file naming the images")
    lines = read_lines(fs, list_path, f"SOURCE {source}")
    if next((line.lstrip() for line in lines if line.strip()), "").startswith("["):
        raise UserError(f"SOURCE {source} holds a JSON array; the list takes JSON lines, one object per line: "
                        f"jq -c '.[]' {source} > {posixpath.splitext(source)[0]}.jsonl")
    classes = read_classes(classes_file)
    index = {nfc(c): i for i, c in enumerate(classes)}
    spaced = next((c for c in classes if len(c.split()) > 1), None)
    folder = Location(source).parent()
    items, seen, files, protocols = [], {}, {}, set()
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if line.lstrip().startswith("#"):
            raise UserError(f"{source} line {lineno}: '{line.strip()}' looks like a comment; the list holds one image "
                            f"per line and nothing else: remove it (an image whose path starts with # is ./#...)")
        if spaced and not line.lstrip().startswith("{"):
            raise UserError(f"--classes {classes_file} names the class '{spaced}', with spaces, which a CSV line of "
                            f"{source} cannot name (line {lineno}: it separates labels by spaces); if that file gives "
                            f"each class a description after its name (ImageNet's LOC_synset_mapping.txt), keep only "
                            f"the first word of each line, else write the list as JSON lines, "
                            f'{{"path": "...", "labels": ["{spaced}"]}}')
        path, labels = _parse_line(line, source, lineno)
        if not labels:
            hint = ("; separate the path from its labels with a comma: 'path, label label'"
                    if "," not in line and len(line.split()) > 1 and not line.lstrip().startswith("{") else "")
            raise UserError(f"{source} line {lineno}: no labels for '{path}'; every image needs at least one "
                            f"label{hint}")
        # A class named twice is one label, not a double count in the manifest.
        ids = tuple(dict.fromkeys(_label_id(lab, index, classes, source, lineno, classes_file) for lab in labels))
        if "://" in path:
            if (protocol := path.split("://", 1)[0]) not in protocols:
                check_protocol(path, source, lineno)
                protocols.add(protocol)
            key, resolved = sample_key(path.split("://", 1)[1].split("/", 1)[-1]), path
        else:
            path = posixpath.normpath(path)  # ./a.jpg is a.jpg
            key, resolved = sample_key(path), path if path.startswith("/") else folder.url_of(path)
        local = resolved.removeprefix("file://")
        file = resolved if "://" in local else os.path.abspath(local)
        if key in seen or file in files:
            first, before, earlier = seen[key] if key in seen else files[file]
            if before == path or file in files:
                named = f"'{path}'" if before == path else f"('{before}' and '{path}')"
                if earlier == ids:
                    raise UserError(f"{source} lines {first} and {lineno} name the same image {named}; remove one")
                both = " ".join(classes[i] for i in dict.fromkeys(earlier + ids))
                raise UserError(f"{source} lines {first} and {lineno} name the same image {named} with other labels; "
                                f"give each image one line with all its labels: '{before}, {both}'")
            raise UserError(f"{source} lines {first} and {lineno}: '{before}' and '{path}' make the same sample key "
                            f"'{key}' (a key drops the extension and turns dots and spaces into _); rename one")
        seen[key] = files[file] = lineno, path, ids
        items.append(Item(key, resolved, ids, -1))
    # One label on every line is a single-label set (key.cls), as a tree makes: an ImageNet split as a list
    return Corpus("list", classes, any(len(item.labels) > 1 for item in items), _with_sizes(items))


def check_protocol(url: str, source: str, lineno: int) -> None:
    protocol = url.split("://", 1)[0]
    try:
        fsspec.get_filesystem_class(protocol)
    except (ImportError, ValueError) as e:  # "Install s3fs to access S3", "Protocol not known: foo"
        raise UserError(f"{source} line {lineno}: '{url}' cannot be read here ({e}); install the package for "
                        f"{protocol}:// or fix the URL") from None


def _parse_line(line: str, source: str, lineno: int) -> tuple[str, list]:
    if line.lstrip().startswith("{"):
        try:
            record = json.loads(line)
            if "labels" not in record and "label" in record:
                raise UserError(f"{source} line {lineno}: the key is 'labels' (a list), not 'label'; write "
                                f'"labels": [{json.dumps(record["label"])}]')
            labels = record.get("labels") or []
            if not isinstance(labels, list):
                raise UserError(f"{source} line {lineno}: 'labels' is {json.dumps(labels)}, not a list; write "
                                f"[{json.dumps(labels)}]")
            return str(record["path"]), labels
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(f"{source} line {lineno}: not a JSON object with 'path' and 'labels' ({e})") from None
    row = next(csv.reader([line], skipinitialspace=True))  # "a.jpg", "cat": the label is cat
    path = row[0].strip()
    labels = " ".join(row[1:]).split()
    return path, labels


def _label_id(label, index: dict[str, int], classes: list[str], source: str, lineno: int, classes_file: str) -> int:
    if isinstance(label, int) and not isinstance(label, bool):
        if not 0 <= label < len(classes):
            raise UserError(f"{source} line {lineno}: class id {label} is outside the {len(classes)} classes of "
                            f"{classes_file}")
        if index.get(str(label), label) != label:
            raise UserError(f"{source} line {lineno}: label {label}, a number, is a class id in JSON lines, here the "
                            f"class '{classes[label]}', but {classes_file} has a class named '{label}' too (id "
                            f"{index[str(label)]}); write the name as a string, \"{label}\", or the classes by name")
        return label
    if nfc(str(label)) in index:
        return index[nfc(str(label))]
    near = difflib.get_close_matches(str(label), classes, n=1)
    header = lineno == 1 and not str(source).endswith(".jsonl")
    if near:
        hint = f" (did you mean '{near[0]}'?)"
    elif isinstance(label, str) and label.isdigit():
        hint = (f" (a class id? a CSV list names its classes; JSON lines take ids: "
                f'{{"path": "...", "labels": [{label}]}})')
    else:
        hint = " (a header line? the list has none: remove it)" if header else ""
    shown = label if isinstance(label, str) else json.dumps(label)  # as written in the file: true, not True
    raise UserError(f"{source} line {lineno}: label '{shown}' is not in {classes_file}{hint}")


def _with_sizes(items: list[Item]) -> list[Item]:
    """Sizes for planning shards by bytes, asked of each filesystem in one batch; -1 for a missing file."""
    groups: dict[int, tuple[AbstractFileSystem, list[int], list[str]]] = {}
    for i, item in enumerate(items):
        fs, path = url_to_fs(item.url)
        _, indices, paths = groups.setdefault(id(fs), (fs, [], []))
        indices.append(i)
        paths.append(path)
    sizes = [-1] * len(items)
    for fs, idx, paths in groups.values():
        try:
            found = fs.sizes(paths)
        except (FileNotFoundError, OSError):
            found = [_size_or_missing(fs, p) for p in paths]
        for i, size in zip(idx, found):
            sizes[i] = -1 if size is None else size
    return [Item(it.key, it.url, it.labels, size) for it, size in zip(items, sizes)]


def _size_or_missing(fs: AbstractFileSystem, path: str) -> int:
    try:
        return fs.size(path)
    except (FileNotFoundError, OSError):
        return -1
