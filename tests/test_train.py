"""`python -m trainer` end to end on CPU: both stages of a tiny recipe, metrics, and the resume drills (kill -9,
SIGTERM, a stage boundary, another device count). Each run is a real subprocess with real orbax checkpoints; runs
share a persistent XLA cache, so only the first run of each configuration compiles."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import once_per_run
from standins import cpu_env, free_port, wait_until, warm

from trainer import contract, storage
from trainer.metrics import read_jsonl
from trainer.workdir import COMMIT_MARKER, committed_steps

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "tiny_synthetic.toml"
# CPU-sized towers (3 and 2 layers of width 96; a 3-layer decoder) for runs that exercise the trainer, not the model:
# the tiny recipe's Ti towers take 3x as long a step and a third more to compile
MU_TOWERS = ["model.image=Mu/8", "model.text=Mu", "model.decoder=Mu"]
# 12 steps at 16 px, then 6 at 32 px; batch 16; a checkpoint every 4 steps; every step logged.
FAST = [
    *MU_TOWERS,
    "stages.0.samples=192",
    "stages.0.global_batch=16",
    "stages.0.warmup_steps=2",
    "stages.1.samples=96",
    "stages.1.global_batch=16",
    "stages.1.warmup_steps=1",
    "log.every_steps=1",
    "checkpoint.every_steps=4",
    "text.context_length=8",
    "text.caption_length=8",
]
STEPS = 18


ONE_STAGE = [o for o in FAST if not o.startswith("stages.1")]


def one_stage_recipe(directory: Path) -> Path:
    """The tests' recipe with its first stage alone (pretrain16; with ONE_STAGE, the reference's first 12 steps)."""
    path = directory / "one_stage.toml"
    text = TINY.read_text()
    path.write_text(text[: text.index("[[stages]]", text.index("[[stages]]") + 1)])
    return path


class Trainer:
    """Starts `python -m trainer` runs and stops every one of them at the end of the test."""

    def __init__(self, cache: Path):
        self.cache = cache
        self.procs: list[subprocess.Popen] = []

    def start(
        self,
        workdir: Path | str,
        *overrides: str,
        devices=1,
        recipe: Path = TINY,
        base=FAST,
        extra=(),
        env=None,
        shared_cache: bool = True,
    ):
        """`shared_cache` False: the trainer's own default cache (next to the workdir), not the tests' shared one."""
        env = {**cpu_env(devices), **(env or {})}
        args = [sys.executable, "-m", "trainer", str(recipe), "--workdir", str(workdir)]
        if shared_cache:
            args += ["--compile-cache", str(self.cache)]
        else:
            env.pop(contract.COMPILE_CACHE_ENV, None)
        args += [*extra]
        for item in [*base, *overrides]:
            args += ["--set", item]
        proc = warm.popen(
            args,
            env=env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.procs.append(proc)
        return proc

    def run(self, workdir: Path, *overrides: str, **kw) -> str:
        proc = self.start(workdir, *overrides, **kw)
        out, _ = proc.communicate(timeout=280)
        assert proc.returncode == 0, out[-3000:]
        return out

    def stop_all(self):
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@pytest.fixture
def trainer(xla_cache):
    t = Trainer(xla_cache)
    yield t
    t.stop_all()


@pytest.fixture(scope="session")
def reference(xla_cache):
    """One uninterrupted run: the per-step records every drill must reproduce. Trained once per test run, by the
    first xdist worker that asks (the others wait for it): read its workdir, never run in it."""

    def build(root: Path) -> None:
        t = Trainer(xla_cache)
        try:
            (root / "out.txt").write_text(t.run(root / "workdir"))
        finally:
            t.stop_all()

    root = once_per_run("train-reference", build)
    return root / "workdir", (root / "out.txt").read_text(), read_jsonl(root / "workdir" / "metrics.jsonl")


def running(proc: subprocess.Popen, condition):
    """`condition`, failing at once with the trainer's output if the trainer has ended."""

    def check():
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        return condition()

    return check


def wait_for_step(workdir: Path, proc: subprocess.Popen, step: int, timeout: float = 240) -> None:
    path = Path(workdir) / "metrics.jsonl"
    reached = running(proc, lambda: path.exists() and any(r["step"] >= step for r in read_jsonl(path)))
    wait_until(reached, timeout, f"step {step} in {path}")


def wait_for_line(proc: subprocess.Popen, start: str) -> str:
    """The trainer's output up to and including its first line that starts with `start` (its output stays readable
    after: communicate() returns the rest)."""
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith(start):
            return "".join(seen)
    raise AssertionError(f"the trainer ended before a line starting {start!r}:\n" + "".join(seen)[-3000:])


