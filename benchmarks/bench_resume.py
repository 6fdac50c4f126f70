"""Time to the first batch of a resumed run: the training input pipeline restarted from a checkpoint's data position.

A 100,000-record dataset (100 TFRecord shards of 1,000 JPEGs of 128 x 128 px, about 1.2 GB, with the shard index
`prepare` writes) is read by trainer.data.open_stage from a position at 0 %, 10 % and 90 % of the epoch (a 10,000
record shuffle buffer, 64-image batches at 32 px); each figure is the time from open_stage to the first batch (the
pipeline's build, the records read to reach the position, the shuffle buffer's fill, the first batch's decoding) and
the bytes read meanwhile (the process's file reads, TensorFlow's libraries included, and what the loopback received
from the bucket stand-in: what a bucket would have to send), the median of --rounds fresh starts, each in a process
of its own. No file cache is dropped: the dataset sits in this machine's page cache (or the emulator's memory), so
reading is as fast as it gets and the times are a floor; from a real bucket the bytes are what costs.

    python benchmarks/bench_resume.py [--root CHECKOUT] [--data DIR] [--rounds 3] [--bucket] [--json]

--root: the checkout whose trainer/ reads (another commit's work tree: its figures "before"); --data: where the
dataset is written once (default: a folder under the system's temp directory, kept for the next run); --bucket:
read it from a bucket instead, the GCS emulator the tests use (tests/standins/gcs.py: the real fake-gcs-server, which
TensorFlow's own GCS client reads over HTTPS), the shards uploaded to it first: the bytes then cross a socket.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RECORDS, SHARDS = 100_000, 100
WORDS = ["[PAD]", "[bos]", "[eos]", "[UNK]", "a", "photo", "of", "cat", "dog", "red", "blue", "."]


def write_dataset(directory: Path) -> None:
    """RECORDS records round-robin over SHARDS shards (each image a 128 x 128 JPEG of noise), the index and a vocab."""
    sys.path.insert(0, str(ROOT))
    import numpy as np
    from PIL import Image

    from trainer.data import examples

    if (directory / examples.INDEX).exists():
        return
    rng = np.random.default_rng(0)
    writer = examples.ShardWriter(directory, "train", SHARDS)
    for i in range(RECORDS):
        out = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)).save(out, format="JPEG")
        writer.write(examples.encode(out.getvalue(), {"txt": f"a photo of {WORDS[7 + i % 2]} ."}, key=f"s{i}"))
    writer.close()
    (directory / "vocab.txt").write_text("\n".join(WORDS) + "\n")


def read_bytes() -> int:
    """The bytes this process has read from files so far (page cache or not), plus what the loopback interface has
    received (a bucket's bytes reach the process by recv, not read; nothing else here talks over it meanwhile)."""
    lines = Path("/proc/self/io").read_text().splitlines()
    files = int(next(line for line in lines if line.startswith("rchar")).split()[1])
    loopback = next(line for line in Path("/proc/net/dev").read_text().splitlines() if line.strip().startswith("lo:"))
    return files + int(loopback.split(":", 1)[1].split()[0])


def first_batch(root: Path, directory: str, consumed: int) -> tuple[float, int]:
    """(in this process) seconds and bytes read from open_stage at `consumed` records of epoch 0 to its first
    batch."""
    sys.path.insert(0, str(root))
    from trainer import data, recipe

    r = recipe.load(
        root / "recipes" / "tiny.toml",
        [
            f"data.train={directory}/train-*.tfrecord",
            f"text.vocab={directory}/vocab.txt",
            "text.context_length=8",
            "data.shuffle_buffer=10000",
            "stages.0.global_batch=64",
            "stages.0.resolution=32",
        ],
    )
    position = {"epoch": 0, "consumed": consumed, "seen": consumed, "bad": 0} if consumed else None
    started, before = time.perf_counter(), read_bytes()
    next(iter(data.open_stage(r, 0, data.Host(), position)))
    return time.perf_counter() - started, read_bytes() - before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=ROOT)
    parser.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "tpuctl-bench-resume-128px")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--bucket", action="store_true", help="read the shards from the GCS emulator")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: one measurement in this process
    parser.add_argument("--from", dest="source", help=argparse.SUPPRESS)  # internal: the dataset's folder or URL
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(first_batch(args.root.resolve(), args.source, args.one)))
        return
    write_dataset(args.data)
    with contextlib.ExitStack() as stack:
        results = measure(args, stack)
    if args.json:
        print(
            json.dumps({"root": str(args.root), "records": RECORDS, "shards": SHARDS, "bucket": args.bucket, **results})
        )
        return
    where = "a bucket (the GCS emulator)" if args.bucket else "local files"
    print(f"{RECORDS:,} records in {SHARDS} shards from {where}, trainer from {args.root}")
    for name, r in results["results"].items():
        print(
            f"  resume at {name:>4} ({r['consumed']:>6,} records): {r['seconds']:.2f} s to the first batch,"
            f" {r['bytes_read'] / 1e6:,.0f} MB read"
        )


def uploaded(directory: Path, stack: contextlib.ExitStack) -> tuple[Any, str]:
    """The GCS emulator (closed with `stack`) holding the dataset's files, and their gs:// folder."""
    sys.path.insert(0, str(ROOT / "tests"))
    from standins.gcs import GcsEmulator

    gcs = GcsEmulator(("bucket",))
    stack.callback(gcs.close)
    for path in sorted(directory.iterdir()):
        name = urllib.parse.quote(f"resume/{path.name}", safe="")
        url = f"{gcs.http_url}/upload/storage/v1/b/bucket/o?uploadType=media&name={name}"
        request = urllib.request.Request(url, data=path.read_bytes(), method="POST")
        urllib.request.urlopen(request, timeout=120).close()
    return gcs, "gs://bucket/resume"


def measure(args: argparse.Namespace, stack: contextlib.ExitStack) -> dict[str, Any]:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    source, wrap = str(args.data), lambda argv: argv
    if args.bucket:
        gcs, source = uploaded(args.data, stack)
        env.update(gcs.env)
        wrap = gcs.namespaced
    results = {}
    for fraction in (0.0, 0.1, 0.9):
        consumed = int(fraction * RECORDS)
        runs = []
        for _ in range(args.rounds):
            command = [sys.executable, __file__, "--root", str(args.root), "--from", source, "--one", str(consumed)]
            out = subprocess.run(wrap(command), env=env, capture_output=True, text=True, check=True)
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        results[f"{fraction:.0%}"] = {
            "consumed": consumed,
            "seconds": statistics.median(t for t, _ in runs),
            "bytes_read": statistics.median(b for _, b in runs),
            "all": runs,
        }
    return {"results": results}


if __name__ == "__main__":
    main()
