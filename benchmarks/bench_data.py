"""Input pipeline throughput: the trainer's full training preprocessing vs plain tf.data decode + resize.

The same JPEG files (generated, photo-sized) are read three ways, at 224 px:
  plain     TFRecord -> parse -> decode -> resize 224 -> batch (tf.data, parallel map): the floor to beat
  trainer   TFRecord shards through trainer.data (seeded shuffle, ordinals, bad-sample markers, random-resized crop,
            WordPiece of both captions, host-side batching): what the training loop receives
  trainer   webdataset tars of the same samples through the same pipeline
Reported: images/s, images/s per core (the machine's cores; every pipeline uses all of them), and trainer / plain.

    .venv/bin/python benchmarks/bench_data.py --images 2000 --markdown benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import os
import platform
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from trainer import data, recipe
from trainer.data import examples
from trainer.data.tfsetup import tf

VOCAB = ["[PAD]", "[bos]", "[eos]", "[UNK]", "a", "photo", "of", "the", "cat", "dog", "on", "grass", "."]


def photo(rng: np.random.Generator) -> bytes:
    """A 400x300 JPEG with smooth structure and noise (compresses like a photo, ~30-60 KB)."""
    coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    image = Image.fromarray(coarse).resize((400, 300), Image.BICUBIC)
    pixels = np.asarray(image).astype(np.int16) + rng.integers(-20, 21, (300, 400, 3))
    out = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(out, format="JPEG", quality=90)
    return out.getvalue()


def make_files(d: Path, count: int) -> None:
    rng = np.random.default_rng(0)
    (d / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    writer = examples.ShardWriter(d, "train", 8)
    with contextlib.ExitStack() as stack:
        tars = [stack.enter_context(tarfile.open(d / f"{i:05d}.tar", "w")) for i in range(8)]
        for i in range(count):
            jpeg = photo(rng)
            caption = "a photo of the cat on the grass ."
            writer.write(examples.encode(jpeg, {"txt": caption, "llava_caption": "a dog on the grass ."}, key=str(i)))
            for name, payload in ((f"{i:08d}.jpg", jpeg), (f"{i:08d}.txt", caption.encode())):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tars[i % 8].addfile(info, io.BytesIO(payload))
    writer.close()


def plain(d: Path, count: int, batch: int) -> float:
    def row(serialized: tf.Tensor) -> tf.Tensor:
        image = tf.io.decode_image(examples.parse(serialized, ())["image"], channels=3, expand_animations=False)
        return tf.cast(tf.image.resize(image, (224, 224)), tf.uint8)

    files = sorted(str(p) for p in d.glob("train-*.tfrecord"))
    ds = tf.data.TFRecordDataset(files).repeat().map(row, num_parallel_calls=tf.data.AUTOTUNE).batch(batch)
    return timed(iter(ds.prefetch(tf.data.AUTOTUNE).as_numpy_iterator()), count // batch, batch)


def trainer_pipeline(d: Path, count: int, batch: int, source: str) -> float:
    train = f"{d}/train-*.tfrecord" if source == "tfrecord" else f"{d}/*.tar"
    r = recipe.from_dict(
        {
            "model": {"image": "B/16"},
            "text": {"vocab": f"{d}/vocab.txt", "context_length": 80, "caption_length": 128},
            "data": {"source": source, "train": train, "shuffle_buffer": 1000, "color_jitter": 0.4},
            "stages": [{"name": "s", "resolution": 224, "global_batch": batch, "samples": count, "peak_lr": 1e-3}],
        }
    )
    stream = (b for b, _ in data.open_stage(r, 0, data.Host()))
    return timed(stream, count // batch, batch)


def timed(batches, steps: int, batch: int) -> float:
    for _ in range(3):  # warm up: threads, autotuning, the shuffle buffer
        next(batches)
    start = time.perf_counter()
    for _ in range(steps):
        next(batches)
    return steps * batch / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000, help="images timed per pipeline")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--markdown", help="append the results to this file")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        make_files(d, 1000)
        rows = [("plain tf.data decode + resize (TFRecord)", plain(d, args.images, args.batch))]
        rows.append(("trainer pipeline, TFRecord", trainer_pipeline(d, args.images, args.batch, "tfrecord")))
        rows.append(("trainer pipeline, webdataset tar", trainer_pipeline(d, args.images, args.batch, "webdataset")))
    base = rows[0][1]
    lines = [
        f"## {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')} — input pipeline, "
        f"{cores} × {platform.processor() or platform.machine()}, Python {platform.python_version()}",
        "",
        f"Command: `.venv/bin/python benchmarks/bench_data.py --images {args.images} --batch {args.batch}`"
        " (1,000 generated 400x300 JPEGs, ~40 KB, read repeatedly; 224 px; batch per host as given)",
        "",
        "| pipeline | images/s | images/s per core | vs plain |",
        "|:--|--:|--:|--:|",
    ]
    for name, rate in rows:
        lines.append(f"| {name} | {rate:.0f} | {rate / cores:.0f} | {rate / base:.2f}× |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.markdown:
        with open(args.markdown, "a") as fh:
            fh.write("\n" + text)


if __name__ == "__main__":
    main()
