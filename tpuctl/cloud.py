"""The Cloud TPU API (google-cloud-tpu, REST transport): nodes, their state and their workers' addresses.

The client library is imported lazily: it costs ~0.3 s, and `tpuctl --help` must not pay it.
"""

from __future__ import annotations

import copy
import difflib
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from tpuctl.errors import CloudError, ConfigError
from tpuctl.imports import load_tpu_v2

if TYPE_CHECKING:
    from tpuctl.config import Settings


@dataclass(frozen=True)
class Worker:
    """One VM of a TPU node, in the node's worker order (worker 0 first)."""

    index: int
    internal_ip: str
    external_ip: str | None

    def address(self, internal: bool) -> str:
        if internal:
            return self.internal_ip
        if not self.external_ip:
            raise ConfigError(
                f"worker {self.index} has no external IP (internal {self.internal_ip})",
                "from inside the VPC, use --internal-ip or TPUCTL_INTERNAL_IP=1",
            )
        return self.external_ip


@dataclass(frozen=True)
class Node:
    name: str
    state: str
    health: str
    accelerator_type: str
    runtime_version: str
    workers: tuple[Worker, ...]
    spot: bool = False  # spot or preemptible: may be taken back at any time
    reserved: bool = False
    health_description: str = ""
    queued_resource: str = ""  # the queued resource that made it, if one did
    create_time: str = ""
    network: str = ""
    labels: tuple[tuple[str, str], ...] = ()
    zone: str = ""  # from its resource name: where a TPU made by `create --zones` landed
    metadata: tuple[tuple[str, str], ...] = ()  # the VMs' metadata (ssh-keys, startup-script, ...)
    source: str = "tpu"  # where it is: "tpu" (a Cloud TPU API node) or "compute" (Compute Engine's VMs, tpuctl.gce)

    def to_json(self) -> dict[str, Any]:
        # metadata by key only: its values (a startup script, say) may hold what must not reach logs
        return {**asdict(self), "labels": dict(self.labels), "metadata": sorted(k for k, _ in self.metadata)}


# The predefined role that grants each Cloud TPU permission tpuctl uses (reads: TPU Viewer; the rest: TPU Admin).
ROLE_VIEWER, ROLE_ADMIN = "roles/tpu.viewer", "roles/tpu.admin"


def role_for(permission: str) -> str:
    """A predefined role holding `permission` (tpu.nodes.list -> roles/tpu.viewer; a write -> roles/tpu.admin)."""
    return ROLE_VIEWER if permission.endswith((".list", ".get")) or not permission else ROLE_ADMIN


def enum_name(value: Any) -> str:
    """An enum field's name; a number newer than the installed client (proto-plus hands it over as a plain int) shows
    as UNKNOWN(N) rather than failing: the API may add states before the client knows them."""
    name = getattr(value, "name", None)
    return name if isinstance(name, str) else f"UNKNOWN({int(value)})"


def node_from_proto(node: Any) -> Node:
    workers = tuple(
        Worker(index=i, internal_ip=ep.ip_address, external_ip=ep.access_config.external_ip or None)
        for i, ep in enumerate(node.network_endpoints)
    )
    health = enum_name(node.health) if node.health else ""
    created = node.create_time.isoformat() if node.create_time else ""  # proto-plus: a datetime or None
    parts = node.name.split("/")  # projects/P/locations/ZONE/nodes/NAME
    return Node(
        name=node.name.rsplit("/", 1)[-1],
        state=enum_name(node.state),
        health="" if health == "HEALTH_UNSPECIFIED" else health,
        accelerator_type=node.accelerator_type,
        runtime_version=node.runtime_version,
        workers=workers,
        spot=bool(node.scheduling_config.spot or node.scheduling_config.preemptible),
        reserved=bool(node.scheduling_config.reserved),
        health_description=node.health_description,
        queued_resource=node.queued_resource.rsplit("/", 1)[-1],
        create_time=created,
        network=node.network_config.network,
        labels=tuple(sorted(node.labels.items())),
        zone=parts[3] if len(parts) == 6 else "",
        metadata=tuple(sorted(node.metadata.items())),
    )


@dataclass(frozen=True)
class Queued:
    """A queued resource: a request for a TPU that waits in line for capacity. Its node exists only once it
    provisions (WAITING_FOR_RESOURCES can last hours), so it is shown, described and deleted by its own name."""

    name: str
    state: str
    node_id: str  # the node it makes
    accelerator_type: str
    create_time: str = ""
    valid_until: str = ""  # when the queue gives up: a time, or a duration after creation ("7200s")
    spot: bool = False
    failure: str = ""  # FAILED: the API's own reason (failedData.error)
    zone: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def queued_from_proto(resource: Any) -> Queued:
    spec = resource.tpu.node_spec[0] if resource.tpu.node_spec else None
    policy = resource.queueing_policy
    if "valid_until_time" in policy:
        valid_until = policy.valid_until_time.isoformat()
    elif "valid_until_duration" in policy:
        valid_until = f"{policy.valid_until_duration.total_seconds():.0f}s after creation"
    else:
        valid_until = ""
    failed = resource.state.failed_data.error if "failed_data" in resource.state else None
    parts = resource.name.split("/")  # projects/P/locations/ZONE/queuedResources/NAME
    return Queued(
        name=resource.name.rsplit("/", 1)[-1],
        state=enum_name(resource.state.state),
        node_id=spec.node_id if spec else "",
        accelerator_type=spec.node.accelerator_type if spec else "",
        create_time=resource.create_time.isoformat() if resource.create_time else "",
        valid_until=valid_until,
        spot="spot" in resource,
        failure=f"{failed.message} (code {failed.code})" if failed is not None and failed.message else "",
        zone=parts[3] if len(parts) == 6 else "",
    )


@dataclass(frozen=True)
class NodeRequest:
    """What `tpuctl create` asks the API for."""

    name: str
    accelerator_type: str
    runtime_version: str
    spot: bool = False
    reserved: bool = False
    network: str | None = None
    subnetwork: str | None = None
    labels: tuple[tuple[str, str], ...] = (("created-by", "tpuctl"),)
    queued: bool = False  # through a queued resource: waits in the queue for capacity instead of failing
    valid_until_s: int | None = None  # queued only: give up waiting after this long
    service_account: str | None = None
    scopes: tuple[str, ...] = ()  # full URLs
    tags: tuple[str, ...] = ()
    metadata: tuple[tuple[str, str], ...] = ()
    data_disks: tuple[tuple[str, bool], ...] = ()  # (projects/P/zones/Z/disks/NAME, read-only)

    @classmethod
    def from_settings(cls, settings: Settings, name: str, ssh_key: str | None = None, **capacity: Any) -> NodeRequest:
        """TPU `name` as the settings describe new TPUs (type, runtime, network, service account, tags, metadata,
        startup script, data disks, `ssh_key` authorised for ssh_user); `capacity`: spot, reserved, queued,
        valid_until_s. Bad values are one line."""
        settings.require("accelerator_type")
        assert settings.accelerator_type is not None
        zone = creation_zones(settings)[0]  # one zone when there are data disks
        if settings.data_disks:
            settings.require("project")
        return cls(
            name=name,
            accelerator_type=settings.accelerator_type,
            runtime_version=settings.runtime_version or runtime_for(settings.accelerator_type),
            network=settings.network,
            subnetwork=settings.subnetwork,
            service_account=settings.service_account,
            scopes=tuple(scope_url(s) for s in settings.scopes) if settings.service_account else (),
            tags=tuple(settings.tags),
            metadata=vm_metadata(settings, ssh_key),
            data_disks=tuple(data_disk(d, settings.project, zone) for d in settings.data_disks),
            **capacity,
        )

    @classmethod
    def like(cls, node: Node) -> NodeRequest:
        """The same TPU again: its name, type, runtime, spot-ness and metadata (the SSH keys in it included: the new
        VMs accept whom the old ones did; babysit remaking a dead TPU it was not told how to create)."""
        return cls(node.name, node.accelerator_type, node.runtime_version, spot=node.spot, metadata=node.metadata)


# The TPU software version Google documents for JAX on each generation (cloud.google.com/tpu/docs/runtimes), by the
# accelerator type's prefix; the first that matches wins.
RUNTIMES = (
    ("v6e-", "v2-alpha-tpuv6e"),
    ("v5p-", "v2-alpha-tpuv5"),
    ("v5litepod-", "v2-alpha-tpuv5-lite"),
    ("v5e-", "v2-alpha-tpuv5-lite"),
    ("", "tpu-ubuntu2204-base"),  # v4 and older
)


