"""How tpuctl logs in to a worker: tpuctl's own known_hosts, the private key, the system ssh command line.

Both transports read the same settings from here: paramiko for fan-out commands, and the OpenSSH client for
interactive shells and as rsync's transport.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shlex
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from tpuctl.errors import ConfigError, HostKeyChangedError, ProxyError, TpuctlError
from tpuctl.imports import load_paramiko

if TYPE_CHECKING:
    import paramiko

    from tpuctl.config import Settings


def host_key_name(host: str, port: int) -> str:
    """The name known_hosts files use for a host (OpenSSH's convention, which paramiko follows)."""
    return host if port == 22 else f"[{host}]:{port}"


class KnownHosts:
    """tpuctl's known_hosts: new host keys are recorded, a changed key is refused unless `replace` is set.

    TPU VMs get recreated with new host keys under the same IPs, so accepting a changed key must be an explicit
    decision (--replace-host-keys), never silent. Shared by all worker threads, hence the lock.
    """

    def __init__(self, path: Path, replace: bool = False):
        paramiko = load_paramiko()

        self.path, self.replace = path, replace
        self._lock = threading.Lock()
        self._keys = paramiko.HostKeys()
        if path.exists():
            try:
                self._keys.load(str(path))
            except (OSError, paramiko.SSHException) as e:
                raise ConfigError(f"cannot read known_hosts file {path}: {e}") from None

    def confirm(self, hostname: str, key: paramiko.PKey) -> None:
        """Accept only the key recorded for this host (an address not from the API must be confirmed by it)."""
        with self._lock:
            recorded = (self._keys.lookup(hostname) or {}).get(key.get_name())
        if recorded is None or recorded != key:
            raise UnconfirmedAddress(f"{hostname} is not the worker tpuctl recorded at that address")

    def knows(self, hostname: str) -> bool:
        with self._lock:
            return bool(self._keys.lookup(hostname))

    def verify(self, hostname: str, key: paramiko.PKey) -> None:
        with self._lock:
            known = self._keys.lookup(hostname) or {}
            recorded = known.get(key.get_name())
            if recorded is not None and recorded == key:
                return
            if recorded is not None and not self.replace:
                raise HostKeyChangedError(
                    f"{hostname} presented a different {key.get_name()} host key than the one in {self.path}",
                    "if the TPU was recreated, rerun with --replace-host-keys",
                )
            self._merge_recorded_meanwhile()
            self._keys.add(hostname, key.get_name(), key)
            self._save()

    def _merge_recorded_meanwhile(self) -> None:
        """Hosts another writer recorded since this file was read (OpenSSH: the jump host) must survive our save."""
        paramiko = load_paramiko()
        on_disk = paramiko.HostKeys()
        with contextlib.suppress(OSError, paramiko.SSHException):
            on_disk.load(str(self.path))
        for name in list(on_disk):
            if name not in self._keys:
                for keytype, key in on_disk[name].items():
                    self._keys.add(name, keytype, key)

    def forget(self, hostnames: list[str]) -> None:
        """Drop recorded keys of these hosts (before the OpenSSH client connects with --replace-host-keys)."""
        with self._lock:
            changed = False
            for name in hostnames:
                while name in self._keys:  # deletes one entry per call
                    del self._keys[name]
                    changed = True
            if changed:
                self._save()

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + f".tmp{os.getpid()}")
        self._keys.save(str(tmp))
        os.chmod(tmp, 0o600)
        os.replace(tmp, self.path)

    def policy(self, confirm_only: bool = False) -> paramiko.MissingHostKeyPolicy:
        """What paramiko asks about a host key it does not know: verify (record new, refuse changed) or, with
        `confirm_only`, accept nothing but the recorded key."""
        base = load_paramiko().MissingHostKeyPolicy

        check = self.confirm if confirm_only else self.verify

        class _Verify(base):  # type: ignore[misc,valid-type]
            def missing_host_key(self, client: Any, hostname: str, key: paramiko.PKey) -> None:
                check(hostname, key)

        return _Verify()


class UnconfirmedAddress(TpuctlError):
    """A recorded address answered with another host key than the one recorded for it (or none is recorded)."""


