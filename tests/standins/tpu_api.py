"""A local HTTP server speaking the Cloud TPU v2 REST API (list/get of nodes), for the real client to talk to.

    with FakeTpuApi() as api:
        api.add_fleet_node("p", "us-central2-b", "pod", fleet)
        client = tpu_v2.TpuClient(credentials=AnonymousCredentials(), transport="rest",
                                  client_options=ClientOptions(api_endpoint=api.endpoint))

Node bodies are camelCase JSON as the v2 API returns them. Errors carry Google's JSON error body, which the
REST client turns into google.api_core.exceptions by HTTP status: 404 -> NotFound, 403 -> Forbidden (not its
subclass PermissionDenied, which only the gRPC transport raises).
"""

from __future__ import annotations

import datetime
import enum
import json
import threading
import time
import traceback
from collections.abc import Iterable, Sequence
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, ClassVar, NamedTuple, Protocol
from urllib.parse import parse_qs, unquote, urlsplit

# The port every v2 network endpoint reports (the TPU runtime's gRPC port).
ENDPOINT_PORT = 8470
DEFAULT_PAGE_SIZE = 1000

NodeKey = tuple[str, str, str]  # (project, zone, name)


class RecordedRequest(NamedTuple):
    method: str
    path: str  # percent-decoded, without the query
    query: dict[str, list[str]]


class _Worker(Protocol):
    """What add_fleet_node needs of a standins.sshfleet.StandinWorker."""

    ip: str


class _Fleet(Protocol):
    """What add_fleet_node needs of a standins.sshfleet.SshFleet."""

    @property
    def workers(self) -> Sequence[_Worker]: ...


class ApiError(Exception):
    """Raised by the routes; answered with Google's JSON error body."""

    # Google's canonical status name for each HTTP status this server answers with.
    CANONICAL: ClassVar[dict[HTTPStatus, str]] = {
        HTTPStatus.BAD_REQUEST: "INVALID_ARGUMENT",
        HTTPStatus.FORBIDDEN: "PERMISSION_DENIED",
        HTTPStatus.NOT_FOUND: "NOT_FOUND",
        HTTPStatus.INTERNAL_SERVER_ERROR: "INTERNAL",
        HTTPStatus.NOT_IMPLEMENTED: "UNIMPLEMENTED",
    }

    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message

    def body(self) -> dict[str, Any]:
        status = self.CANONICAL.get(self.status, "UNKNOWN")
        return {"error": {"code": int(self.status), "message": self.message, "status": status}}


