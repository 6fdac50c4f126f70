"""The VM side of SSH keys: what Google's guest agent does on a TPU VM, for stand-in workers.

On a real VM the guest agent watches the metadata server and turns the node's `ssh-keys` lines into each user's
authorized keys (making the account), or, with OS Login, sshd asks `google_authorized_keys %u` for the keys of the
user's OS Login profile. Either way a key works only once the API holds it, and only some seconds after that.

Here a worker's sshd runs `AuthorizedKeysCommand` (a small script; sshd demands it be root-owned, in directories no
one else may write, so it lives under /run), which asks a `GuestAgent` HTTP server in the test process for USER's
keys. The agent reads them from the stand-in APIs' own state: the node's `ssh-keys` metadata in the local Cloud TPU
API, or an OS Login profile in the local OS Login API; a key it has not seen before is served only `delay_s` after
it first saw it (the real agent's lag, which tpuctl must poll through, not sleep past).

Accounts: the real agent makes a user's account when its key arrives; the stand-in workers instead get, in their own
mount namespace, an /etc/passwd with every name the agent was told of (`users`), each mapped to uid 0 and /root
(sessions there run as root, like every stand-in session).
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, urlsplit

# sshd runs it as root with the agent's address and the user name; it prints that user's authorized keys (nothing
# when it cannot tell). bash's /dev/tcp, not python: sshd runs it twice per login (paramiko asks whether the key would
# do, then signs), 64 times for a 32-worker fan-out, and a python start each time would be the stand-in's cost.
_SCRIPT = """\
#!/bin/bash
exec 3<>"/dev/tcp/$1/$2" || exit 0
printf 'GET /authorized-keys?username=%s HTTP/1.0\\r\\n\\r\\n' "$3" >&3
sed '1,/^\\r$/d' <&3
"""

KeysFor = Callable[[str], Iterable[str]]  # user name -> that user's keys (`type base64 [comment]`), as the API says now


def metadata_keys(api: Any, project: str, zone: str, name: str) -> KeysFor:
    """USER's keys as the node's `ssh-keys` metadata in the local Cloud TPU API holds them now (`user:key` lines)."""

    def keys(user: str) -> list[str]:
        with api._lock:
            node = api.nodes.get((project, zone, name)) or {}
            text = (node.get("metadata") or {}).get("ssh-keys", "")
        found = []
        for line in text.splitlines():
            owner, sep, key = line.strip().partition(":")
            if sep and owner == user:
                found.append(key)
        return found

    return keys


class GuestAgent:
    """Serves each user's authorized keys to the workers' sshd, from `keys_for`, `delay_s` after a key appears."""

    def __init__(self, keys_for: KeysFor, users: Iterable[str] = (), delay_s: float = 0.0) -> None:
        self.keys_for = keys_for
        self.users = tuple(users)  # accounts the workers have besides root
        self.delay_s = delay_s
        self.asked: list[str] = []  # the users sshd asked about, in order
        self._first_seen: dict[tuple[str, str], float] = {}
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._dir = Path(tempfile.mkdtemp(prefix="tpuctl-agent-", dir="/run"))  # root's, 0700: as sshd demands
        self.command = self._dir / "authorized-keys"
        self.command.write_text(_SCRIPT)
        self.command.chmod(0o755)

    def start(self) -> GuestAgent:
        self._server = _Server(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True).start()
        return self

    def sshd_lines(self) -> list[str]:
        """What a worker's sshd_config says to ask this agent, and only it, for keys."""
        return [
            "AuthorizedKeysFile none",
            f"AuthorizedKeysCommand {self.command} {self.host} {self.port} %u",
            "AuthorizedKeysCommandUser root",
        ]

    host = "127.0.0.1"

    @property
    def port(self) -> int:
        assert self._server is not None, "GuestAgent is not started"
        return int(self._server.server_address[1])

    def authorized(self, user: str) -> list[str]:
        """USER's keys that are in force now: held by the API, and seen at least delay_s ago."""
        now = time.monotonic()
        served = []
        with self._lock:
            self.asked.append(user)
            for key in self.keys_for(user):
                seen = self._first_seen.setdefault((user, key), now)
                if now - seen >= self.delay_s:
                    served.append(key)
        return served

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> GuestAgent:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def passwd_with(users: Iterable[str]) -> str:
    """This machine's /etc/passwd plus an account (uid 0, home /root) for each name not in it."""
    text = Path("/etc/passwd").read_text()
    have = {line.split(":", 1)[0] for line in text.splitlines()}
    extra = [f"{u}:x:0:0:{u}:/root:/bin/bash" for u in users if u not in have]
    return text + "".join(f"{line}\n" for line in extra)


class _Server(ThreadingHTTPServer):
    request_queue_size = 256  # a pod's worth of sshds ask at once; socketserver's default backlog of 5 drops some


def _handler_for(agent: GuestAgent) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            url = urlsplit(self.path)
            user = parse_qs(url.query).get("username", [""])[0]
            body = "".join(f"{key}\n" for key in agent.authorized(user)).encode()
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler
