"""A small local JSON API server for the stand-ins of Google's simpler APIs (OS Login, Compute Engine's projects):
routes answer dicts or raise tpu_api.ApiError (Google's error body); every request and answer is recorded, so a test
can hold the answers to the API's discovery document afterwards."""

from __future__ import annotations

import json
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from standins.tpu_api import ApiError, RecordedAnswer, RecordedRequest


class JsonApi:
    """Subclasses implement route(method, path, query, body) -> the answer's JSON."""

    def __init__(self) -> None:
        self.requests: list[RecordedRequest] = []
        self.answers: list[RecordedAnswer] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    def route(self, method: str, path: str, query: dict[str, list[str]], body: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def start(self) -> JsonApi:
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True).start()
        return self

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

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
        protocol_version = "HTTP/1.1"  # keep-alive, as the clients' sessions expect

        def _serve(self) -> None:
            url = urlsplit(self.path)
            path, query = unquote(url.path), parse_qs(url.query)
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            try:
                sent = json.loads(raw) if raw.strip() else {}
            except ValueError:
                sent = {}
            request = RecordedRequest(self.command, path, query, sent or None)
            api.requests.append(request)
            try:
                status, body = HTTPStatus.OK, api.route(self.command, path, query, sent)
            except ApiError as e:
                status, body = e.status, e.body()
            api.answers.append(RecordedAnswer(request, int(status), body))
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json; charset=UTF-8")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = _serve

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler
