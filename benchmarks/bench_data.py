"""Input pipeline throughput: the trainer's full training preprocessing vs plain tf.data decode + resize.

The same JPEG files (generated, photo-sized) are read three ways, at 224 px (or --resolution):
  plain     TFRecord -> parse -> decode -> resize -> batch (tf.data, parallel map): the floor to beat
  trainer   TFRecord shards through trainer.data (seeded shuffle, ordinals, bad-sample accounting, random-resized
            crop, colour-jitter draws, WordPiece of both captions): what the training loop receives
  trainer   webdataset tars of the same samples through the same pipeline
This VM's speed drifts by tens of percent between minutes, so the three are measured in alternating rounds (each
round builds each pipeline afresh, warms it up, times it and drops it, so no other pipeline's threads run meanwhile)
and each ratio is the median of the per-round ratios. Reported: images/s (wall), images per CPU-second of this
process (all its threads: the "per core" figure), and trainer / plain for both.

    .venv/bin/python benchmarks/bench_data.py --rounds 6 --markdown benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import io
import os
import platform
import resource
import statistics
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from trainer import data, recipe
from trainer.data import examples
from trainer.data.tfsetup import tf

VOCAB = ["[PAD]", "[bos]", "[eos]", "[UNK]", "a", "photo", "of", "the", "cat", "dog", "on", "grass", "."]


def photo(rng: np.random.Generator, width: int = 400, height: int = 300) -> bytes:
    """A JPEG with smooth structure and noise (compresses like a photo: ~40 KB at 400x300)."""
    coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    image = Image.fromarray(coarse).resize((width, height), Image.BICUBIC)
    pixels = np.asarray(image).astype(np.int16) + rng.integers(-20, 21, (height, width, 3))
    out = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(out, format="JPEG", quality=90)
    return out.getvalue()


def make_files(d: Path, count: int, width: int = 400, height: int = 300) -> None:
    rng = np.random.default_rng(0)
    (d / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    writer = examples.ShardWriter(d, "train", 8)
    with contextlib.ExitStack() as stack:
        tars = [stack.enter_context(tarfile.open(d / f"{i:05d}.tar", "w")) for i in range(8)]
        for i in range(count):
            jpeg = photo(rng, width, height)
            caption = "a photo of the cat on the grass ."
            writer.write(examples.encode(jpeg, {"txt": caption, "llava_caption": "a dog on the grass ."}, key=str(i)))
            for name, payload in ((f"{i:08d}.jpg", jpeg), (f"{i:08d}.txt", caption.encode())):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tars[i % 8].addfile(info, io.BytesIO(payload))
    writer.close()


def plain(d: Path, batch: int, resolution: int) -> Iterator:
    def row(serialized: tf.Tensor) -> tf.Tensor:
        image = tf.io.decode_image(examples.parse(serialized, ())["image"], channels=3, expand_animations=False)
        return tf.cast(tf.image.resize(image, (resolution, resolution)), tf.uint8)

    files = sorted(str(p) for p in d.glob("train-*.tfrecord"))
    ds = tf.data.TFRecordDataset(files).repeat().map(row, num_parallel_calls=tf.data.AUTOTUNE).batch(batch)
    return iter(ds.prefetch(tf.data.AUTOTUNE).as_numpy_iterator())


def trainer_pipeline(d: Path, batch: int, source: str, jitter: float, resolution: int = 224) -> Iterator:
    train = f"{d}/train-*.tfrecord" if source == "tfrecord" else f"{d}/*.tar"
    r = recipe.from_dict(
        {
            "model": {"image": "B/16", "decoder": "B"},  # with a caption decoder: both captions are tokenized
            "text": {"vocab": f"{d}/vocab.txt", "context_length": 80, "caption_length": 128},
            "data": {"source": source, "train": train, "shuffle_buffer": 1000, "color_jitter": jitter},
            "stages": [
                {"name": "s", "resolution": resolution, "global_batch": batch, "samples": 10**9, "peak_lr": 1e-3}
            ],
        }
    )
    return (b for b, _ in data.open_stage(r, 0, data.Host()))


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def timed(batches: Iterator, steps: int, batch: int) -> tuple[float, float]:
    """(images/s, images per CPU-second) over `steps` batches, after 6 that start its threads, tune its parallelism and
    fill the shuffle buffer."""
    for _ in range(6):
        next(batches)
    wall, cpu = time.perf_counter(), cpu_seconds()
    for _ in range(steps):
        next(batches)
    images = steps * batch
    return images / (time.perf_counter() - wall), images / (cpu_seconds() - cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=6, help="alternating measurement rounds")
    parser.add_argument("--steps", type=int, default=16, help="timed batches per pipeline and round")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", default="400x300", help="the generated JPEGs' WIDTHxHEIGHT")
    parser.add_argument("--resolution", type=int, default=224, help="output size (OpenVision's stages: 84-336)")
    parser.add_argument("--markdown", help="append the results to this file")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        width, height = (int(n) for n in args.size.split("x"))
        make_files(d, 1000, width, height)
        kb = sum(p.stat().st_size for p in d.glob("*.tar")) / 1000 / 1024
        b, res = args.batch, args.resolution
        pipelines: dict[str, Callable[[], Iterator]] = {
            "plain tf.data decode + resize (TFRecord)": lambda: plain(d, b, res),
            "trainer pipeline, TFRecord": lambda: trainer_pipeline(d, b, "tfrecord", 0.4, res),
            "trainer pipeline, webdataset tar": lambda: trainer_pipeline(d, b, "webdataset", 0.4, res),
        }
        rounds: dict[str, list[tuple[float, float]]] = {name: [] for name in pipelines}
        for _ in range(args.rounds):
            for name, make in pipelines.items():
                batches = make()  # a fresh pipeline per round: no other one's threads run meanwhile
                rounds[name].append(timed(batches, args.steps, args.batch))
                del batches
                gc.collect()
    base = rounds["plain tf.data decode + resize (TFRecord)"]
    lines = [
        f"## {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')} — input pipeline, "
        f"{cores} × {platform.processor() or platform.machine()}, Python {platform.python_version()}",
        "",
        f"Command: `.venv/bin/python benchmarks/bench_data.py --rounds {args.rounds} --steps {args.steps}"
        f" --batch {args.batch} --resolution {args.resolution} --size {args.size}` (1,000 generated {args.size}"
        f" JPEGs, ~{kb:.0f} KB, read"
        f" repeatedly; {args.resolution} px; colour jitter 0.4;"
        f" {args.rounds} alternating rounds of {args.steps} batches; medians)",
        "",
        "| pipeline | images/s | vs plain | images per CPU-second | vs plain |",
        "|:--|--:|--:|--:|--:|",
    ]
    for name, measured in rounds.items():
        wall = statistics.median(m[0] for m in measured)
        cpu = statistics.median(m[1] for m in measured)
        wall_ratio = statistics.median(m[0] / b[0] for m, b in zip(measured, base, strict=True))
        cpu_ratio = statistics.median(m[1] / b[1] for m, b in zip(measured, base, strict=True))
        lines.append(f"| {name} | {wall:.0f} | {wall_ratio:.2f}× | {cpu:.0f} | {cpu_ratio:.2f}× |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.markdown:
        with open(args.markdown, "a") as fh:
            fh.write("\n" + text)


if __name__ == "__main__":
    main()
