"""rsync of a local directory to every worker: compute the change once, apply it everywhere.

A plain fan-out runs one rsync per worker, and each one re-scans the tree, re-sends its file list and re-computes
the same delta, 32 or 256 times, across the slow laptop->pod link. Instead tpuctl keeps a local mirror of what it
last sent (in the cache dir) and:
  1. rsyncs DIR into the mirror with --write-batch: the delta is computed once, into a batch file;
  2. streams that batch to every worker over one SSH session each (`rsync --read-batch=-`), guarded by a stamp:
     a worker applies it only if it holds exactly the tree the batch was made against;
  3. syncs in full (rsync over ssh from the mirror, rsync's quick check) the workers that were not: new VMs,
     recreated ones, or ones a batch could not be applied to. `--full` does this for every worker.
The transport is the system ssh client with connection multiplexing (ControlMaster): after the first command the
sessions reuse each worker's open connection, so an edit-sync-run loop pays no SSH handshakes.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tpuctl import codetree, mux, remote
from tpuctl.errors import TpuctlError
from tpuctl.fleet import each
from tpuctl.ssh import KnownHosts, control_path, host_key_name, ssh_command

if TYPE_CHECKING:
    from tpuctl.cloud import Worker
    from tpuctl.config import Settings

SSH_FAILED = 255  # the ssh client's exit status when it could not connect
# rsync's quick check skips a file whose size and mtime match, and by default compares mtimes in whole seconds: a
# same-size edit within the second of the copy was never sent. -1 compares nanoseconds (both ends rsync >= 3.1.3).
EXACT_MTIME = "--modify-window=-1"
NANOSECOND_RSYNC = (3, 1, 3)


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
    """What never travels: .git, what .gitignore ignores, the workers' own venv and sync stamp, `excludes` (the
    sync_excludes setting and --exclude)."""
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


def exact_quick_check(version_text: str) -> str:
    """The rsync option that makes its quick check exact at an end whose `rsync --version` printed `version_text`:
    nanosecond mtimes where it has them, else content checksums (cannot miss; reads every same-size file)."""
    match = re.search(r"version v?(\d+)\.(\d+)\.(\d+)", version_text)
    if match and tuple(int(n) for n in match.groups()) >= NANOSECOND_RSYNC:
        return EXACT_MTIME
    return "--checksum"


@functools.cache
def local_quick_check() -> str:
    """exact_quick_check of this machine's rsync (the mirror step's two ends)."""
    out = subprocess.run(["rsync", "--version"], capture_output=True, text=True, check=False)
    return exact_quick_check(out.stdout)


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
        local_quick_check(),
        "--out-format=%n",
        *(["--delete"] if delete else []),
        *rsync_filters([*settings.sync_excludes, *excludes]),
    ]
    out = subprocess.run([*argv, f"{src}/", f"{tree}/"], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise TpuctlError(f"rsync of {src} failed: {out.stderr.strip()}")
    return [line for line in out.stdout.splitlines() if line and not line.endswith("/")]


class Mirror:
    """The local copy of what was last sent to a TPU's workers, locked while in use.

    Entering it starts rsync computing the delta (a separate process) and then, in a thread, applying it to the
    workers the last sync reached, so that both overlap the caller's look-up of the TPU's workers. That early
    apply only talks to hosts whose SSH host key is already recorded: a host that answers with that key is the
    very VM synced before, whatever the API now says. `sync` then finishes the job for the workers the API names.
    """

    def __init__(
        self,
        settings: Settings,
        src: Path,
        *,
        delete: bool = False,
        excludes: Sequence[str] = (),
        full: bool = False,
    ):
        """full: rsync every worker in full instead of applying the batch (rsync's quick check on each)."""
        check_source(src)
        _need_local("ssh")
        self.settings, self.src, self.full = settings, src, full
        self.filters = [*(["--delete"] if delete else []), *rsync_filters([*settings.sync_excludes, *excludes])]
        self.state = mirror_dir(settings, src)
        self.tree, self.stamp_file, self.hosts_file = self.state / "tree", self.state / "stamp", self.state / "hosts"

    def __enter__(self) -> Mirror:
        self.state.mkdir(parents=True, exist_ok=True)
        self._stack = contextlib.ExitStack()
        lock = self._stack.enter_context(open(self.state / "lock", "w"))
        fcntl.flock(lock, fcntl.LOCK_EX)  # one sync per mirror at a time
        intact = self.stamp_file.exists() and self.tree.exists()
        self.old_stamp = self.stamp_file.read_text().strip() if intact else "none"
        # Until the new batch is written the mirror matches no worker (if we stop halfway, all sync in full).
        self.stamp_file.unlink(missing_ok=True)
        self.tree.mkdir(exist_ok=True)
        self.batch_path = Path(self._stack.enter_context(tempfile.TemporaryDirectory(dir=self.state))) / "batch"
        argv = ["rsync", "-a", local_quick_check(), "--stats", "--itemize-changes", *self.filters]
        argv.append(f"--write-batch={self.batch_path}")
        self._rsync = subprocess.Popen(
            [*argv, f"{self.src}/", f"{self.tree}/"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        self._stack.callback(self._stop_rsync)
        self._batch_lock = threading.Lock()
        self._early: dict[str, float] = {}  # host -> seconds, for hosts the early apply brought up to date
        self._early_thread = None
        last_hosts = self.hosts_file.read_text().split() if intact and self.hosts_file.exists() else []
        if last_hosts and not self.full and not self.settings.replace_host_keys:
            self._early_thread = threading.Thread(target=self._apply_early, args=(last_hosts,), daemon=True)
            self._early_thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._early_thread is not None:
            self._early_thread.join()
        self._stack.close()

    def _stop_rsync(self) -> None:
        if self._rsync.poll() is None:
            self._rsync.kill()
        self._rsync.communicate()

    def _batch(self) -> Delta:
        """Wait for the delta, once. The early apply's thread and sync() both ask; the lock makes the second wait
        for the first (two communicate() calls on one pipe fail)."""
        with self._batch_lock:
            return self._batch_once()

    def _batch_once(self) -> Delta:
        if not hasattr(self, "_delta"):
            out, err = self._rsync.communicate()
            if self._rsync.returncode != 0:
                raise TpuctlError(f"rsync of {self.src} into the local mirror failed: {err.strip()}")
            new_stamp = uuid.uuid4().hex
            self.stamp_file.write_text(new_stamp + "\n")
            count = _stat(out, "Number of regular files transferred")
            batch = self.batch_path.read_bytes()
            rsync_args = ["-a", *self.filters]
            apply = remote.apply_sync_batch(self.settings.remote_dir, rsync_args, self.old_stamp, new_stamp)
            self._delta = Delta(new_stamp, batch, count, apply)
            changes = itemized_changes(out)
            small = archive(self.tree, changes) if changes is not None else None
            if small is not None and len(small) <= max(2 * len(batch), ARCHIVE_BYTES):
                assert changes is not None
                apply = remote.apply_sync_archive(self.settings.remote_dir, self.old_stamp, new_stamp, changes[1])
                self._delta = Delta(new_stamp, small, count, apply)
        return self._delta

    def applied_early(self, hosts: Sequence[str]) -> bool:
        """Whether the early apply brought every one of `hosts` up to date (waits for it)."""
        if self._early_thread is None:
            return False
        self._early_thread.join()
        return all(h in self._early for h in hosts)

    def _apply_early(self, hosts: list[str]) -> None:
        try:
            delta = self._batch()
        except TpuctlError:
            return  # sync() meets the same error and reports it
        batch, apply = delta.payload, delta.apply

        def one(host: str) -> None:
            start = time.monotonic()
            out = _run_ssh(self.settings, host, apply, stdin=batch, known_hosts_only=True)
            if out is not None and out.returncode == 0:
                self._early[host] = time.monotonic() - start

        each(hosts, one, self.settings.concurrency)

    def sync(self, workers: Sequence[Worker], *, on_progress: ProgressCallback | None = None) -> list[SyncResult]:
        """Bring every worker to the mirror's new state; a result per worker, in worker order."""
        settings = self.settings
        progress = on_progress or (lambda worker, phase: None)
        results = [SyncResult(worker=w, host=w.address(settings.internal_addresses)) for w in workers]
        if settings.replace_host_keys:
            hosts = [host_key_name(r.host, settings.ssh_port) for r in results]
            KnownHosts(settings.path("known_hosts")).forget(hosts)
        delta = self._batch()
        new_stamp, batch, files, apply = delta.stamp, delta.payload, delta.files, delta.apply
        if self._early_thread is not None:
            self._early_thread.join()

        def one(result: SyncResult) -> None:
            if result.host in self._early:  # already applied while the workers were being looked up
                result.method, result.files, result.bytes_sent = "batch", files, len(batch)
                result.seconds = self._early[result.host]
            elif not self.full:
                progress(result.worker, "batch")
                out = _ssh(settings, result, apply, stdin=batch)
                if out is not None and out.returncode == 0:
                    result.method, result.files, result.bytes_sent = "batch", files, len(batch)
                elif out is None or out.returncode == SSH_FAILED:
                    result.error = result.error or _ssh_error(out)
                # else: reachable, but stale or the batch did not apply: sync it in full
            if result.method == "" and result.error is None:
                progress(result.worker, "full")
                _full_sync(settings, result, self.tree, self.filters, new_stamp)
            progress(result.worker, "done" if result.ok else "failed")

        each(results, one, settings.concurrency)
        self.hosts_file.write_text("".join(f"{r.host}\n" for r in results if r.ok))
        self.manifest = tree_manifest(self.state)
        return results


def tree_manifest(state: Path) -> codetree.Manifest:
    """The manifest of a mirror's tree: what its last sync sent (digests cached, so only what it wrote is read)."""
    return codetree.manifest(state / "tree", cache_file=state / "digests")


def source_manifest(settings: Settings, src: Path) -> codetree.Manifest:
    """The manifest of what a sync of `src` would send (its files under the sync's filters), read from `src` itself:
    the tree hash of code that trains where it is (a local run), comparable with a pod's."""
    _need_local("rsync")
    with tempfile.TemporaryDirectory() as empty:
        argv = ["rsync", "-a", "-n", "--out-format=%n", *rsync_filters(settings.sync_excludes), f"{src}/", f"{empty}/"]
        out = subprocess.run(argv, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise TpuctlError(f"listing the files of {src} failed: {out.stderr.strip()}")
    files = [line for line in out.stdout.splitlines() if line and not line.endswith("/")]
    return codetree.manifest(src, paths=files)


def last_manifest(settings: Settings, src: Path) -> codetree.Manifest | None:
    """What the last sync of `src` to this TPU's remote dir sent, or None when none was made from this machine."""
    state = mirror_dir(settings, src)
    if not (state / "tree").is_dir():
        return None
    with open(state / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_SH)  # not halfway through another sync's mirror step
        return tree_manifest(state)


def verify(
    settings: Settings, src: Path, workers: Sequence[Worker], excludes: Sequence[str] = ()
) -> tuple[codetree.Manifest, list[codetree.TreeCheck]]:
    """Compare every worker's tree with what the last sync of `src` sent, by content (codetree.check_workers), and
    list the files a worker has that the sync did not send (what `sync --delete` would remove, by the same filters)."""
    from tpuctl.fleet import Fleet

    expected = last_manifest(settings, src)
    if expected is None:
        raise TpuctlError(
            f"nothing was synced from {src} to {settings.remote_dir} on this TPU from this machine",
            f"sync first: tpuctl sync {src}",
        )
    checks = codetree.check_workers(Fleet(settings, list(workers)), settings.remote_dir, expected, VERIFY_TIMEOUT_S)
    tree, filters = mirror_dir(settings, src) / "tree", rsync_filters([*settings.sync_excludes, *excludes])

    def extras(check: codetree.TreeCheck) -> None:
        if check.error is None:
            found = _extra_files(settings, check.host, tree, filters)
            if isinstance(found, str):
                check.error = found
            else:
                check.extra = found

    each(checks, extras, settings.concurrency)
    return expected, checks


VERIFY_TIMEOUT_S = 300.0  # every worker reads its whole tree once


def _extra_files(settings: Settings, host: str, tree: Path, filters: list[str]) -> list[str] | str:
    """What a worker holds under the remote dir that the mirror lacks, ignoring what the filters keep out: the paths
    `rsync --delete` would remove (a dry run that sends nothing: --existing with --ignore-existing); a string says
    why they could not be listed."""
    argv = ["rsync", "-rln", "--delete", "--existing", "--ignore-existing", "--itemize-changes", *filters]
    argv += [
        "-e",
        _transport(settings, host),
        f"{tree}/",
        f"{settings.ssh_user}@{host}:{remote.rsync_path(settings.remote_dir)}/",
    ]
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=settings.command_timeout, check=False)
    except subprocess.TimeoutExpired:
        return f"listing its files timed out after {settings.command_timeout:g}s"
    if out.returncode != 0:
        lines = out.stderr.strip().splitlines()
        return f"listing its files failed ({out.returncode}): {lines[-1] if lines else ''}"
    return sorted(line.split(None, 1)[1] for line in out.stdout.splitlines() if line.startswith("*deleting "))


def _transport(settings: Settings, host: str) -> str:
    """rsync's -e: tpuctl's ssh command for `host` (key, known_hosts, multiplexing, proxy)."""
    return " ".join(_quote_for_rsync(a) for a in ssh_command(settings, for_host=host))


@dataclass(frozen=True)
class Delta:
    """What brings a worker from the last sync's tree to this one: the payload (an rsync batch, or for a small change
    a tar of the changed files) and the command that applies it, on stdin, where the worker's stamp is the old one."""

    stamp: str
    payload: bytes
    files: int
    apply: str


ARCHIVE_FILES = 256  # at most this many changed or deleted paths go as a tar, not an rsync batch
ARCHIVE_BYTES = 1 << 20  # and a tar up to this size (or twice the batch's) is fine on any link
# rsync --itemize-changes: "YXcstpoguax PATH", Y the update (> received, c created, h hard link, . attributes only),
# X the kind (f file, d directory, L symlink, D device, S special); "*deleting PATH" for deletions.
ITEMIZED = re.compile(r"^(?P<kind>[<>ch.][fdLDS][^ ]{9}) (?P<path>.+)$")


def itemized_changes(out: str) -> tuple[list[str], list[str]] | None:
    """(paths to send, paths to delete) from the local rsync's itemized output; None when the change is not one a
    small tar carries well (many paths, devices, hard links, names rsync had to escape)."""
    send: list[str] = []
    delete: list[str] = []
    for line in out.splitlines():
        if line.startswith("*deleting "):
            delete.append(line.split(None, 1)[1].removesuffix("/"))
            continue
        match = ITEMIZED.match(line)
        if match is None:
            continue  # --stats lines
        kind, path = match["kind"], match["path"]
        if kind[1] in "DS" or kind[0] == "h":
            return None
        if kind[1] == "L":
            send.append(path.split(" -> ", 1)[0])
        elif kind[1] == "f" or kind.startswith("cd"):  # a file's data or attributes; a new directory
            send.append(path.removesuffix("/"))
    paths = send + delete
    if len(paths) > ARCHIVE_FILES or not all(_plain_relative(p) for p in paths):
        return None
    return send, delete


def _plain_relative(path: str) -> bool:
    """A path inside the tree, as written (rsync writes names it cannot print as \\#ooo escapes)."""
    return path not in ("", ".") and not path.startswith("/") and ".." not in path.split("/") and "\\#" not in path


def archive(tree: Path, changes: tuple[list[str], list[str]]) -> bytes | None:
    """A tar of the changed paths as they now are in the mirror: modes kept, and mtimes to the nanosecond (a pax
    header), as rsync -a keeps them, so that a later full sync's quick check finds these files unchanged."""
    import io
    import tarfile

    buffer = io.BytesIO()
    try:
        with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for path in changes[0]:
                info = tar.gettarinfo(tree / path, arcname=path)
                ns = (tree / path).lstat().st_mtime_ns
                info.pax_headers = {"mtime": f"{ns // 10**9}.{ns % 10**9:09d}"}
                if info.isreg():
                    with open(tree / path, "rb") as data:
                        tar.addfile(info, data)
                else:
                    tar.addfile(info)
            end = tar.offset + 2 * tarfile.BLOCKSIZE  # the end-of-archive blocks, without the padding to 10 KiB
    except OSError:
        return None
    return buffer.getvalue()[:end]


def _run_ssh(
    settings: Settings, host: str, command: str, stdin: bytes = b"", known_hosts_only: bool = False
) -> subprocess.CompletedProcess[bytes] | None:
    """Run one command on a worker with the system ssh client (multiplexed); None if it timed out. Through an open
    shared connection, the session is asked of its master directly (tpuctl.mux), without starting `ssh`."""
    master = control_path(settings, host)
    if master is not None and master.exists():
        try:
            return mux.run(master, command, stdin, settings.command_timeout)
        except mux.NoMaster:
            pass  # `ssh` (re)makes it
        except TimeoutError:
            return None
    try:
        return subprocess.run(
            [*ssh_command(settings, host, known_hosts_only=known_hosts_only), command],
            input=stdin,
            capture_output=True,
            timeout=settings.command_timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return None


def _ssh(
    settings: Settings, result: SyncResult, command: str, stdin: bytes = b""
) -> subprocess.CompletedProcess[bytes] | None:
    """_run_ssh for one worker's result: adds the time taken, and names a timeout as the worker's error."""
    start = time.monotonic()
    out = _run_ssh(settings, result.host, command, stdin)
    result.seconds += time.monotonic() - start
    if out is None:
        result.error = f"timed out after {settings.command_timeout:g}s"
    return out


def _ssh_error(out: subprocess.CompletedProcess[bytes] | None) -> str:
    lines = out.stderr.decode(errors="replace").strip().splitlines() if out is not None else []
    return lines[-1].removeprefix("ssh: ") if lines else "ssh failed"


def _full_sync(settings: Settings, result: SyncResult, tree: Path, filters: list[str], stamp: str) -> None:
    """rsync the whole mirror to one worker (rsync's quick check, made exact for the worker's rsync), then record the
    stamp it now holds."""
    probe = _ssh(settings, result, remote.RSYNC_VERSION)
    if probe is None:
        return
    if probe.returncode != 0:
        result.error = (
            f"rsync is not installed on the worker: {_ssh_error(probe)}"
            if probe.returncode != SSH_FAILED
            else _ssh_error(probe)
        )
        return
    exact = exact_quick_check(probe.stdout.decode(errors="replace"))
    transport = _transport(settings, result.host)
    dest = remote.rsync_path(settings.remote_dir)
    argv = ["rsync", "-az", exact, "--stats", f"--timeout={round(settings.command_timeout)}", *filters]
    argv += ["-e", transport, f"{tree}/", f"{settings.ssh_user}@{result.host}:{dest}/"]
    start = time.monotonic()
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=settings.command_timeout, check=False)
    except subprocess.TimeoutExpired:
        result.error = f"rsync timed out after {settings.command_timeout:g}s"
        return
    finally:
        result.seconds += time.monotonic() - start
    if out.returncode != 0:
        lines = out.stderr.strip().splitlines()
        result.error = f"rsync failed ({out.returncode}): {lines[-1] if lines else ''}"
        return
    result.method = "full"
    result.files = _stat(out.stdout, "Number of regular files transferred")
    result.bytes_sent = _stat(out.stdout, "Total bytes sent")
    stamped = _ssh(settings, result, remote.write_sync_stamp(settings.remote_dir, stamp))
    if stamped is not None and stamped.returncode != 0:
        result.error = f"could not record the sync: {_ssh_error(stamped)}"


def _quote_for_rsync(arg: str) -> str:
    """rsync splits -e on spaces and honours double quotes (not shell syntax); quote what needs it."""
    return f'"{arg}"' if any(c in arg for c in " \t'") else arg
