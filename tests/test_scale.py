"""A v4-1024-sized pod: 128 stand-in workers (real sshds) for exec, check, sync, run, status and stop, and the
tables read at that size (a summary line and the odd workers; --all and --json give every one).

The trainers here are stand-ins (a shell loop printing the trainer's progress lines, exiting on SIGTERM as the
trainer does after its checkpoint): 128 JAX processes cannot run on this machine's two cores. Everything around
them is real: tmux sessions, pid and exit files, the status script reading them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import held_tpu_api, write_checkout
from standins import wait_until
from standins.pod import RUN_RECIPE, Pod, make_pod
from standins.sshfleet import SshFleet, start_fleet

WORKERS = 128
SLOW = {"TPUCTL_CONNECT_TIMEOUT": "60", "TPUCTL_TIMEOUT": "300"}  # 128 handshakes share two cores with 128 sshds
STAND_IN_TRAINER = """#!/bin/sh
# prints the trainer's progress lines; on SIGTERM, exits as the trainer does once it has checkpointed
trap 'echo "pretrain $i: preempted, checkpoint saved"; exit 0' TERM
i=0
while :; do i=$((i + 1)); echo "pretrain $i  loss 2.5 img_per_s 100.0"; sleep 0.5; done
"""


@dataclass
class WidePod:
    fleet: SshFleet
    project: Path  # the recipe alone, in a git repo: 128 copies of the whole checkout would be most of the time
    pod: Pod

    def tpuctl(self, *args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
        """tpuctl with the timeouts 128 handshakes on two cores need."""
        return self.pod.tpuctl(*args, env=SLOW | kw.pop("env", {}), timeout=600, **kw)


@pytest.fixture(scope="module")
def wide(tmp_path_factory) -> Iterator[WidePod]:
    """One 128-worker pod for this module's tests: its sshds start, and tpuctl's master connections to them open, once
    (each test leaves it as it found it: no chip holder, no run). Its API's answers are held to the reference at the
    end (conftest.held_tpu_api)."""
    root = tmp_path_factory.mktemp("wide")
    small = root / "small"
    (small / RUN_RECIPE).parent.mkdir(parents=True)
    shutil.copy(write_checkout(root / "project") / RUN_RECIPE, small / RUN_RECIPE)
    (small / "recipes").mkdir()
    subprocess.run(["git", "init", "-q", str(small)], check=True)
    with held_tpu_api() as api, start_fleet(WORKERS) as fleet:
        yield WidePod(fleet, small, make_pod(fleet, api, root / "home"))


def hold_the_chips_of_w77(fleet) -> tuple[dict[str, str], int]:
    """Every worker gets a chip (a device file); a process on w77 holds its. The env that points tpuctl at those chips,
    and the holder's pid."""
    for w in fleet.workers:
        w.path("/tmp/dev").mkdir(exist_ok=True)
        w.path("/tmp/dev/accel0").write_bytes(b"")
    holder = fleet.workers[77].spawn(["python3", "-c", "import time; f = open('/tmp/dev/accel0'); time.sleep(600)"])
    wait_until(lambda: r"accel0" in " ".join(_fds(holder)), 10, "the holder opened accel0")
    return {"TPUCTL_DEVICE_GLOBS": "/tmp/dev/accel*"}, holder


@pytest.mark.timeout(600)
def test_a_pod_of_128_workers_execs_checks_and_syncs(wide):
    fleet, tpuctl, project = wide.fleet, wide.tpuctl, wide.project
    r = tpuctl("exec", "--", "hostname")
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(r.stdout.splitlines()) == sorted(f"[w{w.index}] {w.hostname}" for w in fleet.workers)
    assert f"{WORKERS} workers: {WORKERS} ok" in r.stderr and not worker_rows(r.stderr)  # no row for an ok worker

    # check: one summary line, the one busy worker's row alone; --all and --json: every worker
    devices, holder = hold_the_chips_of_w77(fleet)
    try:
        r = tpuctl("check", env=devices)
        assert r.returncode == 1, r.stderr[-3000:]
        assert f"{WORKERS} workers: {WORKERS - 1} free, 1 busy; the 1 worker not free below" in r.stdout
        (row,) = worker_rows(r.stdout)
        assert row.startswith("w77 ") and str(holder) in row
        r = tpuctl("check", "--all", env=devices)
        assert len(worker_rows(r.stdout)) == WORKERS
        r = tpuctl("check", "--json", env=devices)
        assert [d["state"] for d in json.loads(r.stdout)].count("free") == WORKERS - 1
    finally:  # the pod as this test found it, for the module's next test
        os.kill(holder, signal.SIGKILL)

    # sync: cold (every worker in full or by batch), then one edit (the batch, everywhere)
    r = tpuctl("sync", str(project), "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    assert all(d["ok"] for d in json.loads(r.stdout)) and len(json.loads(r.stdout)) == WORKERS
    (project / "recipes" / "note.txt").write_text("edited\n")
    r = tpuctl("sync", str(project), "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    assert {d["method"] for d in json.loads(r.stdout)} == {"batch"}
    assert all(w.path("~/tpuctl/recipes/note.txt").read_text() == "edited\n" for w in fleet.workers)


@pytest.mark.timeout(600)
def test_a_pod_of_128_workers_runs_reports_and_stops(wide):
    """`run` on a pod whose w77 chips are held (--force: that holder alone is killed first), after a sync: every
    worker's tree checked against what it sent (the code's identity recorded with the run), then status and stop."""
    fleet, tpuctl, project = wide.fleet, wide.tpuctl, wide.project
    devices, holder = hold_the_chips_of_w77(fleet)
    assert tpuctl("sync", str(project)).returncode == 0
    for w in fleet.workers:  # what `prepare` would make: the project's venv (sync leaves it alone)
        python = w.path("~/tpuctl/.venv/bin/python")
        python.parent.mkdir(parents=True, exist_ok=True)
        python.write_text(STAND_IN_TRAINER)
        python.chmod(0o755)
    run = ["run", RUN_RECIPE, "--name", "wide", "--no-sync", "--workdir", "/tmp/w", "--force"]
    r = tpuctl(*run, env=devices, cwd=project)  # --force: w77's holder goes first
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "killing what holds the chips on 1 of 128 workers" in r.stdout + r.stderr
    wait_until(lambda: not _fds(holder), 10, "w77's holder killed")
    (recorded,) = json.loads(tpuctl("runs", "--json").stdout)  # this machine's record of it
    assert recorded["code"]["tree"] and "workers_differ" not in recorded["code"]  # all 128 hold the tree sync sent

    def all_stepping():
        answer = tpuctl("status", "wide", "--json")
        workers = json.loads(answer.stdout)["workers"]
        steps = [(w.get("progress") or {}).get("step", 0) for w in workers]
        return workers if all(w["state"] == "running" for w in workers) and min(steps) >= 2 else None

    workers = wait_until(all_stepping, 300, "every trainer running and logging", poll=2)
    assert len(workers) == WORKERS
    r = tpuctl("status", "wide")
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"{WORKERS} workers: {WORKERS} running; pretrain step " in r.stdout
    assert not worker_rows(r.stdout)  # nothing odd to list
    r = tpuctl("stop", "wide", "--grace", "30")
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"{WORKERS} workers: {WORKERS} stopped" in r.stdout, r.stdout[-2000:]  # each one's exit status read


def worker_rows(text: str) -> list[str]:
    return [line for line in text.splitlines() if re.match(r"w\d+ ", line)]


def _fds(pid: int) -> list[str]:
    try:
        return [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
    except OSError:
        return []
