"""The Python programs the tests start hundreds of times, started warm: tpuctl's console script (~340 calls a run,
~0.3 s of CPU of each importing google-cloud-tpu, grpc, paramiko, click, rich) and `python -m trainer...` /
`python -c ...` with JAX (~60 processes a run, ~6 s of CPU of each importing TensorFlow, JAX, Flax, optax, orbax).

A server process (one per test process and kind, started on first use) imports a kind's libraries once, then forks
for each call a waiter, which forks the call's process and reports its exit status. That process is a process of its
own, as a cold one would be: the call's argv, environment, working directory, sys.path[0] and stdin/stdout/stderr
(handed over a Unix socket), its own pid (signals go straight to it) and exit status (-N when a signal ended it),
also when it execs another program (`tpuctl ssh`); the program's own modules (tpuctl, trainer: every module of them)
are imported there, after the call's environment is in place. Only third-party libraries are warm, and a library
that reads the environment as it is imported (JAX's flags, TensorFlow's logging, Python's own PYTHON* settings) is
warm only for calls with that environment: a server serves calls whose such variables equal its own, and a call
with other values gets a server of its own. What warm does not show: that the console script or the interpreter
starts, and what a program imports by itself; the tests that run the console script (test_cli, test_menu,
test_babysit) show that; nor finalizers of objects still alive as a call's program ends (it ends by os._exit,
`_finish`); TPUCTL_TESTS_COLD=1 runs every call cold.

`tpuctl(argv, ...)` is subprocess.run(["tpuctl", *argv], capture_output=True, text=True, ...);
`run(args, ...)` and `popen(args, ...)` are subprocess.run / subprocess.Popen for `[sys.executable, "-m" or "-c",
...]` (anything else runs cold).
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
import time
import types
from pathlib import Path
from typing import IO, Any

TPUCTL = str(Path(sys.executable).parent / "tpuctl")
COLD_ENV = "TPUCTL_TESTS_COLD"
_HEADER_MAX = 1 << 20
# variables a kind's libraries read as they are imported (or the interpreter at its start): a server serves only
# calls whose values of these equal its own (XLA_FLAGS is read when JAX makes its backend, in the call's process)
_INTERPRETER_ENV = ("PYTHON", "LANG", "LC_", "LD_", "GRPC_")
_IMPORT_TIME_ENV = {
    "tpuctl": _INTERPRETER_ENV,
    "jax": (*_INTERPRETER_ENV, "JAX_", "TF_", "OMP_", "MKL_", "KMP_", "TPU_", "CUDA"),
}


def _warm_tpuctl() -> None:
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


def _warm_jax() -> None:
    """The third-party libraries a trainer process imports (none of the trainer's own modules: a test may run a
    copied checkout's). Importing them starts no backend: that happens in the call's process."""
    import click  # noqa: F401
    import etils.epath  # noqa: F401
    import flax.linen  # noqa: F401
    import jax.numpy  # noqa: F401
    import optax  # noqa: F401
    import orbax.checkpoint  # noqa: F401
    import rich.console  # noqa: F401
    import tensorflow  # noqa: F401
    import tensorflow_text  # noqa: F401


_KINDS = {"tpuctl": _warm_tpuctl, "jax": _warm_jax}


def _cold() -> bool:
    return os.environ.get(COLD_ENV) == "1"


def tpuctl(
    argv: list[str],
    *,
    env: dict[str, str],
    cwd: str | Path | None = None,
    timeout: float | None = None,
    input: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """tpuctl with `argv`: its exit code and its stdout/stderr as text (stdin: `input`, else /dev/null)."""
    args = [TPUCTL, *argv]
    if _cold() or env.get(COLD_ENV) == "1":
        stdin = None if input is not None else subprocess.DEVNULL
        return subprocess.run(
            args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, input=input, stdin=stdin
        )
    return _captured(args, {"entry": "tpuctl"}, "tpuctl", env=env, cwd=cwd, timeout=timeout, input=input)


def _python_entry(args: list[str]) -> dict | None:
    """What `[sys.executable, -m MODULE | -c CODE, ...]` runs, or None for anything else (run cold)."""
    if len(args) >= 3 and args[0] == sys.executable and args[1] in ("-m", "-c"):
        return {"entry": "module" if args[1] == "-m" else "code", "target": args[2]}
    return None


def run(
    args: list[str],
    *,
    env: dict[str, str] | None = None,
    cwd: str | Path | None = None,
    timeout: float | None = None,
    input: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """subprocess.run(args, capture_output=True, text=True, ...) for a Python program that uses JAX."""
    entry = _python_entry(args)
    if entry is None or _cold():
        return subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout, input=input)
    return _captured(args, entry, "jax", env=env or dict(os.environ), cwd=cwd, timeout=timeout, input=input)


def popen(
    args: list[str],
    *,
    env: dict[str, str] | None = None,
    cwd: str | Path | None = None,
    stdout: int | None = None,
    stderr: int | None = None,
    text: bool = False,
    start_new_session: bool = False,
) -> Any:
    """subprocess.Popen(args, ...) for a Python program that uses JAX: a WarmProcess (pid, poll, wait, communicate,
    send_signal, terminate, kill; stdout/stderr: PIPE, STDOUT or None)."""
    entry = _python_entry(args)
    if entry is None or _cold():
        return subprocess.Popen(
            args, env=env, cwd=cwd, stdout=stdout, stderr=stderr, text=text, start_new_session=start_new_session
        )
    return WarmProcess(args, entry, env or dict(os.environ), cwd, stdout, stderr, text, start_new_session)


def _captured(
    args: list[str], entry: dict, kind: str, *, env: dict[str, str], cwd, timeout: float | None, input: str | None
) -> subprocess.CompletedProcess[str]:
    with (
        tempfile.TemporaryFile("w+b") as stdin,
        tempfile.TemporaryFile("w+b") as stdout,
        tempfile.TemporaryFile("w+b") as stderr,
    ):
        stdin.write((input or "").encode())  # no input: an empty file, read to its end at once as /dev/null is
        stdin.seek(0)
        call = _server(kind, env).call(args, entry, env, cwd, [stdin.fileno(), stdout.fileno(), stderr.fileno()])
        try:
            code = call.wait(timeout)
        except TimeoutError:
            call.kill()
            raise subprocess.TimeoutExpired(args, timeout or 0) from None
        finally:
            call.close()
        stdout.seek(0)
        stderr.seek(0)
        return subprocess.CompletedProcess(args, code, stdout.read().decode(), stderr.read().decode())


class _Call:
    """One call in flight: its process's pid, and its exit status once the waiter says it."""

    def __init__(self, conn: socket.socket):
        self.conn = conn
        self.pid = int(json.loads(conn.recv(_HEADER_MAX))["pid"])
        self.code: int | None = None

    def wait(self, timeout: float | None) -> int:
        """The exit status; TimeoutError after `timeout` seconds (0: now or never)."""
        if self.code is None:
            self.conn.settimeout(timeout)
            try:
                message = self.conn.recv(_HEADER_MAX)
            except BlockingIOError:
                raise TimeoutError from None
            if not message:
                raise RuntimeError(f"the warm server lost pid {self.pid} (it was stopped?)")
            self.code = int(json.loads(message)["exit"])
        return self.code

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.code is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def close(self) -> None:
        self.conn.close()


class WarmProcess:
    """The part of subprocess.Popen's interface these tests use, for a call to a warm server."""

    def __init__(self, args, entry, env, cwd, stdout, stderr, text, start_new_session):
        self.args, self.returncode = args, None
        pipes: dict[str, int] = {}
        theirs: list[int] = []
        devnull = os.open(os.devnull, os.O_RDONLY)
        for name, how, inherited in (("stdout", stdout, 1), ("stderr", stderr, 2)):
            if how == subprocess.PIPE:
                read, write = os.pipe()
                pipes[name] = read
                theirs.append(write)
            elif how == subprocess.STDOUT:
                theirs.append(theirs[0])
            else:
                assert how is None, f"{name}={how!r}: PIPE, STDOUT or None"
                theirs.append(inherited)
        try:
            self._call = _server("jax", env).call(args, entry, env, cwd, [devnull, *theirs], session=start_new_session)
        finally:
            for fd in {devnull, *theirs} - {1, 2}:
                os.close(fd)
        self.pid = self._call.pid
        mode = "r" if text else "rb"
        self.stdout: IO | None = open(pipes["stdout"], mode) if "stdout" in pipes else None  # noqa: SIM115
        self.stderr: IO | None = open(pipes["stderr"], mode) if "stderr" in pipes else None  # noqa: SIM115
        self._read: dict[str, list] = {}

    def poll(self) -> int | None:
        if self.returncode is None:
            with contextlib.suppress(TimeoutError):
                self.returncode = self._call.wait(0)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            try:
                self.returncode = self._call.wait(timeout)
            except TimeoutError:
                raise subprocess.TimeoutExpired(self.args, timeout or 0) from None
        return self.returncode

    def communicate(self, timeout: float | None = None) -> tuple[Any, Any]:
        """Both pipes read to their end (a thread each, kept across a timeout, as Popen keeps what it read), then
        the exit status."""
        for name in ("stdout", "stderr"):
            stream = getattr(self, name)
            if stream is not None and name not in self._read:
                box: list = []
                reader = threading.Thread(target=lambda s=stream, b=box: b.append(s.read()), daemon=True)
                reader.start()
                self._read[name] = [reader, box]
        deadline = None if timeout is None else time.monotonic() + timeout
        for reader, _ in self._read.values():
            reader.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
            if reader.is_alive():
                raise subprocess.TimeoutExpired(self.args, timeout or 0)
        self.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
        outs = {name: box[0] for name, (_, box) in self._read.items()}
        for stream in (self.stdout, self.stderr):
            if stream is not None:
                stream.close()
        return outs.get("stdout"), outs.get("stderr")

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            self._call.kill(sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self._call.close()


class _Server:
    def __init__(self, kind: str, env: dict[str, str]) -> None:
        self.dir = tempfile.mkdtemp(prefix=f"warm-{kind}-")
        self.path = os.path.join(self.dir, "socket")
        # stdout is where it says it is ready; stderr is the test process's (a failure to start is shown there)
        self.process = subprocess.Popen(
            [sys.executable, __file__, self.path, kind], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, env=env
        )
        assert self.process.stdout is not None
        ready = self.process.stdout.readline()
        if ready.strip() != b"ready":
            raise RuntimeError(f"the warm {kind} server did not start (it said {ready!r})")

    def call(self, args: list[str], entry: dict, env, cwd, fds: list[int], session: bool = False) -> _Call:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        conn.connect(self.path)
        header = {**entry, "argv": args, "env": env, "cwd": os.path.abspath(cwd or os.getcwd()), "session": session}
        socket.send_fds(conn, [json.dumps(header).encode()], fds)
        return _Call(conn)

    def stop(self) -> None:
        self.process.kill()
        self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()
        shutil.rmtree(self.dir, ignore_errors=True)


_lock = threading.Lock()
_servers: dict[tuple, _Server] = {}
_owner = 0  # the pid that started them: a forked test process starts its own


def _server(kind: str, env: dict[str, str]) -> _Server:
    global _owner
    key = (kind, *sorted((k, v) for k, v in env.items() if k.startswith(_IMPORT_TIME_ENV[kind])))
    with _lock:
        if _owner != os.getpid():
            _servers.clear()
            _owner = os.getpid()
        if key not in _servers:
            _servers[key] = server = _Server(kind, env)
            atexit.register(server.stop)
        return _servers[key]


# ---- the server side: run as a script ----


def _serve(listener: socket.socket) -> tuple[dict, list[int]]:
    """Accept calls and fork a waiter for each, which forks the call's process and says its pid and exit status (the
    status even when the program execs another, as `tpuctl ssh` does). Returns only in a call's process: the call
    and its stdin/stdout/stderr."""
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
                return call, fds
            for fd in fds:
                os.close(fd)
            conn.send(json.dumps({"pid": pid}).encode())
            _, status = os.waitpid(pid, 0)
            with contextlib.suppress(OSError):  # the caller may be gone
                conn.send(json.dumps({"exit": os.waitstatus_to_exitcode(status)}).encode())
            os._exit(0)
        conn.close()
        for fd in fds:
            os.close(fd)


def _enter(call: dict, fds: list[int]) -> None:
    """The call's session, working directory, environment, argv, sys.path[0] and stdin/stdout/stderr, in place before
    the program's own modules are imported; then the program (_finish ends the process)."""
    if call["session"]:
        os.setsid()
    os.chdir(call["cwd"])
    os.environ.clear()
    os.environ.update(call["env"])
    for target, fd in enumerate(fds):
        if fd != target:
            os.dup2(fd, target)
            os.close(fd)
    argv = call["argv"]
    if call["entry"] == "tpuctl":
        sys.argv = argv
        sys.path.insert(0, os.path.dirname(argv[0]))
        from tpuctl.cli import main

        main()
    elif call["entry"] == "module":
        import runpy

        sys.argv = [argv[0], *argv[3:]]  # runpy puts the module's path in argv[0]
        sys.path.insert(0, call["cwd"])
        runpy.run_module(call["target"], run_name="__main__", alter_sys=True)
    else:
        sys.argv = ["-c", *argv[3:]]
        sys.path.insert(0, "")
        main_module = types.ModuleType("__main__")
        sys.modules["__main__"] = main_module
        exec(compile(call["target"], "<string>", "exec"), main_module.__dict__)


def _exit_code(code: object) -> int:
    """The status the interpreter exits with for SystemExit(code)."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def _finish(call: dict, fds: list[int]) -> None:
    """Run the call, then end its process as the interpreter's exit does, in its order (non-daemon threads joined,
    atexit, stdout and stderr flushed) but by os._exit: tearing down the server's modules (every object the libraries
    made, each a copy-on-write page of the forked server) cost ~0.14 CPU-s a call, more than a cold `tpuctl --help`.
    What this leaves out: finalizers of objects still alive at the exit (a cold run: TPUCTL_TESTS_COLD=1)."""
    interrupted = False
    try:
        _enter(call, fds)
        code = 0
    except SystemExit as stop:
        code = _exit_code(stop.code)
    except BaseException as error:
        sys.excepthook(type(error), error, error.__traceback__)
        interrupted, code = isinstance(error, KeyboardInterrupt), 1
    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    if interrupted:  # as the interpreter ends on an unhandled Ctrl-C: killed by SIGINT
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    os._exit(code)


if __name__ == "__main__":
    del sys.path[0]  # this file's directory: a call's program gets its own sys.path[0]
    _KINDS[sys.argv[2]]()
    listening = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listening.bind(sys.argv[1])
    listening.listen(64)
    print("ready", flush=True)
    _finish(*_serve(listening))
