"""tpuctl run / status / logs / stop / attach on real stand-ins: two sshd workers whose trainers (real `python -m
trainer` processes in tmux) join through jax.distributed and checkpoint with orbax into a directory both see; the
stop-and-resume drill runs the stand-in trainer (standins/trainer_main.py), the trainer's own resume being
test_train's.

What stands in for what:
- the workdir: a gs:// path in a GCS emulator the workers reach (standins/gcs.py), or a directory under /var/tmp
  that every worker sees at the same path (a bucket mount); the XLA cache is there too; the workers' own /root and
  /tmp are private, as on separate VMs;
- PyPI: `tpuctl prepare` runs for real (venv, `pip install -e PROJECT[train]`, offline), with the trainer's
  dependencies already present, as on a VM image that ships them (standins/image.py: each worker's venv sees this
  machine's site-packages; the workers cannot download 1.5 GB of wheels here).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import standins
from conftest import once_per_run
from standins import image, wait_until, warm
from standins.pod import RUN_RECIPE
from test_chips import alive, holds
from test_data import write_idx
from test_train import FAST

from tpuctl import codetree, remote
from tpuctl.config import Settings
from tpuctl.registry import slug
from tpuctl.sync import rsync_filters
from trainer import contract, storage
from trainer.data.prepare import read_idx
from trainer.metrics import read_jsonl

ROOT = Path(__file__).resolve().parents[1]
RECIPE = RUN_RECIPE  # the tests' tiny recipe, its first stage alone (the `project` fixture writes it)
VENV = "/root/tpuctl/.venv"  # what `tpuctl prepare` makes on a worker (remote_dir ~/tpuctl)
# test_train's CPU-sized towers (FAST), without the decoder: two trainers share this machine's two cores
SMALL = ["model.decoder="]
# of batch 16, in test_babysit's drill (its stand-in trainer): long enough for a kill of babysit and a preemption to
# land mid-stage
STEPS = 80
# of batch 16, in the stop-and-resume drill (the stand-in trainer, 8 s): the stop follows step 3 at once
DRILL_STEPS = 40


def sets(samples: int = 192, checkpoint_every: int = 4) -> list[str]:
    """--set arguments: the trainer tests' quick settings, the small towers, `samples` in the one stage, a checkpoint
    every `checkpoint_every` steps (and at a stop or the end)."""
    skip = ("stages.1", "stages.0.samples", "model.decoder", "checkpoint.every_steps")
    items = [i for i in FAST if not i.startswith(skip)] + SMALL
    items += [f"stages.0.samples={samples}", f"checkpoint.every_steps={checkpoint_every}"]
    return [word for item in items for word in ("--set", item)]


def prepared(pod, project):
    """Sync the project to both workers and `tpuctl prepare` it (offline, on the stand-in VMs' image).

    The test run's first prepare here installs for real (as each of test_prepare's does); its venv is kept, and the
    later drills' workers start from a copy of it, as a VM prepared before would: their `tpuctl prepare` then finds
    the venv up to date (its stamp) and returns at once, instead of spending 15 s on a pip install tested already."""
    image.require_matching_python()
    image.install(pod.fleet)
    assert pod.tpuctl("sync", str(project)).returncode == 0

    def prepare() -> list[dict]:
        r = pod.tpuctl("prepare", "--pip-args", image.OFFLINE_PIP_ARGS, "--json", timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
        return json.loads(r.stdout)

    def first(keep: Path) -> None:
        prepare()
        shutil.copytree(pod.fleet.workers[0].path(VENV), keep / "venv", symlinks=True)

    template = once_per_run("prepared-venv", first) / "venv"
    copy_prepared_venv(template, [w for w in pod.fleet.workers if not (w.path(VENV) / ".tpuctl-prepared").exists()])
    assert not any(w["changed"] for w in prepare()), "a copy of a prepared venv is up to date"


def copy_prepared_venv(venv: Path, workers) -> None:
    """`venv`, a venv `tpuctl prepare` made on a stand-in worker, in place of the image's on `workers` (what a VM
    made from the disk of a prepared one holds)."""
    for worker in workers:
        shutil.rmtree(worker.path(VENV))
        shutil.copytree(venv, worker.path(VENV), symlinks=True)
        image.link_site(worker)


def env_args(shared, heartbeat=30):
    """The trainers' environment on stand-in workers: the test run's XLA cache (under /var/tmp, which they see), every
    program kept, as this session's environment says (conftest), JAX on the CPU, a heartbeat."""
    return [
        "--env",
        f"TRAINER_COMPILE_CACHE={os.environ['TRAINER_COMPILE_CACHE']}",
        "--env",
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0",
        "--env",
        "JAX_PLATFORMS=cpu",
        "--env",
        f"XLA_FLAGS={os.environ['XLA_FLAGS']}",
        "--env",
        f"TRAINER_HEARTBEAT_TIMEOUT={heartbeat}",
    ]


