"""trainer/storage.py against a real GCS emulator (fake-gcs-server) and the local disk: one path type for both."""

from __future__ import annotations

import pytest

from trainer import storage


def test_glob_read_and_write_on_a_bucket(bucket: str) -> None:
    for name in ("a-0.tfrecord", "a-1.tfrecord", "b.txt", "sub/a-2.tfrecord"):
        storage.at(f"{bucket}/{name}").write_text(name)
    assert storage.glob(f"{bucket}/a-*.tfrecord") == [f"{bucket}/a-0.tfrecord", f"{bucket}/a-1.tfrecord"]
    assert storage.glob(f"{bucket}/*/a-*.tfrecord") == [f"{bucket}/sub/a-2.tfrecord"]
    assert storage.glob(f"{bucket}/b.txt") == [f"{bucket}/b.txt"]  # no wildcard: the file itself
    assert storage.glob(f"{bucket}/nothing-*") == []
    assert storage.read_text(f"{bucket}/b.txt", "x") == "b.txt"
    with pytest.raises(storage.StorageError, match=r'^evals\[0\]\.classnames = "gs://.*/missing.txt" cannot be read'):
        storage.read_text(f"{bucket}/missing.txt", "evals[0].classnames")


def test_glob_is_the_same_locally(tmp_path) -> None:
    for name in ("a-0.tfrecord", "a-1.tfrecord", "b.txt"):
        (tmp_path / name).write_text(name)
    assert storage.glob(f"{tmp_path}/a-*.tfrecord") == [f"{tmp_path}/a-0.tfrecord", f"{tmp_path}/a-1.tfrecord"]
    assert storage.at("~/x") == storage.at(f"{storage.at('~')}/x")  # ~ expanded, absolute


def test_check_writable_names_a_missing_bucket(gcs) -> None:
    storage.check_writable(storage.at("gs://bucket/writable"), "--workdir")  # the emulator's bucket: fine
    with pytest.raises(storage.StorageError, match=r"^--workdir = gs://no-such-bucket/run cannot be written"):
        storage.check_writable(storage.at("gs://no-such-bucket/run"), "--workdir")


def test_a_growing_file_on_a_bucket_uploads_only_what_it_adds(bucket: str) -> None:
    path = storage.at(f"{bucket}/metrics.jsonl")
    log = storage.GrowingFile(path, append=True, upload_every=3600)
    log.write(b"one\n")
    log.flush(force=True)
    assert path.read_bytes() == b"one\n"
    log.write(b"two\n")
    log.flush()  # not due yet: the object lags
    assert path.read_bytes() == b"one\n"
    log.close()  # close always uploads
    assert path.read_bytes() == b"one\ntwo\n"
    again = storage.GrowingFile(path, append=True)  # a resumed run appends to what the bucket holds
    again.write(b"three\n")
    again.close()
    assert path.read_bytes() == b"one\ntwo\nthree\n" and again.bytes_uploaded == len(b"three\n")
    fresh = storage.GrowingFile(path, append=False)
    fresh.write(b"new\n")
    fresh.close()
    assert path.read_bytes() == b"new\n"

    # a long run: each upload sends what was added since the last, however long the file has grown (the object is
    # composed from the pieces by the bucket), and the file is whole after each
    long = storage.GrowingFile(storage.at(f"{bucket}/long.jsonl"), append=True, upload_every=0)
    line = b"x" * 1000 + b"\n"
    sent = []
    for i in range(40):
        before = long.bytes_uploaded
        long.write(line)
        long.flush(force=True)
        sent.append(long.bytes_uploaded - before)
        if i in (0, 39):
            assert storage.at(f"{bucket}/long.jsonl").read_bytes() == line * (i + 1)
    assert sent == [len(line)] * 40  # the 40th upload: 1 kB, not 40
    long.close()
    assert storage.glob(f"{bucket}/.parts/*") == []  # the pieces are gone once composed


def test_the_compilation_cache_defaults_to_a_folder_next_to_the_workdir() -> None:
    from trainer.compile_cache import location

    assert location(None, "", "gs://bucket/runs/b16") == "gs://bucket/runs/compile_cache"  # shared by its runs
    assert location(None, "", "gs://bucket") == "gs://bucket/compile_cache"  # a bucket's root: inside it
    assert location(None, "", "/data/runs/b16/") == "/data/runs/compile_cache"
    assert location(None, "gs://bucket/xla", "gs://bucket/runs/b16") == "gs://bucket/xla"  # the recipe's key
    assert location(None, "off", "gs://bucket/runs/b16") is None
    assert location("/tmp/xla", "gs://bucket/xla", "gs://bucket/runs/b16") == "/tmp/xla"  # the flag (or its env)
    assert location("", "gs://bucket/xla", "gs://bucket/runs/b16") is None  # '' = off
