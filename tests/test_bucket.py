"""Runs that live in a bucket, against a real GCS emulator (standins/gcs.py): every path the recipe names checked
before the first step, eval inputs read from gs:// (TensorFlow's own GCS client for the shards), and an eval that
fails mid-run leaving training and checkpoints intact."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from standins import cpu_env
from standins.gcs import GcsEmulator
from standins.wandb_offline import offline_run
from test_train import FAST as TRAIN_FAST

from trainer import preflight, storage
from trainer.errors import UserError
from trainer.metrics import read_jsonl
from trainer.recipe import load

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "tiny_synthetic.toml"
# tiny_synthetic's first stage as the trainer tests run it (12 steps of 16 at 16 px, a checkpoint every 4 steps),
# with evals at steps 6 and 12 and a log every 3 steps
FAST = [
    *(s for s in TRAIN_FAST if not s.startswith(("stages.1", "log.", "model.decoder"))),
    "model.decoder=",  # the evals read the image and text towers alone; a decoder would triple the compile time
    "stages.0.eval_every=6",
    "log.every_steps=3",
]
WORDS = ["photo", "of", "the", "shirt", "shoe", "bag"]  # with the letters a-z and their ##-pieces: 65 entries
CLASSES = ["shirt", "shoe", "bag"]


def one_stage_recipe(directory: Path, evals: str) -> Path:
    text = TINY.read_text()
    recipe = directory / "recipe.toml"
    recipe.write_text(text[: text.index("[[stages]]", text.index("[[stages]]") + 1)] + evals)
    return recipe


def png(seed: int) -> bytes:
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (20, 20, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def eval_files(directory: Path, bad: bool = False, shards: int = 1) -> None:
    """Labelled eval shards (bad: image 5, in the second of two shards, does not decode), class names, templates, a
    WordPiece vocab."""
    from trainer.data import examples
    from trainer.data.tokenizers import RESERVED

    directory.mkdir(parents=True, exist_ok=True)
    writer = examples.ShardWriter(directory, "val", shards)  # round-robin: the odd images go to the second of two
    for i in range(12):
        image = b"not an image" if bad and i == 5 else png(i)
        writer.write(examples.encode(image, {}, label=i % len(CLASSES), key=str(i)))
    writer.close()
    (directory / "classnames.txt").write_text("\n".join(CLASSES) + "\n")
    (directory / "templates.txt").write_text("a photo of the {}\n")
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    (directory / "vocab.txt").write_text("\n".join([*RESERVED, *WORDS, *letters, *(f"##{c}" for c in letters)]) + "\n")


def upload(local: Path, remote: str) -> None:
    for path in local.iterdir():
        storage.at(f"{remote}/{path.name}").write_bytes(path.read_bytes())


def zeroshot(name: str, where: str) -> str:
    return (
        f'\n[[evals]]\nkind = "zeroshot"\nname = "{name}"\npath = "{where}/val-*.tfrecord"\n'
        f'classnames = "{where}/classnames.txt"\ntemplates = "{where}/templates.txt"\nbatch = 8\n'
    )


def trainer_run(gcs: GcsEmulator, recipe: Path, workdir: str, *overrides: str, timeout: float = 400, extra_env=None):
    """`python -m trainer` as a pod's host runs it: reaching the bucket through every client, TensorFlow's too."""
    args = [sys.executable, "-m", "trainer", str(recipe), "--workdir", workdir]
    for item in overrides:
        args += ["--set", item]
    env = {**cpu_env(1), **gcs.env}
    env.update(extra_env or {})
    start = time.monotonic()
    done = subprocess.run(gcs.namespaced(args), env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    return done, time.monotonic() - start


# -- checked before the first step ---------------------------------------------------------------------------


@pytest.fixture
def eval_dir(tmp_path: Path, bucket: str) -> str:
    eval_files(tmp_path / "evals")
    upload(tmp_path / "evals", f"{bucket}/evals")
    return f"{bucket}/evals"


def check(recipe: Path, workdir: str, *overrides: str) -> list:
    return preflight.check(load(recipe, [*FAST, *overrides]), storage.at(workdir))


def test_every_path_of_a_good_recipe_passes_and_eval_inputs_load_once(tmp_path, bucket, eval_dir):
    recipe = one_stage_recipe(tmp_path, zeroshot("val", eval_dir))
    (evaluator,) = check(recipe, f"{bucket}/run", f'text.vocab="{eval_dir}/vocab.txt"', "text.vocab_rows=100")
    assert evaluator.name == "val" and (evaluator.classes, evaluator.templates) == (3, 1)
    assert evaluator.files == [f"{eval_dir}/val-00000-of-00001.tfrecord"]
    assert evaluator.prompt_ids.shape == (3, 8) and (evaluator.prompt_ids[:, 0] > 6).all()  # word pieces, not [UNK]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            "evals.0.path={eval_dir}/nothing-*.tfrecord",
            'evals[0].path = "{eval_dir}/nothing-*.tfrecord" matches no files',
        ),
        (
            "evals.0.classnames={eval_dir}/no-classes.txt",
            'evals[0].classnames = "{eval_dir}/no-classes.txt" does not exist',
        ),
        (
            "evals.0.templates={local}/none.txt",
            'evals[0].templates = "{local}/none.txt" does not exist',
        ),
        (
            "evals.0.path=gs://no-such-bucket/val-*.tfrecord",
            'evals[0].path = "gs://no-such-bucket/val-*.tfrecord" cannot be read: does not exist',
        ),
        ('text.vocab="{eval_dir}/no-vocab.txt"', 'text.vocab = "{eval_dir}/no-vocab.txt" does not exist'),
        ("text.vocab_rows=20", "text.vocab_rows = 20 is less than the 65 ids of bert_wordpiece ({eval_dir}/vocab.txt)"),
        ('data.source="tfrecord"', 'data.train = "{eval_dir}/train-*.tfrecord" matches no files'),
        ('stages.0.init_from="{eval_dir}/converted"', "{eval_dir}/converted is not a converted checkpoint"),
    ],
)
def test_a_mistake_is_one_line_naming_the_key_and_the_path(tmp_path, bucket, eval_dir, change, message):
    recipe = one_stage_recipe(tmp_path, zeroshot("val", eval_dir))
    fill = {"eval_dir": eval_dir, "local": tmp_path}
    base = [f'text.vocab="{eval_dir}/vocab.txt"', "text.vocab_rows=100", f'data.train="{eval_dir}/train-*.tfrecord"']
    changed = change.format(**fill)
    kept = [item for item in base if item.split("=")[0] != changed.split("=")[0]]
    with pytest.raises(UserError) as raised:
        check(recipe, f"{bucket}/run", *kept, changed)
    assert raised.value.message.startswith(message.format(**fill)), raised.value.message
    assert "\n" not in raised.value.message


def test_a_workdir_that_cannot_be_written_is_named(tmp_path, gcs):
    recipe = one_stage_recipe(tmp_path, "")
    with pytest.raises(UserError, match=r"^--workdir = gs://no-such-bucket/run cannot be written"):
        check(recipe, "gs://no-such-bucket/run")
    readonly = tmp_path / "readonly"
    readonly.mkdir(mode=0o500)
    if os.geteuid() != 0:  # root writes anywhere: only a bucket can refuse it here
        with pytest.raises(UserError, match="cannot be written"):
            check(recipe, str(readonly / "run"))


def test_the_trainer_stops_in_seconds_with_one_line_for_a_missing_eval_path(tmp_path, gcs, bucket, eval_dir):
    """The whole command, as a pod runs it: exit 2 and one line before any compile (the figure in RESULTS.md)."""
    recipe = one_stage_recipe(tmp_path, zeroshot("val", f"{bucket}/missing"))
    done, seconds = trainer_run(gcs, recipe, f"{bucket}/run", *FAST, f'text.vocab="{eval_dir}/vocab.txt"')
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stdout == ""
    lines = [line for line in done.stderr.splitlines() if line.startswith("Error:")]
    assert lines == [f'Error: evals[0].path = "{bucket}/missing/val-*.tfrecord" matches no files']
    print(f"missing eval path: exit 2 after {seconds:.1f} s")
    assert not storage.at(f"{bucket}/run/metrics.jsonl").exists()  # nothing started


# -- at run time ---------------------------------------------------------------------------------------------


def test_evals_read_from_the_bucket_and_a_failing_one_leaves_training_intact(tmp_path, gcs, bucket, eval_dir, offline):
    """A gs:// workdir; eval "val" reads its shards through TensorFlow's GCS client, eval "broken" hits an image that
    does not decode at every eval. Training finishes, every checkpoint is there, and the failure is reported. W&B
    (offline) gets the same numbers and the eval tables."""
    eval_files(tmp_path / "broken", bad=True)
    evals = zeroshot("val", eval_dir) + zeroshot("broken", str(tmp_path / "broken"))
    recipe = one_stage_recipe(tmp_path, evals)
    workdir = f"{bucket}/run"
    sets = [*FAST, f'text.vocab="{eval_dir}/vocab.txt"', "text.vocab_rows=100", "log.wandb_project=bucket-tests"]
    done, _ = trainer_run(gcs, recipe, workdir, *sets, extra_env={k: os.environ[k] for k in os.environ if "WANDB" in k})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "done: every stage" in done.stdout
    for step in (6, 12):
        assert f"eval failed: broken at stage pretrain16 step {step}: InvalidArgumentError" in done.stdout
    records = {r["step"]: r for r in read_jsonl(f"{workdir}/metrics.jsonl")}
    assert sorted(records) == [3, 6, 9, 12]
    for step in (6, 12):
        assert records[step]["eval_error"].startswith("broken: InvalidArgumentError"), records[step]
        assert records[step]["val/samples"] == 12.0 and 0 <= records[step]["val/top1"] <= 1
    assert "eval_error" not in records[9]
    steps = sorted(int(p.name) for p in storage.at(f"{workdir}/pretrain16/checkpoints").iterdir())
    assert steps == [8, 12]  # keep = 2 of 4, 6 (an eval's step is saved before its evals), 8, 12
    assert storage.at(f"{workdir}/pretrain16/checkpoints/12/commit_success.txt").exists()
    events = storage.glob(f"{workdir}/tensorboard/events.out.tfevents.*")
    assert len(events) == 1 and storage.at(events[0]).read_bytes()[12:].find(b"val/top1") > 0
    logged = offline_run(offline / "host-a", storage.at(f"{workdir}/wandb_id").read_text().strip()).history()
    assert sorted(logged) == [3, 6, 9, 12]
    for step in (6, 12):
        assert logged[step]["val/top1"] == pytest.approx(records[step]["val/top1"])
        assert "eval_error" not in logged[step] and logged[step]["evals/pretrain16"]["_type"] == "table-file"


def test_an_eval_that_fails_on_one_host_of_two_is_reported_by_both_and_training_goes_on(tmp_path):
    """Two processes joined by jax.distributed (two hosts of a pod), each reading half of every eval's shards. Eval
    "val" counts every image once across the hosts; in eval "broken" the shard host 1 reads has an image that does
    not decode, host 0's has none. Both hosts run that eval's collectives to the end, both report it failed, and both
    go on training to the end in step (a host leaving early would leave the other waiting in a collective)."""
    from standins import run_distributed

    eval_files(tmp_path / "val", shards=2)
    eval_files(tmp_path / "broken", bad=True, shards=2)
    recipe = one_stage_recipe(
        tmp_path, zeroshot("val", str(tmp_path / "val")) + zeroshot("broken", str(tmp_path / "broken"))
    )
    workdir = tmp_path / "run"
    args = [sys.executable, "-m", "trainer", str(recipe), "--workdir", str(workdir)]
    for item in [*FAST, f'text.vocab="{tmp_path}/val/vocab.txt"', "text.vocab_rows=100"]:
        args += ["--set", item]
    env = cpu_env(1)
    outs = run_distributed(args, env, ROOT, 400)
    for step in (6, 12):
        assert f"eval failed: broken at stage pretrain16 step {step}: FailedElsewhere: it failed on host 1" in outs[0]
        assert f"eval failed: broken at stage pretrain16 step {step}: InvalidArgumentError" in outs[1]
    assert all("done: every stage" in out for out in outs)
    records = {r["step"]: r for r in read_jsonl(workdir / "metrics.jsonl")}
    assert records[12]["eval_error"].startswith("broken: FailedElsewhere") and "broken/top1" not in records[12]
    assert records[12]["val/samples"] == 12.0  # 6 images on each host, each counted once


# -- what tpuctl reads back ----------------------------------------------------------------------------------


def test_status_reads_a_bucket_workdirs_checkpoint_and_the_latest_eval_error(tmp_path, gcs, bucket):
    """scripts/runs.py status, as tpuctl sends it (a real shell), on a run whose workdir is in the bucket: the newest
    committed checkpoint comes from the trainer's venv (python -m trainer.workdir), the eval error from the log."""
    from tpuctl import remote, render
    from tpuctl.ops import WorkerReport

    workdir = f"{bucket}/run"
    storage.at(f"{workdir}/recipe.json").write_text('{"stages": [{"name": "low"}, {"name": "high"}]}')
    for stage, step, committed in (("low", 100, True), ("low", 200, True), ("high", 50, True), ("high", 60, False)):
        storage.at(f"{workdir}/{stage}/checkpoints/{step}/meta/metadata").write_text("{}")
        if committed:  # orbax's mark on an object store; 60 is a save still in flight
            storage.at(f"{workdir}/{stage}/checkpoints/{step}/commit_success.txt").write_text("ok")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    log = run_dir / "log"
    log.write_text(
        "high 40  loss 2.5\n  evals: stage high step 40\neval failed: val at stage high step 50: OSError: x\n"
    )

    def status() -> dict:
        command = remote.run_command(
            "status", sys.executable, session="tpuctl-none", run_dir=str(run_dir), workdir=workdir, probe=True,
            trainer_python=sys.executable, cwd=str(ROOT),
        )  # fmt: skip
        done = subprocess.run(["bash", "-c", command], capture_output=True, text=True, env={**os.environ, **gcs.env})
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    found = status()
    assert found["checkpoint"] == "high/50" and found["checkpoint_error"] is None
    assert found["eval_error"] == "val at stage high step 50: OSError: x"
    notes = render.status_notes([WorkerReport(index=0, ip="localhost", state=found["state"], data=found)])
    assert notes == ["latest eval failed: val at stage high step 50: OSError: x (training goes on; see tpuctl logs)"]
    log.write_text(log.read_text() + "  evals: stage high step 60\n")  # a later eval that ran: no error any more
    assert status()["eval_error"] is None
