"""The trainer on real image files end to end: TFRecord shards -> two stages -> zero-shot and retrieval evals in the
loop, then `python -m trainer.eval` on the checkpoints."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from standins import warm

from trainer.data import examples
from trainer.metrics import read_jsonl

ROOT = Path(__file__).resolve().parents[1]
VOCAB = ["[PAD]", "[bos]", "[eos]", "[UNK]", "a", "photo", "of", "red", "blue", "cats", ".", "[CLS]", "[SEP]"]


def png(colour: int, seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 60, (28, 28, 3), dtype=np.uint8)
    pixels[..., 0 if colour == 0 else 2] += 180
    import io

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def make_data(d: Path) -> Path:
    (d / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    names = ("red cats", "blue cats")
    for split, count in (("train", 96), ("test", 20)):
        writer = examples.ShardWriter(d, split, 2)
        for i in range(count):
            label = i % 2
            texts = {"txt": f"a photo of {names[label]} ."}
            writer.write(examples.encode(png(label, i + (1000 if split == "test" else 0)), texts, label, f"{split}{i}"))
        writer.close()
    (d / "classnames.txt").write_text("\n".join(names) + "\n")
    (d / "templates.txt").write_text("a photo of {} .\n")
    images = d / "images"
    images.mkdir()
    entries = []
    for i in range(6):
        (images / f"{i}.png").write_bytes(png(i % 2, 5000 + i))
        sentences = [{"raw": f"a photo of {names[i % 2]} ."}, {"raw": f"{names[i % 2]} ."}]
        entries.append({"filepath": "images", "filename": f"{i}.png", "split": "test", "sentences": sentences})
    entries.append({"filepath": "images", "filename": "0.png", "split": "train", "sentences": [{"raw": "x"}]})
    (d / "karpathy.json").write_text(json.dumps({"images": entries}))
    recipe = d / "recipe.toml"
    # the demo's recipe, a second stage at a higher resolution that its patch size (7) does not divide (4 x 4 patches,
    # 2 pixel rows and columns unused), and a retrieval eval
    recipe.write_text(
        (ROOT / "recipes" / "tiny.toml").read_text()
        + '\n[[stages]]\nname = "ft30"\nresolution = 30\nglobal_batch = 16\nsamples = 32\npeak_lr = 1e-4\n'
        + f'\n[[evals]]\nkind = "retrieval"\nname = "toy_retrieval"\npath = "{d}/karpathy.json"\nbatch = 8\n'
    )
    return recipe


def run(module: str, recipe: Path, d: Path, *extra: str) -> subprocess.CompletedProcess:
    overrides = [
        f"data.train={d}/train-*.tfrecord",
        f"text.vocab={d}/vocab.txt",
        "data.shuffle_buffer=50",
        "data.color_jitter=0.4",  # the real pipeline's draws, applied on the device
        "stages.0.samples=64",
        "stages.0.global_batch=16",
        "stages.0.warmup_steps=1",
        "stages.1.warmup_steps=1",
        "log.every_steps=1",
        f"evals.0.path={d}/test-*.tfrecord",
        f"evals.0.classnames={d}/classnames.txt",
        f"evals.0.templates={d}/templates.txt",
        "evals.0.batch=8",
    ]
    args = [sys.executable, "-m", module, str(recipe), "--workdir", str(d / "run")]
    for item in overrides:
        args += ["--set", item]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}  # the test run's XLA cache: TRAINER_COMPILE_CACHE (conftest)
    return warm.run([*args, *extra], env=env, cwd=ROOT, timeout=280)


def test_train_on_shards_with_zero_shot_and_retrieval_evals_in_the_loop(shard_run):
    """The run is conftest's shard_run (this module's data and recipe; its first stage starts from an imported open_clip
    model, which test_convert checks; nothing here depends on the values it starts from)."""
    out = (shard_run / "out.txt").read_text()
    records = read_jsonl(shard_run / "data" / "run" / "metrics.jsonl")
    assert [rec["stage_step"] for rec in records] == [1, 2, 3, 4, 1, 2]
    ends = [records[3], records[5]]  # each stage's end carries the evals
    for rec in ends:
        assert rec["fashion_mnist/samples"] == 20 and 0 <= rec["fashion_mnist/top1"] <= 1
        assert rec["fashion_mnist/top5"] == 1.0  # 2 classes: always among the top 5
        assert rec["toy_retrieval/images"] == 6
        assert 0 <= rec["toy_retrieval/i2t_r@1"] <= rec["toy_retrieval/i2t_r@5"] <= rec["toy_retrieval/i2t_r@10"] == 1
        assert rec["data_bad"] == 0
    assert "fashion_mnist" in out and "toy_retrieval" in out and "i2t_r@1" in out  # the tables


def test_a_checkpoint_of_that_run_evaluates_to_the_numbers_of_the_loop(shard_run, tmp_path):
    """`python -m trainer.eval` on a checkpoint of shard_run (a test of its own: the run, built once, is the other
    test's; the two together took 100 s of one test)."""
    d = Path(shutil.copytree(shard_run / "data", tmp_path / "data"))  # the shared run stays as it was
    recipe, args = d / "recipe.toml", json.loads((shard_run / "args.json").read_text())
    records = read_jsonl(d / "run" / "metrics.jsonl")
    r = run("trainer.eval", recipe, d, "--stage", "fmnist21", "--checkpoint", "4", *args)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "evals: stage fmnist21 step 4" in r.stdout
    again = read_jsonl(d / "run" / "metrics.jsonl")[3]
    assert again["fashion_mnist/top1"] == records[3]["fashion_mnist/top1"]  # the same params give the same numbers
    assert again["loss"] == records[3]["loss"]  # added to the step's record, not replacing it

    r = run("trainer.eval", recipe, d, "--stage", "nope", *args)
    assert r.returncode == 2 and "--stage nope: the recipe's stages are fmnist21, ft30" in r.stderr