def wait_for_checkpoint(
    workdir: Path | str, proc: subprocess.Popen, stage: str, step: int, timeout: float = 120
) -> None:
    """Until the async save of `step` has committed (locally orbax renames its temporary directory to the step's at
    the end, in a bucket it writes commit_success.txt; a kill before that leaves no checkpoint, and the run rightly
    starts over)."""
    committed = running(proc, lambda: step in committed_steps(storage.at(str(workdir)) / stage))
    wait_until(committed, timeout, f"committed checkpoint {stage}/{step}")


def losses(records) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records}


def test_an_uninterrupted_run_trains_both_stages_and_logs(reference):
    workdir, out, records = reference
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert [r["stage"] for r in records] == ["pretrain16"] * 12 + ["ft32"] * 6
    assert records[11]["stage_step"] == 12 and records[12]["stage_step"] == 1
    assert records[11]["loss"] < records[0]["loss"]  # it learns
    for key in ("contrastive", "caption", "temperature", "grad_norm", "lr"):
        assert all(np.isfinite(r[key]) for r in records), key
    assert records[0]["lr"] == 0.0 and records[2]["lr"] == pytest.approx(1e-3)  # warmup of 2 steps to the peak
    timed = records[5]
    assert timed["img_per_s"] > 0 and timed["eta_s"] > 0 and "mfu" not in timed  # CPUs have no peak: no MFU
    assert "stage pretrain16: done (12 steps)" in out and "stage ft32: done (6 steps)" in out
    # checkpoints: the latest 2 of each stage (keep = 2), the stage's final one among them
    assert sorted(int(p.name) for p in (workdir / "pretrain16" / "checkpoints").iterdir()) == [8, 12]
    assert sorted(int(p.name) for p in (workdir / "ft32" / "checkpoints").iterdir()) == [4, 6]
    # TensorBoard reads the same numbers
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(workdir / "tensorboard"))
    events.Reload()
    tb = {e.step: e.value for e in events.Scalars("loss")}
    assert sorted(tb) == list(range(1, STEPS + 1))
    assert tb[7] == pytest.approx(records[6]["loss"], rel=1e-6)


def test_the_contract_reads_the_trainers_real_output(reference):
    """What tpuctl status reads of a worker's log and workdir, parsed by trainer/contract.py from a real run."""
    import glob

    from trainer import contract

    workdir, out, records = reference
    parsed = [p for p in map(contract.parse_progress, out.splitlines()) if p is not None]
    assert [(p["stage"], p["step"]) for p in parsed] == [(r["stage"], r["stage_step"]) for r in records]
    for p, r in zip(parsed, records, strict=True):  # printed to 3 significant digits
        assert p["loss"] == pytest.approx(r["loss"], rel=5e-3)
        assert p["img_per_s"] == (pytest.approx(r["img_per_s"], rel=5e-3) if "img_per_s" in r else None)
    assert any(p["img_per_s"] for p in parsed)
    last = out.strip().splitlines()[-1]
    assert last == contract.finished_line(str(TINY), str(workdir)) and last.startswith(contract.FINISHED)
    found = glob.glob(str(workdir.joinpath(*contract.CHECKPOINT_GLOB)))
    assert sorted(Path(f).relative_to(workdir).as_posix() for f in found) == [
        "ft32/checkpoints/4",
        "ft32/checkpoints/6",
        "pretrain16/checkpoints/12",
        "pretrain16/checkpoints/8",
    ]


OPENVISION = [  # what the six OpenVision recipes set (recipes/b16.toml): its towers, decoder and loss
    "model.class_token=true",
    "model.norm_after_pool=true",
    "model.activation=gelu",
    "model.text_activation=gelu_tanh",
    "model.pixel_norm=imagenet",
    "model.decoder_style=queries",
    "loss.contrast_recaption=true",
    "loss.max_temperature=inf",
]


def test_openvisions_architecture_and_loss_train_end_to_end(trainer, tmp_path):
    # remat "auto": the least recomputation that fits; a CPU states no memory limit, so none (the plan's test steps)
    out = trainer.run(tmp_path, *OPENVISION, "model.remat=auto", recipe=one_stage_recipe(tmp_path), base=ONE_STAGE)
    assert "stage pretrain16: remat none (auto" in out
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["stage"] for r in records] == ["pretrain16"] * 12  # (stage hand-over: the reference and its drills)
    for r in records:  # the contrastive term is the mean of the image's contrast with either text
        assert r["contrastive"] == pytest.approx((r["contrastive_alt"] + r["contrastive_recaption"]) / 2, rel=1e-5)
        assert np.isfinite(r["caption"])
    assert records[11]["loss"] < records[0]["loss"]  # it learns