class _QuickAckSocket(socket.socket):
    """A TCP socket that acknowledges every segment at once.

    SSH's handshake is a ping-pong of small packets. With Nagle on the server and delayed ACKs here, each
    exchange where the server sends two packets in a row (e.g. sshd's host-key announcement right after auth,
    then the channel confirmation) stalls ~40 ms waiting for our delayed ACK. Measured on loopback: connect +
    auth + channel went from ~140 ms to ~30 ms. Linux resets TCP_QUICKACK by itself, hence after every recv.
    """

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        data = super().recv(bufsize, flags)
        if hasattr(socket, "TCP_QUICKACK"):
            self.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
        return data


def open_socket(host: str, port: int, timeout: float) -> socket.socket:
    """A connected TCP socket for paramiko, tuned for many short SSH sessions (no Nagle, quick ACKs)."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = _QuickAckSocket(family, kind, proto)
    try:
        sock.settimeout(timeout)
        sock.connect(address)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except BaseException:
        sock.close()
        raise
    return sock


@dataclass(frozen=True)
class Proxy:
    """How workers that are not reachable directly are reached (the ssh_proxy setting): through a jump host, over
    one SSH connection to it shared by every worker's (paramiko's direct-tcpip channels, OpenSSH's -W), or through a
    ProxyCommand run once per connection (an IAP tunnel, a corporate gateway)."""

    command: str = ""  # a ProxyCommand; %h, %p, %r: the worker's address, its port, the user; %%: a %
    host: str = ""  # else a jump host
    port: int = 22
    user: str = ""

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return self.command or f"{self.user}@{host}" + (f":{self.port}" if self.port != 22 else "")

    def expand(self, host: str, port: int, user: str) -> str:
        """The ProxyCommand for one worker, its tokens replaced as OpenSSH replaces them."""
        tokens = {"h": host, "p": str(port), "r": user, "%": "%"}
        return re.sub(r"%(.)", lambda m: tokens.get(m[1], m[0]), self.command)


JUMP_HOST_RE = re.compile(
    r"(?:(?P<user>[^@\s]+)@)?(?:\[(?P<v6>[0-9a-fA-F:.]+)\]|(?P<host>[A-Za-z0-9._-]+))(?::(?P<port>\d+))?"
)


def proxy_of(settings: Settings) -> Proxy | None:
    """The ssh_proxy setting: a command when it has spaces or %-tokens, else [USER@]HOST[:PORT]; None when unset."""
    text = (settings.ssh_proxy or "").strip()
    if not text:
        return None
    if any(c.isspace() for c in text) or "%" in text:
        return Proxy(command=text)
    match = JUMP_HOST_RE.fullmatch(text)
    port = int(match["port"] or 22) if match else 0
    if match is None or not 0 < port < 65536:
        raise ConfigError(
            f"ssh_proxy {text!r} is neither a jump host nor a command",
            "give [USER@]HOST[:PORT], or a ProxyCommand with %h and %p",
        )
    return Proxy(host=match["v6"] or match["host"], port=port, user=match["user"] or settings.ssh_user)


class JumpHost:
    """The jump host's OpenSSH master connection (ControlMaster), opened once before a fan-out: every worker
    connection is then an `ssh -W` through it, one more channel of that connection rather than one more login.

    (Channels opened by paramiko over one paramiko connection were tried first: under a 32-worker fan-out paramiko
    can send a channel's data after its close, and sshd then drops the whole connection.)"""

    _lock = threading.Lock()
    _ready: ClassVar[dict[str, float]] = {}  # the master's ssh command line -> when it was last seen up
    _failed: ClassVar[dict[str, tuple[float, TpuctlError]]] = {}

    @classmethod
    def ensure_master(cls, settings: Settings, proxy: Proxy) -> None:
        """Start the master unless it runs (or multiplexing is off); the workers queued behind a failed start fail
        with it rather than try again one by one."""
        base = jump_command(settings, proxy)
        if control_dir(settings) is None:
            return
        key = shlex.join(base)
        with cls._lock:
            failed = cls._failed.get(key)
            if failed is not None and time.monotonic() - failed[0] < settings.connect_timeout:
                raise failed[1]
            if time.monotonic() - cls._ready.get(key, -1e9) < 5:  # checked a moment ago (this fan-out)
                return
            try:
                cls._start(settings, proxy, base)
            except TpuctlError as e:
                cls._failed[key] = (time.monotonic(), e)
                raise
            cls._ready[key] = time.monotonic()
            cls._failed.pop(key, None)

    @staticmethod
    def _start(settings: Settings, proxy: Proxy, base: list[str]) -> None:
        import subprocess
        import tempfile

        timeout = settings.connect_timeout + 10
        check = subprocess.run([*base, "-O", "check", proxy.host], capture_output=True, timeout=timeout, check=False)
        if check.returncode == 0:
            return
        # -f: into the background once logged in. Its stderr goes to a file: a pipe would stay open in the master.
        with tempfile.TemporaryFile() as errors:
            try:
                started = subprocess.run(
                    [*base, "-o", "ControlMaster=yes", "-N", "-f", proxy.host],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=errors,
                    timeout=timeout,
                    check=False,
                )
            except subprocess.TimeoutExpired:
                raise ProxyError(f"the jump host {proxy} is unreachable: no login within {timeout:g}s") from None
            errors.seek(0)
            lines = errors.read().decode(errors="replace").strip().splitlines()
        if started.returncode != 0:
            why = lines[-1].removeprefix("ssh: ") if lines else f"ssh exited {started.returncode}"
            raise ProxyError(f"the jump host {proxy} is unreachable: {why}")


def jump_command(settings: Settings, proxy: Proxy, known_hosts_only: bool = False) -> list[str]:
    """The OpenSSH command line that logs in to the jump host with tpuctl's key and known_hosts (not ProxyJump,
    which would use neither), multiplexed like the workers' connections; `-W HOST:PORT JUMP` completes it."""
    return [
        *_openssh(settings, proxy.port, proxy.user, known_hosts_only),
        "-o", "BatchMode=yes",
        *_multiplexing(settings, proxy.host, proxy.port, proxy.user),
    ]  # fmt: skip


def _openssh(settings: Settings, port: int, user: str, known_hosts_only: bool) -> list[str]:
    """The OpenSSH client logging in as tpuctl does: its key alone, its own known_hosts (written unhashed, as
    paramiko writes it: a hashed entry costs every look-up an HMAC), no trust on first use with known_hosts_only."""
    return [
        "ssh",
        "-i", str(settings.path("ssh_key")),
        "-p", str(port),
        "-l", user,
        "-o", "IdentitiesOnly=yes",
        "-o", f"UserKnownHostsFile={settings.path('known_hosts')}",
        "-o", "GlobalKnownHostsFile=/dev/null",
        "-o", f"StrictHostKeyChecking={'yes' if known_hosts_only else 'accept-new'}",
        "-o", "HashKnownHosts=no",
        "-o", f"ConnectTimeout={max(1, round(settings.connect_timeout))}",
        "-o", "LogLevel=ERROR",
    ]  # fmt: skip


def proxy_socket(settings: Settings, proxy: Proxy, host: str) -> Any:
    """What paramiko connects to a worker over when a proxy is set: the stdin/stdout of the ProxyCommand, or of an
    `ssh -W` through the jump host's master connection."""
    if proxy.command:
        command = proxy.expand(host, settings.ssh_port, settings.ssh_user)
    else:
        JumpHost.ensure_master(settings, proxy)
        command = shlex.join([*jump_command(settings, proxy), "-W", f"[{host}]:{settings.ssh_port}", proxy.host])
    return load_paramiko().ProxyCommand(command)


def load_private_key(settings: Settings) -> paramiko.PKey:
    """Load the key once, up front, so a missing or locked key is one clear line instead of N worker failures."""
    return load_key_file(settings.path("ssh_key"))


def load_key_file(path: Path) -> paramiko.PKey:
    paramiko = load_paramiko()
    hint = "set --ssh-key or TPUCTL_SSH_KEY (gcloud's key is ~/.ssh/google_compute_engine)"
    if not path.is_file():
        raise ConfigError(f"SSH key {path} does not exist", hint)
    try:
        return paramiko.PKey.from_path(path)
    except PermissionError:
        raise ConfigError(f"SSH key {path} is not readable", "check its permissions") from None
    except paramiko.PasswordRequiredException:
        raise ConfigError(
            f"SSH key {path} is protected by a passphrase",
            "use a key without one for tpuctl (or set --ssh-key)",
        ) from None
    except (paramiko.SSHException, ValueError) as e:
        raise ConfigError(f"SSH key {path} cannot be loaded: {e}", hint) from None


def control_dir(settings: Settings) -> Path | None:
    """Where the shared connections' sockets live: a private directory (a socket grants a logged-in session to
    whoever can open it); None when multiplexing is off or that directory is not ours alone."""
    if settings.ssh_control_persist <= 0:
        return None
    base = Path(os.environ.get("XDG_RUNTIME_DIR") or "/tmp") / f"tpuctl-{os.getuid()}"
    try:
        base.mkdir(mode=0o700, exist_ok=True)
        st = base.stat()
    except OSError:
        return None
    return base if st.st_uid == os.getuid() and not st.st_mode & 0o077 else None


def control_path(settings: Settings, host: str, port: int | None = None, user: str | None = None) -> Path | None:
    """The socket of the shared connection to user@host:port, named by tpuctl (not OpenSSH's %C, which it cannot
    compute), so that tpuctl.mux can find it; short enough for a socket path whatever the host name."""
    base = control_dir(settings)
    if base is None:
        return None
    key = f"{user or settings.ssh_user}@{host}:{port or settings.ssh_port}"
    return base / hashlib.sha1(key.encode()).hexdigest()[:20]


def _multiplexing(settings: Settings, host: str, port: int | None = None, user: str | None = None) -> list[str]:
    """OpenSSH options that share one connection per host across commands (ControlMaster/ControlPersist)."""
    path = control_path(settings, host, port, user)
    if path is None:
        return []
    return [
        "-o", "ControlMaster=auto",
        "-o", f"ControlPath={path}",
        "-o", f"ControlPersist={max(1, round(settings.ssh_control_persist))}",
        "-o", "ServerAliveInterval=15",  # a shared connection to a VM that vanished fails in ~45 s, not hangs
        "-o", "ServerAliveCountMax=3",
    ]  # fmt: skip


def ssh_command(
    settings: Settings,
    host: str | None = None,
    *,
    interactive: bool = False,
    known_hosts_only: bool = False,
    for_host: str | None = None,
) -> list[str]:
    """The OpenSSH client command line for one worker (`tpuctl ssh`); without a host, rsync's transport (-e), to
    `for_host` (whose shared connection it uses).

    known_hosts_only: connect only to a host whose key is already recorded (no trust on first use).
    """
    settings.path("known_hosts").parent.mkdir(parents=True, exist_ok=True)
    argv = _openssh(settings, settings.ssh_port, settings.ssh_user, known_hosts_only)
    target = host or for_host
    assert target is not None, "ssh_command needs the host, or for_host for rsync's transport"
    argv += _multiplexing(settings, target)
    argv += _proxy_options(settings, known_hosts_only)
    if interactive:
        argv.append("-t")
    else:
        argv += ["-o", "BatchMode=yes"]
    return argv if host is None else [*argv, host]


def _proxy_options(settings: Settings, known_hosts_only: bool) -> list[str]:
    """The ProxyCommand option for the OpenSSH client: the user's, or `ssh -W` through the jump host (rsync to 32
    workers then logs in to the jump host once: its connection is multiplexed too)."""
    proxy = proxy_of(settings)
    if proxy is None:
        return []
    if proxy.command:
        return ["-o", f"ProxyCommand={proxy.command}"]
    # The outer ssh expands %-tokens in a ProxyCommand: any % of the inner command's own (a path) is escaped.
    inner = shlex.join(jump_command(settings, proxy, known_hosts_only)).replace("%", "%%")
    return ["-o", f"ProxyCommand={inner} -W '[%h]:%p' {shlex.quote(proxy.host)}"]