def status(pod, name=None):
    r = pod.tpuctl("status", *([name] if name else []), "--json")
    return r.returncode, json.loads(r.stdout)["workers"]


def ended_status(pod, name: str) -> tuple[int, list[dict]]:
    """`status` once every worker's trainer has ended: `logs --follow` returns when worker 0's has, and another worker
    may still be writing its exit status ("exiting") or finishing its last step."""

    def ended():
        code, workers = status(pod, name)
        return (code, workers) if not {w["state"] for w in workers} & {"starting", "running", "exiting"} else None

    return wait_until(ended, 60, f"every trainer of {name!r} ended", poll=0.5)


def attached_screen(pod, name: str, scratch: Path, want: str) -> str:
    """`tpuctl attach NAME` in a terminal (a tmux pane of a server of the test's own): the screen once `want` shows."""
    env = {k: v for k, v in pod.env.items() if k != "TMUX"} | {"TMUX_TMPDIR": str(scratch)}
    command = shlex.join([pod.tpuctl_path, "attach", name])
    tmux = ["tmux", "-L", "terminal"]
    try:
        subprocess.run([*tmux, "new-session", "-d", "-x", "150", "-y", "40", command], env=env, check=True)

        def screen() -> str:
            return subprocess.run([*tmux, "capture-pane", "-p"], env=env, capture_output=True, text=True).stdout

        # the first run compiles its step first
        return wait_until(lambda: want in (shown := screen()) and shown, 180, f"{want!r} on screen", screen, 0.2)
    finally:
        subprocess.run([*tmux, "kill-server"], env=env, capture_output=True)


def wait_for_step(path: Path, step: int, timeout: float = 240, detail: Callable[[], str] | None = None) -> None:
    def reached() -> bool:
        return path.exists() and any(r["step"] >= step for r in read_jsonl(path))

    wait_until(reached, timeout, f"step {step} in {path}", detail, poll=0.2)


def logged_step(worker, name: str) -> int:
    """The last step `worker`'s trainer of run `name` logged (its run log, read on the VM: a bucket's metrics.jsonl
    lags), by the contract's progress lines; 0 before any."""
    log = worker.path(f"/root/.tpuctl/runs/{slug(name)}/log")
    lines = log.read_text().splitlines() if log.exists() else []
    steps = [p["step"] for p in map(contract.parse_progress, lines) if p]
    return int(steps[-1]) if steps else 0


def wait_for_logged_step(worker, name: str, step: int, timeout: float = 240) -> None:
    def log_tail() -> str:
        log = worker.path(f"/root/.tpuctl/runs/{slug(name)}/log")
        return "its log ends:\n" + (log.read_text()[-3000:] if log.exists() else "(no log)")

    wait_until(lambda: logged_step(worker, name) >= step, timeout, f"run {name!r} logged step {step}", log_tail, 0.2)


