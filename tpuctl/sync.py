"""rsync of a local directory to every worker: compute the change once, apply it everywhere.

A plain fan-out runs one rsync per worker, and each one re-scans the tree, re-sends its file list and re-computes
the same delta, 32 or 256 times, across the slow laptop->pod link. Instead tpuctl keeps a local mirror of what it
last sent (in the cache dir) and:
  1. rsyncs DIR into the mirror with --write-batch: the delta is computed once, into a batch file;
  2. streams that batch to every worker over one SSH channel each (`rsync --read-batch=-`), guarded by a stamp:
     a worker applies it only if it holds exactly the tree the batch was made against;
  3. syncs in full (rsync over ssh from the mirror, rsync's quick check) the workers that were not: new VMs,
     recreated ones, or ones a batch could not be applied to. `--full` does this for every worker.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tpuctl import remote
from tpuctl.errors import TpuctlError
from tpuctl.ssh import ssh_command

if TYPE_CHECKING:
    from tpuctl.cloud import Worker
    from tpuctl.config import Settings
    from tpuctl.fleet import Fleet

STALE_EXIT = 98  # remote.apply_sync_batch: the worker's tree is not the batch's base


@dataclass
class SyncResult:
    worker: Worker
    host: str
    method: str = ""  # "batch" (delta applied) or "full" (rsync of the whole tree)
    files: int = 0  # regular files transferred
    bytes_sent: int = 0
    seconds: float = 0.0
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


# on_progress(worker, phase) with phase "batch", "full", "done" or "failed".
ProgressCallback = Callable[["Worker", str], None]


def rsync_filters(excludes: Sequence[str]) -> list[str]:
    """What never travels: .git, what .gitignore ignores, the workers' own venv and sync stamp, user excludes."""
    rules = [
        "--filter=:- .gitignore",
        "--exclude=.git",
        "--exclude=/.venv",
        f"--exclude=/{remote.SYNC_STAMP}",
    ]
    return rules + [f"--exclude={p}" for p in excludes]


