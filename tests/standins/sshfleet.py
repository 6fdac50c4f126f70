"""A fleet of real sshd "workers" on this machine, each standing in for one TPU VM.

Every worker is a real OpenSSH server in its own UTS + mount namespaces: it has its own hostname, its own
/root, /tmp (hence its own tmux server) and /etc/hosts, and shares the rest of this machine's filesystem
(python, rsync, tmux, ...). All workers listen on one port, each on its own loopback address, like a real
pod whose workers all run sshd on one port at different IPs.

    with start_fleet(4) as fleet:
        w = fleet.workers[0]
        # ssh -i {fleet.key_path} -p {fleet.port} -o UserKnownHostsFile={fleet.known_hosts} root@{w.ip}
        assert w.path("/root/out.txt").read_text() == ...
"""

from __future__ import annotations

import atexit
import contextlib
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from standins import free_port
from standins.guest_agent import GuestAgent, passwd_with

SSHD = "/usr/sbin/sshd"
# sshd refuses to start without its privilege-separation directory.
PRIVSEP_DIR = Path("/run/sshd")
UNSHARE = ["unshare", "--uts", "--mount", "--propagation", "private", "--"]
# a worker's sshd listening (or a process inside it): 128 of them starting beside a busy neighbour test took longer
# than 10 s once; only a failure waits this long
READY_TIMEOUT_S = 30.0
TERM_GRACE_S = 2.0
KILL_WAIT_S = 5.0
POLL_S = 0.02
# The environment sshd gives a root session; spawn() uses it too, so spawned processes look like remote ones.
SESSION_ENV = {
    "HOME": "/root",
    "USER": "root",
    "LOGNAME": "root",
    "SHELL": "/bin/bash",
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
}

# Fleets not closed yet: an interpreter exit without close() still tears them down (see _close_open_fleets).
_OPEN_FLEETS: set[SshFleet] = set()


@dataclass(frozen=True)
class Network:
    """What a worker's network offers beyond the fleet: more /etc/hosts lines and the environment its SSH sessions
    get (a GCS stand-in's route and endpoints, as a TPU VM reaches the real one)."""

    hosts: str = ""
    env: Mapping[str, str] = field(default_factory=dict)
    netns: str | None = None  # a network namespace (standins.bastion) the workers live in, out of this one's reach


class SshFleetError(RuntimeError):
    """A worker's sshd did not start, or is not running when it must be."""


