"""Local folders and fsspec URLs (gs://, s3://, memory://) behind one small interface."""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import posixpath
import sys
import threading
from collections.abc import Iterator
from typing import BinaryIO

import fsspec
from fsspec.core import url_to_fs
from fsspec.spec import AbstractFileSystem

from pretrain.errors import UserError

# gcsfs logs each request that ran out of retries with its traceback, then raises; the error it raises is what the
# commands report, in one sentence.
logging.getLogger("gcsfs").setLevel(logging.CRITICAL)


class Location:
    """A folder on some filesystem: ``Location("gs://bucket/shards")`` or ``Location("/data/shards")``."""

    def __init__(self, url: str):
        self.url = url.rstrip("/") or "/"
        self.fs: AbstractFileSystem
        try:
            self.fs, self.root = url_to_fs(self.url)
        except ImportError as e:  # fsspec names the package to install, e.g. "Install s3fs to access S3"
            raise UserError(f"{url}: {e} (for gs://, pip install 'vit-pretrain[gcs]')") from None
        except ValueError as e:
            raise UserError(f"{url}: not a path or URL fsspec knows ({e})") from None
        self.root = self.root.rstrip("/") or "/"
        if self.is_local and ".." in self.root.split("/"):  # as the OS reads it: a link's parent, not the lexical one
            self.root = os.path.realpath(self.root)

    @property
    def canonical(self) -> str:
        """The URL, or the real path of a local folder, so that 'src/', './src', 'out/../src' and '/data/src'
        compare equal."""
        return os.path.realpath(self.root) if self.is_local else self.url_for_path(self.root)

    @property
    def is_local(self) -> bool:
        return "file" in as_tuple(self.fs.protocol)

    def path(self, name: str) -> str:
        """Path of ``name`` inside this folder, for ``self.fs``."""
        return f"{self.root}/{name}"

    def url_of(self, name: str) -> str:
        """URL of ``name`` for any reader: a plain path if local, else protocol://path."""
        return self.url_for_path(self.path(name))

    def url_for_path(self, path: str) -> str:
        """URL of a path that self.fs returned (from ls or find)."""
        return path if self.is_local else self.fs.unstrip_protocol(path)

    def parent(self) -> Location:
        return Location(self.url_for_path(self.root.rsplit("/", 1)[0] or "/"))

    def exists(self, name: str) -> bool:
        return self.fs.exists(self.path(name))

    def names(self) -> list[str]:
        """Entries of the folder (file and folder names), empty if it does not exist."""
        if not self.fs.isdir(self.root):
            return []
        return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self.root, detail=False))

    def read_bytes(self, name: str) -> bytes:
        return self.fs.cat_file(self.path(name))

    def write_bytes(self, name: str, data: bytes) -> None:
        """Write a small file whole: a temporary name then a rename on local disks, one upload on stores."""
        with self.open_atomic(name) as f:
            f.write(data)

    @contextlib.contextmanager
    def open_atomic(self, name: str) -> Iterator[BinaryIO]:
        """A file that appears under ``name`` whole or not at all.

        Local disks: written to a hidden temporary name, then renamed. Object stores: one upload that
        is committed on success and discarded on error (an object is never half-written). There is
        no fsync: what a power cut could tear, the sha256 checks of resume and verify find.
        """
        folder, base = posixpath.split(self.path(name))
        self.fs.makedirs(folder, exist_ok=True)
        if self.is_local:
            tmp = f"{folder}/.{base}.tmp"
            try:
                with open(tmp, "wb") as f:
                    yield f
                os.replace(tmp, self.path(name))
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)
            return
        f = self.fs.open(self.path(name), "wb")
        try:
            yield f
        except BaseException:
            if hasattr(f, "discard"):
                f.discard()
            else:
                f.close()
                self.remove(name)
            raise
        f.close()

    def remove(self, name: str) -> None:
        if self.exists(name):
            self.fs.rm(self.path(name), recursive=True)


SLOW_S = 10.0  # a store's first answer later than this gets a line: its client's retries may take a while yet


@contextlib.contextmanager
def first_contact(where: Location) -> Iterator[None]:
    """Say so on stderr when storage is slow to answer the first request: an address that does not answer is
    asked again by the storage client (gcsfs: about 30 s) before the command can say what is wrong."""
    if where.is_local:
        yield
        return
    timer = threading.Timer(SLOW_S, lambda: print(
        f"still waiting for {where.url} after {SLOW_S:.0f} s; an address that does not answer is asked again by the "
        f"storage client (gcsfs: for about 30 s) before this command can say what is wrong", file=sys.stderr,
        flush=True))
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def as_tuple(protocol: str | tuple[str, ...]) -> tuple[str, ...]:
    return (protocol,) if isinstance(protocol, str) else tuple(protocol)


def _gopen_fsspec(url: str, mode: str = "rb", bufsize: int = 8192, **_):
    return fsspec.open(url, mode).open()


def register_webdataset_schemes() -> None:
    """Make webdataset open gs:// and s3:// through fsspec (its default shells out to gsutil / aws)."""
    gopen = importlib.import_module("webdataset.gopen")  # the module; webdataset.gopen is its function
    for scheme in ("gs", "gcs", "s3", "memory", "az", "abfs"):
        gopen.gopen_schemes[scheme] = _gopen_fsspec
