"""Fan-out over workers: run one command on many workers in parallel, with a result per worker.

Built on paramiko directly, with what fabric's ThreadingGroup lacks: a concurrency cap, a deadline for every step
(connect, banner, auth, command) plus an overall watchdog so one hung worker never blocks the command, binary
stdin, and output streamed line by line as it arrives.
"""

from __future__ import annotations

import logging
import select
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from tpuctl.imports import load_paramiko
from tpuctl.ssh import (
    KnownHosts,
    UnconfirmedAddress,
    load_private_key,
    open_socket,
    proxy_of,
    proxy_socket,
)

if TYPE_CHECKING:
    import paramiko

    from tpuctl.cloud import Worker
    from tpuctl.config import Settings

T = TypeVar("T")

# on_line(worker, stream, line): called from worker threads as lines arrive ("stdout" or "stderr").
LineCallback = Callable[["Worker", str, str], None]

# After the exit status arrives, wait this long for the rest of the output (a backgrounded child may hold it open).
_DRAIN_GRACE_S = 0.5


@dataclass
class WorkerResult:
    worker: Worker
    host: str
    exit_code: int | None = None  # None when the command did not run to its end
    stdout: str = ""
    stderr: str = ""
    error: str | None = None  # why it did not run to its end (unreachable, timed out, host key changed)
    timed_out: bool = False
    seconds: float = 0.0
    connected: bool = False  # logged in: the command may have run
    unconfirmed: bool = False  # a recorded address whose host key was not the recorded one
    refused: bool = False  # the worker answered but did not accept the key for the user (not authorised there yet)

    @property
    def status(self) -> str:
        if self.timed_out:
            return "timeout"
        if self.error is not None:
            return "unreachable"
        return "ok" if self.exit_code == 0 else "failed"

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@dataclass
class StreamLines:
    """Accumulates one stream and hands complete lines to the callback."""

    stream: str
    on_line: Callable[[str, str], None] | None
    data: bytearray = field(default_factory=bytearray)
    _partial: bytearray = field(default_factory=bytearray)

    def feed(self, chunk: bytes) -> None:
        self.data += chunk
        if self.on_line is None:
            return
        self._partial += chunk
        *lines, rest = self._partial.split(b"\n")
        self._partial = bytearray(rest)
        for line in lines:
            self.on_line(self.stream, line.decode(errors="replace"))

    def close(self) -> str:
        if self.on_line is not None and self._partial:
            self.on_line(self.stream, self._partial.decode(errors="replace"))
            self._partial.clear()
        return self.data.decode(errors="replace")


class CommandTimeout(Exception):
    pass


class ConnectionLost(Exception):
    pass