class StandinWorker:
    """One sshd "TPU VM". Its files live under `dir` on this machine and persist across sshd restarts."""

    def __init__(
        self,
        index: int,
        hostname: str,
        ip: str,
        port: int,
        dir: Path,
        authorized_keys: Path,
        network: Network | None = None,
        agent: GuestAgent | None = None,
    ) -> None:
        self.index = index
        self.network = network or Network()
        self.hostname = hostname
        self.ip = ip
        self.port = port
        self.dir = dir
        self.home = dir / "home"  # the worker's /root
        self.tmp = dir / "tmp"  # the worker's /tmp
        self.crash_dir = dir / "crash"  # the worker's /var/crash (system crash reports: clean-logs empties it)
        self.hosts_file = dir / "hosts"  # the worker's /etc/hosts
        self.host_key = dir / "ssh_host_ed25519_key"
        self.sshd_config = dir / "sshd_config"
        self.log = dir / "sshd.log"
        self._authorized_keys = authorized_keys
        self.agent = agent  # where sshd asks for keys (the API's view) instead of a fixed authorized_keys
        self.passwd = dir / "passwd"  # the worker's /etc/passwd, with the agent's accounts
        self._sshd: subprocess.Popen[bytes] | None = None
        self._frozen = False
        # Every mount namespace this worker has had (one per sshd start), as "mnt:[4026532177]": close()
        # kills every process in them. The kernel hands a freed namespace's number out again at once, so an
        # open fd holds each one alive until close(): a recorded number never comes to mean another namespace.
        self.namespaces: set[str] = set()
        self._ns_fds: list[int] = []
        self._spawned: list[subprocess.Popen[bytes]] = []

    def __repr__(self) -> str:
        return f"StandinWorker({self.index}, {self.hostname!r}, {self.ip}:{self.port}, pid={self.sshd_pid})"

    @property
    def sshd_pid(self) -> int | None:
        """Pid of the listening sshd, None when stopped.

        unshare and bash both exec, so the pid of the Popen that started it is sshd's own.
        """
        return self._sshd.pid if self._sshd is not None else None

    @property
    def running(self) -> bool:
        return self._live_sshd() is not None

    def path(self, inside: str) -> Path:
        """Map a path as the worker sees it to the path on this machine.

        /root/..., /tmp/... and /var/crash/... are the worker's own, and so are ~/... and relative paths (an SSH
        session starts in /root); /etc/hosts is its own file; any other path is shared with this machine.
        """
        if inside == "~" or inside.startswith("~/"):
            inside = "/root" + inside[1:]
        elif not inside.startswith("/"):
            inside = "/root/" + inside
        for mount_point, host_dir in (("/root", self.home), ("/tmp", self.tmp), ("/var/crash", self.crash_dir)):
            if inside == mount_point or inside.startswith(mount_point + "/"):
                return host_dir / inside[len(mount_point) :].lstrip("/")
        if inside == "/etc/hosts":
            return self.hosts_file
        return Path(inside)

    def spawn(self, argv: list[str], cwd: str | None = None, env: Mapping[str, str] | None = None) -> int:
        """Start a long-running process inside the worker, as if started over SSH; return its pid.

        It gets a new session, stdin from /dev/null and its output in `dir`/spawn-N.log. `cwd` is a path
        inside the worker (default /root); `env` adds to an SSH-session-like environment. It is killed at
        close(). Returns once the process is inside the worker's namespaces.
        """
        sshd = self._require_sshd()
        log_path = self.dir / f"spawn-{len(self._spawned)}.log"
        # --wdns resolves cwd inside the worker (plain --wd resolves it on this machine, before entering).
        # Without --fork nsenter setns()es itself and execs argv, so the Popen's pid is the process's own.
        net = ["-n"] if self.network.netns else []
        cmd = ["nsenter", "-t", str(sshd.pid), "-m", "-u", *net, f"--wdns={cwd or '/root'}", "--", *argv]
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env={**SESSION_ENV, **self.network.env, **(env or {})},
                start_new_session=True,
            )
        self._spawned.append(proc)
        self._wait_entered(proc)
        return proc.pid

    def stop_sshd(self) -> None:
        """SIGTERM the listening sshd and wait for it. Open sessions keep running, as with a real sshd."""
        if self._sshd is None:
            return
        self.thaw()
        self._sshd.terminate()
        try:
            self._sshd.wait(timeout=KILL_WAIT_S)
        except subprocess.TimeoutExpired:
            self._sshd.kill()
            self._sshd.wait()
        self._sshd = None

    def start_sshd(self) -> None:
        """Start sshd again (same IP, port and host key; files persist) and wait until it answers."""
        if self.running:
            raise SshFleetError(f"worker {self.index}: sshd is already running")
        self._launch()
        _wait_ready([self])

    def crash(self) -> None:
        """SIGKILL everything on the worker, sshd and its sessions included: the VM died mid-command. Swept until
        nothing is left: a process forking while one sweep reads /proc can have a child that sweep did not see."""
        self.thaw()
        deadline = time.monotonic() + KILL_WAIT_S
        while (alive := _alive(self.namespaces, self._children())) and time.monotonic() < deadline:
            _signal(alive, signal.SIGKILL)
            time.sleep(0.01)
        if self._sshd is not None:
            self._sshd.wait()
            self._sshd = None

    def new_host_key(self) -> None:
        """Give the worker a new host key and restart its sshd, as when a TPU VM is deleted and recreated."""
        self.stop_sshd()
        for path in (self.host_key, self.host_key.with_name(self.host_key.name + ".pub")):
            path.unlink(missing_ok=True)
        _keygen([self.host_key])
        self.start_sshd()

    def freeze(self) -> None:
        """SIGSTOP the listener: a TCP connect still succeeds (the kernel accepts), but no banner comes."""
        os.kill(self._require_sshd().pid, signal.SIGSTOP)
        self._frozen = True

    def thaw(self) -> None:
        """Undo freeze()."""
        sshd = self._live_sshd()
        if self._frozen and sshd is not None:
            os.kill(sshd.pid, signal.SIGCONT)
        self._frozen = False

    # -- internals used by start_fleet and SshFleet --------------------------------------------------------

    def _prepare(self) -> None:
        """Create the worker's dirs and files (start_fleet makes the host key, for all workers at once)."""
        self.home.mkdir(mode=0o700, parents=True)
        self.tmp.mkdir()
        self.tmp.chmod(0o1777)  # like /tmp: tmux and others check its mode
        self.crash_dir.mkdir()
        # The hostname must resolve on the worker (gloo, JAX coordinators and `hostname -i` need it).
        self.hosts_file.write_text(f"127.0.0.1 localhost\n{self.ip} {self.hostname}\n{self.network.hosts}")
        self.sshd_config.write_text(self._sshd_config_text())
        if self.agent is not None:
            self.passwd.write_text(passwd_with(self.agent.users))

    def _sshd_config_text(self) -> str:
        return "\n".join(
            [
                f"ListenAddress {self.ip}:{self.port}",
                f"HostKey {self.host_key}",
                "PidFile none",
                # Outside /root and /tmp, which are mounted over inside the worker.
                *(self.agent.sshd_lines() if self.agent else [f"AuthorizedKeysFile {self._authorized_keys}"]),
                "PasswordAuthentication no",
                "KbdInteractiveAuthentication no",
                "PubkeyAuthentication yes",
                "PermitRootLogin prohibit-password",
                "UsePAM no",
                "StrictModes no",
                # The default 10:30:100 drops connections when a fan-out opens many at once.
                "MaxStartups 200",
                "MaxSessions 100",
                "Subsystem sftp internal-sftp",
                "LogLevel ERROR",
                "PrintMotd no",
                "PrintLastLog no",
                # one line: sshd takes only the first SetEnv
                *(
                    [" ".join(["SetEnv", *(f"{k}={v}" for k, v in self.network.env.items())])]
                    if self.network.env
                    else []
                ),
                "",
            ]
        )

    def _launch_script(self) -> str:
        q = shlex.quote
        return "\n".join(
            [
                "set -e",
                f"hostname {q(self.hostname)}",
                # The sources live outside /root and /tmp, so no mount hides the next one's source.
                f"mount --bind {q(str(self.home))} /root",
                f"mount --bind {q(str(self.tmp))} /tmp",
                "mkdir -p /var/crash",  # the mount point (Debian images have it; an empty one on this machine else)
                f"mount --bind {q(str(self.crash_dir))} /var/crash",
                f"mount --bind {q(str(self.hosts_file))} /etc/hosts",
                *([f"mount --bind {q(str(self.passwd))} /etc/passwd"] if self.agent else []),
                f"exec {SSHD} -D -e -f {q(str(self.sshd_config))}",
            ]
        )

    def _launch(self) -> None:
        """Start sshd in fresh UTS + mount namespaces without waiting for it (see _wait_ready)."""
        PRIVSEP_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
        netns = ["ip", "netns", "exec", self.network.netns] if self.network.netns else []  # execs: the pid stays
        cmd = [*netns, *UNSHARE, "bash", "-c", self._launch_script()]
        with open(self.log, "ab") as log:
            self._sshd = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
        self._frozen = False

    def _shows_banner(self) -> bool:
        if self.network.netns:  # out of reach from here: look for its listening socket in its namespace instead
            return self._listening()
        try:
            with socket.create_connection((self.ip, self.port), timeout=0.5) as sock:
                if not sock.recv(64).startswith(b"SSH-"):
                    return False
                # Answering with a banner keeps sshd from logging a kex_exchange_identification error.
                sock.sendall(b"SSH-2.0-standin-probe\r\n")
                return True
        except OSError:
            return False

    def _listening(self) -> bool:
        """sshd listens at ip:port, as its network namespace's /proc/PID/net/tcp shows (state 0A: LISTEN)."""
        sshd = self._live_sshd()
        if sshd is None:
            return False
        local = f"{socket.inet_aton(self.ip)[::-1].hex().upper()}:{self.port:04X}"
        try:
            rows = Path(f"/proc/{sshd.pid}/net/tcp").read_text().splitlines()[1:]
        except OSError:
            return False
        return any(row.split()[1] == local and row.split()[3] == "0A" for row in rows)

    def _wait_entered(self, proc: subprocess.Popen[bytes]) -> None:
        """Wait until a spawned process is inside the worker (or already gone)."""
        deadline = time.monotonic() + READY_TIMEOUT_S
        while proc.poll() is None and time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{proc.pid}/ns/mnt") in self.namespaces:
                    return
            time.sleep(0.002)

    def _note_namespace(self) -> None:
        """Record and hold sshd's mount namespace, once it has left ours (just after Popen it may not)."""
        sshd = self._live_sshd()
        if sshd is None:
            return
        try:
            fd = os.open(f"/proc/{sshd.pid}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return
        ns = os.readlink(f"/proc/self/fd/{fd}")
        # Never mark this machine's own namespace for killing; hold each namespace once.
        if ns == os.readlink("/proc/self/ns/mnt") or ns in self.namespaces:
            os.close(fd)
            return
        self.namespaces.add(ns)
        self._ns_fds.append(fd)

    def _release_namespaces(self) -> None:
        for fd in self._ns_fds:
            os.close(fd)
        self._ns_fds.clear()

    def _children(self) -> list[subprocess.Popen[bytes]]:
        return [p for p in [self._sshd, *self._spawned] if p is not None]

    def _live_sshd(self) -> subprocess.Popen[bytes] | None:
        return self._sshd if self._sshd is not None and self._sshd.poll() is None else None

    def _require_sshd(self) -> subprocess.Popen[bytes]:
        sshd = self._live_sshd()
        if sshd is None:
            raise SshFleetError(f"worker {self.index}: sshd is not running")
        return sshd

    def _failure(self, why: str) -> SshFleetError:
        log = self.log.read_text(errors="replace") if self.log.exists() else "(no log)"
        return SshFleetError(f"worker {self.index} ({self.ip}:{self.port}) {why}; sshd log:\n{log}")


class SshFleet:
    """The workers plus the client side: one key pair for all, and a known_hosts path of the test's own."""

    user: str = "root"

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = 0  # set by start_fleet
        self.network = Network()
        self.agent: GuestAgent | None = None
        self.key_path = root / "client_key"  # the client's private key; the public one is client_key.pub
        self.known_hosts = root / "known_hosts"  # not created: the client under test fills it
        self.workers: list[StandinWorker] = []
        self._closed = False
        _OPEN_FLEETS.add(self)

    def __repr__(self) -> str:
        return f"SshFleet({len(self.workers)} workers, port={self.port}, root={self.root})"

    @property
    def ips(self) -> list[str]:
        return [w.ip for w in self.workers]

    def close(self) -> None:
        """Kill all that lives in the workers (sshd, sessions, spawned processes); remove the fleet's dir."""
        if self._closed:
            return
        self._closed = True
        _OPEN_FLEETS.discard(self)
        for w in self.workers:
            w._note_namespace()
            w.thaw()  # a stopped sshd would not act on SIGTERM
        namespaces = set().union(*(w.namespaces for w in self.workers))
        _terminate(namespaces, [p for w in self.workers for p in w._children()])
        for w in self.workers:
            w._sshd = None
            w._release_namespaces()
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> SshFleet:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def start_fleet(
    n: int,
    base_dir: Path | None = None,
    like: SshFleet | None = None,
    network: Network | None = None,
    ips: list[str] | None = None,
    agent: GuestAgent | None = None,
) -> SshFleet:
    """Start n sshd workers and wait until every one shows its SSH banner.

    The fleet lives in a fresh `tpuctl-fleet-*` dir made in base_dir (default /var/tmp), which must be
    outside /tmp: each worker mounts its own dir over /tmp, which would hide files kept there. `like`: new
    VMs of the same project, as a recreated TPU's: they accept the same client key (the project's SSH keys)
    and listen on the same port, at addresses and with host keys of their own (and on the same `network`). `ips`:
    the workers' addresses (default: a random 127.A.B.0/24 of the fleet's own). `agent`: the workers accept
    the keys that guest agent serves (the node's metadata, an OS Login profile) instead of the fleet's client key.
    """
    if not 1 <= n <= 252:
        raise ValueError(f"a fleet has 1..252 workers (one loopback /24), not {n}")
    parent = Path(base_dir or "/var/tmp").resolve()
    if parent == Path("/tmp") or Path("/tmp") in parent.parents:
        raise ValueError(f"fleet base_dir must be outside /tmp, got {parent}")
    fleet = SshFleet(Path(tempfile.mkdtemp(prefix="tpuctl-fleet-", dir=parent)))
    try:
        fleet.network = network or (like.network if like else Network())
        fleet.agent = agent
        _populate(fleet, n, like, ips)
    except BaseException:
        fleet.close()
        raise
    return fleet


def _populate(fleet: SshFleet, n: int, like: SshFleet | None = None, ips: list[str] | None = None) -> None:
    fleet_id = secrets.token_hex(2)
    # A random 127.A.B.0/24 per fleet, so that fleets (also in parallel test processes) do not collide.
    prefix = f"127.{1 + secrets.randbelow(250)}.{1 + secrets.randbelow(250)}"
    ips = ips or [f"{prefix}.{i + 2}" for i in range(n)]
    fleet.port = like.port if like else free_port(ips[0])
    authorized_keys = fleet.root / "authorized_keys"
    for i, ip in enumerate(ips):
        wdir = fleet.root / f"w{i}"
        wdir.mkdir()
        worker = StandinWorker(i, f"w{i}-{fleet_id}", ip, fleet.port, wdir, authorized_keys, fleet.network, fleet.agent)
        fleet.workers.append(worker)
    if like:
        for suffix in ("", ".pub"):
            shutil.copyfile(f"{like.key_path}{suffix}", f"{fleet.key_path}{suffix}")
        fleet.key_path.chmod(0o600)
    _keygen([*([] if like else [fleet.key_path]), *(w.host_key for w in fleet.workers)])
    shutil.copyfile(fleet.key_path.with_name(fleet.key_path.name + ".pub"), authorized_keys)
    # Launch every sshd first and only then wait: the starts overlap, so 32 workers take well under 1 s.
    for w in fleet.workers:
        w._prepare()
        w._launch()
    _wait_ready(fleet.workers)


def _keygen(paths: Iterable[Path]) -> None:
    """ed25519 keys without passphrase, generated in parallel."""
    procs = [(path, _start_keygen(path)) for path in paths]
    for path, proc in procs:
        out, _ = proc.communicate()
        if proc.returncode != 0:
            raise SshFleetError(f"ssh-keygen for {path} failed: {out.decode(errors='replace')}")


def _start_keygen(path: Path) -> subprocess.Popen[bytes]:
    cmd = ["ssh-keygen", "-t", "ed25519", "-N", "", "-q", "-C", path.parent.name, "-f", str(path)]
    return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _wait_ready(workers: list[StandinWorker], timeout: float = READY_TIMEOUT_S) -> None:
    """Poll until every worker's sshd shows its SSH banner; fail early, with its log, if one exits."""
    deadline = time.monotonic() + timeout
    pending = list(workers)
    while pending:
        for w in pending:
            if not w.running:
                raise w._failure("sshd exited during start")
        pending = [w for w in pending if not w._shows_banner()]
        if pending and time.monotonic() > deadline:
            raise pending[0]._failure(f"showed no SSH banner within {timeout:.0f} s")
        if pending:
            time.sleep(POLL_S)
    for w in workers:
        w._note_namespace()


def _pids_in(namespaces: set[str]) -> set[int]:
    """Live processes whose mount namespace is one of `namespaces` (a zombie has none: it does not count)."""
    found: set[int] = set()
    if not namespaces:
        return found
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError):  # gone meanwhile, or a zombie
                if os.readlink(f"/proc/{entry.name}/ns/mnt") in namespaces:
                    found.add(int(entry.name))
    found.discard(os.getpid())
    return found


def _signal(pids: Iterable[int], sig: signal.Signals) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def _alive(namespaces: set[str], children: list[subprocess.Popen[bytes]]) -> set[int]:
    # poll() reaps our own children, which would otherwise linger as zombies.
    alive = _pids_in(namespaces) | {p.pid for p in children if p.poll() is None}
    if alive:
        return alive
    # None, as far as one scan of /proc saw: a process forked while the scan ran, behind it, is in the next one
    time.sleep(POLL_S)
    return _pids_in(namespaces)


def _terminate(namespaces: set[str], children: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM every process in the namespaces (and our children); SIGKILL what survives a short grace."""
    for sig, wait_s in ((signal.SIGTERM, TERM_GRACE_S), (signal.SIGKILL, KILL_WAIT_S)):
        alive = _alive(namespaces, children)
        if not alive:
            return
        _signal(alive, sig)
        if sig == signal.SIGTERM:
            _signal(alive, signal.SIGCONT)  # a stopped process acts on SIGTERM only once continued
        deadline = time.monotonic() + wait_s
        while _alive(namespaces, children) and time.monotonic() < deadline:
            time.sleep(POLL_S)
            if sig == signal.SIGKILL:
                _signal(_pids_in(namespaces), signal.SIGKILL)  # sessions may have forked since the scan


def _close_open_fleets() -> None:
    for fleet in list(_OPEN_FLEETS):
        fleet.close()


atexit.register(_close_open_fleets)
