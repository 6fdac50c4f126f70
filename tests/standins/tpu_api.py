"""A local HTTP server speaking the Cloud TPU v2 REST API, for the real client to talk to: nodes (list, get, create
and delete as long-running operations), queued resources, operations.

    with FakeTpuApi() as api:
        api.add_fleet_node("p", "us-central2-b", "pod", fleet)
        client = tpu_v2.TpuClient(credentials=AnonymousCredentials(), transport="rest",
                                  client_options=ClientOptions(api_endpoint=api.endpoint))

Node bodies are camelCase JSON as the v2 API returns them. Errors carry Google's JSON error body, which the
REST client turns into google.api_core.exceptions by HTTP status: 404 -> NotFound, 403 -> Forbidden (not its
subclass PermissionDenied, which only the gRPC transport raises), 429 -> TooManyRequests (quota), 409 -> Conflict.

Creation takes `create_delay_s` (CREATING, then READY) and asks `on_create(project, zone, name, node)` for the new
node's workers, so a test can start fresh stand-in workers for it; `fail_creates` makes the next creations fail, at
once (an ApiError: quota) or in their operation (an OperationError: no capacity), as the real API does, and
`full_zones` every creation in a zone.
"""

from __future__ import annotations

import copy
import datetime
import enum
import itertools
import json
import re
import threading
from collections.abc import Callable, Iterable, Sequence
from http import HTTPStatus
from pathlib import Path
from typing import Any, NamedTuple, Protocol

from standins.jsonapi import ApiError, JsonApi, RecordedRequest

# The port every v2 network endpoint reports (the TPU runtime's gRPC port).
ENDPOINT_PORT = 8470
DEFAULT_PAGE_SIZE = 1000

NodeKey = tuple[str, str, str]  # (project, zone, name)
# Accelerator types the fake accepts: the v2 API's families with their chip/core counts (powers of two from 8).
ACCELERATOR_TYPE = re.compile(r"^(v2|v3|v4|v5p|v5litepod|v6e)-(\d+)$")
TYPE_URL = "type.googleapis.com/google.cloud.tpu.v2."
# UpdateNode's update_mask paths (tpu.v2.json: "Supported fields: [description, tags, labels, metadata,
# network_config.enable_external_ips]"), the node field each replaces; the nested one the real API takes is not
# implemented here (501, so that a test needing it fails as the stand-in's gap, not as a refusal the API would give)
UPDATABLE = {"description": "description", "tags": "tags", "labels": "labels", "metadata": "metadata"}
NOT_IMPLEMENTED_UPDATES = {"networkConfig.enableExternalIps", "network_config.enable_external_ips"}
# google.rpc.Code of an HTTP status, for a google.rpc.Status (an operation's or a failed queue's error)
GRPC_CODES = {
    HTTPStatus.BAD_REQUEST: 3,
    HTTPStatus.FORBIDDEN: 7,
    HTTPStatus.NOT_FOUND: 5,
    HTTPStatus.CONFLICT: 6,
    HTTPStatus.TOO_MANY_REQUESTS: 8,
    HTTPStatus.SERVICE_UNAVAILABLE: 14,
}
TEST_ZONES = ("zone-a", "zone-b", "zone-c", "zone-full")
# Zones with Cloud TPUs (Google's TPU regions and zones page), as locations.list names them
TPU_ZONES = (
    "asia-east1-c",
    "asia-northeast1-b",
    "asia-southeast1-b",
    "europe-west4-a",
    "europe-west4-b",
    "us-central1-a",
    "us-central1-b",
    "us-central1-c",
    "us-central1-f",
    "us-central2-b",
    "us-east1-c",
    "us-east1-d",
    "us-east5-a",
    "us-east5-b",
    "us-south1-a",
    "us-west1-c",
    "us-west4-a",
)
WorkersFor = Callable[[str, str, str, dict[str, Any]], list[tuple[str, str | None]]]


class _Worker(Protocol):
    """What add_fleet_node needs of a standins.sshfleet.StandinWorker."""

    ip: str


class _Fleet(Protocol):
    """What add_fleet_node needs of a standins.sshfleet.SshFleet."""

    @property
    def workers(self) -> Sequence[_Worker]: ...