def test_started_again_when_done_it_trains_nothing(reference, trainer, tmp_path):
    workdir, _, records = reference
    workdir = Path(shutil.copytree(workdir, tmp_path / "done"))  # the shared reference stays as it was
    out = trainer.run(workdir)
    assert "done: every stage" in out and "resuming" not in out
    assert len(read_jsonl(workdir / "metrics.jsonl")) == len(records)


def test_kill_9_then_resume_continues_exactly(reference, trainer, tmp_path):
    proc = trainer.start(tmp_path)
    wait_for_step(tmp_path, proc, 6)  # past the checkpoint at step 4 ...
    wait_for_checkpoint(tmp_path, proc, "pretrain16", 4)  # ... and its save committed (it is written asynchronously)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    out = trainer.run(tmp_path)
    assert "resuming at step" in out
    got, want = losses(read_jsonl(tmp_path / "metrics.jsonl")), losses(reference[2])
    assert sorted(got) == sorted(want)
    for step in want:  # the same batches in the same order from the same state: the same losses
        assert got[step] == pytest.approx(want[step], rel=1e-6, abs=1e-6), step


def test_a_bucket_workdir_killed_and_resumed_continues_exactly(reference, trainer, bucket):
    """The same drill with the workdir in a bucket (the GCS emulator): checkpoints, metrics, the resume and the
    compilation cache (the trainer's default: next to the workdir) all go through gs://."""
    workdir = f"{bucket}/run"
    proc = trainer.start(workdir, shared_cache=False)
    wait_for_checkpoint(workdir, proc, "pretrain16", 4)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert storage.glob(f"{bucket}/compile_cache/*"), "the first start wrote its programs into the bucket"
    out = trainer.run(workdir, shared_cache=False)
    assert "resuming at step" in out
    # the restart read its train step from there instead of compiling it again
    first = re.search(r"stage pretrain16: first step after [\d.]+ s \((\d+) of (\d+) programs so far read", out)
    assert first and int(first.group(1)) >= 1, out[-3000:]
    got, want = losses(read_jsonl(f"{workdir}/metrics.jsonl")), losses(reference[2])
    assert sorted(got) == sorted(want)
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-6, abs=1e-6), step
    assert committed_steps(storage.at(workdir) / "ft32") == [4, 6]
    assert len(storage.glob(f"{workdir}/tensorboard/events.out.tfevents.*")) == 2  # one per start


def test_a_finished_stage_hands_its_params_to_the_next(reference, trainer, tmp_path):
    """Stage 0 trained by a one-stage recipe; the two-stage recipe then starts stage 1 from its final params."""
    workdir = tmp_path / "run"
    trainer.run(workdir, recipe=one_stage_recipe(tmp_path), base=ONE_STAGE)
    out = trainer.run(workdir)
    assert "stage pretrain16" not in out and "stage ft32: 6 steps" in out
    got, want = losses(read_jsonl(workdir / "metrics.jsonl")), losses(reference[2])
    assert got == pytest.approx(want, rel=1e-6, abs=1e-6)


def test_recipe_errors_are_one_line_before_any_training(trainer, tmp_path):
    proc = trainer.start(tmp_path, "stages.1.resolution=4")
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert out.strip() == (
        "Error: --set stages.1.resolution=4: stages[1].resolution = 4 is smaller than the patch size 8 of"
        ' model.image = "Mu/8": at least 8 px'
    )
    proc = trainer.start(tmp_path, devices=5)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert out.strip().splitlines()[-1] == (
        "Error: stages[0].global_batch = 16 (/ grad_accum 1 = 16) is not divisible by 5 devices"
    )


# what the two hosts' trainers are told: the synced tree's identity, as tpuctl passes it
TWO_HOSTS_CODE = {"tree": "0123abcd" * 8, "files": 3}
# no periodic save (a bucket save from both hosts costs seconds a step here): the stop's is the one resumed
STOP_ONLY = [*(o for o in ONE_STAGE if not o.startswith("checkpoint.every_steps")), "checkpoint.every_steps=1000"]


def copy_tree(source: str | Path, dest: str | Path) -> None:
    """Every file under `source` to the same place under `dest` (a local directory or a gs:// prefix, either way)."""
    for path in storage.at(source).iterdir():  # epath's rglob refuses gs:// (an RPC per directory, it says)
        if path.is_dir():
            copy_tree(path, f"{dest}/{path.name}")
            continue
        target = storage.at(f"{dest}/{path.name}")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(path.read_bytes())


