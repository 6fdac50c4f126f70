"""Every path a user gives the trainer, local or `gs://`, as one type: etils `epath.Path` (what orbax uses too).

Which client moves the bytes (the README's "Runs in a bucket" says why):
- small files and orbax's own metadata: epath over fsspec (gcsfs) for `gs://`, not over TensorFlow's GCS file system
  (`EPATH_USE_TF=false`, set here before any epath call). gcsfs takes the standard endpoint override
  (`STORAGE_EMULATOR_HOST`), so the same code runs against a local GCS emulator in the tests;
- checkpoint arrays: orbax -> tensorstore's own GCS driver;
- the bulk reads (training and eval shards, retrieval images): tf.data's native GCS reader, inside the input graph.

A bucket object cannot be appended to, so a file that grows (metrics.jsonl, a TensorBoard event file) is a
`GrowingFile`: appended to on a local disk; on a bucket, what was added goes up as an object of its own, composed
onto the file's end by Cloud Storage, at most every `upload_every` seconds and at close, from a background thread:
an upload costs what it adds, however long the run (TensorFlow's own GCS files rewrite the whole object on flush).
"""

from __future__ import annotations

import glob as local_glob
import os
import re
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import IO

os.environ.setdefault("EPATH_USE_TF", "false")  # read by epath at each call; a user may still choose TF's client

from etils import epath

from trainer.recipe import RecipeError  # standard library only: this module stays light

WILDCARD = re.compile(r"[*?\[]")


class StorageError(OSError):
    """A path that cannot be read or written, as one line naming it."""


def is_remote(location: str | os.PathLike[str]) -> bool:
    return "://" in os.fspath(location)


def at(location: str | os.PathLike[str]) -> epath.Path:
    """A local path (with ~ expanded, made absolute: orbax needs that) or a bucket one, as given."""
    text = os.fspath(location)
    return epath.Path(text if is_remote(text) else os.path.abspath(os.path.expanduser(text)))


def glob(pattern: str) -> list[str]:
    """The files one glob matches (local or gs://), sorted; a pattern without wildcards matches itself if it is a
    file."""
    if not is_remote(pattern):
        return sorted(p for p in local_glob.glob(os.path.expanduser(pattern)) if os.path.isfile(p))
    scheme, rest = pattern.split("://", 1)
    parts = rest.split("/")
    first = next((i for i, part in enumerate(parts) if WILDCARD.search(part)), None)
    if first is None:
        return [pattern] if epath.Path(pattern).is_file() else []
    base = epath.Path(f"{scheme}://" + "/".join(parts[:first]))
    return sorted(str(p) for p in base.glob("/".join(parts[first:])))


def list_files(patterns: str, key: str) -> list[str]:
    """Comma-separated paths or globs (local or gs://), sorted; one that matches nothing, or that cannot be listed,
    is a RecipeError naming `key`."""
    files: list[str] = []
    for pattern in [p.strip() for p in patterns.split(",") if p.strip()]:
        try:
            matched = glob(pattern)
        except Exception as error:  # an unreadable bucket: gcsfs's own errors as well as OSError
            raise RecipeError(f'{key} = "{pattern}" cannot be read: {describe(error)}') from None
        if not matched:
            raise RecipeError(f'{key} = "{pattern}" matches no files')
        files += matched
    return sorted(set(files))


def describe(error: BaseException) -> str:
    """An I/O error as a short phrase (gcsfs and the OS phrase theirs differently)."""
    if isinstance(error, FileNotFoundError):
        return "does not exist"
    if isinstance(error, PermissionError):
        return "permission denied"
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return text[:200]


def check_writable(directory: epath.Path, what: str) -> None:
    """Creates `directory` and writes then removes a small file there; a StorageError naming `what` otherwise."""
    probe = directory / f".write-check-{os.getpid()}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe.write_text("ok")
        probe.unlink()
    except Exception as error:  # gcsfs raises OSError subclasses, but also its HttpError and aiohttp's errors
        raise StorageError(f"{what} = {directory} cannot be written: {describe(error)}") from None


def read_text(location: str, what: str) -> str:
    """A whole text file (local or gs://), or a StorageError naming `what` and the path."""
    try:
        return at(location).read_text()
    except Exception as error:
        raise StorageError(f'{what} = "{location}" cannot be read: {describe(error)}') from None


class GrowingFile:
    """A binary file that only grows. Local: appended to and flushed. Bucket: what was written since the last upload
    goes up as an object of its own and Cloud Storage composes it onto the end of the file's object (server-side, so
    an upload costs what it adds, not the file's size), at most every `upload_every` seconds and at every forced
    flush; on a background thread, so that the training loop never waits on the bucket except where it asks to
    (a forced flush, close). A failed upload is raised by the next flush or close."""

    def __init__(self, path: epath.Path, append: bool, upload_every: float = 30.0):
        self.path, self.upload_every = path, upload_every
        self.local: IO[bytes] | None = None
        self.pending = bytearray()
        self.uploaded = 0.0  # when the last upload was started
        self.closed = False
        self.bytes_uploaded = 0  # what the uploads sent (each its own bytes only)
        self.uploads: Future[None] | None = None  # the latest; each waits for the one before
        if not is_remote(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            self.local = open(os.fspath(path), "ab" if append else "wb")  # noqa: SIM115 (closed by close())
            return
        self.exists = append and path.exists()  # compose onto it; else the first upload makes (or replaces) it
        self.uploader = ThreadPoolExecutor(1, thread_name_prefix="growing-file")  # one at a time, in order

    def write(self, data: bytes) -> None:
        if self.local is not None:
            self.local.write(data)
        else:
            self.pending += data

    def flush(self, force: bool = False) -> None:
        if self.local is not None:
            self.local.flush()
            return
        if self.uploads is not None and self.uploads.done():
            self.uploads.result()  # an earlier upload's error, here
        if self.pending and (force or time.monotonic() - self.uploaded >= self.upload_every):
            chunk, self.pending = bytes(self.pending), bytearray()
            self.uploads = self.uploader.submit(self._upload, chunk)
            self.uploaded = time.monotonic()
        if force and self.uploads is not None:
            self.uploads.result()

    def _upload(self, chunk: bytes) -> None:
        if not self.exists:
            self.path.write_bytes(chunk)
            self.exists = True
        else:
            import fsspec

            # (named so that no reader takes it for the file: TensorBoard reads any name with "tfevents" in it)
            part = self.path.parent / ".parts" / f"{os.getpid()}-{time.monotonic_ns()}"
            part.write_bytes(chunk)
            fs, target = fsspec.core.url_to_fs(os.fspath(self.path))
            fs.merge(target, [target, fsspec.core.url_to_fs(os.fspath(part))[1]])
            part.unlink()
        self.bytes_uploaded += len(chunk)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.local is not None:
            self.local.close()
        else:
            try:
                self.flush(force=True)
            finally:
                self.uploader.shutdown(wait=True)