def mirror_dir(settings: Settings, src: Path) -> Path:
    key = "|".join([str(settings.project), str(settings.zone), str(settings.tpu), settings.remote_dir, str(src)])
    cache = Path(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"))
    return cache / "tpuctl" / "sync" / hashlib.sha256(key.encode()).hexdigest()[:16]


def _stat(text: str, label: str) -> int:
    m = re.search(rf"^{label}: ([\d,]+)", text, re.MULTILINE)
    return int(m.group(1).replace(",", "")) if m else 0


def _need_local(tool: str) -> None:
    if shutil.which(tool) is None:
        raise TpuctlError(f"{tool} is not installed on this machine", f"install it, e.g. `apt-get install {tool}`")


def check_source(src: Path) -> None:
    """Fail before contacting anything when there is nothing to sync or nothing to sync with."""
    _need_local("rsync")
    if not src.is_dir():
        problem = "is not a directory" if src.exists() else "does not exist"
        raise TpuctlError(f"{src} {problem}", "give the directory to sync, e.g. `tpuctl sync .`")


def changed_files(src: Path, settings: Settings, *, delete: bool, excludes: Sequence[str]) -> list[str]:
    """What a sync would send (for --dry-run): rsync's itemized list against the mirror."""
    _need_local("rsync")
    tree = mirror_dir(settings, src) / "tree"
    tree.mkdir(parents=True, exist_ok=True)
    argv = [
        "rsync",
        "-a",
        "-n",
        "--out-format=%n",
        *(["--delete"] if delete else []),
        *rsync_filters(excludes),
    ]
    out = subprocess.run([*argv, f"{src}/", f"{tree}/"], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise TpuctlError(f"rsync of {src} failed: {out.stderr.strip()}")
    return [line for line in out.stdout.splitlines() if line and not line.endswith("/")]


def sync(
    settings: Settings,
    fleet: Fleet,
    src: Path,
    *,
    delete: bool = False,
    excludes: Sequence[str] = (),
    full: bool = False,
    on_progress: ProgressCallback | None = None,
) -> list[SyncResult]:
    check_source(src)
    progress = on_progress or (lambda worker, phase: None)
    filters = [*(["--delete"] if delete else []), *rsync_filters(excludes)]
    state = mirror_dir(settings, src)
    state.mkdir(parents=True, exist_ok=True)
    with open(state / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one sync per mirror at a time
        old_stamp, new_stamp, batch, files = _write_batch(src, state, filters)

        results = {w.index: SyncResult(worker=w, host=h) for w, h in zip(fleet.workers, fleet.hosts, strict=True)}
        todo_full = list(results.values())
        if not full:
            todo_full = []
            for w in fleet.workers:
                progress(w, "batch")
            applied = fleet.run(
                remote.apply_sync_batch(settings.remote_dir, ["-a", *filters], old_stamp, new_stamp),
                stdin=batch,
                on_done=lambda r: progress(r.worker, "done" if r.ok else "full" if r.exit_code else "failed"),
            )
            for r in applied:
                result = results[r.worker.index]
                result.seconds = r.seconds
                if r.ok:
                    result.method, result.files, result.bytes_sent = "batch", files, len(batch)
                elif r.exit_code is not None:  # reachable, but stale or the batch did not apply: sync it in full
                    todo_full.append(result)
                else:
                    result.error = r.error
        if todo_full:
            _full_sync(settings, fleet, state / "tree", todo_full, filters, new_stamp, progress)
    return [results[w.index] for w in fleet.workers]


def _write_batch(src: Path, state: Path, filters: list[str]) -> tuple[str, str, bytes, int]:
    """Update the mirror from src, recording the delta as an rsync batch; returns (old, new stamp, batch, files)."""
    tree, stamp_file = state / "tree", state / "stamp"
    old_stamp = stamp_file.read_text().strip() if stamp_file.exists() and tree.exists() else "none"
    tree.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(dir=state) as tmp:
        batch_path = Path(tmp) / "batch"
        out = subprocess.run(
            ["rsync", "-a", "--stats", *filters, f"--write-batch={batch_path}", f"{src}/", f"{tree}/"],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        if out.returncode != 0:
            stamp_file.unlink(missing_ok=True)  # the mirror may be half-updated: make every worker sync in full
            raise TpuctlError(f"rsync of {src} into the local mirror failed: {out.stderr.strip()}")
        batch = batch_path.read_bytes()
    new_stamp = uuid.uuid4().hex
    stamp_file.write_text(new_stamp + "\n")
    return old_stamp, new_stamp, batch, _stat(out.stdout, "Number of regular files transferred")


def _full_sync(
    settings: Settings,
    fleet: Fleet,
    tree: Path,
    todo: list[SyncResult],
    filters: list[str],
    stamp: str,
    progress: ProgressCallback,
) -> None:
    _need_local("ssh")
    transport = " ".join(_quote_for_rsync(a) for a in ssh_command(settings))
    dest = remote.rsync_path(settings.remote_dir)

    def one(result: SyncResult) -> None:
        progress(result.worker, "full")
        start = time.monotonic()
        argv = ["rsync", "-az", "--stats", f"--timeout={round(settings.command_timeout)}", *filters]
        argv += ["-e", transport, f"{tree}/", f"{settings.ssh_user}@{result.host}:{dest}/"]
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=settings.command_timeout, check=False)
        except subprocess.TimeoutExpired:
            result.error = f"rsync timed out after {settings.command_timeout:g}s"
        else:
            if out.returncode == 0:
                result.method = "full"
                result.files = _stat(out.stdout, "Number of regular files transferred")
                result.bytes_sent = _stat(out.stdout, "Total bytes sent")
            else:
                lines = out.stderr.strip().splitlines()
                result.error = f"rsync failed ({out.returncode}): {lines[-1] if lines else ''}"
        result.seconds += time.monotonic() - start
        if result.error:
            progress(result.worker, "failed")

    with ThreadPoolExecutor(max_workers=min(settings.concurrency, len(todo))) as pool:
        list(pool.map(one, todo))
    synced = [r for r in todo if r.ok]
    if synced:
        stamped = fleet.subset([r.worker.index for r in synced]).run(
            remote.write_sync_stamp(settings.remote_dir, stamp)
        )
        for r, s in zip(synced, stamped, strict=True):
            if not s.ok:
                r.error = f"could not record the sync: {s.error or s.stderr.strip()}"
            progress(r.worker, "done" if r.ok else "failed")


def _quote_for_rsync(arg: str) -> str:
    """rsync splits -e on spaces and honours double quotes (not shell syntax); quote what needs it."""
    return f'"{arg}"' if any(c in arg for c in " \t'") else arg
