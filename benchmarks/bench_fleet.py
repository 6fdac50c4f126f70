"""Benchmarks of tpuctl against real stand-ins (sshd workers on loopback, a local Cloud TPU API).

Measures the whole command as a user runs it (a subprocess of the real console script, API look-up included):
  exec     `tpuctl exec -- hostname` on fleets of several sizes vs `pdsh -R ssh` with equivalent ssh options
  sync     `tpuctl sync DIR` of a 1,000-file ~5 MB tree to a fleet: cold, incremental (batch) and --full,
           vs one plain `rsync -az` of the same change to one worker
  startup  `tpuctl --help`, `tpuctl check --help` and what `check --help` imports
  bastion  `tpuctl exec -- hostname` on workers reachable only through a jump host (ssh_proxy) vs pdsh through the
           same jump host (OpenSSH's ProxyJump)

    .venv/bin/python benchmarks/bench_fleet.py --workers 1,8,32 --repeat 5 --markdown benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import platform
import random
import re
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the stand-ins live in tests/standins

from standins.bastion import private_network, start_bastion  # noqa: E402
from standins.pod import NODE, PROJECT, TPUCTL, ZONE, Pod, make_pod  # noqa: E402
from standins.sshfleet import SshFleet, start_fleet  # noqa: E402
from standins.tpu_api import FakeTpuApi  # noqa: E402

# As in tests/conftest.py: google-auth must never probe the GCE metadata server (off this machine).
SAFE_ENV = {"NO_GCE_CHECK": "true", "GCE_METADATA_HOST": "127.0.0.1:9", "GCE_METADATA_IP": "127.0.0.1:9"}
UNSET_ENV = ("GOOGLE_APPLICATION_CREDENTIALS", "GOOGLE_CLOUD_PROJECT", "CLOUDSDK_CORE_PROJECT")
FORBIDDEN_IMPORTS = ("jax", "tensorflow", "grpc", "google.cloud")
REMOTE_DIR = "/root/tpuctl"  # tpuctl's default remote dir (~/tpuctl) as the workers see it
BASELINE_DIR = "bench-baseline"
# OpenSSH 9.x's default key exchange, sntrup761x25519, costs its client ~100+ ms of CPU per connection here;
# paramiko (tpuctl's fan-out) negotiates curve25519 instead. The baselines also run with it, to show the difference.
FAST_KEX = "curve25519-sha256"
# An empty worker has no sync stamp, like an empty mirror: the first sync may apply the whole tree as a batch.
COLD_METHODS = {"batch", "full"}
STARTUP_REPEAT = 10
TIMEOUT_S = 180

# Targets: (name, limit). A measured value at or below the limit passes.
EXEC_VS_PDSH = 0.5
EXEC_SCALING = 3.0
SYNC_VS_RSYNC = 3.0
BASTION_VS_PDSH = 0.5
EXEC_VS_PDSH_32 = 0.4
STARTUP_S = 0.3


class BenchError(RuntimeError):
    """A benchmarked command failed or printed something else than it should have."""


# --- measuring ------------------------------------------------------------------------------------------------


@dataclass
class Timing:
    wall: float
    cpu: float  # CPU seconds of the command and its children
    cpu_all: float  # CPU seconds of the whole machine meanwhile: the stand-in workers (sshd, shells, rsync) too


@dataclass
class Samples:
    timings: list[Timing] = field(default_factory=list)

    @property
    def values(self) -> list[float]:
        return [t.wall for t in self.timings]

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    @property
    def min(self) -> float:
        return min(self.values)

    @property
    def max(self) -> float:
        return max(self.values)

    @property
    def cpu(self) -> float:
        return statistics.median(t.cpu for t in self.timings)

    @property
    def cpu_all(self) -> float:
        return statistics.median(t.cpu_all for t in self.timings)

    def to_json(self) -> dict[str, Any]:
        stats = {"median": self.median, "min": self.min, "max": self.max, "cpu": self.cpu, "cpu_all": self.cpu_all}
        return {**stats, "timings": [vars(t) for t in self.timings]}


def measure(runs: dict[str, Callable[[], Timing]], repeat: int, warmup: int = 1) -> dict[str, Samples]:
    """Run each (one warm-up first), interleaved so that drift on the machine hits all alike."""
    for run in runs.values():
        for _ in range(warmup):
            run()
    samples = {name: Samples() for name in runs}
    for _ in range(repeat):
        for name, run in runs.items():
            samples[name].timings.append(run())
    return samples


def machine_cpu() -> float:
    """CPU seconds all processes have used since boot (user, nice, system, irq, softirq)."""
    user, nice, system, _idle, _iowait, irq, softirq = map(int, Path("/proc/stat").read_text().split()[1:8])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed(argv: Sequence[str], env: dict[str, str], timeout: float = TIMEOUT_S) -> tuple[Timing, str]:
    """Run argv; (its timing, stdout). Raises BenchError when it fails."""
    cpu, cpu_all, start = children_cpu(), machine_cpu(), time.perf_counter()
    proc = subprocess.run(
        argv, env=env, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL, check=False
    )
    timing = Timing(time.perf_counter() - start, children_cpu() - cpu, machine_cpu() - cpu_all)
    if proc.returncode != 0:
        raise BenchError(f"{shlex.join(argv)} exited {proc.returncode}:\n{proc.stderr[-2000:]}")
    return timing, proc.stdout


def check(condition: bool, what: str) -> None:
    if not condition:
        raise BenchError(what)


def progress(text: str) -> None:
    print(f"· {text}", file=sys.stderr, flush=True)


# --- environment and machine ----------------------------------------------------------------------------------


def isolate_env(work: Path) -> None:
    """No metadata-server probes, no gcloud/tpuctl config of this machine's user leaking in."""
    os.environ.update(SAFE_ENV)
    for name in UNSET_ENV:
        os.environ.pop(name, None)
    (work / "cloudsdk").mkdir()
    os.environ["CLOUDSDK_CONFIG"] = str(work / "cloudsdk")
    os.environ["TPUCTL_CONFIG"] = str(work / "no-such-dir" / "config.toml")


def first_line(argv: Sequence[str]) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    return (proc.stdout or proc.stderr).strip().splitlines()[0] if (proc.stdout or proc.stderr).strip() else "?"


def busy_fraction(seconds: float = 1.0) -> float:
    """How busy the machine's CPUs are now (0..1): a benchmark wants them idle."""
    before = machine_cpu()
    time.sleep(seconds)
    return (machine_cpu() - before) / seconds / len(os.sched_getaffinity(0))


def machine_info() -> dict[str, str]:
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.MULTILINE)
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "nproc": str(len(os.sched_getaffinity(0))),
        "cpu": model.group(1) if model else platform.processor(),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "load average (1, 5, 15 min)": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "CPU busy at start (1 s)": f"{busy_fraction():.0%}",
        "rsync": first_line(["rsync", "--version"]),
        "ssh": first_line(["ssh", "-V"]),
        "pdsh": first_line(["pdsh", "-V"]),
        # set here: an editable install's own modules (tpuctl) are then compiled afresh at every start
        "PYTHONDONTWRITEBYTECODE": os.environ.get("PYTHONDONTWRITEBYTECODE", "unset"),
    }


# --- stand-in pods --------------------------------------------------------------------------------------------


class Pods:
    """One local Cloud TPU API for the whole run; each pod gets a fresh HOME (config, cache, known_hosts)."""

    def __init__(self, api: FakeTpuApi, work: Path):
        self.api, self.work, self.count = api, work, 0

    def pod(self, fleet: SshFleet) -> Pod:
        self.count += 1
        return make_pod(fleet, self.api, self.work / f"home-{self.count}")


def ssh_options(pod: Pod, known_hosts: Path, kex: str | None = None) -> list[str]:
    """The OpenSSH options tpuctl's own rsync transport uses (tpuctl.ssh.ssh_command), for the baselines."""
    return [
        *(["-o", f"KexAlgorithms={kex}"] if kex else []),
        "-i", str(pod.fleet.key_path),
        "-p", str(pod.fleet.port),
        "-o", "IdentitiesOnly=yes",
        "-o", f"UserKnownHostsFile={known_hosts}",
        "-o", "GlobalKnownHostsFile=/dev/null",
        "-o", "StrictHostKeyChecking=accept-new",
        "-o", "BatchMode=yes",
        "-o", "LogLevel=ERROR",
    ]  # fmt: skip


# --- a. exec --------------------------------------------------------------------------------------------------


@dataclass
class ExecResult:
    workers: int
    tpuctl: Samples
    pdsh: Samples
    pdsh_fast_kex: Samples

    @property
    def ratio(self) -> float:
        return self.tpuctl.median / self.pdsh.median


def tpuctl_exec(pod: Pod, hostnames: list[str]) -> Timing:
    return tpuctl_exec_env(pod.env, hostnames)


def tpuctl_exec_env(env: dict[str, str], hostnames: list[str]) -> Timing:
    timing, out = timed([TPUCTL, "exec", "--", "hostname"], env)
    lines = out.splitlines()
    check(len(lines) == len(hostnames), f"tpuctl exec printed {len(lines)} lines for {len(hostnames)} workers")
    got = sorted(re.sub(r"^\[w\d+\] ", "", line) for line in lines)
    check(got == hostnames, f"tpuctl exec printed {got}, expected {hostnames}")
    return timing


def pdsh_exec(pod: Pod, hostnames: list[str], kex: str | None = None, fanout: int = 64) -> Timing:
    known_hosts = pod.home / "pdsh_known_hosts"
    env = {
        **pod.env,
        "PDSH_RCMD_TYPE": "ssh",
        "PDSH_SSH_ARGS": shlex.join(ssh_options(pod, known_hosts, kex)) + " -l%u %h",
    }
    argv = ["pdsh", "-R", "ssh", "-f", str(fanout), "-l", pod.fleet.user, "-w", ",".join(pod.fleet.ips), "hostname"]
    timing, out = timed(argv, env)
    lines = out.splitlines()
    check(len(lines) == len(hostnames), f"pdsh printed {len(lines)} lines for {len(hostnames)} workers")
    check(sorted(line.split(": ", 1)[1] for line in lines) == hostnames, f"pdsh printed {lines}")
    return timing


def bench_exec_size(pods: Pods, n: int, repeat: int) -> ExecResult:
    progress(f"exec: {n} workers, {repeat} runs each of tpuctl, pdsh and pdsh with {FAST_KEX}")
    with start_fleet(n) as fleet:
        pod = pods.pod(fleet)
        hostnames = sorted(w.hostname for w in fleet.workers)
        runs = {
            "tpuctl": lambda: tpuctl_exec(pod, hostnames),
            "pdsh": lambda: pdsh_exec(pod, hostnames),
            "pdsh_fast_kex": lambda: pdsh_exec(pod, hostnames, FAST_KEX),
        }
        samples = measure(runs, repeat)
    return ExecResult(n, samples["tpuctl"], samples["pdsh"], samples["pdsh_fast_kex"])


