"""A command on a worker through its OpenSSH master connection, spoken to directly: OpenSSH's multiplexing protocol
(PROTOCOL.mux, version 4) over the ControlPath socket, without starting an `ssh` client process.

Syncing an edit to 128 workers is 128 short sessions; each `ssh` mux client costs a process start (~5 ms of CPU,
most of a session's cost on this side). Asking the master directly costs a socket and three pipes. Whenever the
master is not there or does not answer as expected, the caller starts `ssh` as before (which also (re)makes the
master): this is only ever a faster way to the same session.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import socket
import struct
import subprocess
import time
from pathlib import Path

MUX_MSG_HELLO = 0x00000001
MUX_C_NEW_SESSION = 0x10000002
MUX_S_PERMISSION_DENIED = 0x80000002
MUX_S_FAILURE = 0x80000003
MUX_S_EXIT_MESSAGE = 0x80000004
MUX_S_SESSION_OPENED = 0x80000006
SSHMUX_VER = 4
NO_ESCAPE_CHAR = 0xFFFFFFFF


class NoMaster(Exception):
    """The master is not there, or did not open the session: start `ssh` instead."""


def _string(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def _packet(*fields: bytes) -> bytes:
    body = b"".join(fields)
    return struct.pack(">I", len(body)) + body


def _u32(value: int) -> bytes:
    return struct.pack(">I", value)


class _Packets:
    """Length-prefixed messages read off the control socket."""

    def __init__(self, sock: socket.socket):
        self.sock, self.buffer = sock, b""

    def feed(self) -> bool:
        chunk = self.sock.recv(4096)
        self.buffer += chunk
        return bool(chunk)

    def next(self) -> bytes | None:
        if len(self.buffer) < 4:
            return None
        (length,) = struct.unpack(">I", self.buffer[:4])
        if len(self.buffer) < 4 + length:
            return None
        packet, self.buffer = self.buffer[4 : 4 + length], self.buffer[4 + length :]
        return packet

    def wait(self, deadline: float) -> bytes:
        while (packet := self.next()) is None:
            self.sock.settimeout(max(0.001, deadline - time.monotonic()))
            if not self.feed():
                raise NoMaster("the master closed the connection")
        return packet


def run(control_path: Path, command: str, stdin: bytes, timeout: float) -> subprocess.CompletedProcess[bytes]:
    """`command` on the master's host with `stdin`; its exit status and output. Raises NoMaster when `ssh` should
    be started instead, TimeoutError past `timeout`."""
    deadline = time.monotonic() + timeout
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    pipes: list[int] = []
    try:
        sock.settimeout(min(timeout, 5.0))
        try:
            sock.connect(str(control_path))
        except OSError as e:  # no master (a stale socket file refuses)
            raise NoMaster(str(e)) from None
        packets = _Packets(sock)
        sock.sendall(_packet(_u32(MUX_MSG_HELLO), _u32(SSHMUX_VER)))
        hello = packets.wait(deadline)
        if struct.unpack(">I", hello[:4])[0] != MUX_MSG_HELLO:
            raise NoMaster("no hello from the master")
        request = [_u32(MUX_C_NEW_SESSION), _u32(1), _string(b""), _u32(0), _u32(0), _u32(0), _u32(0)]
        request += [_u32(NO_ESCAPE_CHAR), _string(b""), _string(command.encode())]
        sock.sendall(_packet(*request))
        stdin_r, stdin_w = os.pipe()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        pipes = [stdin_r, stdin_w, out_r, out_w, err_r, err_w]
        for fd in (stdin_r, out_w, err_w):  # the session's stdin, stdout and stderr, as the ssh client passes them
            socket.send_fds(sock, [b"\0"], [fd])
        for fd in (stdin_r, out_w, err_w):
            os.close(fd)
            pipes.remove(fd)
        opened = packets.wait(deadline)
        kind = struct.unpack(">I", opened[:4])[0]
        if kind != MUX_S_SESSION_OPENED:
            raise NoMaster(f"the master refused the session ({kind:#x})")
        return _communicate(sock, packets, stdin_w, out_r, err_r, stdin, deadline, pipes)
    finally:
        for fd in pipes:
            with contextlib.suppress(OSError):
                os.close(fd)
        sock.close()


def _communicate(
    sock: socket.socket,
    packets: _Packets,
    stdin_w: int,
    out_r: int,
    err_r: int,
    stdin: bytes,
    deadline: float,
    pipes: list[int],
) -> subprocess.CompletedProcess[bytes]:
    """Feed stdin, gather stdout and stderr, and wait for the exit message: one select loop. The pipes left open
    in `pipes` are closed by the caller."""
    os.set_blocking(stdin_w, False)
    output = {out_r: bytearray(), err_r: bytearray()}
    status: int | None = None
    sent = 0
    with selectors.DefaultSelector() as selector:
        if stdin:
            selector.register(stdin_w, selectors.EVENT_WRITE)
        for fd in output:
            selector.register(fd, selectors.EVENT_READ)
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ)
        reading = set(output)
        while reading or status is None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            for key, _ in selector.select(min(left, 1.0)):
                if key.fd == stdin_w:
                    try:
                        sent += os.write(stdin_w, stdin[sent : sent + 65536])
                    except BrokenPipeError:  # the command did not read it all
                        sent = len(stdin)
                    if sent >= len(stdin):
                        selector.unregister(stdin_w)
                        os.close(stdin_w)
                        pipes.remove(stdin_w)
                elif key.fd in output:
                    chunk = os.read(key.fd, 65536)
                    output[key.fd] += chunk
                    if not chunk:
                        selector.unregister(key.fd)
                        reading.discard(key.fd)
                else:
                    try:
                        alive = packets.feed()
                    except BlockingIOError:
                        continue
                    while (packet := packets.next()) is not None:
                        if struct.unpack(">I", packet[:4])[0] == MUX_S_EXIT_MESSAGE:
                            status = struct.unpack(">I", packet[8:12])[0]
                    if not alive or status is not None:
                        selector.unregister(sock)
                        status = 255 if status is None else status  # gone without an exit status: as ssh says
    return subprocess.CompletedProcess(["ssh-mux"], status, bytes(output[out_r]), bytes(output[err_r]))
