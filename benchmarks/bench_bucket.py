"""Runs in a bucket, measured against the GCS emulator the tests use (tests/standins/gcs.py: the real
fake-gcs-server, on loopback):

  a. a recipe with a mistake: wall time from `python -m trainer` starting to its one-line error (exit 2), with the
     whole command as a pod runs it (the bucket reached through every client, TensorFlow's too): a missing eval path
     (found by preflight's first pass, paths alone) and a text.vocab_rows below the tokenizer's size (its second);
  b. one checkpoint of the CPU demo's recipe (recipes/tiny.toml: its train state, params + optimizer + step/RNG, and
     the meta JSON) saved by the trainer's StageCheckpoints to the emulator and to local disk, until committed.

The emulator runs on this machine, so (b) measures the client-side cost of the bucket path (HTTP requests, JSON API
round trips, tensorstore's GCS driver), not a network: a real bucket adds its latency per request.

    .venv/bin/python benchmarks/bench_bucket.py --repeats 5 --markdown benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from standins.gcs import GcsEmulator  # noqa: E402

# label: (the eval's path, --set items). A mistake the first pass finds (paths alone), one the second (the tokenizer).
CASES = {
    "a missing eval path (gs://)": ("gs://bucket/nothing/val-*.tfrecord", ["text.vocab_rows=49408"]),
    "text.vocab_rows below the tokenizer's": ("gs://bucket/evals/val-*", ["text.vocab_rows=1000"]),
}


def time_to_error(gcs: GcsEmulator, path: str, sets: list[str], repeats: int) -> list[float]:
    """The tests' synthetic-data recipe with one zero-shot eval of `path` (CLIP's shipped BPE), `sets` applied."""
    recipe = Path(tempfile.mkdtemp()) / "recipe.toml"
    evals = f'\n[[evals]]\nkind = "zeroshot"\nname = "val"\npath = "{path}"\n'
    recipe.write_text((ROOT / "tests" / "tiny_synthetic.toml").read_text() + evals)
    args = [sys.executable, "-m", "trainer", str(recipe), "--workdir", "gs://bucket/bench-error"]
    for item in ['text.tokenizer="clip_bpe"', *sets]:
        args += ["--set", item]
    env = {**os.environ, **gcs.env, "JAX_PLATFORMS": "cpu"}
    times = []
    for _ in range(repeats):
        begin = time.monotonic()
        done = subprocess.run(gcs.namespaced(args), env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
        times.append(time.monotonic() - begin)
        errors = [line for line in done.stderr.splitlines() if line.startswith("Error:")]
        assert done.returncode == 2 and len(errors) == 1, done.stderr[-2000:]
    print(f"  {errors[0]}")
    return times


def save_times(gcs: GcsEmulator, repeats: int) -> dict[str, list[float]]:
    os.environ.update(gcs.env)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from trainer import sharding, storage
    from trainer.checkpoint import StageCheckpoints
    from trainer.models.clip import build
    from trainer.program import compile_stage
    from trainer.recipe import load

    recipe = load(ROOT / "recipes" / "tiny.toml")
    stage = recipe.stages[0]
    model = build(recipe)
    program = compile_stage(model, recipe, stage, sharding.checked_mesh(recipe))
    state = program.init_state()
    sizes = sum(x.size * x.dtype.itemsize for x in __import__("jax").tree.leaves(state))
    print(f"  train state: {sizes / 1e6:.2f} MB")
    local = Path(tempfile.mkdtemp(prefix="bench-ckpt-", dir="/var/tmp"))
    places = {"local disk": storage.at(str(local)), "GCS emulator": storage.at("gs://bucket/bench-ckpt")}
    times: dict[str, list[float]] = {name: [] for name in places}
    for step in range(1, repeats + 2):
        for name, where in places.items():
            ckpt = StageCheckpoints(where / stage.name, keep=2)
            begin = time.monotonic()
            ckpt.save(state, {"stage": 0, "stage_name": stage.name, "step": step, "data": [{"batch": step}]})
            ckpt.wait()
            took = time.monotonic() - begin
            ckpt.close()
            if step > 1:  # the first save of each also creates the directories and warms the clients
                times[name].append(took)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--markdown", type=Path, help="Append the tables to this file.")
    args = parser.parse_args()
    gcs = GcsEmulator(("bucket",))
    try:
        print("a. a mistake -> its one-line error")
        os.environ.update(gcs.env)
        from trainer import storage

        storage.at("gs://bucket/evals/val-0.tfrecord").write_bytes(b"")  # the second case's eval path exists
        errors = {case: time_to_error(gcs, path, sets, args.repeats) for case, (path, sets) in CASES.items()}
        print("b. checkpoint save, committed")
        saves = save_times(gcs, args.repeats)
    finally:
        gcs.close()
    now = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()
    lines = [
        f"## {now} — {os.cpu_count()} × {platform.processor() or platform.machine()},"
        f" Python {platform.python_version()}",
        "",
        f"Command: `.venv/bin/python benchmarks/bench_bucket.py --repeats {args.repeats}"
        + (f" --markdown {args.markdown}`" if args.markdown else "`"),
        "",
        "### a. A mistake in a recipe: start of `python -m trainer` to its one-line error (exit 2)",
        "",
        "| mistake | runs | median s | min s | max s |",
        "|:--|--:|--:|--:|--:|",
        *(
            f"| {case} | {len(t)} | {statistics.median(t):.1f} | {min(t):.1f} | {max(t):.1f} |"
            for case, t in errors.items()
        ),
        "",
        "### b. One checkpoint of recipes/tiny.toml's train state, saved until committed (StageCheckpoints)",
        "",
        "| where | saves | median ms | min ms | max ms |",
        "|:--|--:|--:|--:|--:|",
    ]
    for name, values in saves.items():
        ms = [v * 1000 for v in values]
        lines.append(f"| {name} | {len(ms)} | {statistics.median(ms):.0f} | {min(ms):.0f} | {max(ms):.0f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.markdown:
        with open(args.markdown, "a") as f:
            f.write("\n" + text)


if __name__ == "__main__":
    main()