class FakeTpuApi:
    """Nodes keyed by (project, zone, name), served at `endpoint` while started."""

    def __init__(self) -> None:
        self.nodes: dict[NodeKey, dict[str, Any]] = {}
        self.denied_projects: set[str] = set()
        self.delay_s = 0.0  # seconds every answer waits, to stand in for a slow API across the internet
        self.requests: list[RecordedRequest] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------------------

    def start(self) -> FakeTpuApi:
        if self._server is not None:
            return self
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        # A short poll interval keeps close() fast: shutdown() waits for serve_forever to notice.
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), name="fake-tpu-api", daemon=True
        )
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

    def __enter__(self) -> FakeTpuApi:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @property
    def endpoint(self) -> str:
        if self._server is None:
            raise RuntimeError("FakeTpuApi is not started")
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    # -- state -------------------------------------------------------------------------------------------

    def add_node(
        self,
        project: str,
        zone: str,
        name: str,
        workers: Iterable[tuple[str, str | None]],
        accelerator_type: str = "v4-32",
        state: str = "READY",
        health: str = "HEALTHY",
        runtime_version: str = "tpu-ubuntu2204-base",
        labels: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        """Add (or replace) a node; `workers` are (internal ip, external ip or None), in worker order.

        Returns the stored JSON dict: changing it changes what the server answers from then on.
        """
        node = {
            "name": f"projects/{project}/locations/{zone}/nodes/{name}",
            "id": str(abs(hash((project, zone, name))) % 10**18),
            "acceleratorType": accelerator_type,
            "state": state,
            "health": health,
            "runtimeVersion": runtime_version,
            "createTime": _now_rfc3339(),
            "networkConfig": {"network": "default", "subnetwork": "default", "enableExternalIps": True},
            "networkEndpoints": [_endpoint_json(internal, external) for internal, external in workers],
            "schedulingConfig": {},
            "labels": dict(labels or {}),
            "apiVersion": "V2",
        }
        with self._lock:
            self.nodes[(project, zone, name)] = node
        return node

    def add_fleet_node(
        self, project: str, zone: str, name: str, fleet: _Fleet, accelerator_type: str = "v4-32", **kw: Any
    ) -> dict[str, Any]:
        """A node whose workers are the fleet's: each worker's loopback ip is its internal and external ip."""
        workers = [(w.ip, w.ip) for w in fleet.workers]
        return self.add_node(project, zone, name, workers, accelerator_type=accelerator_type, **kw)

    def set_state(self, project: str, zone: str, name: str, state: str) -> None:
        with self._lock:
            self.nodes[(project, zone, name)]["state"] = state

    def remove_node(self, project: str, zone: str, name: str) -> None:
        with self._lock:
            del self.nodes[(project, zone, name)]

    # -- routes (run in the server's threads) ------------------------------------------------------------

    def _route(self, method: str, path: str, query: dict[str, list[str]]) -> dict[str, Any]:
        parts = path.strip("/").split("/")
        if len(parts) < 3 or parts[:2] != ["v2", "projects"]:
            raise ApiError(HTTPStatus.NOT_FOUND, f"unknown path {path}")
        if parts[2] in self.denied_projects:
            message = f"Permission denied on resource project {parts[2]} (or it may not exist)."
            raise ApiError(HTTPStatus.FORBIDDEN, message)
        if method != "GET":
            raise ApiError(HTTPStatus.NOT_IMPLEMENTED, f"{method} {path} is not implemented by FakeTpuApi")
        match parts[2:]:
            case [project, "locations"]:
                return self._list_locations(project)
            case [project, "locations", zone]:
                return _location_json(project, zone)
            case [project, "locations", zone, "nodes"]:
                return self._list_nodes(project, zone, query)
            case [project, "locations", zone, "nodes", name]:
                return self._get_node(project, zone, name)
        raise ApiError(HTTPStatus.NOT_FOUND, f"unknown path {path}")

    def _list_locations(self, project: str) -> dict[str, Any]:
        with self._lock:
            zones = sorted({zone for p, zone, _ in self.nodes if p == project})
        return {"locations": [_location_json(project, z) for z in zones]}

    def _get_node(self, project: str, zone: str, name: str) -> dict[str, Any]:
        with self._lock:
            node = self.nodes.get((project, zone, name))
            if node is None:
                resource = f"projects/{project}/locations/{zone}/nodes/{name}"
                raise ApiError(HTTPStatus.NOT_FOUND, f"Resource '{resource}' was not found")
            return _snapshot(node)

    def _list_nodes(self, project: str, zone: str, query: dict[str, list[str]]) -> dict[str, Any]:
        # The page token is simply the offset of the next page's first node (in insertion order).
        try:
            size = int(query.get("pageSize", ["0"])[0]) or DEFAULT_PAGE_SIZE
            start = int(query.get("pageToken", ["0"])[0] or 0)
        except ValueError as e:
            raise ApiError(HTTPStatus.BAD_REQUEST, f"invalid pageSize or pageToken: {e}") from None
        if size < 0 or start < 0:
            raise ApiError(HTTPStatus.BAD_REQUEST, "pageSize and pageToken must not be negative")
        with self._lock:
            matching = [_snapshot(n) for (p, z, _), n in self.nodes.items() if (p, z) == (project, zone)]
        body: dict[str, Any] = {"nodes": matching[start : start + size]}
        if start + size < len(matching):
            body["nextPageToken"] = str(start + size)
        return body


def _now_rfc3339() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _snapshot(node: dict[str, Any]) -> dict[str, Any]:
    """A deep copy, taken under the lock, so that a concurrent set_state cannot tear a response."""
    copy: dict[str, Any] = json.loads(json.dumps(node))
    return copy


def _location_json(project: str, zone: str) -> dict[str, Any]:
    return {"name": f"projects/{project}/locations/{zone}", "locationId": zone}


def _endpoint_json(internal_ip: str, external_ip: str | None) -> dict[str, Any]:
    endpoint: dict[str, Any] = {"ipAddress": internal_ip, "port": ENDPOINT_PORT}
    if external_ip is not None:
        endpoint["accessConfig"] = {"externalIp": external_ip}
    return endpoint


def _enums_as_ints(body: dict[str, Any]) -> dict[str, Any]:
    """Node enums as numbers, as Google answers the REST client's `$alt=json;enum-encoding=int`."""
    from google.cloud import tpu_v2  # the client this fake serves; its enums give the numbers

    enums: dict[str, type[enum.Enum]] = {
        "state": tpu_v2.Node.State,
        "health": tpu_v2.Node.Health,
        "apiVersion": tpu_v2.Node.ApiVersion,
    }

    def number(key: str, value: Any) -> Any:
        # A name the enum does not know stays a string: the client then fails to parse it, as in production.
        member = enums[key].__members__.get(value) if key in enums and isinstance(value, str) else None
        return member.value if member is not None else value

    def convert(node: dict[str, Any]) -> dict[str, Any]:
        return {k: number(k, v) for k, v in node.items()}

    if "nodes" in body:
        return {**body, "nodes": [convert(n) for n in body["nodes"]]}
    return convert(body) if "acceleratorType" in body else body


def _handler_for(api: FakeTpuApi) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        # HTTP/1.1 keeps connections alive, as the client's requests session expects.
        protocol_version = "HTTP/1.1"

        def _serve(self) -> None:
            url = urlsplit(self.path)
            path, query = unquote(url.path), parse_qs(url.query)
            api.requests.append(RecordedRequest(self.command, path, query))
            self._drain_body()
            time.sleep(api.delay_s)
            try:
                status, body = HTTPStatus.OK, api._route(self.command, path, query)
                if "enum-encoding=int" in query.get("$alt", [""])[0]:
                    body = _enums_as_ints(body)
            except ApiError as e:
                status, body = e.status, e.body()
            except Exception:  # a bug in the fake: answer it readably rather than dropping the connection
                error = ApiError(HTTPStatus.INTERNAL_SERVER_ERROR, traceback.format_exc())
                status, body = error.status, error.body()
            self._reply(status, body)

        def _drain_body(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            if length:
                self.rfile.read(length)

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