# The permission each read or write of this API needs (Cloud TPU's IAM permissions, as its error messages name them).
PERMISSIONS = {
    ("GET", "nodes"): "tpu.nodes.list",
    ("GET", "node"): "tpu.nodes.get",
    ("POST", "nodes"): "tpu.nodes.create",
    ("DELETE", "node"): "tpu.nodes.delete",
    ("PATCH", "node"): "tpu.nodes.update",
    ("GET", "queuedResources"): "tpu.queuedResources.list",
    ("GET", "queuedResource"): "tpu.queuedResources.get",
    ("POST", "queuedResources"): "tpu.queuedResources.create",
    ("DELETE", "queuedResource"): "tpu.queuedResources.delete",
}


def _refusal(api: FakeTpuApi, method: str, parts: list[str]) -> ApiError | None:
    """How the project of `parts` (v2/projects/P/...) refuses the call, if it does: the API disabled there, the
    caller lacking the permission, or a read over the rate limit."""
    project = parts[2]
    if project in api.disabled_projects:
        url = f"https://console.developers.google.com/apis/api/tpu.googleapis.com/overview?project={project}"
        message = (
            f"Cloud TPU API has not been used in project {project} before or it is disabled. Enable it by visiting"
            f" {url} then retry."
        )
        metadata = {"service": "tpu.googleapis.com", "consumer": f"projects/{project}", "activationUrl": url}
        return ApiError(HTTPStatus.FORBIDDEN, message, "SERVICE_DISABLED", metadata)
    if project in api.denied_projects or (project in api.read_only_projects and method != "GET"):
        kind = parts[5] if len(parts) > 5 else "locations"
        kind = kind[:-1] if len(parts) > 6 else kind  # .../nodes/NAME: one node
        permission = PERMISSIONS.get((method, kind), "tpu.locations.list")
        resource = "/".join(parts[1:])
        message = f"Permission '{permission}' denied on '{resource}'"
        metadata = {"permission": permission, "resource": resource}
        return ApiError(HTTPStatus.FORBIDDEN, message, "IAM_PERMISSION_DENIED", metadata, "iam.googleapis.com")
    if method == "GET" and api.rate_limited_reads > 0:
        api.rate_limited_reads -= 1
        message = "Quota exceeded for quota metric 'Read requests' and limit 'Read requests per minute'."
        return ApiError(HTTPStatus.TOO_MANY_REQUESTS, message, "RATE_LIMIT_EXCEEDED", {"service": "tpu.googleapis.com"})
    return None


class OperationError(NamedTuple):
    """A creation that is accepted, then fails in its long-running operation (google.rpc.Status code + message)."""

    code: int  # 8 RESOURCE_EXHAUSTED (no capacity), 9 FAILED_PRECONDITION, ...
    message: str
    details: tuple[dict[str, Any], ...] = ()  # the Status's details (each an Any with its @type)


class FakeTpuApi(JsonApi):
    """Nodes keyed by (project, zone, name), served at `endpoint` while started."""

    def __init__(self) -> None:
        super().__init__()
        self.nodes: dict[NodeKey, dict[str, Any]] = {}
        self.queued: dict[NodeKey, dict[str, Any]] = {}  # queued resources, by (project, zone, id)
        self.operations: dict[str, dict[str, Any]] = {}  # by full name
        self.denied_projects: set[str] = set()  # the caller lacks every permission there
        self.read_only_projects: set[str] = set()  # the caller may read there (TPU Viewer), not write
        self.disabled_projects: set[str] = set()  # the Cloud TPU API is not enabled there
        self.rate_limited_reads = 0  # the next reads answered 429 (the project's read rate limit)
        self.beyond_reference = False  # a test answers enum values or types newer than the reference on purpose
        # what an operation's metadata holds; a test names a type no client knows (a newer API's)
        self.operation_metadata_type = TYPE_URL + "OperationMetadata"
        self.delay_s = 0.0  # seconds every answer waits, to stand in for a slow API across the internet
        self.page_size = DEFAULT_PAGE_SIZE  # a list's page when the client asks for none (the API's own is unstated)
        # locations.list: the zones the project may use (the tests' own, and Google's TPU zones); a zone not here still
        # lists as empty, and a node there is 404, as the stand-in assumes the real API does (README)
        self.zones = sorted({*TEST_ZONES, *TPU_ZONES})
        self.unknown_zone_error: HTTPStatus | None = None  # a test: a list in a zone not in `zones` is refused so
        self.create_delay_s = 0.2  # CREATING -> READY
        self.queue_wait_s = 0.0  # a queued resource's WAITING_FOR_RESOURCES, with no node, before it provisions
        self.delete_delay_s = 0.1  # DELETING -> gone
        self.update_delay_s = 0.1  # an UpdateNode's operation -> done, the change applied
        # called with the node's stored dict right after an update is applied (under the lock): a test's concurrent
        # writer, whose own read-modify-write lands just after
        self.after_update: Callable[[dict[str, Any]], None] | None = None
        self.fail_creates: list[ApiError | OperationError] = []  # the next creations' failures, in order
        self.full_zones: dict[str, ApiError | OperationError] = {}  # zone -> how every creation there fails
        self.on_create: WorkersFor | None = None  # the new node's workers; default: made-up 10.0.0.x addresses
        self.on_delete: Callable[[str, str, str], None] | None = None  # a deleted node's workers go away
        self._op_ids = itertools.count(1)
        self._timers: list[threading.Timer] = []

    # -- lifecycle ---------------------------------------------------------------------------------------

    def encode(self, body: dict[str, Any], query: dict[str, list[str]]) -> dict[str, Any]:
        """Enums as numbers where the client asked for `enum-encoding=int` (the REST transport does)."""
        return _enums_as_ints(body) if "enum-encoding=int" in query.get("$alt", [""])[0] else body

    def close(self) -> None:
        for timer in self._timers:
            timer.cancel()
        super().close()

    def __enter__(self) -> FakeTpuApi:
        return self.start()

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
        """A node whose workers are the fleet's: each worker's loopback ip is its internal and external ip. Its
        ssh-keys metadata authorises the fleet's client key for the fleet's user, as on a TPU that gcloud or tpuctl
        made (so tpuctl finds its key there and has nothing to add)."""
        workers = [(w.ip, w.ip) for w in fleet.workers]
        node = self.add_node(project, zone, name, workers, accelerator_type=accelerator_type, **kw)
        key_path, user = getattr(fleet, "key_path", None), getattr(fleet, "user", None)
        if key_path is not None and user is not None:
            public = " ".join(Path(f"{key_path}.pub").read_text().split()[:2])
            with self._lock:
                node["metadata"] = {"ssh-keys": f"{user}:{public} {user}"}
        return node

    def set_state(self, project: str, zone: str, name: str, state: str) -> None:
        with self._lock:
            self.nodes[(project, zone, name)]["state"] = state

    def remove_node(self, project: str, zone: str, name: str) -> None:
        with self._lock:
            del self.nodes[(project, zone, name)]

    def set_queued_state(self, project: str, zone: str, name: str, state: str) -> None:
        with self._lock:
            self.queued[(project, zone, name)]["state"] = {"state": state}

    def creations(self) -> list[RecordedRequest]:
        return [r for r in self.requests if r.method == "POST" and r.path.endswith(("/nodes", "/queuedResources"))]

    # -- routes (run in the server's threads) ------------------------------------------------------------

    def route(
        self, method: str, path: str, query: dict[str, list[str]], body: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        body = body or {}
        parts = path.strip("/").split("/")
        if len(parts) < 3 or parts[:2] != ["v2", "projects"]:
            raise ApiError(HTTPStatus.NOT_FOUND, f"unknown path {path}")
        refusal = _refusal(self, method, parts)
        if refusal is not None:
            raise refusal
        match method, parts[2:]:
            case "GET", [project, "locations"]:
                return self._list_locations(project)
            case "GET", [project, "locations", zone]:
                return _location_json(project, zone)
            case "GET", [project, "locations", zone, "nodes"]:
                return self._list_nodes(project, zone, query)
            case "GET", [project, "locations", zone, "nodes", name]:
                return self._get_node(project, zone, name)
            case "POST", [project, "locations", zone, "nodes"]:
                return self._create_node(project, zone, _one(query, "nodeId"), body)
            case "DELETE", [project, "locations", zone, "nodes", name]:
                return self._delete_node(project, zone, name)
            case "PATCH", [project, "locations", zone, "nodes", name]:
                return self._update_node(project, zone, name, query.get("updateMask", [""])[0], body)
            case "GET", [project, "locations", zone, "operations", _]:
                return self._get_operation(path.removeprefix("/v2/"))
            case "POST", [project, "locations", zone, "queuedResources"]:
                return self._create_queued(project, zone, _one(query, "queuedResourceId"), body)
            case "GET", [project, "locations", zone, "queuedResources"]:
                return self._list_queued(project, zone, query)
            case "GET", [project, "locations", zone, "queuedResources", name]:
                return self._get_queued(project, zone, name)
            case "DELETE", [project, "locations", zone, "queuedResources", name]:
                return self._delete_queued(project, zone, name, query.get("force", ["false"])[0] == "true")
        if method in ("GET", "POST", "DELETE", "PATCH"):
            raise ApiError(HTTPStatus.NOT_FOUND, f"unknown path {path}")
        raise ApiError(HTTPStatus.NOT_IMPLEMENTED, f"{method} {path} is not implemented by FakeTpuApi")

    def _list_locations(self, project: str) -> dict[str, Any]:
        with self._lock:
            zones = sorted({*self.zones, *(zone for p, zone, _ in self.nodes if p == project)})
        return {"locations": [_location_json(project, z) for z in zones]}

    def _get_node(self, project: str, zone: str, name: str) -> dict[str, Any]:
        with self._lock:
            node = self.nodes.get((project, zone, name))
            if node is None:
                resource = f"projects/{project}/locations/{zone}/nodes/{name}"
                raise ApiError(HTTPStatus.NOT_FOUND, f"Resource '{resource}' was not found")
            return _snapshot(node)

    def _list_nodes(self, project: str, zone: str, query: dict[str, list[str]]) -> dict[str, Any]:
        if self.unknown_zone_error is not None and zone not in self.zones:
            raise ApiError(self.unknown_zone_error, f"Location {zone} is not found or access is unauthorized.")
        size, start = _page(query, self.page_size)
        with self._lock:
            matching = [_snapshot(n) for (p, z, _), n in self.nodes.items() if (p, z) == (project, zone)]
        body: dict[str, Any] = {"nodes": matching[start : start + size]}
        if start + size < len(matching):
            body["nextPageToken"] = str(start + size)
        return body

    # -- long-running operations -------------------------------------------------------------------------

    def _operation(self, project: str, zone: str, verb: str, target: str) -> dict[str, Any]:
        name = f"projects/{project}/locations/{zone}/operations/operation-{next(self._op_ids)}"
        op = {
            "name": name,
            "metadata": {
                "@type": self.operation_metadata_type,
                "createTime": _now_rfc3339(),
                "target": target,
                "verb": verb,
                "apiVersion": "v2",
            },
            "done": False,
        }
        self.operations[name] = op
        return op

    def _later(self, seconds: float, fn: Callable[[], None]) -> None:
        timer = threading.Timer(seconds, fn)
        timer.daemon = True
        self._timers.append(timer)
        timer.start()

    def _get_operation(self, name: str) -> dict[str, Any]:
        with self._lock:
            op = self.operations.get(name)
            if op is None:
                raise ApiError(HTTPStatus.NOT_FOUND, f"Operation '{name}' was not found")
            return _snapshot(op)

    def _create_node(self, project: str, zone: str, name: str, body: dict[str, Any]) -> dict[str, Any]:
        accelerator = body.get("acceleratorType") or body.get("acceleratorConfig", {}).get("type", "")
        match = ACCELERATOR_TYPE.match(str(accelerator))
        if not match or int(match[2]) < 1 or int(match[2]) & (int(match[2]) - 1):
            raise ApiError(HTTPStatus.BAD_REQUEST, f"Invalid accelerator type: {accelerator!r} is not supported")
        if not body.get("runtimeVersion"):
            raise ApiError(HTTPStatus.BAD_REQUEST, "runtimeVersion is required")
        with self._lock:
            if (project, zone, name) in self.nodes:
                raise ApiError(HTTPStatus.CONFLICT, f"Node '{name}' already exists")
            failure = self.fail_creates.pop(0) if self.fail_creates else self.full_zones.get(zone)
            if isinstance(failure, ApiError):
                raise failure
            target = f"projects/{project}/locations/{zone}/nodes/{name}"
            op = self._operation(project, zone, "create", target)
            if isinstance(failure, OperationError):
                error = {"code": failure.code, "message": failure.message}
                op.update(done=True, error={**error, "details": list(failure.details)} if failure.details else error)
                return _snapshot(op)
        node = self.add_node(
            project,
            zone,
            name,
            [],
            accelerator_type=accelerator,
            state="CREATING",
            health="",
            runtime_version=body["runtimeVersion"],
            labels=body.get("labels"),
        )
        with self._lock:
            node["schedulingConfig"] = body.get("schedulingConfig", {})
            node["networkConfig"] = {**node["networkConfig"], **body.get("networkConfig", {})}
            for field in ("metadata", "tags"):  # as asked (the SSH keys in the metadata, say)
                if body.get(field):
                    node[field] = copy.deepcopy(body[field])
            snapshot = _snapshot(node)

        def ready() -> None:
            workers = self.on_create(project, zone, name, snapshot) if self.on_create else _made_up_workers(accelerator)
            with self._lock:
                node.update(
                    state="READY",
                    health="HEALTHY",
                    networkEndpoints=[_endpoint_json(internal, external) for internal, external in workers],
                )
                op.update(done=True, response={"@type": TYPE_URL + "Node", **_snapshot(node)})

        self._later(self.create_delay_s, ready)
        return _snapshot(op)

    def _delete_node(self, project: str, zone: str, name: str) -> dict[str, Any]:
        with self._lock:
            node = self.nodes.get((project, zone, name))
            if node is None:
                raise ApiError(HTTPStatus.NOT_FOUND, f"Resource '{project}/{zone}/{name}' was not found")
            node["state"] = "DELETING"
            op = self._operation(project, zone, "delete", node["name"])

        def gone() -> None:
            if self.on_delete:
                self.on_delete(project, zone, name)
            with self._lock:
                self.nodes.pop((project, zone, name), None)
                op.update(done=True, response={"@type": "type.googleapis.com/google.protobuf.Empty"})

        self._later(self.delete_delay_s, gone)
        return _snapshot(op)

    def _update_node(self, project: str, zone: str, name: str, mask: str, body: dict[str, Any]) -> dict[str, Any]:
        """UpdateNode (nodes.patch): the fields its update_mask names are replaced by the body's, each as a whole (a
        map such as metadata too, as a field mask naming a map means in Google's APIs, AIP-134), once the operation is
        done."""
        paths = [p.strip() for p in mask.split(",") if p.strip()]
        if not paths:
            raise ApiError(HTTPStatus.BAD_REQUEST, "update_mask is required")
        for path in paths:
            if path in NOT_IMPLEMENTED_UPDATES:
                raise ApiError(HTTPStatus.NOT_IMPLEMENTED, f"update_mask {path!r} is not implemented by FakeTpuApi")
            if path not in UPDATABLE:
                supported = ", ".join(UPDATABLE)
                raise ApiError(HTTPStatus.BAD_REQUEST, f"Invalid update_mask path {path!r} (supported: {supported})")
        with self._lock:
            node = self.nodes.get((project, zone, name))
            if node is None:
                raise ApiError(HTTPStatus.NOT_FOUND, f"Resource '{project}/{zone}/{name}' was not found")
            op = self._operation(project, zone, "update", node["name"])

        def apply() -> None:
            with self._lock:
                node = self.nodes.get((project, zone, name))
                if node is None:
                    op.update(done=True, error={"code": 5, "message": f"Resource '{name}' was not found"})
                    return
                for path in paths:
                    field = UPDATABLE[path]
                    if field in body:
                        node[field] = copy.deepcopy(body[field])
                    else:
                        node.pop(field, None)
                if self.after_update:
                    self.after_update(node)
                op.update(done=True, response={"@type": TYPE_URL + "Node", **_snapshot(node)})

        self._later(self.update_delay_s, apply)
        return _snapshot(op)

    # -- queued resources ----------------------------------------------------------------------------------

    def _create_queued(self, project: str, zone: str, name: str, body: dict[str, Any]) -> dict[str, Any]:
        """ACCEPTED, then WAITING_FOR_RESOURCES with no node for `queue_wait_s` (hours, for a real queue), then
        PROVISIONING with the node (which names its queuedResource), ACTIVE once it is READY; FAILED, with the API's
        reason in failedData, when the node cannot be made (fail_creates, a full zone)."""
        specs = body.get("tpu", {}).get("nodeSpec", [])
        if len(specs) != 1:
            raise ApiError(HTTPStatus.BAD_REQUEST, "exactly one tpu.nodeSpec is supported")
        spec = specs[0]
        with self._lock:
            if (project, zone, name) in self.queued:
                raise ApiError(HTTPStatus.CONFLICT, f"QueuedResource '{name}' already exists")
            resource = {
                **body,
                "name": f"projects/{project}/locations/{zone}/queuedResources/{name}",
                "createTime": _now_rfc3339(),
                "state": {"state": "ACCEPTED"},
            }
            self.queued[(project, zone, name)] = resource
            op = self._operation(project, zone, "create", resource["name"])
            op.update(done=True, response={"@type": TYPE_URL + "QueuedResource", **_snapshot(resource)})

        def provision(later: bool) -> None:
            with self._lock:
                if self.queued.get((project, zone, name)) is not resource:  # deleted while it waited
                    return
            try:
                node_op = self._create_node(project, zone, spec["nodeId"], spec.get("node", {}))
            except ApiError as e:
                if not later:  # the request itself is refused, at once
                    with self._lock:
                        self.queued.pop((project, zone, name), None)
                    raise
                node_op = {"error": {"code": GRPC_CODES.get(e.status, 13), "message": e.message}}  # 13: INTERNAL
            with self._lock:
                if node_op.get("error"):
                    resource["state"] = {"state": "FAILED", "failedData": {"error": node_op["error"]}}
                    return
                resource["state"] = {"state": "PROVISIONING"}
                node = self.nodes.get((project, zone, spec["nodeId"]))
                if node is not None:
                    node["queuedResource"] = resource["name"]

            def active() -> None:
                with self._lock:
                    if resource["state"]["state"] == "PROVISIONING":
                        resource["state"] = {"state": "ACTIVE"}

            self._later(self.create_delay_s + 0.05, active)

        if self.queue_wait_s > 0:
            with self._lock:
                resource["state"] = {"state": "WAITING_FOR_RESOURCES"}
            self._later(self.queue_wait_s, lambda: provision(later=True))
        else:
            provision(later=False)
        return _snapshot(op)

    def _list_queued(self, project: str, zone: str, query: dict[str, list[str]]) -> dict[str, Any]:
        size, start = _page(query, self.page_size)
        with self._lock:
            matching = [_snapshot(q) for (p, z, _), q in self.queued.items() if (p, z) == (project, zone)]
        body: dict[str, Any] = {"queuedResources": matching[start : start + size]}
        if start + size < len(matching):
            body["nextPageToken"] = str(start + size)
        return body

    def _get_queued(self, project: str, zone: str, name: str) -> dict[str, Any]:
        with self._lock:
            resource = self.queued.get((project, zone, name))
            if resource is None:
                raise ApiError(HTTPStatus.NOT_FOUND, f"QueuedResource '{name}' was not found")
            return _snapshot(resource)

    def _delete_queued(self, project: str, zone: str, name: str, force: bool) -> dict[str, Any]:
        with self._lock:
            resource = self.queued.get((project, zone, name))
            if resource is None:
                raise ApiError(HTTPStatus.NOT_FOUND, f"QueuedResource '{name}' was not found")
            node_id = resource["tpu"]["nodeSpec"][0]["nodeId"]
            if (project, zone, node_id) in self.nodes and not force:
                raise ApiError(HTTPStatus.BAD_REQUEST, f"QueuedResource '{name}' has a node: delete it or force")
            self.queued.pop((project, zone, name))
            op = self._operation(project, zone, "delete", resource["name"])
            op.update(done=True, response={"@type": "type.googleapis.com/google.protobuf.Empty"})
        if force and (project, zone, node_id) in self.nodes:
            self._delete_node(project, zone, node_id)
        return _snapshot(op)


def _page(query: dict[str, list[str]], default_size: int) -> tuple[int, int]:
    """A list's page: its size and the offset of its first item (the page token is simply that offset)."""
    try:
        size = int(query.get("pageSize", ["0"])[0]) or default_size
        start = int(query.get("pageToken", ["0"])[0] or 0)
    except ValueError as e:
        raise ApiError(HTTPStatus.BAD_REQUEST, f"invalid pageSize or pageToken: {e}") from None
    if size < 0 or start < 0:
        raise ApiError(HTTPStatus.BAD_REQUEST, "pageSize and pageToken must not be negative")
    return size, start


def _one(query: dict[str, list[str]], key: str) -> str:
    values = query.get(key) or [""]
    if not values[0]:
        raise ApiError(HTTPStatus.BAD_REQUEST, f"{key} is required")
    return values[0]


def _made_up_workers(accelerator: str) -> list[tuple[str, str | None]]:
    """One worker per 4 chips (v4/v5p: per 8 cores), as a real slice has; addresses nobody answers on."""
    size = int(accelerator.rsplit("-", 1)[1])
    per_host = 8 if accelerator.startswith(("v2", "v3", "v4", "v5p")) else 4
    return [(f"10.0.0.{i + 2}", None) for i in range(max(1, size // per_host))]


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
    """Every enum as its number, nested ones too (a node inside an operation's response, a queued resource's
    state.state), as Google answers the REST client's `$alt=json;enum-encoding=int`. An unset enum is left out, as
    proto3's JSON leaves out every default value."""
    from google.cloud import tpu_v2  # the client this fake serves; its enums give the numbers

    node_enums: dict[str, type[enum.Enum]] = {
        "state": tpu_v2.Node.State,
        "health": tpu_v2.Node.Health,
        "apiVersion": tpu_v2.Node.ApiVersion,
    }
    queued_enums: dict[str, type[enum.Enum]] = {
        "state": tpu_v2.QueuedResourceState.State,
        "stateInitiator": tpu_v2.QueuedResourceState.StateInitiator,
    }

    def numbered(message: dict[str, Any], enums: dict[str, type[enum.Enum]]) -> dict[str, Any]:
        out = {}
        for key, value in message.items():
            if key in enums and value == "":
                continue
            # A name the enum does not know stays a string: the client then fails to parse it, as in production.
            member = enums[key].__members__.get(value) if key in enums and isinstance(value, str) else None
            out[key] = member.value if member is not None else value
        return out

    def queued(resource: dict[str, Any]) -> dict[str, Any]:
        resource = dict(resource)
        if isinstance(resource.get("state"), dict):
            resource["state"] = numbered(resource["state"], queued_enums)
        return resource

    def any_message(value: Any) -> Any:  # an operation's response or metadata: a google.protobuf.Any
        if not isinstance(value, dict):
            return value
        kind = value.get("@type", "")
        return (
            numbered(value, node_enums)
            if kind.endswith(".Node")
            else queued(value)
            if kind.endswith(".QueuedResource")
            else value
        )

    if "nodes" in body:
        return {**body, "nodes": [numbered(n, node_enums) for n in body["nodes"]]}
    if "queuedResources" in body:
        return {**body, "queuedResources": [queued(q) for q in body["queuedResources"]]}
    if "acceleratorType" in body:
        return numbered(body, node_enums)
    if "tpu" in body or "queueingPolicy" in body or isinstance(body.get("state"), dict):
        return queued(body)
    if "done" in body or "metadata" in body:  # a long-running operation
        return {k: any_message(v) if k in ("response", "metadata") else v for k, v in body.items()}
    return body
