"""The one on-disk sample format: a tf.train.Example per image-text pair in TFRecord shards.

Features: `image` (encoded JPEG/PNG/WebP bytes), one bytes feature per caption (`txt` = alt-text, `llava_caption` =
re-caption, names from the recipe), optional int64 `label` (eval sets), `key` (the sample's id, for messages).
Training reads the image from the recipe's data.image_key: a TFDS builder's records are tf.Examples too, with its
features' names (OpenVision's: `jpg`, `txt`, `llava_caption`).
A shard set may carry `index.json` (file name -> record count, written by the prepare tools): with it, a truncated
shard is noticed and counted as bad samples.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from trainer import storage
from trainer.data.tfsetup import tf

IMAGE, LABEL, KEY = "image", "label", "key"
INDEX = "index.json"


def encode(image: bytes, captions: dict[str, str], label: int | None = None, key: str = "") -> bytes:
    feature = {
        IMAGE: tf.train.Feature(bytes_list=tf.train.BytesList(value=[image])),
        KEY: tf.train.Feature(bytes_list=tf.train.BytesList(value=[key.encode()])),
    }
    for name, text in captions.items():
        feature[name] = tf.train.Feature(bytes_list=tf.train.BytesList(value=[text.encode()]))
    if label is not None:
        feature[LABEL] = tf.train.Feature(int64_list=tf.train.Int64List(value=[label]))
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def parse(
    serialized: tf.Tensor, caption_keys: tuple[str, ...], with_label: bool = False, image_key: str = IMAGE
) -> dict[str, tf.Tensor]:
    """In-graph: the image bytes (under `image_key`), each caption ("" when missing) and the label (-1 when
    missing)."""
    spec: dict[str, Any] = {image_key: tf.io.FixedLenFeature([], tf.string, default_value="")}
    for name in caption_keys:
        spec[name] = tf.io.FixedLenFeature([], tf.string, default_value="")
    if with_label:
        spec[LABEL] = tf.io.FixedLenFeature([], tf.int64, default_value=-1)
    return tf.io.parse_single_example(serialized, spec)


class ShardWriter:
    """Writes examples round-robin into `shards` files `PREFIX-00000-of-000NN.tfrecord` plus the index."""

    def __init__(self, out_dir: Path, prefix: str, shards: int):
        out_dir.mkdir(parents=True, exist_ok=True)
        self.out_dir = out_dir
        self.paths = [out_dir / f"{prefix}-{i:05d}-of-{shards:05d}.tfrecord" for i in range(shards)]
        self.writers = [tf.io.TFRecordWriter(str(p)) for p in self.paths]
        self.counts = [0] * shards
        self.next = 0

    def write(self, record: bytes) -> None:
        self.writers[self.next].write(record)
        self.counts[self.next] += 1
        self.next = (self.next + 1) % len(self.writers)

    def close(self) -> int:
        for w in self.writers:
            w.close()
        index_path = self.out_dir / INDEX
        index = json.loads(index_path.read_text()) if index_path.exists() else {}
        index.update({p.name: n for p, n in zip(self.paths, self.counts, strict=True)})
        index_path.write_text(json.dumps(index, indent=1, sort_keys=True) + "\n")
        return sum(self.counts)


def read_index(files: list[str]) -> dict[str, int]:
    """Record counts of the shards whose directory has an index (by full path)."""
    counts: dict[str, int] = {}
    for directory in sorted({f.rsplit("/", 1)[0] for f in files}):
        path = storage.at(f"{directory}/{INDEX}")
        if path.exists():
            counts.update({f"{directory}/{name}": n for name, n in json.loads(path.read_text()).items()})
    return counts