class Fleet:
    """The workers of one TPU node, reachable over SSH."""

    def __init__(
        self,
        settings: Settings,
        workers: Sequence[Worker],
        refresh: Callable[[], Sequence[Worker]] | None = None,
        accelerator_type: str | None = None,
        source: str = "tpu",
    ):
        """`refresh`: the workers are recorded addresses (tpuctl.endpoints), to be confirmed by their host keys;
        refresh() asks the API for them when one is not (its answer then replaces them). `accelerator_type`: the
        node's, where the API was asked; `source`: which API holds the node (cloud.Node.source)."""
        self.settings = settings
        self.accelerator_type = accelerator_type
        self.source = source
        self.workers = list(workers)
        self.hosts = [w.address(settings.internal_addresses) for w in self.workers]
        self._refresh = refresh
        self._pkey: paramiko.PKey | None = None  # loaded by the first run(): a dry run needs no key
        self._known_hosts = KnownHosts(settings.path("known_hosts"), replace=settings.replace_host_keys)
        self._slots = threading.Semaphore(settings.concurrency)
        self._proxy = proxy_of(settings)
        # paramiko logs each failed handshake with a traceback; tpuctl reports failures per worker instead.
        logging.getLogger("paramiko").addHandler(logging.NullHandler())
        logging.getLogger("paramiko").propagate = False

    def run(
        self,
        command: str | Callable[[Worker], str],
        *,
        timeout: float | None = None,
        stdin: bytes | None = None,
        on_line: LineCallback | None = None,
        on_done: Callable[[WorkerResult], None] | None = None,
    ) -> list[WorkerResult]:
        """Run `command` (or command(worker)) on every worker; results in worker order.

        `stdin` is sent to every worker; on_line gets output lines as they arrive, on_done each finished worker.
        """
        timeout = self.settings.command_timeout if timeout is None else timeout
        if self._pkey is None:  # once, up front: a missing or locked key is one clear line, not N worker failures
            self._pkey = load_private_key(self.settings)
        first_done = on_done
        if self._refresh is not None and on_done is not None:  # a worker asked again is done after that
            first_done = lambda r: on_done(r) if r.connected or r.error is None else None  # noqa: E731
        results = self._fan_out(list(range(len(self.workers))), command, timeout, stdin, on_line, first_done)
        doubtful = [i for i, r in enumerate(results) if r.error is not None and not r.connected]
        if self._refresh is not None and doubtful:
            # A recorded address was not confirmed (or did not answer): the API says where the workers are now.
            # The command goes to those that did not run it where the answer changes something: a new address, an
            # address whose key was not the recorded one (now under the usual policy, which names the change), or a
            # worker that refused the key (refresh() authorises it). A worker that did not answer at the address the
            # API still gives is not made to time out twice.
            fresh = list(self._refresh())
            self._refresh = None
            before = self.hosts
            self.workers, self.hosts = fresh, [w.address(self.settings.internal_addresses) for w in fresh]
            again = [i for i in doubtful if self.hosts[i] != before[i] or results[i].unconfirmed or results[i].refused]
            for i in doubtful:
                if i not in again and on_done is not None:
                    on_done(results[i])
            for i, result in zip(again, self._fan_out(again, command, timeout, stdin, on_line, on_done), strict=True):
                results[i] = result
        return results

    def _fan_out(
        self,
        positions: list[int],
        command: str | Callable[[Worker], str],
        timeout: float,
        stdin: bytes | None,
        on_line: LineCallback | None,
        on_done: Callable[[WorkerResult], None] | None,
    ) -> list[WorkerResult]:
        results = [WorkerResult(worker=self.workers[i], host=self.hosts[i]) for i in positions]
        threads = []
        go = threading.Event()  # workers wait for it, so starting thread N never queues behind N-1's handshake
        for result in results:
            text = command(result.worker) if callable(command) else command
            t = threading.Thread(
                target=self._run_one, args=(go, result, text, timeout, stdin, on_line, on_done), daemon=True
            )
            t.start()
            threads.append(t)
        go.set()
        # The watchdog: each worker's own deadlines should fire first; this catches whatever hangs past them
        # (e.g. a queue behind the concurrency cap, or a library call without a timeout).
        waves = -(-len(results) // self.settings.concurrency)
        deadline = time.monotonic() + waves * (3 * self.settings.connect_timeout + timeout) + 5
        for t, result in zip(threads, results, strict=True):
            t.join(max(0.0, deadline - time.monotonic()))
            if t.is_alive():
                result.error, result.timed_out = "no answer before the deadline", True
        return results

    def _run_one(
        self,
        go: threading.Event,
        result: WorkerResult,
        command: str,
        timeout: float,
        stdin: bytes | None,
        on_line: LineCallback | None,
        on_done: Callable[[WorkerResult], None] | None,
    ) -> None:
        go.wait()
        start = time.monotonic()
        client = None
        with self._slots:
            try:
                client = self._connect(result.host)
                result.connected = True
                callback = None if on_line is None else (lambda s, line: on_line(result.worker, s, line))
                result.exit_code, result.stdout, result.stderr = _exec(client, command, timeout, stdin, callback)
            except CommandTimeout:
                result.error, result.timed_out = f"timed out after {timeout:g}s", True
            except ConnectionLost:
                result.error = "connection lost before the command finished"
            except Exception as e:  # any failure of one worker is that worker's result, never the command's end
                result.error = _describe_failure(e, self.settings, time.monotonic() - start)
                result.unconfirmed = isinstance(e, UnconfirmedAddress)
                result.refused = isinstance(e, load_paramiko().AuthenticationException)
            finally:
                if client is not None:
                    client.close()
                result.seconds = time.monotonic() - start
        if on_done is not None:
            on_done(result)

    def _connect(self, host: str) -> paramiko.SSHClient:
        s = self.settings
        client = load_paramiko().SSHClient()
        client.set_missing_host_key_policy(self._known_hosts.policy(confirm_only=self._refresh is not None))
        client.connect(
            host,
            port=s.ssh_port,
            username=s.ssh_user,
            pkey=self._pkey,
            sock=self._socket(host),
            look_for_keys=False,
            allow_agent=False,
            timeout=s.connect_timeout,
            banner_timeout=s.connect_timeout,
            auth_timeout=s.connect_timeout,
            channel_timeout=s.connect_timeout,
        )
        return client

    def _socket(self, host: str) -> Any:
        if self._proxy is None:
            return open_socket(host, self.settings.ssh_port, self.settings.connect_timeout)
        return proxy_socket(self.settings, self._proxy, host)


def each(items: Sequence[T], fn: Callable[[T], None], limit: int) -> None:
    """fn(item) for every item in parallel threads, at most `limit` at once; returns when all are done.

    The threads are all started before any begins work: starting thread N while N-1 threads hold the GIL in their
    handshakes would otherwise queue the later workers behind the earlier ones.
    """
    go, slots = threading.Event(), threading.Semaphore(limit)

    def run(item: T) -> None:
        go.wait()
        with slots:
            fn(item)

    threads = [threading.Thread(target=run, args=(item,), daemon=True) for item in items]
    for t in threads:
        t.start()
    go.set()
    for t in threads:
        t.join()


def _exec(
    client: paramiko.SSHClient,
    command: str,
    timeout: float,
    stdin: bytes | None,
    on_line: Callable[[str, str], None] | None,
) -> tuple[int, str, str]:
    deadline = time.monotonic() + timeout
    transport = client.get_transport()
    assert transport is not None
    chan = transport.open_session(timeout=max(1.0, min(timeout, 30.0)))
    chan.exec_command(command)
    if stdin:
        chan.sendall(stdin)
    chan.shutdown_write()
    out, err = StreamLines("stdout", on_line), StreamLines("stderr", on_line)
    exited_at = None
    while True:
        now = time.monotonic()
        if now >= deadline:
            raise CommandTimeout
        select.select([chan], [], [], min(deadline - now, 0.2))
        while chan.recv_ready():
            out.feed(chan.recv(65536))
        while chan.recv_stderr_ready():
            err.feed(chan.recv_stderr(65536))
        if chan.exit_status_ready():
            exited_at = exited_at or now
            drained = chan.eof_received and not chan.recv_ready() and not chan.recv_stderr_ready()
            if drained or now - exited_at > _DRAIN_GRACE_S:
                break
    status = chan.recv_exit_status()
    if status == -1:  # paramiko's value when the channel closed without an exit status
        raise ConnectionLost
    return status, out.close(), err.close()


def _describe_failure(e: Exception, settings: Settings, elapsed: float) -> str:
    """One line on why a worker could not run the command."""
    from tpuctl.errors import TpuctlError

    paramiko = load_paramiko()

    if isinstance(e, TpuctlError):
        return str(e)
    if isinstance(e, paramiko.ProxyCommandFailure):
        return f"the ssh_proxy command failed: {e}"
    if isinstance(e, ConnectionRefusedError):
        return f"connection refused on port {settings.ssh_port}"
    if isinstance(e, socket.timeout | TimeoutError):
        return f"no connection within {settings.connect_timeout:g}s"
    if isinstance(e, paramiko.AuthenticationException):
        from tpuctl.access import refused_hint

        return f"authentication failed as {settings.ssh_user!r} with key {settings.ssh_key} ({refused_hint(settings)})"
    if isinstance(e, paramiko.SSHException) and ("banner" in str(e) or "No existing session" in str(e)):
        # the handshake never completed: a hung sshd (timeout) or one that dropped us (e.g. MaxStartups)
        if elapsed >= settings.connect_timeout:
            return f"no SSH answer within {settings.connect_timeout:g}s"
        return "the SSH handshake failed (the worker closed the connection)"
    if isinstance(e, OSError | EOFError | paramiko.SSHException):
        return f"connection failed: {e or type(e).__name__}"
    return f"{type(e).__name__}: {e}"
