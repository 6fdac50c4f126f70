"""TPU slices on Compute Engine (google-cloud-compute, REST): what v5p, v6e and TPU7x are on Compute Engine, and
what TPU7x is only there (the Cloud TPU API gets fixes only and does not serve it).

A single-host slice is a VM instance with a TPU machine type; a multi-host slice is a managed instance group (MIG)
of 4-chip VMs whose workload policy (a regional resourcePolicy, `workloadPolicy.acceleratorTopology`) names the
slice's topology. `ComputeTpus` answers the same questions as cloud.TpuApi, in the same `Node`s (source
"compute"), so every fleet command and lifecycle.create/delete work on either unchanged. tpuctl makes a slice as
a MIG (a single-host one as a MIG of one VM, no workload policy: Compute Engine's "MIGs with a single TPU VM"); a
lone TPU VM made elsewhere is found as well.

Worker order: each VM's `agent-worker-number` metadata, the index the TPU runtime and JAX's GceTpuCluster read on
the VM (a VM without it, if any, after those, by name). tpuctl wires `jax.distributed` in that order (worker 0's
internal address as coordinator), so the process ids agree with the runtime's numbering.

The client: the `*_unary` methods (an Operation back) and the operation clients of the same endpoint to follow
them. google-cloud-compute's ExtendedOperation polls compute.googleapis.com whatever the endpoint, so a local
stand-in (or a regional endpoint) would not see its own operations.
"""

from __future__ import annotations

import copy
import re
import time
from dataclasses import dataclass
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from tpuctl.cloud import Node, NodeRequest, Worker, api_message, credentials_for
from tpuctl.errors import CloudError, ConfigError

if TYPE_CHECKING:
    from tpuctl.config import Settings

WORKER_KEY = "agent-worker-number"  # the VM's worker index, set by the TPU platform (JAX's GceTpuCluster reads it)
CREATED_BY = "created-by"  # Compute Engine's own metadata key on a MIG's VMs: the MIG's path
# Metadata each VM has for itself, never copied between the VMs of a slice when tpuctl writes a key to them all
OWN_KEYS = frozenset({WORKER_KEY, CREATED_BY, "worker-network-endpoints", "instance-template"})
# Errors of an operation or of a MIG's attempts that say "no capacity or quota now": worth another try
CAPACITY_CODES = frozenset(
    {"ZONE_RESOURCE_POOL_EXHAUSTED", "ZONE_RESOURCE_POOL_EXHAUSTED_WITH_DETAILS", "QUOTA_EXCEEDED", "STOCKOUT"}
)
# The image a new slice's VMs boot: plain Ubuntu 22.04 LTS (`tpuctl prepare` installs jax[tpu] and its libtpu from
# PyPI, as on any TPU VM); the `image` setting takes another (a family or an image, full or project-relative path).
DEFAULT_IMAGE = "projects/ubuntu-os-cloud/global/images/family/ubuntu-2204-lts"


@dataclass(frozen=True)
class Family:
    """A TPU generation on Compute Engine: its accelerator-type prefix, how the type's number counts chips (v5p and
    TPU7x count TensorCores, two a chip; v6e counts chips), its machine types by chips a VM, and its topology's
    dimensions (v6e's is 2D, v5p's and TPU7x's 3D)."""

    prefix: str
    per_chip: int
    machines: dict[int, str]  # chips a VM -> machine type; the 4-chip one makes multi-host slices
    dims: int


FAMILIES = (
    Family("v5p", 2, {4: "ct5p-hightpu-4t"}, 3),
    Family("v6e", 1, {1: "ct6e-standard-1t", 4: "ct6e-standard-4t", 8: "ct6e-standard-8t"}, 2),
    Family("tpu7x", 2, {1: "tpu7x-standard-1t", 4: "tpu7x-standard-4t"}, 3),
)
HOST_CHIPS = 4  # chips of each VM of a multi-host slice


@dataclass(frozen=True)
class SliceShape:
    machine_type: str
    hosts: int
    topology: str  # the workload policy's acceleratorTopology ("4x4", "2x2x4"); "" for one host