def bench_exec(pods: Pods, sizes: Sequence[int], repeat: int) -> list[ExecResult]:
    return [bench_exec_size(pods, n, repeat) for n in sizes]


# --- d. through a jump host -----------------------------------------------------------------------------------


@dataclass
class BastionResult:
    workers: int
    tpuctl: Samples
    pdsh: Samples

    @property
    def ratio(self) -> float:
        return self.tpuctl.median / self.pdsh.median


def pdsh_through(pod: Pod, jump_host: str, port: int, hostnames: list[str]) -> Timing:
    """pdsh's ssh with ProxyJump to the workers, as a pdsh user behind a bastion runs it (an ssh_config file: the
    jump host's own ssh reads it too, so it gets the same key and known_hosts)."""
    known_hosts = pod.home / "pdsh_known_hosts"
    config = pod.home / "pdsh_ssh_config"
    options = [
        f"Port {port}",
        f"IdentityFile {pod.fleet.key_path}",
        "IdentitiesOnly yes",
        f"UserKnownHostsFile {known_hosts}",
        "GlobalKnownHostsFile /dev/null",
        "StrictHostKeyChecking accept-new",
        "BatchMode yes",
        "LogLevel ERROR",
    ]
    config.write_text(f"Host 127.*\n  ProxyJump {pod.fleet.user}@{jump_host}\nHost *\n  " + "\n  ".join(options) + "\n")
    env = {**pod.env, "PDSH_RCMD_TYPE": "ssh", "PDSH_SSH_ARGS": f"-F {config} -l%u %h"}
    argv = ["pdsh", "-R", "ssh", "-f", "128", "-l", pod.fleet.user, "-w", ",".join(pod.fleet.ips), "hostname"]
    timing, out = timed(argv, env)
    lines = out.splitlines()
    check(sorted(line.split(": ", 1)[-1] for line in lines) == hostnames, f"pdsh printed {lines}")
    return timing


def bench_bastion(pods: Pods, n: int, repeat: int) -> BastionResult:
    progress(f"bastion: {n} workers behind a jump host, {repeat} runs each of tpuctl exec and pdsh")
    with private_network() as net, start_fleet(n, network=net.network) as fleet, start_bastion(net, fleet) as jump:
        pod = pods.pod(fleet)
        # internal IPs only, as on a project whose TPUs get no external IPs
        pod.api.add_node(PROJECT, ZONE, NODE, [(w.ip, None) for w in fleet.workers])
        hostnames = sorted(w.hostname for w in fleet.workers)
        env = pod.env | {"TPUCTL_SSH_PROXY": f"{fleet.user}@{net.bastion_ip}:{jump.port}"}
        runs = {
            "tpuctl": lambda: tpuctl_exec_env(env, hostnames),
            "pdsh": lambda: pdsh_through(pod, net.bastion_ip, jump.port, hostnames),
        }
        samples = measure(runs, repeat)
    return BastionResult(n, samples["tpuctl"], samples["pdsh"])


def bastion_table(r: BastionResult) -> Table:
    rows = [
        [str(r.workers), "tpuctl exec -- hostname (ssh_proxy: jump host)", *spread(r.tpuctl, cpu=True), "-"],
        [str(r.workers), "pdsh, ProxyJump", *spread(r.pdsh, cpu=True), f"{r.ratio:.2f}"],
    ]
    cols = ["workers", "command", "med ms", "min", "max", *CPU_COLUMNS, "tpuctl ÷ this"]
    note = (
        "Workers in a network namespace of their own (internal IPs only), a bastion sshd on a veth pair into it. "
        "tpuctl logs in to the jump host once (an OpenSSH master connection) and reaches each worker through it "
        "(`ssh -W` as paramiko's ProxyCommand); pdsh -f 128 runs one ssh per worker with ProxyJump, each logging in "
        "to the jump host too. " + CPU_NOTE
    )
    return Table("d. exec through a jump host", cols, rows, note, text_columns=2)


# --- b. sync --------------------------------------------------------------------------------------------------


@dataclass
class Tree:
    root: Path
    files: list[Path]  # every file a sync sends (.gitignore included)
    text_files: list[Path]  # the ones a change edits

    @property
    def size(self) -> int:
        return sum(p.stat().st_size for p in self.files)


def _file_sizes(rng: random.Random, count: int, total: int) -> list[int]:
    """Log-normal sizes (many small files, a few large ones) scaled to about `total` bytes."""
    weights = [rng.lognormvariate(0, 1.3) for _ in range(count)]
    scale = total / sum(weights)
    return [max(40, round(w * scale)) for w in weights]


def _text(rng: random.Random, size: int) -> str:
    lines, length = [], 0
    while length < size:
        line = f"value_{rng.randrange(10**6)} = {rng.random():.12f}  # {rng.randrange(10**9):x}\n"
        lines.append(line)
        length += len(line)
    return "".join(lines)[:size]


