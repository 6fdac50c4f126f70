"""`tpuctl run` forwards WANDB_API_KEY from this machine's environment to every trainer and shows it nowhere: not in
--dry-run (masked), tpuctl's output, the run's log, the run registry, a file left in the run directory, nor on any
process's command line while the trainers run. On a real stand-in pod (sshd workers): the key is read back from the
running trainers' own environment (/proc/PID/environ; the stand-in workers share this machine's process ids)."""

from __future__ import annotations

import contextlib
import json
import secrets
import sys
from pathlib import Path

from standins import image, wait_until
from standins.pod import RUN_RECIPE

from tpuctl import launch, remote
from tpuctl.config import Settings
from tpuctl.registry import RunRecord

# Random, so it cannot be anywhere by chance; quotes, $, a backquote, a backslash and spaces, so a shell that
# parsed it anywhere would break it.
TOKEN = secrets.token_hex(12)
KEY = f'wb-{TOKEN} it\'s "$HOME" `id` \\ ok'


def shown_nowhere(text: str) -> bool:
    return TOKEN not in text


def every_command_line() -> list[bytes]:
    lines = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):  # gone meanwhile
            lines.append(cmdline.read_bytes())
    return lines


def trainer_environ(run_dir: Path, timeout: float = 30) -> dict[str, str]:
    """The environment of the trainer whose pid the run directory names, once it is the trainer (after exec)."""
    pid = (run_dir / "pid").read_text().strip()
    proc = Path("/proc", pid)
    try:  # the pane's sh, until it execs the trainer
        wait_until(lambda: b"trainer" in (proc / "cmdline").read_bytes(), timeout, f"pid {pid} became the trainer")
        raw = (proc / "environ").read_bytes()
    except FileNotFoundError:
        raise AssertionError(f"the trainer (pid {pid}) is gone: {(run_dir / 'log').read_text()[-3000:]}") from None
    return dict(item.decode().split("=", 1) for item in raw.split(b"\0") if item)


def test_the_key_reaches_every_trainer_and_is_shown_nowhere(pod, project):
    image.require_matching_python()
    image.install(pod.fleet)  # the trainer's python on the workers (no `prepare`: the trainer need only start)
    env = {"WANDB_API_KEY": KEY}
    run = [RUN_RECIPE, "--workdir", "/tmp/w", "--env", "JAX_PLATFORMS=cpu", "--set", "stages.0.samples=64000"]

    dry = pod.tpuctl("run", *run, "--dry-run", env=env, cwd=project)
    assert dry.returncode == 0 and shown_nowhere(dry.stdout + dry.stderr)
    assert dry.stdout.count("WANDB_API_KEY=****") == 2  # one line per worker
    dry = pod.tpuctl("run", *run, "--dry-run", "--json", env=env, cwd=project)
    plans = json.loads(dry.stdout)["workers"]
    assert shown_nowhere(dry.stdout) and [p["secret_env"] for p in plans] == [["WANDB_API_KEY"]] * 2
    assert all(" 'WANDB_API_KEY=****' " in p["command"] for p in plans)  # quoted: a shell would glob ****

    r = pod.tpuctl("run", *run, env=env, cwd=project, timeout=120)
    try:
        assert r.returncode == 0, r.stdout + r.stderr
        assert shown_nowhere(r.stdout + r.stderr)
        for worker in pod.fleet.workers:
            run_dir = worker.path("/root/.tpuctl/runs/tiny_run")
            environ = trainer_environ(run_dir)
            assert environ["WANDB_API_KEY"] == KEY, worker.ip  # exactly, quotes and all
            assert environ["JAX_PLATFORMS"] == "cpu"
            log = (run_dir / "log").read_text()
            assert " 'WANDB_API_KEY=****' " in log.splitlines()[0] and shown_nowhere(log)
            assert not (run_dir / "secrets").exists()  # the pane's shell deleted it before the trainer started
            assert all(shown_nowhere(p.read_text(errors="replace")) for p in run_dir.iterdir())
        assert not [c for c in every_command_line() if TOKEN.encode() in c]  # `ps` shows it nowhere
        records = list((pod.home / ".local" / "state" / "tpuctl" / "runs").glob("*.json"))
        assert records and all(shown_nowhere(p.read_text()) for p in records)
        assert "WANDB_API_KEY" not in json.loads(records[0].read_text())["env"]
    finally:
        pod.tpuctl("stop", "--grace", "5", timeout=60)


def test_without_the_key_nothing_is_forwarded_and_the_start_command_never_holds_it(tmp_path, monkeypatch):
    """The words that travel as the remote command line (SSH's exec request, the worker's process list) name the
    secret; its value goes only to the start's stdin."""
    settings = Settings()
    target = launch.local_target(settings, tmp_path)
    record = RunRecord(name="r", recipe="r.toml", workdir="/w", target="local", cwd="/p", env={"A": "1"})
    worker = target.fleet.workers[0]
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    plan = launch.worker_plan(settings, target, record, worker)
    assert plan["secret_env"] == [] and launch.secret_env() == {}
    assert (
        launch.describe_plan(plan)
        == f"cd /p && env A=1 PYTHONUNBUFFERED=1 {sys.executable} -m trainer r.toml --workdir /w"
    )
    monkeypatch.setenv("WANDB_API_KEY", KEY)
    plan = launch.worker_plan(settings, target, record, worker)
    assert plan["secret_env"] == ["WANDB_API_KEY"] and launch.secret_env() == {"WANDB_API_KEY": KEY}
    assert shown_nowhere(remote.run_command("start", **plan)) and shown_nowhere(json.dumps(plan))
    assert launch.describe_plan(plan) == (
        f"cd /p && env A=1 PYTHONUNBUFFERED=1 'WANDB_API_KEY=****' {sys.executable} -m trainer r.toml --workdir /w"
    )


def test_the_key_as_an_env_flag_is_refused_without_echoing_it(pod, project):
    """--env WANDB_API_KEY=... would store the key with the run and show it: refused, in one line, before anything."""
    r = pod.tpuctl("run", RUN_RECIPE, "--local", "--dry-run", "--env", f"WANDB_API_KEY={KEY}", cwd=project)
    assert r.returncode == 2, r.stdout + r.stderr
    assert shown_nowhere(r.stdout + r.stderr)
    assert r.stderr.startswith("tpuctl: error: --env WANDB_API_KEY=... would record the secret with the run and show")
    assert "export WANDB_API_KEY here instead" in r.stderr