def topology(chips: int, dims: int) -> str:
    """The slice's chip grid: 2D (v6e: 2x2, 2x4, 4x4, 4x8, 8x8, ...) or 3D (2x2x1, 2x2x2, 2x2x4, 2x4x4, 4x4x4,
    ...), each size doubling the smallest dimension from the last, as Google's topology tables list them."""
    grid = [2, 2] if dims == 2 else [2, 2, 1]
    while grid[0] * grid[1] * (grid[2] if dims == 3 else 1) < chips:
        smallest = min(range(len(grid)), key=lambda i: (grid[i], -i))
        grid[smallest] *= 2
    return "x".join(str(d) for d in sorted(grid))


def shape_of(accelerator_type: str) -> SliceShape:
    """v6e-16 -> 4 VMs of ct6e-standard-4t in a 4x4; v5p-8 -> 1 VM of ct5p-hightpu-4t. A type Compute Engine does
    not offer is one line naming those it does."""
    name, _, number = accelerator_type.partition("-")
    family = next((f for f in FAMILIES if f.prefix == name), None)
    known = ", ".join(f"{f.prefix}-N" for f in FAMILIES)
    if family is None or not number.isdigit():
        raise ConfigError(
            f"TPU type {accelerator_type!r} is not one Compute Engine offers as VMs",
            f"use {known} (the Cloud TPU API has the others: --backend tpu)",
        )
    chips, remainder = divmod(int(number), family.per_chip)
    if remainder or chips < 1 or chips & (chips - 1):
        raise ConfigError(f"TPU type {accelerator_type!r} has no whole power-of-two number of chips")
    if chips in family.machines:
        return SliceShape(family.machines[chips], 1, "")
    if chips < HOST_CHIPS:
        raise ConfigError(f"TPU type {accelerator_type!r}: {name} has no {chips}-chip VM")
    return SliceShape(family.machines[HOST_CHIPS], chips // HOST_CHIPS, topology(chips, family.dims))


def accelerator_type_of(machine_type: str, hosts: int) -> str:
    """The accelerator type of `hosts` VMs of `machine_type` (ct6e-standard-4t x 4 -> v6e-16); the machine type
    itself where it is no TPU machine type tpuctl knows."""
    for family in FAMILIES:
        for chips, machine in family.machines.items():
            if machine == machine_type:
                return f"{family.prefix}-{chips * hosts * family.per_chip}"
    return machine_type


def is_tpu_machine(machine_type: str) -> bool:
    return any(machine_type in f.machines.values() for f in FAMILIES)


def region_of(zone: str) -> str:
    return zone.rsplit("-", 1)[0]


def last(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[-1]


def metadata_dict(metadata: Any) -> dict[str, str]:
    return {item.key: item.value for item in metadata.items}


# What an instance's status means for the slice, in the Cloud TPU API's words (lifecycle and status read those)
STATES = {
    "PROVISIONING": "CREATING",
    "STAGING": "CREATING",
    "RUNNING": "READY",
    "STOPPING": "STOPPING",
    "STOPPED": "STOPPED",
    "SUSPENDING": "STOPPING",
    "SUSPENDED": "STOPPED",
    "REPAIRING": "REPAIRING",
    "TERMINATED": "TERMINATED",
}


class Done:
    """A finished step (what delete returns once everything is gone), shaped as lifecycle reads an operation."""

    def __init__(self, name: str):
        self.operation = SimpleNamespace(name=name)

    def done(self) -> bool:
        return True


class Pending:
    """Compute Engine operations followed to their end (their `done()` asks the API again)."""

    def __init__(self, api: ComputeTpus, operations: list[Any], mig: str | None = None):
        self.api, self.operations, self.mig = api, operations, mig
        self.operation = operations[-1]

    def done(self) -> bool:
        self.operations = [self.api.refresh(op) for op in self.operations]
        return all(self.api.is_done(op) for op in self.operations)


class ComputeTpus:
    """The Compute Engine calls tpuctl makes about TPU slices, each failure one line (as TpuApi's)."""

    source = "compute"

    def __init__(self, settings: Settings):
        settings.require("project")
        zone = settings.zone or (settings.zones[0] if settings.zones else None)
        if not zone:
            settings.require("zone")
        self.project, self.zone, self.endpoint = str(settings.project), str(zone), settings.compute_endpoint
        self.image = settings.image or DEFAULT_IMAGE
        self._timeout, self._poll = settings.api_timeout, settings.api_poll
        from google.api_core.client_options import ClientOptions

        from tpuctl.imports import import_past_init

        options = ClientOptions(api_endpoint=self.endpoint)
        credentials = credentials_for(self.endpoint)

        def client(service: str, name: str) -> Any:
            module = import_past_init("google.cloud.compute_v1", f"services.{service}")
            return getattr(module, name)(credentials=credentials, transport="rest", client_options=options)

        self._migs = client("instance_group_managers", "InstanceGroupManagersClient")
        self._templates = client("instance_templates", "InstanceTemplatesClient")
        self._instances = client("instances", "InstancesClient")
        self._policies = client("resource_policies", "ResourcePoliciesClient")
        self._zone_ops = client("zone_operations", "ZoneOperationsClient")
        self._region_ops = client("region_operations", "RegionOperationsClient")
        self._global_ops = client("global_operations", "GlobalOperationsClient")
        self.types = import_past_init("google.cloud.compute_v1", "types.compute")

    def in_zone(self, zone: str) -> ComputeTpus:
        other = copy.copy(self)
        other.zone = zone
        return other

    @property
    def region(self) -> str:
        return region_of(self.zone)

    # -- reading ----------------------------------------------------------------------------------------------

    def list_nodes(self) -> list[Node]:
        """The zone's TPU slices: its MIGs of TPU VMs and its TPU VMs of no MIG."""
        instances = self._zone_instances()
        try:
            migs = list(self._migs.list(project=self.project, zone=self.zone, timeout=self._timeout))
        except Exception as e:
            raise self._error("listing managed instance groups", e, "compute.instanceGroupManagers.list") from None
        nodes = [node for mig in migs if (node := self._mig_node(mig, instances)) is not None]
        mine = {i.name for n in nodes for i in instances if self._member_of(i, n.name)}
        for instance in instances:
            alone = instance.name not in mine and not metadata_dict(instance.metadata).get(CREATED_BY)
            if alone and is_tpu_machine(last(instance.machine_type)):
                nodes.append(self._instance_node(instance))
        return sorted(nodes, key=lambda n: n.name)

    def find_node(self, name: str) -> Node | None:
        """The slice `name` (a MIG, else a TPU VM), or None."""
        from google.api_core import exceptions

        try:
            mig = self._migs.get(
                project=self.project, zone=self.zone, instance_group_manager=name, timeout=self._timeout
            )
        except exceptions.NotFound:
            mig = None
        except Exception as e:
            raise self._error(f"looking up TPU {name!r}", e, "compute.instanceGroupManagers.get") from None
        if mig is not None:
            return self._mig_node(mig, self._zone_instances())
        try:
            instance = self._instances.get(project=self.project, zone=self.zone, instance=name, timeout=self._timeout)
        except exceptions.NotFound:
            return None
        except Exception as e:
            raise self._error(f"looking up TPU {name!r}", e, "compute.instances.get") from None
        return self._instance_node(instance) if is_tpu_machine(last(instance.machine_type)) else None

    def get_node(self, name: str) -> Node:
        node = self.find_node(name)
        if node is None:
            names = ", ".join(n.name for n in self.list_nodes()) or "none"
            raise CloudError(
                f"TPU {name!r} not found on Compute Engine in project {self.project}, zone {self.zone}",
                f"TPU slices there: {names}",
            )
        return node

    def _zone_instances(self) -> list[Any]:
        try:
            return list(self._instances.list(project=self.project, zone=self.zone, timeout=self._timeout))
        except Exception as e:
            raise self._error("listing VM instances", e, "compute.instances.list") from None

    def _member_of(self, instance: Any, mig: str) -> bool:
        # Compute Engine writes `projects/NUMBER/zones/Z/instanceGroupManagers/NAME`: the number, not the project's id
        path = f"/zones/{self.zone}/instanceGroupManagers/{mig}"
        return metadata_dict(instance.metadata).get(CREATED_BY, "").endswith(path)

    def _template(self, url: str) -> Any | None:
        from google.api_core import exceptions

        try:
            return self._templates.get(project=self.project, instance_template=last(url), timeout=self._timeout)
        except exceptions.NotFound:
            return None
        except Exception as e:
            raise self._error(f"reading instance template {last(url)!r}", e, "compute.instanceTemplates.get") from None

    def _mig_node(self, mig: Any, instances: list[Any]) -> Node | None:
        """The MIG as a slice; None when its template is no TPU machine type (a MIG of other VMs)."""
        template = self._template(mig.instance_template) if mig.instance_template else None
        machine = template.properties.machine_type if template is not None else ""
        members = [i for i in instances if self._member_of(i, mig.name)]
        if template is not None and not is_tpu_machine(machine):
            return None
        members.sort(key=worker_order)
        workers = tuple(worker_of(i, n) for n, i in enumerate(members))
        statuses = {i.status for i in members}
        size = int(mig.target_size)
        spot = template is not None and template.properties.scheduling.provisioning_model == "SPOT"
        if statuses <= {"RUNNING"} and len(members) == size and size:
            state = "READY"
        elif statuses & {"TERMINATED", "STOPPED", "SUSPENDED"}:
            state = "PREEMPTED" if spot else "TERMINATED"
        else:
            state = "CREATING"
        base = metadata_dict(template.properties.metadata) if template is not None else {}
        shared = shared_metadata([metadata_dict(i.metadata) for i in members]) if members else base
        policy = mig.resource_policies.workload_policy if mig.resource_policies else ""
        return Node(
            name=mig.name,
            state=state,
            health="" if state == "READY" or not members else f"{len(members)}/{size} VMs",
            accelerator_type=accelerator_type_of(machine, size) if machine else "?",
            runtime_version=last(template.properties.disks[0].initialize_params.source_image)
            if template is not None and template.properties.disks
            else "",
            workers=workers,
            spot=spot,
            reserved=template is not None and template.properties.scheduling.provisioning_model == "RESERVATION_BOUND",
            health_description=f"workload policy {last(policy)}" if policy else "",
            create_time=mig.creation_timestamp,
            network=last(template.properties.network_interfaces[0].network)
            if template is not None and template.properties.network_interfaces
            else "",
            labels=tuple(sorted(template.properties.labels.items())) if template is not None else (),
            zone=self.zone,
            metadata=tuple(sorted(shared.items())),
            source="compute",
        )

    def _instance_node(self, instance: Any) -> Node:
        spot = instance.scheduling.provisioning_model == "SPOT"
        state = STATES.get(instance.status, instance.status or "UNKNOWN")
        if state == "TERMINATED" and spot:
            state = "PREEMPTED"
        return Node(
            name=instance.name,
            state=state,
            health="",
            accelerator_type=accelerator_type_of(last(instance.machine_type), 1),
            runtime_version="",
            workers=(worker_of(instance, 0),),
            spot=spot,
            reserved=instance.scheduling.provisioning_model == "RESERVATION_BOUND",
            create_time=instance.creation_timestamp,
            labels=tuple(sorted(instance.labels.items())),
            zone=self.zone,
            metadata=tuple(sorted(metadata_dict(instance.metadata).items())),
            source="compute",
        )

    # -- writing ----------------------------------------------------------------------------------------------

    def create(self, request: NodeRequest) -> Pending:
        """The slice as a MIG: its instance template, its workload policy (several hosts) and the group; returns
        the group's creation, which `operation_error` follows into the VMs' own attempts."""
        if request.queued:
            raise ConfigError("--queued is the Cloud TPU API's queue", "on Compute Engine, create without it")
        shape = shape_of(request.accelerator_type)
        doing = f"creating TPU {request.name!r}"
        t = self.types
        template = self._template_body(request, shape)
        insert = self._call(
            lambda: self._templates.insert_unary(project=self.project, instance_template_resource=template),
            doing,
            "compute.instanceTemplates.insert",
        )
        self._wait(insert, doing)
        policy_url = ""
        try:
            if shape.hosts > 1:
                policy = t.ResourcePolicy(
                    name=request.name,
                    description="tpuctl: the slice's topology",
                    workload_policy=t.ResourcePolicyWorkloadPolicy(
                        type_="HIGH_THROUGHPUT", accelerator_topology=shape.topology
                    ),
                )
                op = self._call(
                    lambda: self._policies.insert_unary(
                        project=self.project, region=self.region, resource_policy_resource=policy
                    ),
                    doing,
                    "compute.resourcePolicies.create",
                )
                self._wait(op, doing)
                policy_url = f"projects/{self.project}/regions/{self.region}/resourcePolicies/{request.name}"
            mig = t.InstanceGroupManager(
                name=request.name,
                base_instance_name=request.name,
                instance_template=f"projects/{self.project}/global/instanceTemplates/{request.name}",
                target_size=shape.hosts,
            )
            if policy_url:
                mig.resource_policies = t.InstanceGroupManagerResourcePolicies(workload_policy=policy_url)
            op = self._call(
                lambda: self._migs.insert_unary(
                    project=self.project, zone=self.zone, instance_group_manager_resource=mig
                ),
                doing,
                "compute.instanceGroupManagers.create",
            )
        except CloudError:
            self._remove_parts(request.name, policy=bool(policy_url))
            raise
        return Pending(self, [op], mig=request.name)

    def plan_json(self, request: NodeRequest) -> list[dict[str, Any]]:
        """What `create` would send (--dry-run): each request's method, path and JSON body, in order."""
        import json

        t = self.types
        shape = shape_of(request.accelerator_type)
        base = f"/compute/v1/projects/{self.project}"

        def body(message: Any, kind: Any) -> Any:
            return json.loads(kind.to_json(message, always_print_fields_with_no_presence=False))

        sent = [
            {
                "method": "POST",
                "path": f"{base}/global/instanceTemplates",
                "body": body(self._template_body(request, shape), t.InstanceTemplate),
            }
        ]
        group: dict[str, Any] = {
            "name": request.name,
            "baseInstanceName": request.name,
            "instanceTemplate": f"projects/{self.project}/global/instanceTemplates/{request.name}",
            "targetSize": shape.hosts,
        }
        if shape.hosts > 1:
            policy = {
                "name": request.name,
                "workloadPolicy": {"type": "HIGH_THROUGHPUT", "acceleratorTopology": shape.topology},
            }
            sent.append({"method": "POST", "path": f"{base}/regions/{self.region}/resourcePolicies", "body": policy})
            group["resourcePolicies"] = {
                "workloadPolicy": f"projects/{self.project}/regions/{self.region}/resourcePolicies/{request.name}"
            }
        sent.append({"method": "POST", "path": f"{base}/zones/{self.zone}/instanceGroupManagers", "body": group})
        return sent

    def describe_plan(self, request: NodeRequest) -> str:
        shape = shape_of(request.accelerator_type)
        topology = f", workload policy {shape.topology} (HIGH_THROUGHPUT)" if shape.hosts > 1 else ""
        capacity = " spot" if request.spot else (" reserved" if request.reserved else "")
        return (
            f"would create on Compute Engine, {self.endpoint}: instance template {request.name!r}"
            f" ({shape.machine_type}{capacity}, image {self.image}){topology}, managed instance group"
            f" {request.name!r} of {shape.hosts} VM{'s' if shape.hosts > 1 else ''} in {self.zone}"
        )

    def _template_body(self, request: NodeRequest, shape: SliceShape) -> Any:
        t = self.types
        scheduling = t.Scheduling(on_host_maintenance="TERMINATE", automatic_restart=False)
        if request.spot:
            scheduling.provisioning_model = "SPOT"
            scheduling.instance_termination_action = "STOP"
        elif request.reserved:
            scheduling.provisioning_model = "RESERVATION_BOUND"
        interface = t.NetworkInterface(
            network=f"global/networks/{request.network or 'default'}",
            access_configs=[t.AccessConfig(name="External NAT", type_="ONE_TO_ONE_NAT")],
        )
        if request.subnetwork:
            interface.subnetwork = f"regions/{self.region}/subnetworks/{request.subnetwork}"
        properties = t.InstanceProperties(
            machine_type=shape.machine_type,
            disks=[
                t.AttachedDisk(
                    boot=True,
                    auto_delete=True,
                    initialize_params=t.AttachedDiskInitializeParams(source_image=self.image, disk_size_gb=100),
                )
            ],
            network_interfaces=[interface],
            scheduling=scheduling,
            labels=dict(request.labels),
            metadata=t.Metadata(items=[t.Items(key=k, value=v) for k, v in request.metadata]),
            tags=t.Tags(items=list(request.tags)),
        )
        if request.reserved:
            properties.reservation_affinity = t.ReservationAffinity(consume_reservation_type="ANY_RESERVATION")
        if request.service_account:
            properties.service_accounts = [t.ServiceAccount(email=request.service_account, scopes=list(request.scopes))]
        return t.InstanceTemplate(name=request.name, description="tpuctl: one VM of the slice", properties=properties)

    def set_metadata(self, name: str, metadata: dict[str, str]) -> Pending:
        """`metadata`'s items onto every VM of the slice, each VM's own (its worker number, ...) kept."""
        node = self.get_node(name)
        names = self._member_names(node)
        operations = []
        for instance_name in names:
            doing = f"updating the metadata of {instance_name!r}"
            instance = self._call(
                lambda n=instance_name: self._instances.get(project=self.project, zone=self.zone, instance=n),
                doing,
                "compute.instances.get",
            )
            own = metadata_dict(instance.metadata)
            merged = {**own, **{k: v for k, v in metadata.items() if k not in OWN_KEYS}}
            body = self.types.Metadata(
                fingerprint=instance.metadata.fingerprint,
                items=[self.types.Items(key=k, value=v) for k, v in merged.items()],
            )
            operations.append(
                self._call(
                    lambda n=instance_name, b=body: self._instances.set_metadata_unary(
                        project=self.project, zone=self.zone, instance=n, metadata_resource=b
                    ),
                    doing,
                    "compute.instances.setMetadata",
                )
            )
        return Pending(self, operations)

    def _member_names(self, node: Node) -> list[str]:
        if self._is_mig(node.name):
            return [i.name for i in self._zone_instances() if self._member_of(i, node.name)]
        return [node.name]

    def _is_mig(self, name: str) -> bool:
        from google.api_core import exceptions

        try:
            self._migs.get(project=self.project, zone=self.zone, instance_group_manager=name, timeout=self._timeout)
        except exceptions.NotFound:
            return False
        except Exception as e:
            raise self._error(f"looking up TPU {name!r}", e, "compute.instanceGroupManagers.get") from None
        return True

    def delete(self, node: Node) -> Done:
        """The slice's MIG, then its template and workload policy (a lone VM: itself), each waited for: what is
        left of a half-done delete is found and removed by the next."""
        doing = f"deleting TPU {node.name!r}"
        if not self._is_mig(node.name):
            op = self._call(
                lambda: self._instances.delete_unary(project=self.project, zone=self.zone, instance=node.name),
                doing,
                "compute.instances.delete",
            )
            self._wait(op, doing)
            return Done(op.name)
        mig = self._call(
            lambda: self._migs.get(project=self.project, zone=self.zone, instance_group_manager=node.name),
            doing,
            "compute.instanceGroupManagers.get",
        )
        template = self._template(mig.instance_template) if mig.instance_template else None
        op = self._call(
            lambda: self._migs.delete_unary(project=self.project, zone=self.zone, instance_group_manager=node.name),
            doing,
            "compute.instanceGroupManagers.delete",
        )
        self._wait(op, doing, timeout=1800)
        # the parts tpuctl made (named after the slice, labelled by it); a template made elsewhere may serve others
        policy = mig.resource_policies.workload_policy if mig.resource_policies else ""
        if template is not None and template.name == node.name and made_by_tpuctl(template.properties.labels):
            self._remove_parts(template.name, policy=last(policy) == node.name)
        return Done(op.name)

    def _remove_parts(self, template: str, policy: bool) -> None:
        """The instance template and workload policy (both named `template`) of a slice tpuctl made, once its MIG
        is gone or was never made."""
        from google.api_core import exceptions

        steps = [
            (
                lambda: self._templates.delete_unary(project=self.project, instance_template=template),
                f"deleting instance template {template!r}",
            )
        ]
        if policy:
            steps.append(
                (
                    lambda: self._policies.delete_unary(
                        project=self.project, region=self.region, resource_policy=template
                    ),
                    f"deleting workload policy {template!r}",
                )
            )
        for call, doing in steps:
            try:
                self._wait(call(), doing)
            except exceptions.NotFound:
                continue
            except CloudError:
                raise
            except Exception as e:
                raise self._error(doing, e) from None

    # -- operations -------------------------------------------------------------------------------------------

    def refresh(self, op: Any) -> Any:
        if op.status == self.types.Operation.Status.DONE:
            return op
        if op.zone:
            return self._zone_ops.get(project=self.project, zone=last(op.zone), operation=op.name)
        if op.region:
            return self._region_ops.get(project=self.project, region=last(op.region), operation=op.name)
        return self._global_ops.get(project=self.project, operation=op.name)

    def is_done(self, op: Any) -> bool:
        return op.status == self.types.Operation.Status.DONE

    def _wait(self, op: Any, doing: str, timeout: float | None = None) -> Any:
        deadline = time.monotonic() + (timeout or max(self._timeout, 300.0))
        pause = min(0.25, self._poll)
        while True:
            op = self.refresh(op)
            if self.is_done(op):
                error = self.op_error(op, doing)
                if error is not None:
                    raise error
                return op
            if time.monotonic() > deadline:
                raise CloudError(f"{doing}: not done after {timeout or self._timeout:.0f} s ({op.name})")
            time.sleep(pause)
            pause = min(pause * 1.5, self._poll)

    def op_error(self, op: Any, doing: str) -> CloudError | None:
        """A finished operation's errors as one line (retryable where capacity or quota was the reason)."""
        errors = list(op.error.errors) if op.error else []
        if not errors and not op.http_error_status_code:
            return None
        codes = {e.code for e in errors}
        message = "; ".join(f"{e.code}: {e.message}" for e in errors) or op.http_error_message
        error = CloudError(f"{doing}: {message}")
        error.retryable = bool(codes & CAPACITY_CODES)
        return error

    def operation_error(self, operation: Any, doing: str) -> CloudError | None:
        """The failure of a creation or update, as lifecycle asks TpuApi's: an operation's error, or, for a MIG
        being made, its VMs' last attempt's (a zone without capacity fails there, not in the group's operation)."""
        if not isinstance(operation, Pending):
            return None
        try:
            done = operation.done()
        except Exception as e:
            raise self._error(f"{doing} (its operation)", e) from None
        for op in operation.operations:
            if self.is_done(op) and (error := self.op_error(op, doing)) is not None:
                return error
        if done and operation.mig is not None:
            return self._attempt_error(operation.mig, doing)
        return None

    def _attempt_error(self, mig: str, doing: str) -> CloudError | None:
        try:
            answer = self._migs.list_managed_instances(
                project=self.project, zone=self.zone, instance_group_manager=mig, timeout=self._timeout
            )
        except Exception as e:
            raise self._error(f"{doing} (its VMs)", e, "compute.instanceGroupManagers.listManagedInstances") from None
        errors = [e for m in answer for e in m.last_attempt.errors.errors] if answer else []
        if not errors:
            return None
        codes = {e.code for e in errors}
        error = CloudError(f"{doing}: {errors[0].code}: {errors[0].message}")
        error.retryable = bool(codes & CAPACITY_CODES)
        return error

    # -- what the Cloud TPU API has and Compute Engine does not ------------------------------------------------

    def get_queued(self, name: str) -> None:
        return None

    def queued_state(self, name: str) -> str:
        return ""

    def delete_queued(self, name: str) -> Any:
        raise CloudError(f"{name!r}: queued resources are the Cloud TPU API's; Compute Engine has none")

    # -- errors -----------------------------------------------------------------------------------------------

    def _call(self, call: Any, doing: str, permission: str) -> Any:
        try:
            return call()
        except Exception as e:
            raise self._error(doing, e, permission) from None

    def _error(self, doing: str, e: Exception, permission: str = "") -> Exception:
        """One line for a failed Compute Engine call, as TpuApi's for the Cloud TPU API."""
        from google.api_core import exceptions
        from google.auth import exceptions as auth_exceptions

        where = f"project {self.project}, zone {self.zone}"
        if isinstance(e, exceptions.GoogleAPICallError):
            message = api_message(e.message)
            if getattr(e, "reason", None) == "SERVICE_DISABLED" or "has not been used in project" in message:
                return CloudError(
                    f"{doing}: the Compute Engine API is not enabled in project {self.project}",
                    f"enable it: gcloud services enable compute.googleapis.com --project {self.project}",
                )
            if isinstance(e, exceptions.Forbidden | exceptions.Unauthorized):
                lacks = f": your account lacks {permission}" if permission else ""
                return CloudError(
                    f"{doing}: permission denied in {where}{lacks} ({message})",
                    f"ask for a role that has it, e.g. roles/compute.instanceAdmin.v1, on project {self.project}",
                )
            if isinstance(e, exceptions.Conflict):
                return CloudError(f"{doing}: it already exists ({message})", "pick another name, or `tpuctl delete` it")
            if isinstance(e, exceptions.NotFound):
                return CloudError(f"{doing}: {where} not found ({message})", "check --project and --zone")
            error = CloudError(f"{doing}: the Compute Engine API answered {e.code}: {message}")
            error.retryable = any(code in message for code in CAPACITY_CODES)
            return error
        if isinstance(e, auth_exceptions.GoogleAuthError):
            return CloudError(f"{doing}: {e}", "run `gcloud auth application-default login`")
        if isinstance(e, OSError):
            return CloudError(f"{doing}: cannot reach the Compute Engine API at {self.endpoint} ({e})")
        return e


def made_by_tpuctl(labels: Any) -> bool:
    """Whether a template carries the label tpuctl gives what it makes (cloud.NodeRequest's labels)."""
    return dict(labels).get("created-by") == "tpuctl"


def worker_order(instance: Any) -> tuple[int, str]:
    number = metadata_dict(instance.metadata).get(WORKER_KEY, "")
    return (int(number), "") if re.fullmatch(r"\d+", number) else (1 << 30, instance.name)


def worker_of(instance: Any, index: int) -> Worker:
    interface = instance.network_interfaces[0] if instance.network_interfaces else None
    internal = interface.network_i_p if interface is not None else ""
    external = next((a.nat_i_p for a in interface.access_configs if a.nat_i_p), None) if interface else None
    return Worker(index=index, internal_ip=internal, external_ip=external)


def shared_metadata(each: list[dict[str, str]]) -> dict[str, str]:
    """The items every VM of a slice has with the same value (a key tpuctl wrote to them all; not their own)."""
    first = each[0]
    return {k: v for k, v in first.items() if k not in OWN_KEYS and all(m.get(k) == v for m in each[1:])}
