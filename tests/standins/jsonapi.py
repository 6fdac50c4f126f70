"""A small local JSON API server for the stand-ins of Google's simpler APIs (OS Login, Compute Engine's projects):
routes answer dicts or raise tpu_api.ApiError (Google's error body); every request and answer is recorded, so a test
can hold the answers to the API's discovery document afterwards."""

from __future__ import annotations

import json
import threading
import time
import traceback
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, ClassVar, NamedTuple
from urllib.parse import parse_qs, unquote, urlsplit


class RecordedRequest(NamedTuple):
    method: str
    path: str  # percent-decoded, without the query
    query: dict[str, list[str]]
    body: Any = None  # the JSON sent, if any


class RecordedAnswer(NamedTuple):
    request: RecordedRequest
    status: int
    body: Any  # the JSON answered


class ApiError(Exception):
    """Raised by the routes; answered with Google's JSON error body."""

    # Google's canonical status name for each HTTP status this server answers with.
    CANONICAL: ClassVar[dict[HTTPStatus, str]] = {
        HTTPStatus.BAD_REQUEST: "INVALID_ARGUMENT",
        HTTPStatus.FORBIDDEN: "PERMISSION_DENIED",
        HTTPStatus.NOT_FOUND: "NOT_FOUND",
        HTTPStatus.CONFLICT: "ALREADY_EXISTS",
        HTTPStatus.TOO_MANY_REQUESTS: "RESOURCE_EXHAUSTED",
        HTTPStatus.INTERNAL_SERVER_ERROR: "INTERNAL",
        HTTPStatus.NOT_IMPLEMENTED: "UNIMPLEMENTED",
        HTTPStatus.SERVICE_UNAVAILABLE: "UNAVAILABLE",
    }

    def __init__(
        self,
        status: HTTPStatus,
        message: str,
        reason: str | None = None,
        metadata: dict[str, str] | None = None,
        domain: str = "googleapis.com",
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.reason, self.metadata, self.domain = reason, metadata or {}, domain

    def body(self) -> dict[str, Any]:
        """Google's error body; with a reason, a google.rpc.ErrorInfo in `details`, as Google's front end adds."""
        status = self.CANONICAL.get(self.status, "UNKNOWN")
        error: dict[str, Any] = {"code": int(self.status), "message": self.message, "status": status}
        if self.reason is not None:
            info = {"reason": self.reason, "domain": self.domain, "metadata": self.metadata}
            error["details"] = [{"@type": "type.googleapis.com/google.rpc.ErrorInfo", **info}]
        return {"error": error}


class JsonApi:
    """Subclasses implement route(method, path, query, body) -> the answer's JSON."""

    def __init__(self) -> None:
        self.requests: list[RecordedRequest] = []
        self.answers: list[RecordedAnswer] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    delay_s = 0.0  # seconds every answer waits, to stand in for a slow API across the internet

    def route(self, method: str, path: str, query: dict[str, list[str]], body: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def encode(self, body: dict[str, Any], query: dict[str, list[str]]) -> dict[str, Any]:
        """The answer as sent (a subclass may encode what the request asked for differently)."""
        return body

    def start(self) -> Any:
        if self._server is not None:
            return self
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        # A short poll interval keeps close() fast: shutdown() waits for serve_forever to notice.
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = self._thread = None

    def __enter__(self) -> Any:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @property
    def endpoint(self) -> str:
        assert self._server is not None, f"{type(self).__name__} is not started"
        return f"http://127.0.0.1:{self._server.server_address[1]}"


def _handler_for(api: JsonApi) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        # HTTP/1.1 keeps connections alive, as the clients' requests sessions expect.
        protocol_version = "HTTP/1.1"

        def _serve(self) -> None:
            url = urlsplit(self.path)
            path, query = unquote(url.path), parse_qs(url.query)
            sent = self._read_body()
            request = RecordedRequest(self.command, path, query, sent or None)
            api.requests.append(request)
            time.sleep(api.delay_s)
            try:
                status, body = HTTPStatus.OK, api.encode(api.route(self.command, path, query, sent), query)
            except ApiError as e:
                status, body = e.status, e.body()
            except Exception:  # a bug in the stand-in: answer it readably rather than dropping the connection
                error = ApiError(HTTPStatus.INTERNAL_SERVER_ERROR, traceback.format_exc())
                status, body = error.status, error.body()
            api.answers.append(RecordedAnswer(request, int(status), body))
            self._reply(status, body)

        def _read_body(self) -> dict[str, Any]:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            try:
                body = json.loads(raw) if raw.strip() else {}
            except ValueError:
                return {}
            return body if isinstance(body, dict) else {}

        def _reply(self, status: HTTPStatus, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json; charset=UTF-8")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_DELETE = do_PATCH = _serve

        def log_message(self, format: str, *args: Any) -> None:
            pass  # quiet: the recorded `requests` are what tests look at

    return Handler