def make_tree(root: Path, count: int = 1000, total: int = 5_000_000, seed: int = 7) -> Tree:
    """A git repo of `count` synced files (.gitignore included) in nested dirs, plus ignored files it must skip."""
    rng = random.Random(seed)
    dirs = [Path(f"src/pkg{a}/mod{b}") for a in range(6) for b in range(4)]
    dirs += [Path(f"data/set{a}/part{b}/shard{c}") for a in range(3) for b in range(3) for c in range(2)]
    dirs += [Path("."), Path("docs"), Path("scripts")]
    files, text_files = [root / ".gitignore"], []
    for i, size in enumerate(_file_sizes(rng, count - 1, total)):
        binary = i % 4 == 3
        path = root / dirs[i % len(dirs)] / (f"blob{i}.bin" if binary else f"file{i}.py")
        path.parent.mkdir(parents=True, exist_ok=True)
        if binary:
            path.write_bytes(rng.randbytes(size))
        else:
            path.write_text(_text(rng, size))
            text_files.append(path)
        files.append(path)
    (root / ".gitignore").write_text("*.log\nbuild/\n__pycache__/\n")
    (root / "build").mkdir()
    (root / "build" / "ignored.bin").write_bytes(rng.randbytes(1_000_000))
    (root / "train.log").write_text("ignored\n" * 1000)
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    rng.shuffle(text_files)
    return Tree(root, files, text_files)


@dataclass
class SyncRun:
    """One `tpuctl sync --json`: wall time and what it reported per worker."""

    timing: Timing
    workers: list[dict[str, Any]]

    @property
    def bytes_total(self) -> int:
        return sum(w["bytes_sent"] for w in self.workers)

    @property
    def methods(self) -> str:
        return "+".join(sorted({w["method"] for w in self.workers}))

    @property
    def slowest_worker(self) -> float:
        return max(w["seconds"] for w in self.workers)


@dataclass
class SyncResult:
    workers: int
    tree_files: int
    tree_bytes: int
    cold: Samples = field(default_factory=Samples)
    batch: Samples = field(default_factory=Samples)
    full: Samples = field(default_factory=Samples)
    rsync: Samples = field(default_factory=Samples)
    rsync_fast_kex: Samples = field(default_factory=Samples)
    runs: dict[str, list[SyncRun]] = field(default_factory=lambda: {"cold": [], "batch": [], "full": []})
    rsync_bytes: list[int] = field(default_factory=list)


def tpuctl_sync(pod: Pod, tree: Tree, methods: set[str], files: int, *extra: str) -> SyncRun:
    timing, out = timed([TPUCTL, "sync", str(tree.root), "--json", *extra], pod.env)
    workers = json.loads(out)
    check(len(workers) == len(pod.fleet.workers), f"tpuctl sync reported {len(workers)} workers")
    for w in workers:
        check(w["ok"] and w["method"] in methods, f"worker {w['worker']}: {w}, expected a method of {methods}")
        check(w["files"] == files, f"worker {w['worker']} got {w['files']} files, expected {files}")
    return SyncRun(timing, workers)


def check_copies(workers: Sequence[Any], tree: Tree, changed: Path, remote_dir: str = REMOTE_DIR) -> None:
    """Every worker holds the changed file as it is here."""
    rel = changed.relative_to(tree.root)
    for w in workers:
        copy = w.path(f"{remote_dir}/{rel}")
        check(copy.read_bytes() == changed.read_bytes(), f"{copy} differs from {changed}")


def change_one_file(tree: Tree, number: int) -> Path:
    """Edit a different text file each time (append a line): mtime and size change, like an edit."""
    path = tree.text_files[number % len(tree.text_files)]
    with path.open("a") as f:
        f.write(f"changed = {number}\n")
    return path


def cold_sync(pods: Pods, tree: Tree, n: int, into: SyncResult) -> Timing:
    """First sync ever: fresh workers (a new fleet) and a fresh HOME (empty mirror cache, empty known_hosts)."""
    with start_fleet(n) as fleet:
        pod = pods.pod(fleet)
        run = tpuctl_sync(pod, tree, COLD_METHODS, len(tree.files))
        remote = [p for p in fleet.workers[-1].path(REMOTE_DIR).rglob("*") if p.is_file()]
        check(len(remote) == len(tree.files) + 1, f"a worker holds {len(remote)} files after a cold sync")  # + stamp
    into.runs["cold"].append(run)
    return run.timing


class Incremental:
    """Change one file and sync it with tpuctl (batch or --full) to the fleet; rsync the same change to one worker."""

    def __init__(self, pod: Pod, tree: Tree, into: SyncResult):
        self.pod, self.tree, self.into = pod, tree, into
        self.changes = 0
        self.changed: Path | None = None  # the last change
        self.synced: set[str] = set()  # the baseline dirs that have it
        self.known_hosts = pod.home / "rsync_known_hosts"

    def tpuctl(self, method: str) -> Timing:
        self.changes += 1
        changed = change_one_file(self.tree, self.changes)
        run = tpuctl_sync(self.pod, self.tree, {method}, 1, *(["--full"] if method == "full" else []))
        check_copies(self.pod.fleet.workers, self.tree, changed)
        self.into.runs[method].append(run)
        self.changed, self.synced = changed, set()
        return run.timing

    def rsync(self, kex: str | None = None) -> Timing:
        """rsync the tree to a baseline dir on worker 0 (one per kex); after a tpuctl() it sends that one change."""
        w, dest = self.pod.fleet.workers[0], BASELINE_DIR + (f"-{kex}" if kex else "")
        # rsync splits -e on spaces (no shell quoting): fine, as no option here has a space
        transport = " ".join(["ssh", *ssh_options(self.pod, self.known_hosts, kex)])
        argv = ["rsync", "-az", "--stats", "--filter=:- .gitignore", "--exclude=.git", "-e", transport]  # as tpuctl
        argv += [f"{self.tree.root}/", f"{self.pod.fleet.user}@{w.ip}:{dest}/"]
        timing, out = timed(argv, self.pod.env)
        if self.changed is not None and dest not in self.synced:
            sent = _rsync_stat(out, "Number of regular files transferred")
            check(sent == 1, f"rsync sent {sent} files, not the one changed:\n{out}")
            check_copies([w], self.tree, self.changed, dest)
            if kex is None:
                self.into.rsync_bytes.append(_rsync_stat(out, "Total bytes sent"))
        self.synced.add(dest)
        return timing


def _rsync_stat(text: str, label: str) -> int:
    m = re.search(rf"^{label}: ([\d,]+)", text, re.MULTILINE)
    return int(m.group(1).replace(",", "")) if m else -1


def bench_sync(pods: Pods, tree: Tree, n: int, repeat: int) -> SyncResult:
    result = SyncResult(n, len(tree.files), tree.size)
    progress(f"sync: cold, {repeat} runs (+1 warm-up), each on a fresh {n}-worker fleet")
    result.cold = measure({"cold": lambda: cold_sync(pods, tree, n, result)}, repeat)["cold"]
    result.runs["cold"] = result.runs["cold"][1:]  # drop the warm-up's
    progress(f"sync: incremental to {n} workers (batch, then --full), rsync to one worker after each change")
    with start_fleet(n) as fleet:
        pod = pods.pod(fleet)
        tpuctl_sync(pod, tree, COLD_METHODS, len(tree.files))  # the previous tree, on every worker
        inc = Incremental(pod, tree, result)
        inc.rsync(), inc.rsync(FAST_KEX)  # the previous tree, in worker 0's baseline dirs
        runs = {"batch": lambda: inc.tpuctl("batch"), "rsync": inc.rsync, "rsync_fast_kex": lambda: inc.rsync(FAST_KEX)}
        batch = measure(runs, repeat)
        full = measure({"full": lambda: inc.tpuctl("full")}, repeat)
    result.batch, result.rsync, result.rsync_fast_kex = batch["batch"], batch["rsync"], batch["rsync_fast_kex"]
    result.full = full["full"]
    for method in ("batch", "full"):
        result.runs[method] = result.runs[method][1:]
    result.rsync_bytes = result.rsync_bytes[1:]
    return result


# --- e. scale: 32, 64, 128 workers ---------------------------------------------------------------------------


@dataclass
class ScaleResult:
    workers: int
    exec_tpuctl: Samples
    exec_pdsh: Samples
    sync_tpuctl: Samples
    sync_rsync: Samples
    sync_methods: str
    verify: Samples


def bench_scale(pods: Pods, tree: Tree, sizes: Sequence[int], repeat: int) -> list[ScaleResult]:
    return [bench_scale_size(pods, tree, n, repeat) for n in sizes]


def bench_scale_size(pods: Pods, tree: Tree, n: int, repeat: int) -> ScaleResult:
    """exec and an incremental sync, against pdsh -f 128 and one rsync of the same change to one worker, on the same
    fleet (the stand-in sshds share the cores with tpuctl, as pdsh's and rsync's do)."""
    progress(f"scale: {n} workers: exec vs pdsh -f 128, then one edit synced vs rsync to one worker")
    with start_fleet(n) as fleet:
        pod = pods.pod(fleet)
        hostnames = sorted(w.hostname for w in fleet.workers)
        runs = {"tpuctl": lambda: tpuctl_exec(pod, hostnames), "pdsh": lambda: pdsh_exec(pod, hostnames, None, 128)}
        execs = measure(runs, repeat)
        sync = SyncResult(n, len(tree.files), tree.size)
        tpuctl_sync(pod, tree, COLD_METHODS, len(tree.files))  # the previous tree, on every worker
        inc = Incremental(pod, tree, sync)
        inc.rsync()  # the previous tree, in worker 0's baseline dir
        syncs = measure({"tpuctl": lambda: inc.tpuctl("batch"), "rsync": inc.rsync}, repeat)
        verify = measure({"verify": lambda: tpuctl_verify(pod, tree)}, repeat)["verify"]
    methods = "/".join(sorted({x.methods for x in sync.runs["batch"]}))
    return ScaleResult(n, execs["tpuctl"], execs["pdsh"], syncs["tpuctl"], syncs["rsync"], methods, verify)


def tpuctl_verify(pod: Pod, tree: Tree) -> Timing:
    """`tpuctl sync --verify`: every worker reads its tree against the last sync's manifest, and lists extras."""
    timing, out = timed([TPUCTL, "sync", str(tree.root), "--verify", "--json"], pod.env)
    states = {w["state"] for w in json.loads(out)["workers"]}
    check(states == {"same"}, f"sync --verify found {states}")
    return timing


def scale_table(results: list[ScaleResult]) -> Table:
    base = results[0]
    rows = []
    for r in results:
        rows.append(
            [
                str(r.workers),
                ms(r.exec_tpuctl.median),
                ms(r.exec_pdsh.median),
                f"{r.exec_tpuctl.median / r.exec_pdsh.median:.2f}",
                f"{r.exec_tpuctl.median / base.exec_tpuctl.median:.2f}",
                ms(r.sync_tpuctl.median),
                ms(r.sync_rsync.median),
                f"{r.sync_tpuctl.median / r.sync_rsync.median:.2f}",
                f"{r.sync_tpuctl.median / base.sync_tpuctl.median:.2f}",
                ms(r.verify.median),
            ]
        )
    cols = [
        "workers",
        "exec ms",
        "pdsh -f 128 ms",
        "exec ÷ pdsh",
        f"exec ÷ exec({base.workers})",
        "sync 1 edit ms",
        "rsync to 1 ms",
        "sync ÷ rsync",
        f"sync ÷ sync({base.workers})",
        "sync --verify ms",
    ]
    note = (
        "Medians. exec: `tpuctl exec -- hostname` (the recorded addresses, confirmed by host keys; the warm-up run "
        "asked the API) vs `pdsh -R ssh -f 128` with tpuctl's OpenSSH options. sync: `tpuctl sync DIR` after one "
        f"file of the 1,000-file tree changed (method {'/'.join(sorted({r.sync_methods for r in results}))}) vs "
        "`rsync -az` of the same change to one worker, on the same fleet. sync --verify: every worker checks its "
        "whole tree by content (sha256sum against the last sync's manifest) and lists extras (an rsync dry run)."
    )
    return Table("e. scale: exec and an incremental sync at 32, 64 and 128 workers", cols, rows, note)


# --- c. startup -----------------------------------------------------------------------------------------------


@dataclass
class StartupResult:
    commands: dict[str, Samples]
    forbidden: list[str]  # forbidden modules `check --help` imported
    modules: int  # how many modules it imported
    packages: dict[str, float]  # import seconds (self) per top-level package, largest first


def help_run(argv: Sequence[str]) -> Timing:
    timing, out = timed(argv, dict(os.environ))
    check("Usage:" in out or argv[-1] != "--help", f"{shlex.join(argv)} printed no usage")
    return timing


def import_profile(argv: Sequence[str]) -> tuple[list[str], dict[str, float]]:
    """(modules imported, seconds of import work per top-level package, largest first) from python -X importtime."""
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", *argv], capture_output=True, text=True, check=False, timeout=60
    )
    check(proc.returncode == 0, f"python -X importtime {shlex.join(argv)} failed:\n{proc.stderr[-2000:]}")
    modules, per_package = [], collections.Counter[str]()
    for m in re.finditer(r"^import time:\s+(\d+) \|\s+\d+ \| *(\S+)$", proc.stderr, re.MULTILINE):
        modules.append(m.group(2))
        per_package[m.group(2).split(".")[0]] += int(m.group(1)) / 1e6
    return modules, dict(per_package.most_common())


def is_forbidden(module: str) -> bool:
    return any(module == f or module.startswith(f + ".") for f in FORBIDDEN_IMPORTS)


def bench_startup() -> StartupResult:
    progress(f"startup: {STARTUP_REPEAT} runs each (+1 warm-up)")
    runs = {
        "python -c pass (floor)": lambda: help_run([sys.executable, "-c", "pass"]),
        "tpuctl --help": lambda: help_run([TPUCTL, "--help"]),
        "tpuctl check --help": lambda: help_run([TPUCTL, "check", "--help"]),
    }
    commands = measure(runs, STARTUP_REPEAT)
    modules, packages = import_profile(["-m", "tpuctl", "check", "--help"])
    return StartupResult(commands, sorted({m for m in modules if is_forbidden(m)}), len(modules), packages)


# --- reporting ------------------------------------------------------------------------------------------------


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list[str]]
    note: str = ""
    text_columns: int = 1  # the leading columns hold text (left-aligned); the others numbers (right-aligned)


def ms(seconds: float) -> str:
    return f"{seconds * 1000:,.0f}"


CPU_COLUMNS = ["CPU ms", "CPU ms all"]
CPU_NOTE = (
    "CPU ms: medians of the CPU time of the command and its children; CPU ms all: of the whole machine meanwhile, "
    "the stand-in workers' sshd, shells and rsync included (they share this machine's CPUs)."
)


def spread(s: Samples, cpu: bool = False) -> list[str]:
    """median, min, max wall time in ms; with cpu, also the median CPU ms of the command and of the machine."""
    return [ms(s.median), ms(s.min), ms(s.max), *([ms(s.cpu), ms(s.cpu_all)] if cpu else [])]


def kb(n: float) -> str:
    return f"{n / 1000:,.1f}"


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def machine_table(info: dict[str, str]) -> Table:
    return Table("Machine", ["", ""], [[k, v] for k, v in info.items()], text_columns=2)


def exec_table(results: list[ExecResult]) -> Table:
    rows = []
    for r in results:
        for label, samples in (
            ("tpuctl exec -- hostname", r.tpuctl),
            ("pdsh", r.pdsh),
            (f"pdsh, KexAlgorithms={FAST_KEX}", r.pdsh_fast_kex),
        ):
            ratio = "-" if samples is r.tpuctl else f"{r.tpuctl.median / samples.median:.2f}"
            rows.append([str(r.workers), label, *spread(samples, cpu=True), ratio])
    cols = ["workers", "command", "med ms", "min", "max", *CPU_COLUMNS, "tpuctl ÷ this"]
    note = (
        "`tpuctl exec -- hostname` (whole command; the warm-up run asked the API, the timed ones use the workers' "
        "recorded addresses, confirmed by their host keys) vs `pdsh -R ssh -f 64 -w IPS hostname` "
        "with tpuctl's OpenSSH options; the second pdsh row also forces the key exchange paramiko negotiates. "
        + CPU_NOTE
    )
    return Table("a. exec: one command on every worker", cols, rows, note, text_columns=2)


def sync_table(r: SyncResult) -> Table:
    def row(label: str, s: Samples, runs: list[SyncRun], per_worker_bytes: float, total_bytes: float) -> list[str]:
        slowest = ms(statistics.median(x.slowest_worker for x in runs)) if runs else "-"
        methods = "/".join(sorted({x.methods for x in runs})) if runs else "rsync"
        return [label, methods, *spread(s, cpu=True), slowest, kb(per_worker_bytes), kb(total_bytes)]

    def tpuctl_row(label: str, method: str, s: Samples) -> list[str]:
        runs = r.runs[method]
        total = statistics.median(x.bytes_total for x in runs)
        return row(label, s, runs, total / r.workers, total)

    rsync_bytes = statistics.median(r.rsync_bytes)
    rows = [
        tpuctl_row(f"tpuctl sync, cold, {r.workers} workers", "cold", r.cold),
        tpuctl_row(f"tpuctl sync, 1 file changed, {r.workers} workers", "batch", r.batch),
        tpuctl_row(f"tpuctl sync --full, 1 file changed, {r.workers} workers", "full", r.full),
        row("baseline: rsync -az, 1 file changed, 1 worker", r.rsync, [], rsync_bytes, rsync_bytes),
        row(f"baseline, KexAlgorithms={FAST_KEX}", r.rsync_fast_kex, [], rsync_bytes, rsync_bytes),
    ]
    cols = ["", "method", "med ms", "min", "max", *CPU_COLUMNS, "slowest worker ms", "kB sent/worker", "kB sent total"]
    note = (
        f"Tree: {r.tree_files:,} files, {r.tree_bytes / 1e6:.2f} MB (+ a .git dir and .gitignore'd files, skipped). "
        "Bytes as tpuctl --json reports them (batch: the batch file per worker; full: rsync's 'Total bytes sent') "
        "and rsync --stats for the baseline. tpuctl sync --full runs rsync over OpenSSH (its default key exchange). "
        "Slowest worker: the longest per-worker time tpuctl --json reports. " + CPU_NOTE
    )
    return Table("b. sync: a 1,000-file tree", cols, rows, note, text_columns=2)


def startup_table(r: StartupResult) -> Table:
    rows = [[name, ms(s.median), ms(s.min), ms(s.max)] for name, s in r.commands.items()]
    heaviest = ", ".join(f"{name} {ms(sec)} ms" for name, sec in list(r.packages.items())[:8])
    note = (
        f"`python -X importtime -m tpuctl check --help`: {r.modules} modules; forbidden "
        f"({', '.join(FORBIDDEN_IMPORTS)}) imported: {', '.join(r.forbidden) or 'none'}. "
        f"Import time by package: {heaviest}; total {ms(sum(r.packages.values()))} ms."
    )
    title = f"c. startup (median of {STARTUP_REPEAT} after a warm-up)"
    return Table(title, ["command", "med ms", "min", "max"], rows, note)


def target(label: str, value: float, limit: float, unit: str = "×") -> list[str]:
    shown = f"{value:.2f}×" if unit == "×" else f"{value:.3f} {unit}"
    return [label, shown, verdict(value <= limit)]


def targets(
    exec_results: list[ExecResult],
    sync: SyncResult | None,
    startup: StartupResult | None,
    bastion: BastionResult | None = None,
    scale: Sequence[ScaleResult] = (),
) -> list[list[str]]:
    rows = []
    for r in scale:
        what = f"sync at {r.workers} workers: an edit ≤ {SYNC_VS_RSYNC}× rsync of it to 1"
        rows.append(target(what, r.sync_tpuctl.median / r.sync_rsync.median, SYNC_VS_RSYNC))
    if scale:
        r = next((x for x in scale if x.workers == 32), scale[0])
        what = f"exec at {r.workers} workers ≤ {EXEC_VS_PDSH_32}× pdsh"
        rows.append(target(what, r.exec_tpuctl.median / r.exec_pdsh.median, EXEC_VS_PDSH_32))
    if bastion is not None:
        what = f"exec through a jump host: tpuctl ≤ {BASTION_VS_PDSH}× pdsh at {bastion.workers} workers"
        rows.append(target(what, bastion.ratio, BASTION_VS_PDSH))
    if exec_results:
        big, small = max(exec_results, key=lambda r: r.workers), min(exec_results, key=lambda r: r.workers)
        rows.append(target(f"exec: tpuctl ≤ {EXEC_VS_PDSH}× pdsh at {big.workers} workers", big.ratio, EXEC_VS_PDSH))
        scaling = big.tpuctl.median / small.tpuctl.median
        rows.append(
            target(f"exec: tpuctl({big.workers}) ≤ {EXEC_SCALING}× tpuctl({small.workers})", scaling, EXEC_SCALING)
        )
    if sync is not None:
        ratio = sync.batch.median / sync.rsync.median
        rows.append(
            target(f"sync: incremental to {sync.workers} workers ≤ {SYNC_VS_RSYNC}× rsync to 1", ratio, SYNC_VS_RSYNC)
        )
    if startup is not None:
        for name in ("tpuctl --help", "tpuctl check --help"):
            rows.append(target(f"startup: {name} ≤ {STARTUP_S} s", startup.commands[name].median, STARTUP_S, "s"))
        found = ", ".join(startup.forbidden)
        rows.append(
            [
                f"startup: check --help imports none of {', '.join(FORBIDDEN_IMPORTS)}",
                found or "none",
                verdict(not found),
            ]
        )
    return rows