@pytest.fixture
def two_hosts_stopped(xla_cache, gcs, bucket) -> Path:
    """2 processes x 1 CPU device (fsdp 2: every parameter split across the hosts) through jax.distributed (gloo
    collectives), as two hosts of a pod with their workdir in a bucket, SIGTERMed together after step 3 (a preempted
    pod): made once per test run (the stop, then its resume, are two tests of a minute's work between them). Its
    directory: workdir/ (the bucket's workdir as the two left it, copied: another xdist worker has its own bucket),
    recipe one_stage.toml, run.json (each process's exit code and output)."""

    def build(root: Path) -> None:
        recipe = one_stage_recipe(root)
        workdir = f"{bucket}/two hosts stopping"
        coordinator = f"127.0.0.1:{free_port()}"
        trainer = Trainer(xla_cache)
        try:
            procs = [
                trainer.start(
                    workdir,
                    "mesh.fsdp=2",  # each parameter split over the two hosts' devices
                    devices=1,
                    recipe=recipe,
                    base=STOP_ONLY,
                    extra=["--coordinator", coordinator, "--num-processes", "2", "--process-id", str(i)],
                    env={contract.CODE_ENV: json.dumps(TWO_HOSTS_CODE)},
                )
                for i in range(2)
            ]
            seen = wait_for_line(procs[0], "pretrain16 3 ")
            for proc in procs:
                proc.send_signal(signal.SIGTERM)
            outs = [proc.communicate(timeout=120)[0] for proc in procs]
        finally:
            trainer.stop_all()
        outs[0] = seen + outs[0]
        (root / "run.json").write_text(json.dumps({"codes": [p.returncode for p in procs], "outs": outs}))
        copy_tree(workdir, root / "workdir")

    return once_per_run("two-hosts-stopped", build)


def test_two_processes_stop_together_on_preemption(two_hosts_stopped, reference):  # the save first (no reference)
    """The two hosts (two_hosts_stopped) train the same losses as one device; SIGTERM to both -> both save one
    checkpoint into the bucket at one agreed step, right there (the run has no periodic save), with each host's data
    position, and exit cleanly."""
    run = json.loads((two_hosts_stopped / "run.json").read_text())
    outs = run["outs"]
    assert run["codes"] == [0, 0], outs[0][-2000:] + outs[1][-2000:]
    workdir = two_hosts_stopped / "workdir"
    records = read_jsonl(workdir / "metrics.jsonl")  # host 0 writes the metrics
    last = records[-1]["stage_step"]
    assert last < 12, "the run ended before the preemption: nothing was resumed"
    assert f"preempted: saved stage pretrain16 step {last}/12" in outs[0]
    stage = workdir / "pretrain16"
    # saved right at the step it stopped, and nothing else: the copy holds every step directory the bucket had
    assert committed_steps(stage) == [last]
    assert (stage / "checkpoints" / str(last) / COMMIT_MARKER).exists()  # committed in the bucket
    meta = json.loads((stage / "checkpoints" / str(last) / "meta" / "metadata").read_text())
    assert meta["data"] == [{"batch": last}] * 2  # both hosts' data positions
    want = losses(reference[2][:12])
    # the same mathematics over other device counts: equal up to the order of float sums
    assert losses(records) == pytest.approx({s: want[s] for s in range(1, last + 1)}, rel=2e-4)


def test_a_two_host_save_resumes_on_another_mesh(reference, trainer, two_hosts_stopped, bucket):
    """One process on 2 devices (data 2: every parameter whole on each) resumes from the two hosts' save in a
    bucket: the state split across 2 hosts restores onto the new mesh and the stage ends where the uninterrupted
    run does; each start
    recorded the code tpuctl named (contract.CODE_ENV) and where it started. The first stage alone: each mesh compiles
    its own programs, and the hand-over to the next stage is tested above."""
    last = read_jsonl(two_hosts_stopped / "workdir" / "metrics.jsonl")[-1]["stage_step"]
    workdir = f"{bucket}/two hosts"
    copy_tree(two_hosts_stopped / "workdir", workdir)  # into this test's bucket, as the two hosts left it
    recipe = two_hosts_stopped / "one_stage.toml"
    code_env = {contract.CODE_ENV: json.dumps(TWO_HOSTS_CODE)}
    out = trainer.run(workdir, devices=2, recipe=recipe, base=STOP_ONLY, env=code_env)
    assert f"resuming at step {last}/12" in out
    want = losses(reference[2][:12])
    got = losses(read_jsonl(f"{workdir}/metrics.jsonl"))
    assert sorted(got) == sorted(want)
    assert got == pytest.approx(want, rel=2e-4)
    starts = json.loads(storage.at(f"{workdir}/{contract.CODE_FILE}").read_text())
    code = TWO_HOSTS_CODE
    assert [(s["stage"], s["step"], s["tree"], s["files"]) for s in starts] == [
        ("pretrain16", 0, code["tree"], 3),
        ("pretrain16", last, code["tree"], 3),
    ]