def runtime_for(accelerator_type: str) -> str:
    """The documented runtime version for an accelerator type (v5litepod-16 -> v2-alpha-tpuv5-lite)."""
    return next(runtime for prefix, runtime in RUNTIMES if accelerator_type.startswith(prefix))


ZONE_RE = re.compile(r"[a-z][a-z0-9-]*[a-z0-9]")  # us-central2-b, europe-west4-a


def creation_zones(settings: Settings) -> tuple[str, ...]:
    """Where a new TPU may go, in order of preference: the zones setting, else the zone."""
    if not settings.zones:
        settings.require("zone")
        assert settings.zone is not None
        return (settings.zone,)
    for zone in settings.zones:
        if not ZONE_RE.fullmatch(zone):
            raise ConfigError(f"zone {zone!r} is not a zone name", "e.g. --zones us-central2-b,us-central1-a")
    if settings.data_disks and len(settings.zones) > 1:
        raise ConfigError(
            "--data-disk with several --zones: a persistent disk lives in one zone", "give that zone alone"
        )
    return tuple(dict.fromkeys(settings.zones))


SCOPE_PREFIX = "https://www.googleapis.com/auth/"
TAG_RE = re.compile(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?")  # Compute Engine's network tags
METADATA_KEY_RE = re.compile(r"[a-zA-Z0-9_-]{1,128}")


def scope_url(scope: str) -> str:
    """gcloud's short scope names (cloud-platform, devstorage.read_only) as the API wants them: full URLs."""
    return scope if "://" in scope else SCOPE_PREFIX + scope


def vm_metadata(settings: Settings, ssh_key: str | None = None) -> tuple[tuple[str, str], ...]:
    """The metadata setting's KEY=VALUE items, plus the startup script's contents as `startup-script` and a line for
    `ssh_key` (a public key) in `ssh-keys`, after any the metadata setting gives."""
    items: dict[str, str] = {}
    for item in settings.metadata:
        key, sep, value = item.partition("=")
        if not sep or not METADATA_KEY_RE.fullmatch(key):
            raise ConfigError(f"metadata {item!r} is not KEY=VALUE", "e.g. --metadata owner=alice,team=vision")
        items[key] = value
    for tag in settings.tags:
        if not TAG_RE.fullmatch(tag):
            raise ConfigError(f"tag {tag!r} is not a network tag", "lowercase letters, digits and -, at most 63")
    if settings.startup_script:
        if "startup-script" in items:
            raise ConfigError("startup-script is given twice: in metadata and as startup_script", "keep one")
        path = settings.path("startup_script")
        try:
            items["startup-script"] = path.read_text()
        except OSError as e:
            raise ConfigError(f"cannot read the startup script {path}: {e.strerror}") from None
    if ssh_key:
        from tpuctl import keys

        merged = keys.with_key(items.get(keys.SSH_KEYS, ""), settings.ssh_user, ssh_key)
        if merged is not None:
            items[keys.SSH_KEYS] = merged
    return tuple(items.items())


def data_disk(spec: str, project: str | None, zone: str) -> tuple[str, bool]:
    """'NAME', 'NAME:ro' or a full projects/P/zones/Z/disks/NAME path -> (full path, read-only)."""
    source, _, mode = spec.partition(":")
    if mode not in ("", "ro", "rw") or not source:
        raise ConfigError(f"data disk {spec!r} is not NAME or NAME:ro", "e.g. --data-disk imagenet:ro")
    if "/" not in source:
        source = f"projects/{project}/zones/{zone}/disks/{source}"
    return source, mode == "ro"


def node_proto(request: NodeRequest) -> Any:
    tpu_v2 = load_tpu_v2()

    node = tpu_v2.Node(
        accelerator_type=request.accelerator_type,
        runtime_version=request.runtime_version,
        labels=dict(request.labels),
        network_config=tpu_v2.NetworkConfig(
            network=request.network or "", subnetwork=request.subnetwork or "", enable_external_ips=True
        ),
    )
    if not request.queued:  # a queued resource says spot/reserved itself
        node.scheduling_config = tpu_v2.SchedulingConfig(spot=request.spot, reserved=request.reserved)
    if request.service_account:
        node.service_account = tpu_v2.ServiceAccount(email=request.service_account, scope=list(request.scopes))
    node.tags = list(request.tags)
    node.metadata = dict(request.metadata)
    mode = tpu_v2.AttachedDisk.DiskMode
    node.data_disks = [
        tpu_v2.AttachedDisk(source_disk=source, mode=mode.READ_ONLY if read_only else mode.READ_WRITE)
        for source, read_only in request.data_disks
    ]
    return node


def queued_proto(request: NodeRequest, parent: str) -> Any:
    tpu_v2 = load_tpu_v2()
    from google.protobuf import duration_pb2

    QR = tpu_v2.QueuedResource
    spec = QR.Tpu.NodeSpec(parent=parent, node_id=request.name, node=node_proto(request))
    resource = QR(tpu=QR.Tpu(node_spec=[spec]))
    if request.spot:
        resource.spot = QR.Spot()
    elif request.reserved:
        resource.guaranteed = QR.Guaranteed()
    if request.valid_until_s:
        duration = duration_pb2.Duration(seconds=request.valid_until_s)
        resource.queueing_policy = QR.QueueingPolicy(valid_until_duration=duration)
    return resource


def request_json(request: NodeRequest, parent: str) -> dict[str, Any]:
    """The HTTP request `create` sends (what --dry-run prints): method, path and the JSON body."""
    import json

    tpu_v2 = load_tpu_v2()

    if request.queued:
        body = tpu_v2.QueuedResource.to_json(
            queued_proto(request, parent), use_integers_for_enums=False, always_print_fields_with_no_presence=False
        )
        path = f"/v2/{parent}/queuedResources?queuedResourceId={request.name}"
    else:
        body = tpu_v2.Node.to_json(
            node_proto(request), use_integers_for_enums=False, always_print_fields_with_no_presence=False
        )
        path = f"/v2/{parent}/nodes?nodeId={request.name}"
    return {"method": "POST", "path": path, "body": json.loads(body)}


def api_message(message: str) -> str:
    """The API's own words: the REST transport prefixes them with the request ("POST https://...?...: ")."""
    return re.sub(r"^(GET|POST|DELETE|PATCH|PUT) \S+: ", "", message or "")


def is_capacity_error(e: Exception) -> bool:
    """No capacity or quota right now (an HTTP 429/503 answer, or an operation that ended RESOURCE_EXHAUSTED,
    UNAVAILABLE or ABORTED): worth asking again later."""
    from google.api_core import exceptions

    capacity = (exceptions.TooManyRequests, exceptions.ResourceExhausted, exceptions.ServiceUnavailable)
    return isinstance(e, (*capacity, exceptions.Aborted))


def is_unreadable(e: Exception) -> bool:
    """An answer this client cannot parse: an operation whose metadata, response or error details hold a type newer
    than the installed google-cloud-tpu knows (protobuf's json_format refuses an Any it has no descriptor for)."""
    from google.protobuf import json_format

    return isinstance(e, json_format.ParseError) and "message descriptor by type_url" in str(e)


@dataclass(frozen=True)
class _OperationName:
    name: str


class UnreadOperation:
    """The API accepted the request, but its operation cannot be read here (is_unreadable): there is nothing to learn
    from it, so the callers' polling of the node or queued resource decides."""

    def __init__(self, why: str):
        self.operation = _OperationName(f"an operation this client cannot read, {why}; watching the TPU instead")

    def done(self) -> bool:
        return False

    def exception(self) -> None:
        return None


def credentials_for(endpoint: str) -> Any:
    """Application default credentials for a Google API at `endpoint`; none for an emulator (http://)."""
    if endpoint.startswith("http://"):
        # A plain-http endpoint is an emulator: never ask Google for a token (nor probe the metadata server).
        from google.auth.credentials import AnonymousCredentials

        return AnonymousCredentials()
    import google.auth
    import google.auth.exceptions

    try:
        credentials, _ = google.auth.default(scopes=["https://www.googleapis.com/auth/cloud-platform"])
    except google.auth.exceptions.DefaultCredentialsError:
        raise CloudError("no Google Cloud credentials found", "run `gcloud auth application-default login`") from None
    return credentials


class TpuApi:
    """Thin wrapper over tpu_v2.TpuClient that turns API failures into one-line CloudErrors."""

    source = "tpu"

    def __init__(self, settings: Settings):
        settings.require("project")
        zone = settings.zone or (settings.zones[0] if settings.zones else None)  # --zones alone: start at the first
        if not zone:
            settings.require("zone")
        self.project, self.zone, self.endpoint = settings.project, zone, settings.api_endpoint
        tpu_v2 = load_tpu_v2()  # first: what it imports, api_core's included, comes without aiohttp
        from google.api_core import exceptions
        from google.api_core.client_options import ClientOptions
        from google.api_core.retry import Retry, if_transient_error

        # Transient failures are retried with backoff, all within api_timeout; each attempt gets what is left.
        self._timeout = settings.api_timeout
        self._retry = Retry(predicate=if_transient_error, initial=0.25, maximum=4.0, timeout=settings.api_timeout)
        # A creation refused for quota (429) is not retried inside the call: lifecycle.create retries it visibly,
        # with a backoff measured in minutes, not seconds.
        self._create_retry = self._retry.with_predicate(
            lambda e: if_transient_error(e) and not isinstance(e, exceptions.TooManyRequests)
        )
        self._client = tpu_v2.TpuClient(
            credentials=credentials_for(self.endpoint),
            transport="rest",
            client_options=ClientOptions(api_endpoint=self.endpoint),
        )
        self._zones: dict[str, list[str]] = {}  # the project's TPU zones, asked once (shared with in_zone's copies)

    def in_zone(self, zone: str) -> TpuApi:
        """The same client asking about another zone of the project (the zone is only part of each request's path)."""
        other = copy.copy(self)
        other.zone = zone
        return other

    @property
    def _call(self) -> dict[str, Any]:
        return {"retry": self._retry, "timeout": self._timeout}

    @property
    def parent(self) -> str:
        return f"projects/{self.project}/locations/{self.zone}"

    def list_nodes(self) -> list[Node]:
        """The zone's TPUs. A zone the API does not offer (listed as empty, or refused) is a CloudError naming the
        zones there are: a typo must not read as "no TPUs"."""
        from google.api_core import exceptions

        try:
            nodes = [node_from_proto(n) for n in self._client.list_nodes(parent=self.parent, **self._call)]
        except Exception as e:
            if isinstance(e, exceptions.NotFound | exceptions.BadRequest):  # or refuses the zone: the same answer
                self.check_zone()
            raise self._error("listing TPUs", e, "tpu.nodes.list") from None
        if not nodes:
            self.check_zone()
        return nodes

    def zones(self) -> list[str]:
        """The zones Cloud TPU offers this project (locations.list), sorted."""
        project = str(self.project)
        if project not in self._zones:
            request = {"name": f"projects/{project}"}
            found: list[str] = []
            try:
                while True:
                    answer = self._client.list_locations(request=request, **self._call)
                    found += [location.location_id for location in answer.locations]
                    if not answer.next_page_token:
                        break
                    request["page_token"] = answer.next_page_token
            except Exception as e:
                raise self._error("listing the Cloud TPU zones", e, "tpu.locations.list") from None
            self._zones[project] = sorted(found)
        return self._zones[project]

    def check_zone(self) -> None:
        """A CloudError when the zone is not one of the project's TPU zones (nothing when the list cannot be had:
        the call that follows says what is wrong)."""
        try:
            zones = self.zones()
        except CloudError:
            return
        zone = str(self.zone)
        if zones and zone not in zones:
            close = difflib.get_close_matches(zone, zones, n=3, cutoff=0.6)
            hint = f"did you mean {' or '.join(close)}? " if close else ""
            raise CloudError(
                f"zone {zone!r} is not a Cloud TPU zone of project {self.project}",
                f"{hint}set --zone to one of: {', '.join(zones)}",
            )

    def get_node(self, name: str) -> Node:
        """The node; its absence is a one-line error naming the TPUs that do exist."""
        node = self.find_node(name)
        if node is None:
            names = ", ".join(n.name for n in self.list_nodes()) or "none"
            raise CloudError(
                f"TPU {name!r} not found in project {self.project}, zone {self.zone}", f"TPUs there: {names}"
            )
        return node

    # -- lifecycle: long-running operations ------------------------------------------------------------------

    def _start(self, call: Callable[[], Any], doing: str, permission: str) -> Any:
        """A call that starts a long-running operation: the operation, an UnreadOperation where its answer cannot be
        parsed here (the request went through), or the one-line CloudError."""
        try:
            return call()
        except Exception as e:
            if is_unreadable(e):
                return UnreadOperation(api_message(str(e)))
            raise self._error(doing, e, permission) from None

    def create(self, request: NodeRequest) -> Any:
        """Ask for the node (or its queued resource); returns the long-running operation. Raises CloudError, whose
        `retryable` says whether capacity or quota was the reason."""
        call: dict[str, Any] = {"retry": self._create_retry, "timeout": self._timeout}
        doing = f"creating TPU {request.name!r}"
        if request.queued:
            return self._start(
                lambda: self._client.create_queued_resource(
                    parent=self.parent,
                    queued_resource_id=request.name,
                    queued_resource=queued_proto(request, self.parent),
                    **call,
                ),
                doing,
                "tpu.queuedResources.create",
            )
        return self._start(
            lambda: self._client.create_node(
                parent=self.parent, node_id=request.name, node=node_proto(request), **call
            ),
            doing,
            "tpu.nodes.create",
        )

    def set_metadata(self, name: str, metadata: dict[str, str]) -> Any:
        """Replace node `name`'s metadata by `metadata` (UpdateNode with update_mask "metadata": the whole map, so pass
        every key to keep); returns the long-running operation."""
        from google.protobuf import field_mask_pb2

        node = {"name": f"{self.parent}/nodes/{name}", "metadata": metadata}
        return self._start(
            lambda: self._client.update_node(
                node=node, update_mask=field_mask_pb2.FieldMask(paths=["metadata"]), **self._call
            ),
            f"updating the metadata of TPU {name!r}",
            "tpu.nodes.update",
        )

    def delete(self, node: Node) -> Any:
        """Delete the node; one made by a queued resource goes with its queued resource (force)."""
        if node.queued_resource:
            return self.delete_queued(node.queued_resource)
        return self._start(
            lambda: self._client.delete_node(name=f"{self.parent}/nodes/{node.name}", **self._call),
            f"deleting TPU {node.name!r}",
            "tpu.nodes.delete",
        )

    def delete_queued(self, name: str) -> Any:
        return self._start(
            lambda: self._client.delete_queued_resource(
                request={"name": f"{self.parent}/queuedResources/{name}", "force": True}, **self._call
            ),
            f"deleting queued resource {name!r}",
            "tpu.queuedResources.delete",
        )

    def queued_state(self, name: str) -> str:
        """The queued resource's state (ACCEPTED, WAITING_FOR_RESOURCES, PROVISIONING, ACTIVE, FAILED, SUSPENDED,
        ...); "" if there is none."""
        queued = self.get_queued(name)
        return queued.state if queued else ""

    def get_queued(self, name: str) -> Queued | None:
        """The queued resource, or None when there is none of that name."""
        from google.api_core import exceptions

        try:
            resource = self._client.get_queued_resource(name=f"{self.parent}/queuedResources/{name}", **self._call)
        except exceptions.NotFound:
            return None
        except Exception as e:
            raise self._error(f"looking up queued resource {name!r}", e, "tpu.queuedResources.get") from None
        return queued_from_proto(resource)

    def list_queued(self) -> list[Queued]:
        """The zone's queued resources, whatever their state."""
        try:
            found = self._client.list_queued_resources(parent=self.parent, **self._call)
            return [queued_from_proto(q) for q in found]
        except Exception as e:
            raise self._error("listing queued resources", e, "tpu.queuedResources.list") from None

    def waiting_requests(self, nodes: list[Node]) -> list[Queued]:
        """The zone's queued resources whose node is not among `nodes` (the zone's TPUs): requests still in line,
        or failed, which a user must be able to see and cancel."""
        made = {n.name for n in nodes if not n.zone or n.zone == self.zone}
        return [q for q in self.list_queued() if q.node_id not in made]

    def find_node(self, name: str) -> Node | None:
        """The node, or None when there is none of that name."""
        from google.api_core import exceptions

        try:
            return node_from_proto(self._client.get_node(name=f"{self.parent}/nodes/{name}", **self._call))
        except exceptions.NotFound:
            return None
        except Exception as e:
            raise self._error(f"looking up TPU {name!r}", e, "tpu.nodes.get") from None

    def operation_error(self, operation: Any, doing: str) -> CloudError | None:
        """A finished operation's failure as a CloudError (None when it succeeded, is still running, or cannot be read
        here: then the node's own state tells)."""
        try:
            error = operation.exception() if operation.done() else None
        except Exception as e:
            if is_unreadable(e):
                return None
            raise self._error(f"{doing} (its operation)", e) from None
        if error is None:
            return None
        converted = self._error(doing, error)
        return converted if isinstance(converted, CloudError) else CloudError(f"{doing}: {error}")

    def _error(self, doing: str, e: Exception, permission: str = "") -> Exception:
        """The one-line CloudError for a failed call, saying what to do where the API says why (its ErrorInfo's
        reason); `permission` is what the call needs (Cloud TPU's IAM permission). Anything unexpected is returned
        as it is."""
        from google.api_core import exceptions
        from google.auth import exceptions as auth_exceptions

        if isinstance(e, exceptions.RetryError) and isinstance(e.cause, exceptions.GoogleAPICallError):
            retried = f"retried for {self._timeout:g} s"
            e = e.cause  # what the API kept answering, not "cannot reach"
        else:
            retried = ""
        if isinstance(e, exceptions.GoogleAPICallError):
            e.message = api_message(e.message)

        where = f"project {self.project}, zone {self.zone}"
        reason = getattr(e, "reason", None)
        info: dict[str, str] = dict(getattr(e, "metadata", None) or {})  # the ErrorInfo's metadata
        if reason == "SERVICE_DISABLED":
            service = info.get("service", "tpu.googleapis.com")
            return CloudError(
                f"{doing}: the Cloud TPU API is not enabled in project {self.project}",
                f"enable it: gcloud services enable {service} --project {self.project}",
            )
        if isinstance(e, exceptions.NotFound):
            return CloudError(f"{doing}: {where} not found ({e.message})", "check --project and --zone")
        # The REST transport raises by HTTP status (Forbidden/Unauthorized), gRPC's subclasses only over gRPC.
        if isinstance(e, exceptions.Forbidden | exceptions.Unauthorized):
            needed = info.get("permission") or permission
            role = role_for(needed)
            lacks = f": your account lacks {needed}" if needed else ""
            return CloudError(
                f"{doing}: permission denied in {where}{lacks} ({e.message})",
                f"ask for a role that has it, e.g. {role}, on project {self.project}"
                f" (gcloud projects add-iam-policy-binding {self.project} --member=user:YOU --role={role})",
            )
        if isinstance(e, exceptions.TooManyRequests) and retried:
            return CloudError(
                f"{doing}: the Cloud TPU API kept refusing for rate limit or quota, {retried} (429: {e.message})",
                f"wait a minute and run it again; the limits: https://console.cloud.google.com/iam-admin/quotas"
                f"?project={self.project}",
            )
        if isinstance(e, exceptions.GoogleAPICallError) and is_capacity_error(e):
            error = CloudError(f"{doing}: no capacity or quota now ({e.message})", "tpuctl retries with backoff")
            error.retryable = True
            return error
        if isinstance(e, exceptions.InvalidArgument | exceptions.BadRequest):
            return CloudError(f"{doing}: the Cloud TPU API refused the request: {e.message}")
        if isinstance(e, exceptions.Conflict | exceptions.AlreadyExists):
            return CloudError(f"{doing}: it already exists ({e.message})", "pick another name, or `tpuctl delete` it")
        if isinstance(e, exceptions.GoogleAPICallError):
            return CloudError(
                f"{doing}: the Cloud TPU API answered {e.code}{f', {retried}' if retried else ''}: {e.message}"
            )
        if isinstance(e, auth_exceptions.GoogleAuthError):
            return CloudError(f"{doing}: {e}", "run `gcloud auth application-default login`")
        if isinstance(e, OSError | exceptions.RetryError):  # requests' ConnectionError is an OSError
            return CloudError(f"{doing}: cannot reach the Cloud TPU API at {self.endpoint} ({e})")
        return e