def test_two_workers_stop_and_resume_a_run_by_its_name(bucket_pod, project, shared, bucket):
    """tpuctl's side of a pod's stop and resume, with the stand-in trainer (standins/trainer_main.py: the trainer's
    log lines, checkpoint layout and SIGTERM save, a fifth of a second per step, no JAX): both hosts stopped, the
    checkpoint found in the bucket by the workers' real `python -m trainer.workdir`, the same name started again
    resumes from it in the recorded workdir and is followed to its end. The real trainer's side of the same drill
    (two hosts preempted save one checkpoint into a bucket and resume to the uninterrupted losses, each start's code
    recorded) is test_train's two-process test; the real trainer launched by tpuctl on a pod, the dead-worker test's."""
    pod = bucket_pod
    shutil.copy(Path(standins.__file__).parent / "trainer_main.py", project / "trainer" / "__main__.py")
    prepared(pod, project)
    drill = sets(16 * DRILL_STEPS, checkpoint_every=1000)  # no periodic checkpoint: the stop's is the one resumed
    common = [RECIPE, "--no-sync", *env_args(shared), *drill]
    # a run with a name the remote shell must not split, in a bucket, stopped mid-stage (what a running run shows,
    # and a second start of it refused, are the dead-worker test's: its run has no end)
    name = 'it\'s a "run"'
    workdir = f"{bucket}/work dir"
    r = pod.tpuctl("run", *common, "--name", name, "--workdir", workdir, cwd=project, timeout=120)
    assert r.returncode == 0, r.stderr
    for worker in pod.fleet.workers:  # each past its start (a SIGTERM before the trainer's handler just ends it)
        wait_for_logged_step(worker, name, 3)
    r = pod.tpuctl("stop", name, "--grace", "120", "--json", timeout=200)
    logs = "\n".join(  # what each trainer said last, for a failure here
        f"w{w.index}'s log ends:\n" + w.path(f"/root/.tpuctl/runs/{slug(name)}/log").read_text()[-1500:]
        for w in pod.fleet.workers
    )
    assert r.returncode == 0, r.stdout + r.stderr + logs
    assert [w["state"] for w in json.loads(r.stdout)["workers"]] == ["stopped", "stopped"], r.stdout + logs
    code, workers = status(pod, name)
    seen = [(w["state"], w.get("exit_code"), w.get("last_line"), w.get("error")) for w in workers]
    assert [w["state"] for w in workers] == ["stopped", "stopped"] and not any(w["session"] for w in workers), (
        f"{seen}\n{logs}"
    )
    saved = workers[0]["checkpoint"]  # read from the bucket by each worker's venv (python -m trainer.workdir)
    assert workers[1]["checkpoint"] == saved
    stopped_at = int(saved.split("/")[1])
    assert storage.at(f"{workdir}/pretrain16/checkpoints/{stopped_at}/commit_success.txt").exists()
    assert saved.startswith("pretrain16/") and 3 <= stopped_at < DRILL_STEPS, saved
    logs = pod.tpuctl("logs", name, "--workers", "all", "-n", "3")
    assert f"[w0] preempted: saved stage pretrain16 step {stopped_at}/{DRILL_STEPS}" in logs.stdout, logs.stdout

    # the same name again: the recorded workdir, resumed from that checkpoint, followed to its end; with --prepare
    # and the pip arguments the first prepare used (other ones make it install again), as a user who is not sure
    # would start it: the workers are prepared before the trainers start
    offline = {"TPUCTL_PIP_ARGS": image.OFFLINE_PIP_ARGS}
    r = pod.tpuctl("run", *common, "--name", name, "--prepare", env=offline, cwd=project, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stderr.index("Preparing 2 workers") < r.stderr.index("Started run"), r.stderr
    r = pod.tpuctl("logs", name, "--follow", timeout=400)
    assert r.returncode == 0 and r.stdout.rstrip().endswith(f"checkpoints in {workdir}"), r.stdout[-3000:]
    assert f"resuming at step {stopped_at}/{DRILL_STEPS}" in r.stdout
    code, workers = ended_status(pod, name)
    assert code == 0 and [w["state"] for w in workers] == ["done", "done"]
    assert [w["checkpoint"] for w in workers] == [f"pretrain16/{DRILL_STEPS}"] * 2


def test_a_dead_worker_stops_the_others_and_status_names_it(pod, project, shared):
    prepared(pod, project)
    many = sets(samples=100_000, checkpoint_every=100_000)  # would run for long; no save (nothing here reads one)
    name = 'a "long" run'  # a name the remote shell must not split
    start = [RECIPE, "--name", name, "--no-sync", *env_args(shared, heartbeat=10), *many]
    start += ["--workdir", str(shared / "w")]
    r = pod.tpuctl("run", *start, cwd=project)
    assert r.returncode == 0, r.stderr
    logs = lambda: pod.tpuctl("logs", name, "--workers", "all", "-n", "30").stdout  # noqa: E731
    wait_for_step(shared / "w" / "metrics.jsonl", 2, detail=logs)
    # while it runs: its log in worker 0's tmux pane, both hosts stepping, a second start refused and harmless
    attached_screen(pod, name, shared, "  loss ")
    code, workers = status(pod, name)
    assert code == 0 and [w["state"] for w in workers] == ["running", "running"], workers
    assert workers[0]["progress"]["stage"] == "pretrain16" and workers[0]["progress"]["step"] >= 2
    assert workers[1]["progress"]["step"] >= 1  # every host logs its steps: a lagging worker would show
    assert all(w["session"] for w in workers)
    again = pod.tpuctl("run", *start, cwd=project, timeout=120)
    assert again.returncode == 2 and f"w1 ({pod.fleet.workers[1].ip}): run {name!r} is already running" in again.stderr
    workers = status(pod, name)[1]
    assert [w["state"] for w in workers] == ["running", "running"], workers  # their last lines say why not
    pod.fleet.workers[1].crash()  # the VM is gone: its sshd, tmux and trainer

    def ended():  # exiting: ended, its exit status on its way
        answer = status(pod, name)
        return answer if answer[1][0]["state"] not in ("running", "exiting") else None

    code, workers = wait_until(ended, 120, "worker 0's trainer ended", poll=1)
    assert workers[0]["state"] == "failed", workers[0]  # no silent hang
    assert workers[0]["exit_code"] not in (0, None)
    assert workers[1]["state"] == "unknown" and "refused" in workers[1]["error"]
    assert code == 3  # a worker unknown
    table = pod.tpuctl("status", name)
    assert "w1" in table.stderr and "refused" in table.stderr and "failed (exit" in table.stdout


def test_busy_chips_are_refused_and_force_kills_the_holder(pod, project):
    globs = "/tmp/dev/accel*"
    for w in pod.fleet.workers:
        (w.path("/tmp/dev")).mkdir()
        (w.path("/tmp/dev/accel0")).write_bytes(b"")
    holder = pod.fleet.workers[1].spawn(["python3", "-c", "import time; f = open('/tmp/dev/accel0'); time.sleep(600)"])
    wait_until(lambda: holds(holder, "accel0"), 5, "the holder opened accel0")
    env = {"TPUCTL_DEVICE_GLOBS": globs}
    r = pod.tpuctl("run", RECIPE, *sets(), "--workdir", "/tmp/w", env=env, cwd=project, timeout=120)
    assert r.returncode == 2 and f"the chips of w1 ({pod.fleet.workers[1].ip}) are busy" in r.stderr, r.stderr
    # no libtpu here (test_plan's tests have one): the plan is skipped, said, and the run goes on to the chips
    assert f"Not checked whether {RECIPE} fits a v4-32 chip: libtpu is not installed here" in r.stderr
    assert "--force" in r.stderr and str(holder) in r.stdout
    assert "no run was started" in pod.tpuctl("status").stderr  # nothing was recorded
    # --force kills the holder first; here the start then stops at the missing venv, named on each worker
    r = pod.tpuctl("run", RECIPE, *sets(), "--workdir", "/tmp/w", "--force", env=env, cwd=project, timeout=120)
    assert not alive(holder), r.stdout + r.stderr
    assert r.returncode == 2 and "tpuctl/.venv/bin/python does not exist: run `tpuctl prepare` first" in r.stderr
    assert "(or `tpuctl run --prepare`)" in r.stderr
    # the dry run says what would run where, and starts nothing
    r = pod.tpuctl("run", RECIPE, "--workdir", "/tmp/w", "--dry-run", "--json", env=env, cwd=project)
    plan = json.loads(r.stdout)
    assert [w["env"]["TRAINER_PROCESS_ID"] for w in plan["workers"]] == ["0", "1"]
    assert plan["workers"][1]["env"]["TRAINER_COORDINATOR"] == f"{pod.fleet.workers[0].ip}:{pod.coordinator_port}"
    assert plan["workers"][0]["argv"][1:4] == ["-m", "trainer", RECIPE]


def test_a_start_that_fails_on_one_worker_stops_the_others(pod, project):
    """One launch path (babysit's rounds take it too): worker 1 cannot start its trainer, so the one worker 0 did
    start is stopped again (a half-started pod would wait for the missing worker), and no run is recorded."""
    assert pod.tpuctl("sync", str(project)).returncode == 0
    python = pod.fleet.workers[0].path("~/tpuctl/.venv/bin/python")  # worker 0 alone looks prepared
    python.parent.mkdir(parents=True)
    python.write_text("#!/bin/sh\nexec sleep 600\n")
    python.chmod(0o755)
    session = remote.session_name(slug("halfway"))
    r = pod.tpuctl("run", RECIPE, "--name", "halfway", "--no-sync", "--workdir", "/tmp/w", cwd=project, timeout=120)
    assert r.returncode == 2, r.stdout + r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(f"tpuctl: error: start failed on w1 ({pod.fleet.workers[1].ip})"), r.stderr
    assert "run `tpuctl prepare` first" in last and "run 'halfway' was not started" in last
    trainer = int(pod.fleet.workers[0].path(f"~/.tpuctl/runs/{slug('halfway')}/pid").read_text())  # it did start
    assert not alive(trainer)  # and was stopped (the workers share this machine's pids), with its session
    on_w0 = pod.tpuctl("exec", "--workers", "0", "--", f"! tmux has-session -t {session}")
    assert on_w0.returncode == 0, on_w0.stdout + on_w0.stderr
    assert "no run was started" in pod.tpuctl("status").stderr


def test_recipe_mistakes_are_one_line_before_anything_starts(pod, project, gcs):
    r = pod.tpuctl("run", "recipes/nope.toml", cwd=project)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "recipes/nope.toml' does not exist" in r.stderr
    r = pod.tpuctl("run", RECIPE, "--set", "stages.0.resolution=5", cwd=project)
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert "error: --set stages.0.resolution=5: stages[0].resolution = 5 is smaller" in r.stderr  # the flag's
    outside = project.parent / "elsewhere.toml"
    shutil.copy(project / RECIPE, outside)
    r = pod.tpuctl("run", str(outside), cwd=project)
    assert r.returncode == 2 and "outside the project" in r.stderr
    r = pod.tpuctl("run", RECIPE, "--env", "1BAD=x", cwd=project)
    assert r.returncode == 2 and "--env '1BAD=x' is not NAME=VALUE" in r.stderr
    r = pod.tpuctl("run", RECIPE, "--workdir", "gs:/bucket/b16", cwd=project)  # a slash eaten on the way
    assert r.returncode == 2 and "--workdir gs:/bucket/b16 is not a bucket URL" in r.stderr and "gs://" in r.stderr
    r = pod.tpuctl("run", "recipes/b16.toml", "--dry-run", cwd=project)  # as shipped: gs://YOUR-BUCKET/...
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert "text.vocab = 'gs://YOUR-BUCKET/bert_base_vocab_bos_eos.txt' is a placeholder (and 4 more:" in r.stderr
    assert "--set text.vocab=gs://" in r.stderr
    for local in ([], ["--local"]):  # a bucket workdir reaches the trainer as it is, also on this machine
        r = pod.tpuctl("run", RECIPE, "--workdir", "gs://bucket/b16", *local, "--dry-run", "--json", cwd=project)
        assert json.loads(r.stdout)["workers"][0]["argv"][3:6] == [RECIPE, "--workdir", "gs://bucket/b16"], r.stdout


def test_a_pod_runs_bucket_paths_are_read_from_here_before_anything_starts(pod, project, gcs, bucket):
    """What a pod run will read from Cloud Storage (tpuctl.bucket, through the emulator): a missing bucket, a glob
    that matches nothing, a file not copied up, a TFDS builder without the split, a directory that is no converted
    checkpoint, all named in one message before anything starts (nothing synced to any worker); once there, the run
    goes ahead; --no-check-paths skips the check; Cloud Storage out of reach is one line."""
    from google.cloud import storage as gcs_client

    text = (project / RECIPE).read_text()
    text = text.replace('source = "synthetic"', f'source = "tfds"\ntrain = "{bucket}/tfds/ds/1.0.0"\nsplit = "train"')
    text = text.replace("[text]\n", f'[text]\ntokenizer = "bert_wordpiece"\nvocab = "{bucket}/vocab.txt"\n')
    text += f'\n[[evals]]\nkind = "zeroshot"\nname = "inet"\npath = "{bucket}/inet/val-*.tfrecord"\n'
    text += f'\n[[evals]]\nkind = "retrieval"\nname = "coco"\npath = "{bucket}/coco/karpathy.json"\n'
    (project / "recipes" / "paths.toml").write_text(text)
    run = ["run", "recipes/paths.toml", "--set", f"stages.0.init_from={bucket}/imported"]
    r = pod.tpuctl(*run, "--workdir", "gs://no-such-bucket/runs", cwd=project)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr  # one line: the problems, then the fix
    assert "the workdir gs://no-such-bucket/runs: bucket gs://no-such-bucket does not exist (and 5 more:" in r.stderr
    assert "data.train, text.vocab, evals[0].path" in r.stderr and "copy the files there" in r.stderr
    assert not any(w.path("/root/tpuctl").exists() for w in pod.fleet.workers), "nothing synced"
    r = pod.tpuctl(*run, "--workdir", f"{bucket}/runs", cwd=project)
    assert f'data.train = "{bucket}/tfds/ds/1.0.0" is not a TFDS builder directory' in r.stderr, r.stderr

    prefix = bucket.removeprefix("gs://bucket/")
    store = gcs_client.Client(project="proj").bucket("bucket")
    info = {"splits": [{"name": "validation"}]}  # no "train"
    store.blob(f"{prefix}/tfds/ds/1.0.0/dataset_info.json").upload_from_string(json.dumps(info))
    for name in ("vocab.txt", "inet/val-0.tfrecord", "imported/model.toml"):
        store.blob(f"{prefix}/{name}").upload_from_string("")
    store.blob(f"{prefix}/coco/karpathy.json.bak").upload_from_string("")  # a neighbour is not the file
    r = pod.tpuctl(*run, "--workdir", f"{bucket}/runs", "--dry-run", cwd=project)
    assert r.returncode == 2, r.stderr
    assert f'data.split = "train": {bucket}/tfds/ds/1.0.0 has no split "train" (its splits: validation)' in r.stderr
    assert "(and 1 more: evals[1].path)" in r.stderr, r.stderr
    store.blob(f"{prefix}/coco/karpathy.json").upload_from_string("{}")
    info["splits"].append({"name": "train"})
    store.blob(f"{prefix}/tfds/ds/1.0.0/dataset_info.json").upload_from_string(json.dumps(info))
    r = pod.tpuctl(*run, "--workdir", f"{bucket}/runs", "--dry-run", cwd=project)
    assert r.returncode == 0, r.stderr
    assert f"--workdir {bucket}/runs" in r.stdout

    unreachable = {
        "TPUCTL_STORAGE_ENDPOINT": "http://127.0.0.1:9",
        "TPUCTL_API_TIMEOUT": "1",
    }  # a closed port: retried 1 s
    r = pod.tpuctl(*run, "--workdir", f"{bucket}/runs", "--dry-run", cwd=project, env=unreachable)
    assert r.returncode == 2 and "cannot reach Cloud Storage at http://127.0.0.1:9" in r.stderr, r.stderr
    assert "--no-check-paths" in r.stderr and "Traceback" not in r.stderr
    r = pod.tpuctl(
        *run, "--workdir", "gs://no-such-bucket/x", "--no-check-paths", "--dry-run", cwd=project, env=unreachable
    )
    assert r.returncode == 0, r.stderr


def test_a_bucket_your_account_may_not_read_names_the_role_and_the_way_past(pod, project):
    """Cloud Storage refusing your account (403): one line naming the path, the role that reads it and
    --no-check-paths (the TPU VMs' service account may read what you cannot). fake-gcs-server never refuses, so a
    loopback server answers every request as Cloud Storage answers one without storage.objects.list."""
    import http.server
    import threading

    class Refusing(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            message = "me@example.com does not have storage.objects.list access to the Google Cloud Storage bucket."
            error = {"message": message, "domain": "global", "reason": "forbidden"}  # the JSON API's error body
            body = json.dumps({"error": {"code": 403, "message": message, "errors": [error]}})
            self.send_response(403)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body.encode())

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Refusing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        refusing = {"TPUCTL_STORAGE_ENDPOINT": f"http://127.0.0.1:{server.server_port}"}
        r = pod.tpuctl("run", RECIPE, "--workdir", "gs://locked/runs", "--dry-run", cwd=project, env=refusing)
    finally:
        server.shutdown()
        server.server_close()
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "the workdir gs://locked/runs cannot be read with your credentials (me@example.com does not" in r.stderr
    assert "roles/storage.objectViewer" in r.stderr and "--no-check-paths" in r.stderr


FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture
def local_env(tmp_path):
    """This machine as the target, with its own home (run records, run dirs, XLA cache) and its own tmux server,
    which the test stops at the end (with any trainer still in it)."""
    home = tmp_path / "home"
    home.mkdir()
    env = {
        **os.environ,
        "HOME": str(home),
        "XDG_STATE_HOME": str(home / ".local" / "state"),
        "TMUX_TMPDIR": str(tmp_path),
        "JAX_PLATFORMS": "cpu",
    }
    env.pop("TMUX", None)
    yield env
    subprocess.run(["tmux", "kill-server"], env=env, capture_output=True, check=False)


def sent_files(project: Path) -> list[str]:
    """What `tpuctl sync` would send of `project` by default (rsync's own listing under sync's filters)."""
    filters = rsync_filters(Settings().sync_excludes)
    argv = ["rsync", "-a", "-n", "--out-format=%n", *filters, f"{project}/", "/nonexistent/"]
    out = subprocess.run(argv, capture_output=True, text=True, check=True)
    return [line for line in out.stdout.splitlines() if not line.endswith("/")]


def tpuctl_here(env, *args, cwd, timeout=60):
    return warm.tpuctl(list(args), env=env, cwd=cwd, timeout=timeout)


def test_the_local_target_trains_the_tiny_recipe_from_a_clean_checkout(project, local_env, tmp_path):
    assert (FASHION_MNIST / "train-images-idx3-ubyte.gz").exists(), "install Debian's dataset-fashion-mnist"
    # the real images, the first 4,000 of the training split and 1,000 of the test split: all the 30 steps below
    # read (3,840), prepared in a second instead of 20 (preparing the whole set is .ci/demo's; its format, test_data's)
    subset = tmp_path / "fashion-mnist"
    subset.mkdir()
    for split, count in (("train", 4000), ("t10k", 1000)):
        for kind in ("images-idx3", "labels-idx1"):
            name = f"{split}-{kind}-ubyte.gz"
            write_idx(subset / name, read_idx(FASHION_MNIST / name)[:count])
    from click.testing import CliRunner

    from trainer.data.prepare import main as prepare  # here, where TensorFlow is imported already (6 s of a process)

    done = CliRunner().invoke(prepare, ["fashion-mnist", str(subset), str(project / "data" / "fashion-mnist")])
    assert done.exit_code == 0, done.output
    recipe = project / "my recipes" / "tiny's run.toml"  # a path the remote shell must not split
    recipe.parent.mkdir()
    shutil.copy(project / "recipes" / "tiny.toml", recipe)
    workdir = tmp_path / "work dir"
    quick = ["--set", "stages.0.samples=3840", "--set", "stages.0.global_batch=128"]
    quick += ["--set", "stages.0.warmup_steps=10", "--set", "log.every_steps=10"]
    r = tpuctl_here(
        local_env, "run", str(recipe), "--local", "--name", "tiny 'demo'", "--workdir", str(workdir), *quick, "-f",
        cwd=project, timeout=600,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "done: every stage of my recipes/tiny's run.toml is trained" in r.stdout
    top1 = read_jsonl(workdir / "metrics.jsonl")[-1]["fashion_mnist/top1"]
    assert top1 > 0.5  # 30 steps on the real images (0.63), evaluated on 1,000 real images of the test split
    r = tpuctl_here(local_env, "status", "--json", cwd=tmp_path)
    (worker,) = json.loads(r.stdout)["workers"]
    assert r.returncode == 0 and worker["state"] == "done" and worker["checkpoint"] == "fmnist21/30"
    assert worker["progress"]["stage"] == "fmnist21" and worker["progress"]["step"] == 30
    # the log line's loss, to 3 significant digits
    assert worker["progress"]["loss"] == pytest.approx(read_jsonl(workdir / "metrics.jsonl")[-1]["loss"], rel=5e-3)
    # the code it trained: the tree a sync of this checkout would send, recorded with the run and in the workdir
    code = json.loads(r.stdout)["run"]["code"]
    assert code["tree"] == codetree.manifest(project, paths=sent_files(project)).tree_hash
    (start,) = json.loads((workdir / contract.CODE_FILE).read_text())
    assert start["tree"] == code["tree"] and start["stage"] == "fmnist21" and start["step"] == 0
    r = tpuctl_here(local_env, "logs", "tiny 'demo'", "-n", "1", cwd=tmp_path)
    assert r.stdout.startswith("done: every stage")
    r = tpuctl_here(local_env, "stop", "tiny 'demo'", cwd=tmp_path)  # a finished run: nothing to resume
    assert r.returncode == 0 and "had finished (every stage trained): nothing to stop or resume" in r.stderr
    assert "Resume with" not in r.stderr


def test_a_multi_worker_run_refuses_a_workdir_on_each_workers_own_disk(pod, project, gcs):
    """Checkpoints on every VM's own disk would be lost with the VMs (a preempted spot TPU is deleted): refused
    before anything starts, naming the fix; a bucket or a declared shared mount is fine."""
    r = pod.tpuctl("run", RECIPE, "--dry-run", cwd=project)  # the default workdir: ~/tpuctl-runs/NAME, per worker
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "~/tpuctl-runs/tiny_run is on each of the 2 workers' own disk" in r.stderr
    assert "--workdir gs://BUCKET/runs/tiny_run" in r.stderr and "workdir_root" in r.stderr
    assert "shared_dirs" in r.stderr
    r = pod.tpuctl("run", RECIPE, "--workdir", "/var/tmp/runs/x", "--dry-run", cwd=project)
    assert r.returncode == 0, r.stderr  # under shared_dirs (the stand-in pod declares /var/tmp shared)
    no_shared = {"TPUCTL_SHARED_DIRS": ""}
    r = pod.tpuctl("run", RECIPE, "--workdir", "/var/tmp/runs/x", "--dry-run", cwd=project, env=no_shared)
    assert r.returncode == 2 and "own disk" in r.stderr
    r = pod.tpuctl("run", RECIPE, "--dry-run", cwd=project, env={"TPUCTL_WORKDIR_ROOT": "gs://bucket/team-runs"})
    assert r.returncode == 0, r.stderr  # a team sets the bucket once
    assert "gs://bucket/team-runs/tiny_run" in r.stderr + r.stdout
    r = pod.tpuctl("run", RECIPE, "--set", "workdir=gs://bucket/own", "--dry-run", "--json", cwd=project)
    assert r.returncode == 0, r.stderr  # or the recipe names its own (workdir = "gs://...")
    assert json.loads(r.stdout)["run"]["workdir"] == "gs://bucket/own"
