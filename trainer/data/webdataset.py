"""webdataset `.tar` shards as img2dataset writes them: members `KEY.jpg|jpeg|png|webp`, `KEY.txt` (the alt-text),
`KEY.json` (metadata; may hold a re-caption and a label), grouped by KEY in file order.

tf.data has no tar reader, so a Python generator walks each tar (only bytes are moved there; decoding stays in the
tf.data graph) and hands on each sample as the same serialized tf.train.Example a TFRecord shard holds.
"""

from __future__ import annotations

import json
import tarfile
from collections.abc import Iterator

from trainer.data import examples

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


def samples(path: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) per sample; a truncated or corrupt tar ends the file's samples."""
    from trainer.data.tfsetup import tf

    key: str | None = None
    parts: dict[str, bytes] = {}
    try:
        with tf.io.gfile.GFile(path, "rb") as fh, tarfile.open(fileobj=fh, mode="r|*") as tar:
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
    image = next((parts[e] for e in IMAGE_EXTENSIONS if e in parts), b"")
    meta = {}
    if "json" in parts:
        try:
            meta = json.loads(parts["json"])
        except (json.JSONDecodeError, UnicodeDecodeError):
            meta = {}
    captions = {caption_key: parts.get("txt", b"").decode("utf-8", "replace")}
    if recaption_key and isinstance(meta.get(recaption_key), str):
        captions[recaption_key] = meta[recaption_key]
    label = meta.get("label") if isinstance(meta.get("label"), int) else None
    return examples.encode(image, captions, label=label, key=key)


def records(path: bytes, caption_key: bytes, recaption_key: bytes) -> Iterator[bytes]:
    """Serialized examples of one tar (a tf.data.Dataset.from_generator body: its arguments arrive as bytes)."""
    for key, parts in samples(path.decode()):
        yield to_example(key, parts, caption_key.decode(), recaption_key.decode())
