"""The stand-in VMs' "image": a venv at ~/tpuctl/.venv, made with the workers' system python, that sees this machine's
site-packages (the trainer's dependencies, pip included), as a TPU VM image that ships them would. `tpuctl prepare`
then runs for real on top of it, offline (the workers cannot download 1.5 GB of wheels here).

This machine's site-packages may lie under /root or /tmp, which are private to each worker; but the workers share
this machine's process ids, so /proc/<our pid>/root is our file system, seen from inside any of them.
"""

from __future__ import annotations

import glob
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

# `tpuctl prepare --pip-args` on the image: no index to reach, and pip installs the project with what the image holds
OFFLINE_PIP_ARGS = "--no-index --no-build-isolation"
WORKER_PYTHON = "/usr/bin/python3"  # what a worker's sshd session finds first (the workers' /root, pyenv's, is private)


def require_matching_python() -> None:
    """Skip where the image cannot be made: compiled wheels load only into the Python minor version they were built
    for, and the workers' python is not this venv's (the stand-ins cannot reach another interpreter: a pyenv one
    links its libpython from /root, which is private to each worker). `.ci/setup` makes the venv from the workers'
    python, so under CI (CI set) this is a failure, not a skip: there it would mean the setup broke."""
    if not os.path.exists(WORKER_PYTHON):
        unusable(f"no {WORKER_PYTHON} for the stand-in workers")
    version = subprocess.run(
        [WORKER_PYTHON, "-c", "import sys; print(tuple(sys.version_info[:2]))"], capture_output=True, text=True
    ).stdout.strip()
    if version != str(tuple(sys.version_info[:2])):
        unusable(f"the workers' {WORKER_PYTHON} is {version}, this venv's {sys.version_info[:2]}: wheels differ")


def unusable(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (.ci/setup makes the venv from it)")
    pytest.skip(reason)


def install(fleet: Any) -> None:
    """Put the image on every worker of `fleet` (a standins.sshfleet.SshFleet)."""
    pids = [w.spawn([WORKER_PYTHON, "-m", "venv", "--without-pip", "/root/tpuctl/.venv"]) for w in fleet.workers]
    for pid in pids:
        os.waitpid(pid, 0)  # our child (spawn started it): reaped here, it cannot linger as a zombie
    for w in fleet.workers:
        link_site(w)


def link_site(worker: Any) -> None:
    """Point the venv at ~/tpuctl/.venv of `worker` at this machine's site-packages (through our /proc root)."""
    site = f"/proc/{os.getpid()}/root" + next(p for p in sys.path if p.endswith("site-packages"))
    (packages,) = glob.glob(str(worker.path("/root/tpuctl/.venv/lib/python3*/site-packages")))
    Path(packages, "image.pth").write_text(site)
