"""This machine as a one-worker "pod": the same command lines tpuctl sends over SSH, run by a local shell.

`LocalFleet.run` has Fleet.run's contract (results per worker, output line by line, a deadline), so run, status,
logs and stop work on it unchanged: the local target differs from a pod only in how a command line gets to a shell.
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from tpuctl.cloud import Worker
from tpuctl.fleet import LineCallback, StreamLines, WorkerResult

if TYPE_CHECKING:
    from tpuctl.config import Settings

LOCAL_WORKER = Worker(index=0, internal_ip="127.0.0.1", external_ip="127.0.0.1")


class LocalFleet:
    source = "local"  # this machine, not a node of either API (tpuctl.fleet.Fleet.source)

    def __init__(self, settings: Settings):
        self.settings = settings
        self.workers = [LOCAL_WORKER]
        self.hosts = ["localhost"]

    def run(
        self,
        command: str | Callable[[Worker], str],
        *,
        timeout: float | None = None,
        stdin: bytes | None = None,
        on_line: LineCallback | None = None,
        on_done: Callable[[WorkerResult], None] | None = None,
    ) -> list[WorkerResult]:
        timeout = self.settings.command_timeout if timeout is None else timeout
        worker = self.workers[0]
        result = WorkerResult(worker=worker, host=self.hosts[0])
        text = command(worker) if callable(command) else command
        start = time.monotonic()
        proc = subprocess.Popen(
            ["bash", "-c", text],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,  # like an SSH session: a Ctrl-C here is tpuctl's, not the command's
        )
        callback = None if on_line is None else (lambda stream, line: on_line(worker, stream, line))
        outputs = [StreamLines("stdout", callback), StreamLines("stderr", callback)]
        readers = [
            threading.Thread(target=_pump, args=(pipe, out), daemon=True)
            for pipe, out in zip((proc.stdout, proc.stderr), outputs, strict=True)
        ]
        for t in readers:
            t.start()
        assert proc.stdin is not None
        try:
            proc.stdin.write(stdin or b"")
            proc.stdin.close()
        except BrokenPipeError:
            pass
        try:
            result.exit_code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            result.error, result.timed_out = f"timed out after {timeout:g}s", True
        for t in readers:
            t.join(timeout=1.0)
        result.stdout, result.stderr = outputs[0].close(), outputs[1].close()
        result.seconds = time.monotonic() - start
        if on_done is not None:
            on_done(result)
        return [result]


def _pump(pipe: object, out: StreamLines) -> None:
    for chunk in iter(lambda: pipe.read1(65536), b""):  # type: ignore[attr-defined]
        out.feed(chunk)
