"""webdataset `.tar` shards as img2dataset writes them: members `KEY.jpg|jpeg|png|webp`, `KEY.txt` (the alt-text),
`KEY.json` (metadata; may hold a re-caption and a label), grouped by KEY in file order; CLIP_benchmark's eval shards
carry `KEY.cls` (the class index) instead of a caption.

tf.data has no tar reader, so a Python generator walks each tar (only bytes are moved there; decoding stays in the
tf.data graph) and hands on the samples' (image, alt-text, re-caption) bytes in chunks: one generator call per chunk,
not per sample, keeps the Python side's share small.
"""

from __future__ import annotations

import itertools
import json
import tarfile
from collections.abc import Iterator

from trainer.data import examples

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


def samples(path: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) per sample; a truncated or corrupt tar ends the file's samples."""
    from trainer import storage

    key: str | None = None
    parts: dict[str, bytes] = {}
    try:
        with storage.at(path).open("rb") as fh, tarfile.open(fileobj=fh, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                name = member.name.rsplit("/", 1)[-1]
                this_key, _, extension = name.partition(".")
                if this_key != key and parts:
                    yield key or "", parts
                    parts = {}
                key = this_key
                reader = tar.extractfile(member)
                parts[extension.lower()] = reader.read() if reader else b""
    except (tarfile.TarError, OSError, EOFError):
        pass  # what was read before the damage still counts
    if parts:
        yield key or "", parts


def to_example(key: str, parts: dict[str, bytes], caption_key: str, recaption_key: str) -> bytes:
    image, alt, recaption = fields(parts, recaption_key)
    captions = {caption_key: alt.decode("utf-8", "replace")}
    if recaption:
        captions[recaption_key] = recaption.decode()
    label = metadata(parts).get("label")
    if not isinstance(label, int):
        label = class_label(parts)
    return examples.encode(image, captions, label=label, key=key)


def class_label(parts: dict[str, bytes]) -> int | None:
    """The sample's `.cls` member (CLIP_benchmark's eval shards: the class index as text), None when missing."""
    try:
        return int(parts["cls"].decode().strip())
    except (KeyError, ValueError, UnicodeDecodeError):
        return None


def labelled(path: bytes) -> Iterator[tuple[bytes, int]]:
    """(image, class index) of each sample of one eval tar (a tf.data.Dataset.from_generator body); a sample without
    an image or a `.cls` label fails the eval, naming it."""
    name = path.decode()
    for key, parts in samples(name):
        image = next((parts[e] for e in IMAGE_EXTENSIONS if e in parts), b"")
        label = class_label(parts)
        if not image or label is None:
            missing = "image (.jpg/.png/.webp)" if not image else ".cls label"
            raise ValueError(f"{name}: sample {key} has no {missing} (members: {', '.join(sorted(parts))})")
        yield image, label


def count_labelled(path: str) -> int:
    """The samples with a `.cls` label in one tar, from its member headers (the images are not read)."""
    from trainer import storage

    with storage.at(path).open("rb") as fh, tarfile.open(fileobj=fh, mode="r:*") as tar:
        return sum(1 for name in tar.getnames() if name.endswith(".cls"))


def metadata(parts: dict[str, bytes]) -> dict:
    """The sample's JSON object ({} when missing or unreadable)."""
    try:
        meta = json.loads(parts.get("json", b"{}"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return meta if isinstance(meta, dict) else {}


def fields(parts: dict[str, bytes], recaption_key: str) -> tuple[bytes, bytes, bytes]:
    """(image, alt-text, re-caption) of one sample; a missing part is empty (the pipeline counts the sample bad)."""
    image = next((parts[e] for e in IMAGE_EXTENSIONS if e in parts), b"")
    recaption = metadata(parts).get(recaption_key) if recaption_key else None
    return image, parts.get("txt", b""), recaption.encode() if isinstance(recaption, str) else b""


def chunks(path: bytes, recaption_key: bytes, size: int = 64) -> Iterator[tuple[list[bytes], ...]]:
    """One tar's samples as (images, alt-texts, re-captions) lists of up to `size` (a tf.data.Dataset.from_generator
    body: its arguments arrive as bytes)."""
    rows = (fields(parts, recaption_key.decode()) for _, parts in samples(path.decode()))
    while chunk := list(itertools.islice(rows, size)):
        yield tuple(list(column) for column in zip(*chunk, strict=True))
