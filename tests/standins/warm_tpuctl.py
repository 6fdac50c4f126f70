"""tpuctl's console script, run as a process that starts warm: the tests run tpuctl some 400 times, and ~0.3 s of CPU
of each start is importing the same libraries (google-cloud-tpu, grpc, paramiko, click, rich).

A server process (one per test process, started on first use) imports those libraries once, then forks for each
call a waiter, which forks the call's process and reports its exit status. That process is a process of its own, as
the console script's would be: the call's argv, environment, working directory and stdin/stdout/stderr (handed over
the socket), its own exit code, also when it execs another program (`tpuctl ssh`); tpuctl itself (every module of it)
is imported there, after the call's environment is in place. What it does not show: that the console script starts,
and what tpuctl imports by itself; the tests that run the console script (test_cli, test_menu, test_babysit) show
that, and TPUCTL_TESTS_COLD=1 runs every call through it.

`run(argv, ...)` is subprocess.run(["tpuctl", *argv], capture_output=True, text=True, ...) for these tests' uses.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

TPUCTL = str(Path(sys.executable).parent / "tpuctl")
COLD_ENV = "TPUCTL_TESTS_COLD"
_HEADER_MAX = 1 << 20


def run(
    argv: list[str],
    *,
    env: dict[str, str],
    cwd: str | Path | None = None,
    timeout: float | None = None,
    input: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """tpuctl with `argv`: its exit code and its stdout/stderr as text (stdin: `input`, else /dev/null)."""
    if os.environ.get(COLD_ENV) == "1" or env.get(COLD_ENV) == "1":
        return subprocess.run(
            [TPUCTL, *argv],
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
        )
    return _server().call(argv, env=env, cwd=str(cwd or os.getcwd()), timeout=timeout, input=input)


class _Server:
    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="warm-tpuctl-")
        self.path = os.path.join(self.dir, "socket")
        # stdout is where it says it is ready; stderr is the test process's (a failure to start is shown there)
        self.process = subprocess.Popen(
            [sys.executable, __file__, self.path], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True
        )
        assert self.process.stdout is not None
        ready = self.process.stdout.readline()
        if ready.strip() != "ready":
            raise RuntimeError(f"the warm tpuctl server did not start (it said {ready!r})")

    def call(
        self, argv: list[str], *, env: dict[str, str], cwd: str, timeout: float | None, input: str | None
    ) -> subprocess.CompletedProcess[str]:
        with (
            tempfile.TemporaryFile("w+b") as stdin,
            tempfile.TemporaryFile("w+b") as stdout,
            tempfile.TemporaryFile("w+b") as stderr,
            socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as conn,
        ):
            stdin.write((input or "").encode())  # no input: an empty file, read to its end at once as /dev/null is
            stdin.seek(0)
            conn.connect(self.path)
            header = json.dumps({"argv": argv, "env": env, "cwd": cwd}).encode()
            socket.send_fds(conn, [header], [stdin.fileno(), stdout.fileno(), stderr.fileno()])
            conn.settimeout(timeout)
            pid = json.loads(conn.recv(_HEADER_MAX))["pid"]
            try:
                code = json.loads(conn.recv(_HEADER_MAX))["exit"]  # once the process is gone (-N: killed by signal N)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                raise subprocess.TimeoutExpired([TPUCTL, *argv], timeout or 0) from None
            stdout.seek(0)
            stderr.seek(0)
            out, err = stdout.read().decode(), stderr.read().decode()
        return subprocess.CompletedProcess([TPUCTL, *argv], code, out, err)

    def stop(self) -> None:
        self.process.kill()
        self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()
        shutil.rmtree(self.dir, ignore_errors=True)


_lock = threading.Lock()
_started: _Server | None = None
_owner = 0  # the pid that started it: a forked test process starts its own


def _server() -> _Server:
    global _started, _owner
    with _lock:
        if _started is None or _owner != os.getpid():
            _started, _owner = _Server(), os.getpid()
            atexit.register(_started.stop)
        return _started


# ---- the server side: run as a script ----


def _warm_up() -> None:
    """The libraries every tpuctl command imports, imported the way tpuctl imports them (tpuctl.imports)."""
    import click  # noqa: F401
    import rich.console
    import rich.table  # noqa: F401

    from tpuctl.imports import load_paramiko, load_tpu_v2

    load_tpu_v2()
    load_paramiko()
    import google.api_core.retry
    import google.auth.credentials
    import google.protobuf.json_format  # noqa: F401


def _serve(listener: socket.socket) -> list[int]:
    """Accept calls and fork a waiter for each, which forks the call's process and says its pid and exit status (the
    status even when tpuctl execs another program, as `tpuctl ssh` does). Returns only in a call's process, with its
    stdin/stdout/stderr."""
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the waiters are reaped by the kernel: nothing waits on them here
    parent = os.getppid()
    listener.settimeout(1.0)
    while True:
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            if os.getppid() != parent:  # the test process is gone: so is this server
                raise SystemExit(0) from None
            continue
        conn.settimeout(None)
        header, fds, _, _ = socket.recv_fds(conn, _HEADER_MAX, 3)
        if os.fork() == 0:
            listener.close()
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            call = json.loads(header)
            pid = os.fork()
            if pid == 0:
                conn.close()
                _enter(call)
                return fds
            for fd in fds:
                os.close(fd)
            conn.send(json.dumps({"pid": pid}).encode())
            _, status = os.waitpid(pid, 0)
            conn.send(json.dumps({"exit": os.waitstatus_to_exitcode(status)}).encode())
            os._exit(0)
        conn.close()
        for fd in fds:
            os.close(fd)


def _enter(call: dict) -> None:
    """The call's working directory, environment and argv, in place before tpuctl is imported."""
    os.chdir(call["cwd"])
    os.environ.clear()
    os.environ.update(call["env"])
    sys.argv = [TPUCTL, *call["argv"]]


def _run_tpuctl(fds: list[int]) -> None:
    """The console script's body, on the call's stdin/stdout/stderr; the interpreter then exits as the console
    script's would (SystemExit's code, atexit, threads)."""
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    from tpuctl.cli import main

    main()


if __name__ == "__main__":
    _warm_up()
    listening = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listening.bind(sys.argv[1])
    listening.listen(64)
    print("ready", flush=True)
    _run_tpuctl(_serve(listening))