def print_tables(tables: list[Table]) -> None:
    from rich.console import Console
    from rich.table import Table as RichTable

    console = Console()
    if not console.is_terminal:
        console.width = 150  # rich's default of 80 columns when piped wraps the tables
    for t in tables:
        rt = RichTable(title=t.title, title_justify="left", title_style="bold")
        for i, col in enumerate(t.columns):
            rt.add_column(col, justify="left" if i < t.text_columns else "right", overflow="fold")
        for row in t.rows:
            style = {"PASS": "green", "FAIL": "bold red"}.get(row[-1])
            rt.add_row(*row, style=style)
        console.print(rt)
        if t.note:
            console.print(t.note, style="dim", markup=False, highlight=False)
        console.print()


def markdown(tables: list[Table], info: dict[str, str], argv: Sequence[str]) -> str:
    parts = [f"\n## {info['date']} — {info['nproc']} × {info['cpu']}, Python {info['python']}\n"]
    parts.append(f"Command: `{shlex.join(argv)}`\n")
    for t in tables:
        parts.append(f"### {t.title}\n")
        header = t.columns if any(t.columns) else ["", ""]
        parts.append("| " + " | ".join(header) + " |")
        parts.append("|" + "|".join(":--" if i < t.text_columns else "--:" for i in range(len(header))) + "|")
        parts += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in t.rows]
        if t.note:
            parts.append(f"\n{t.note}")
        parts.append("")
    return "\n".join(parts)


def to_json(
    info: dict[str, str],
    exec_results: list[ExecResult],
    sync: SyncResult | None,
    startup: StartupResult | None,
    summary: list[list[str]],
    bastion: BastionResult | None = None,
) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "machine": info,
        "targets": [dict(zip(["target", "value", "result"], r, strict=True)) for r in summary],
    }
    doc["exec"] = [
        {"workers": r.workers, **{k: getattr(r, k).to_json() for k in ("tpuctl", "pdsh", "pdsh_fast_kex")}}
        for r in exec_results
    ]
    if sync is not None:
        doc["sync"] = {
            "workers": sync.workers,
            "tree_files": sync.tree_files,
            "tree_bytes": sync.tree_bytes,
            **{k: getattr(sync, k).to_json() for k in ("cold", "batch", "full", "rsync", "rsync_fast_kex")},
            "bytes_total": {k: [x.bytes_total for x in runs] for k, runs in sync.runs.items()},
            "rsync_bytes": sync.rsync_bytes,
        }
    if bastion is not None:
        samples = {"tpuctl": bastion.tpuctl.to_json(), "pdsh": bastion.pdsh.to_json()}
        doc["bastion"] = {"workers": bastion.workers, **samples}
    if startup is not None:
        doc["startup"] = {
            "commands": {k: s.to_json() for k, s in startup.commands.items()},
            "forbidden_imports": startup.forbidden,
            "modules": startup.modules,
            "import_seconds_by_package": startup.packages,
        }
    return doc


# --- main -----------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", default="1,8,32", help="fleet sizes for exec (default 1,8,32)")
    p.add_argument("--sync-workers", type=int, default=32, help="fleet size for sync (default 32)")
    p.add_argument("--repeat", type=int, default=5, help="timed runs of each measurement, after one warm-up")
    p.add_argument("--bastion-workers", type=int, default=32, help="fleet size behind the jump host (default 32)")
    p.add_argument("--scale-workers", default="32,64,128", help="fleet sizes of the scale part (default 32,64,128)")
    p.add_argument("--parts", default="exec,sync,startup,bastion,scale", help="which benchmarks to run (default all)")
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of tables")
    p.add_argument("--markdown", metavar="FILE", type=Path, help="append the results as a Markdown section")
    args = p.parse_args(argv)
    args.sizes = sorted({int(x) for x in args.workers.split(",")})
    args.parts = set(args.parts.split(","))
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    work = Path(tempfile.mkdtemp(prefix="tpuctl-bench-"))
    try:
        isolate_env(work)
        info = machine_info()
        exec_results: list[ExecResult] = []
        sync = startup = bastion = None
        scale: list[ScaleResult] = []
        with FakeTpuApi() as api:
            pods = Pods(api, work)
            if "startup" in args.parts:
                startup = bench_startup()
            if "exec" in args.parts:
                exec_results = bench_exec(pods, args.sizes, args.repeat)
            if "sync" in args.parts:
                tree = make_tree(work / "src")
                sync = bench_sync(pods, tree, args.sync_workers, args.repeat)
            if "bastion" in args.parts:
                bastion = bench_bastion(pods, args.bastion_workers, args.repeat)
            if "scale" in args.parts:
                sizes = sorted({int(x) for x in args.scale_workers.split(",")})
                scale = bench_scale(pods, make_tree(work / "scale-src"), sizes, args.repeat)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    summary = targets(exec_results, sync, startup, bastion, scale)
    tables = [machine_table(info)]
    tables += [exec_table(exec_results)] if exec_results else []
    tables += [sync_table(sync)] if sync else []
    tables += [startup_table(startup)] if startup else []
    tables += [bastion_table(bastion)] if bastion else []
    tables += [scale_table(scale)] if scale else []
    tables.append(Table("Targets", ["target", "measured", "result"], summary, text_columns=1))
    if args.json:
        print(json.dumps(to_json(info, exec_results, sync, startup, summary, bastion), indent=2))
    else:
        print_tables(tables)
    if args.markdown:
        with args.markdown.open("a") as f:
            f.write(markdown(tables, info, [os.path.relpath(sys.executable), *sys.argv]))
    return 0 if all(row[-1] == "PASS" for row in summary) else 1


if __name__ == "__main__":
    raise SystemExit(main())
