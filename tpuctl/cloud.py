"""The Cloud TPU API (google-cloud-tpu, REST transport): nodes, their state and their workers' addresses.

The client library is imported lazily: it costs ~0.3 s, and `tpuctl --help` must not pay it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from tpuctl.errors import CloudError, ConfigError

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
    spot: bool = False

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def node_from_proto(node: Any) -> Node:
    workers = tuple(
        Worker(index=i, internal_ip=ep.ip_address, external_ip=ep.access_config.external_ip or None)
        for i, ep in enumerate(node.network_endpoints)
    )
    health = node.health.name if node.health else ""
    return Node(
        name=node.name.rsplit("/", 1)[-1],
        state=node.state.name,
        health="" if health == "HEALTH_UNSPECIFIED" else health,
        accelerator_type=node.accelerator_type,
        runtime_version=node.runtime_version,
        workers=workers,
        spot=bool(node.scheduling_config.spot or node.scheduling_config.preemptible),
    )


def _credentials(endpoint: str) -> Any:
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

    def __init__(self, settings: Settings):
        settings.require("project", "zone")
        self.project, self.zone, self.endpoint = settings.project, settings.zone, settings.api_endpoint
        from google.api_core.client_options import ClientOptions
        from google.api_core.retry import Retry, if_transient_error
        from google.cloud import tpu_v2

        # Transient failures are retried with backoff, all within api_timeout; each attempt gets what is left.
        self._timeout = settings.api_timeout
        self._retry = Retry(predicate=if_transient_error, initial=0.25, maximum=4.0, timeout=settings.api_timeout)
        self._client = tpu_v2.TpuClient(
            credentials=_credentials(self.endpoint),
            transport="rest",
            client_options=ClientOptions(api_endpoint=self.endpoint),
        )

    @property
    def _call(self) -> dict[str, Any]:
        return {"retry": self._retry, "timeout": self._timeout}

    @property
    def parent(self) -> str:
        return f"projects/{self.project}/locations/{self.zone}"

    def list_nodes(self) -> list[Node]:
        try:
            return [node_from_proto(n) for n in self._client.list_nodes(parent=self.parent, **self._call)]
        except Exception as e:
            raise self._error("listing TPUs", e) from None

    def get_node(self, name: str) -> Node:
        from google.api_core import exceptions

        try:
            return node_from_proto(self._client.get_node(name=f"{self.parent}/nodes/{name}", **self._call))
        except exceptions.NotFound:
            names = ", ".join(n.name for n in self.list_nodes()) or "none"
            raise CloudError(
                f"TPU {name!r} not found in project {self.project}, zone {self.zone}", f"TPUs there: {names}"
            ) from None
        except Exception as e:
            raise self._error(f"looking up TPU {name!r}", e) from None

    def _error(self, doing: str, e: Exception) -> Exception:
        """The one-line CloudError for a failed call; anything unexpected is returned as it is."""
        from google.api_core import exceptions
        from google.auth import exceptions as auth_exceptions

        where = f"project {self.project}, zone {self.zone}"
        if isinstance(e, exceptions.NotFound):
            return CloudError(f"{doing}: {where} not found ({e.message})", "check --project and --zone")
        # The REST transport raises by HTTP status (Forbidden/Unauthorized), gRPC's subclasses only over gRPC.
        if isinstance(e, exceptions.Forbidden | exceptions.Unauthorized):
            return CloudError(
                f"{doing}: permission denied in {where} ({e.message})",
                "check the project, and that your account may use TPUs there (roles/tpu.viewer)",
            )
        if isinstance(e, exceptions.GoogleAPICallError):
            return CloudError(f"{doing}: the Cloud TPU API answered {e.code}: {e.message}")
        if isinstance(e, auth_exceptions.GoogleAuthError):
            return CloudError(f"{doing}: {e}", "run `gcloud auth application-default login`")
        if isinstance(e, OSError | exceptions.RetryError):  # requests' ConnectionError is an OSError
            return CloudError(f"{doing}: cannot reach the Cloud TPU API at {self.endpoint} ({e})")
        return e
