"""A local Compute Engine API (v1): the project's metadata (`projects.get`, whose `commonInstanceMetadata` holds
`enable-oslogin`) and what TPUs on Compute Engine are made of: instance templates (global), workload policies
(regional resourcePolicies), managed instance groups (zonal instanceGroupManagers, with listManagedInstances), their
instances (get, list, setMetadata, delete) and the zone / region / global operations each write returns.

Its answers are held to compute.v1.json by the tests (`held_to_reference`), and so are the bodies it is sent: a field
the document's request schema lacks is a 400, as Google's front end answers. Enums travel as names (Compute Engine's
REST client sends and reads strings). A project not in `projects` is 404; one in `denied` is 403.

A MIG's instances are named `{baseInstanceName}-{4 letters}` as Compute Engine names them; `on_create(project, zone,
mig, count)` gives their (internal, external) addresses, so a test can put stand-in sshd workers behind them. Each
instance gets its template's metadata plus what the TPU platform sets on a slice's VMs for the TPU runtime and JAX's
GceTpuCluster: `agent-worker-number` (its worker index) and `worker-network-endpoints` (every worker's address, in
worker order). The worker order is deliberately not the order of the names, so a client that sorted by name instead
would wire the slice wrongly. Instances are PROVISIONING for `create_delay_s`, then RUNNING.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import random
import string
import threading
import time
from collections.abc import Callable
from http import HTTPStatus
from typing import Any

from standins.jsonapi import ApiError, JsonApi

SERVICE_PATH = "/compute/v1"  # the document's servicePath: its method paths start after it
BASE = "https://www.googleapis.com/compute/v1"
# TPU machine types (Compute Engine's TPU pages): chips per VM
TPU_MACHINE_TYPES = {
    "ct5p-hightpu-4t": 4,
    "ct6e-standard-1t": 1,
    "ct6e-standard-4t": 4,
    "ct6e-standard-8t": 8,
    "tpu7x-standard-1t": 1,
    "tpu7x-standard-4t": 4,
}
WorkersFor = Callable[[str, str, str, int], list[tuple[str, str | None]]]


def _region(zone: str) -> str:
    return zone.rsplit("-", 1)[0]


def _last(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[-1]


def _fingerprint(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


class FakeComputeApi(JsonApi):
    def __init__(self) -> None:
        super().__init__()
        self.projects: dict[str, dict[str, str]] = {}  # project -> its common instance metadata
        self.denied: set[str] = set()
        self.templates: dict[tuple[str, str], dict[str, Any]] = {}  # (project, name)
        self.policies: dict[tuple[str, str, str], dict[str, Any]] = {}  # (project, region, name)
        self.migs: dict[tuple[str, str, str], dict[str, Any]] = {}  # (project, zone, name)
        self.instances: dict[tuple[str, str, str], dict[str, Any]] = {}  # (project, zone, name)
        self.operations: dict[str, dict[str, Any]] = {}  # name -> operation
        self.on_create: WorkersFor = lambda *_: []
        self.create_delay_s = 0.0
        self.no_capacity_zones: set[str] = set()  # a MIG's instances there fail to start (ZONE_RESOURCE_POOL_EXHAUSTED)
        self._ids = itertools.count(1_000_000_001)
        self._random = random.Random(7)
        self._state_lock = threading.RLock()

    # -- set-up by tests --------------------------------------------------------------------------------

    def add_instance(
        self,
        project: str,
        zone: str,
        name: str,
        machine_type: str,
        ip: str,
        external_ip: str | None = None,
        metadata: dict[str, str] | None = None,
        status: str = "RUNNING",
    ) -> dict[str, Any]:
        """A VM made elsewhere (a single-host TPU VM made with gcloud, say)."""
        with self._state_lock:
            instance = self._instance(project, zone, name, machine_type, ip, external_ip, metadata or {}, None)
            instance["status"] = status
            return instance

    def preempt(self, project: str, zone: str, mig: str) -> None:
        """Compute Engine takes the MIG's spot VMs back: they stop (instanceTerminationAction STOP: TERMINATED)."""
        with self._state_lock:
            for key in self._members(project, zone, mig):
                self.instances[key]["status"] = "TERMINATED"

    # -- routing ----------------------------------------------------------------------------------------

    def route(self, method: str, path: str, query: dict[str, list[str]], body: dict[str, Any]) -> dict[str, Any]:
        parts = path.removeprefix(SERVICE_PATH).strip("/").split("/")
        if len(parts) < 2 or parts[0] != "projects":
            raise ApiError(HTTPStatus.NOT_FOUND, f"unknown path {path}")
        project = parts[1]
        if project in self.denied:
            raise ApiError(HTTPStatus.FORBIDDEN, f"Required 'compute.projects.get' permission for 'projects/{project}'")
        self._check_body(method, path, body)
        with self._state_lock:
            return self._route(method, project, parts[2:], query, body)

    def _check_body(self, method: str, path: str, body: dict[str, Any]) -> None:
        """A request body holding what the document's request schema lacks is refused, as the real API refuses it."""
        from standins import discovery

        if not body:
            return
        doc = discovery.document("compute.v1.json")
        found = discovery.method_for(doc, method, path.removeprefix(SERVICE_PATH))
        ref = (found or {}).get("request", {}).get("$ref")
        if ref is None:
            raise ApiError(HTTPStatus.BAD_REQUEST, f"{method} {path} takes no body")
        problems = discovery.Checker(doc, enums_as_numbers=False).check(body, {"$ref": ref}, ref)
        if problems:
            raise ApiError(HTTPStatus.BAD_REQUEST, f"Invalid JSON payload received. {problems[0]}")

    def _route(
        self, method: str, project: str, rest: list[str], query: dict[str, list[str]], body: dict[str, Any]
    ) -> dict[str, Any]:
        if "operations" in rest and method in ("GET", "POST"):  # get, or wait (POST .../wait): all are done here
            at = rest.index("operations")
            if at + 1 < len(rest):
                return self._operation(project, rest[0], rest[1:at], rest[at + 1])
        match method, rest:
            case "GET", []:
                return self._project(project)
            case "POST", ["global", "instanceTemplates"]:
                return self._insert_template(project, body)
            case "GET", ["global", "instanceTemplates", name]:
                return self._get(self.templates, (project, name), f"projects/{project}/global/instanceTemplates/{name}")
            case "DELETE", ["global", "instanceTemplates", name]:
                return self._delete_template(project, name)
            case "POST", ["regions", region, "resourcePolicies"]:
                return self._insert_policy(project, region, body)
            case "GET", ["regions", region, "resourcePolicies", name]:
                key = (project, region, name)
                return self._get(self.policies, key, f"projects/{project}/regions/{region}/resourcePolicies/{name}")
            case "DELETE", ["regions", region, "resourcePolicies", name]:
                return self._delete_policy(project, region, name)
            case "POST", ["zones", zone, "instanceGroupManagers"]:
                return self._insert_mig(project, zone, body)
            case "GET", ["zones", zone, "instanceGroupManagers"]:
                found = [self._mig_view(k) for k in sorted(self.migs) if k[:2] == (project, zone)]
                return self._list("compute#instanceGroupManagerList", found, project, zone, "instanceGroupManagers")
            case "GET", ["zones", zone, "instanceGroupManagers", name]:
                self._get(
                    self.migs, (project, zone, name), f"projects/{project}/zones/{zone}/instanceGroupManagers/{name}"
                )
                return self._mig_view((project, zone, name))
            case "POST", ["zones", zone, "instanceGroupManagers", name, "listManagedInstances"]:
                return self._managed_instances(project, zone, name)
            case "DELETE", ["zones", zone, "instanceGroupManagers", name]:
                return self._delete_mig(project, zone, name)
            case "GET", ["zones", zone, "instances"]:
                found = [self._instance_view(k) for k in sorted(self.instances) if k[:2] == (project, zone)]
                return self._list("compute#instanceList", found, project, zone, "instances")
            case "GET", ["zones", zone, "instances", name]:
                self._get(self.instances, (project, zone, name), f"projects/{project}/zones/{zone}/instances/{name}")
                return self._instance_view((project, zone, name))
            case "POST", ["zones", zone, "instances", name, "setMetadata"]:
                return self._set_metadata(project, zone, name, body)
            case "DELETE", ["zones", zone, "instances", name]:
                self._get(self.instances, (project, zone, name), f"projects/{project}/zones/{zone}/instances/{name}")
                del self.instances[(project, zone, name)]
                return self._done(project, ("zones", zone), "delete", f"zones/{zone}/instances/{name}")
        raise ApiError(HTTPStatus.NOT_FOUND, f"unknown path /{'/'.join(rest)}")

    # -- projects -----------------------------------------------------------------------------------------

    def _project(self, project: str) -> dict[str, Any]:
        metadata = self.projects.get(project)
        if metadata is None:
            raise ApiError(HTTPStatus.NOT_FOUND, f"The resource 'projects/{project}' was not found")
        items = [{"key": k, "value": v} for k, v in metadata.items()]
        return {
            "kind": "compute#project",
            "id": self._project_number(project),
            "name": project,
            "selfLink": f"{BASE}/projects/{project}",
            "commonInstanceMetadata": {"kind": "compute#metadata", "fingerprint": _fingerprint(items), "items": items},
        }

    # -- generic ------------------------------------------------------------------------------------------

    @staticmethod
    def _get(table: dict[Any, dict[str, Any]], key: Any, resource: str) -> dict[str, Any]:
        if key not in table:
            raise ApiError(HTTPStatus.NOT_FOUND, f"The resource '{resource}' was not found")
        return table[key]

    @staticmethod
    def _list(kind: str, items: list[dict[str, Any]], project: str, zone: str, what: str) -> dict[str, Any]:
        return {
            "kind": kind,
            "id": f"projects/{project}/zones/{zone}/{what}",
            "items": items,
            "selfLink": f"{BASE}/projects/{project}/zones/{zone}/{what}",
        }

    def _done(
        self,
        project: str,
        scope: tuple[str, ...],
        kind: str,
        target: str,
        error: tuple[HTTPStatus, str, str] | None = None,
    ) -> dict[str, Any]:
        """A finished operation (the writes here take no time) on `target` (`zones/Z/...`, `global/...`)."""
        name = f"operation-{int(time.time() * 1000)}-{next(self._ids)}"
        where = "/".join(scope)
        op: dict[str, Any] = {
            "kind": "compute#operation",
            "id": str(next(self._ids)),
            "name": name,
            "operationType": kind,
            "targetLink": f"{BASE}/projects/{project}/{target}",
            "targetId": str(next(self._ids)),
            "status": "DONE",
            "progress": 100,
            "insertTime": time.strftime("%Y-%m-%dT%H:%M:%S.000-00:00", time.gmtime()),
            "selfLink": f"{BASE}/projects/{project}/{where}/operations/{name}",
        }
        if scope[0] == "zones":
            op["zone"] = f"{BASE}/projects/{project}/zones/{scope[1]}"
        elif scope[0] == "regions":
            op["region"] = f"{BASE}/projects/{project}/regions/{scope[1]}"
        if error is not None:
            status, code, message = error
            op["error"] = {"errors": [{"code": code, "message": message}]}
            op["httpErrorStatusCode"], op["httpErrorMessage"] = int(status), status.phrase.upper()
        self.operations[name] = op
        return op

    def _operation(self, project: str, scope: str, where: list[str], name: str) -> dict[str, Any]:
        op = self.operations.get(name)
        if op is None or not op["selfLink"].startswith(f"{BASE}/projects/{project}/{'/'.join([scope, *where])}/"):
            raise ApiError(
                HTTPStatus.NOT_FOUND, f"The resource 'projects/{project}/{scope}/operations/{name}' was not found"
            )
        return op

    def _in_use(self, what: str, by: str) -> ApiError:
        return ApiError(
            HTTPStatus.BAD_REQUEST,
            f"The {what} resource is already being used by '{by}'",
            "resourceInUseByAnotherResource",
        )

    # -- templates and policies ---------------------------------------------------------------------------

    def _insert_template(self, project: str, body: dict[str, Any]) -> dict[str, Any]:
        name = body.get("name", "")
        if (project, name) in self.templates:
            raise ApiError(
                HTTPStatus.CONFLICT, f"The resource 'projects/{project}/global/instanceTemplates/{name}' already exists"
            )
        machine = body.get("properties", {}).get("machineType", "")
        if "/" in machine:  # a global template names the bare machine type (compute.v1.json)
            raise ApiError(
                HTTPStatus.BAD_REQUEST, f"Invalid value for field 'resource.properties.machineType': '{machine}'"
            )
        self.templates[(project, name)] = {
            **body,
            "kind": "compute#instanceTemplate",
            "id": str(next(self._ids)),
            "selfLink": f"{BASE}/projects/{project}/global/instanceTemplates/{name}",
            "creationTimestamp": time.strftime("%Y-%m-%dT%H:%M:%S.000-00:00", time.gmtime()),
        }
        return self._done(project, ("global",), "insert", f"global/instanceTemplates/{name}")

    def _delete_template(self, project: str, name: str) -> dict[str, Any]:
        template = self._get(self.templates, (project, name), f"projects/{project}/global/instanceTemplates/{name}")
        for (p, zone, mig), body in self.migs.items():
            if p == project and body["instanceTemplate"] == template["selfLink"]:
                raise self._in_use(
                    f"instance template '{name}'", f"projects/{p}/zones/{zone}/instanceGroupManagers/{mig}"
                )
        del self.templates[(project, name)]
        return self._done(project, ("global",), "delete", f"global/instanceTemplates/{name}")

    def _insert_policy(self, project: str, region: str, body: dict[str, Any]) -> dict[str, Any]:
        name = body.get("name", "")
        if (project, region, name) in self.policies:
            raise ApiError(
                HTTPStatus.CONFLICT,
                f"The resource 'projects/{project}/regions/{region}/resourcePolicies/{name}' already exists",
            )
        self.policies[(project, region, name)] = {
            **body,
            "kind": "compute#resourcePolicy",
            "id": str(next(self._ids)),
            "region": f"{BASE}/projects/{project}/regions/{region}",
            "selfLink": f"{BASE}/projects/{project}/regions/{region}/resourcePolicies/{name}",
            "status": "READY",
        }
        return self._done(project, ("regions", region), "insert", f"regions/{region}/resourcePolicies/{name}")

    def _delete_policy(self, project: str, region: str, name: str) -> dict[str, Any]:
        policy = self._get(
            self.policies, (project, region, name), f"projects/{project}/regions/{region}/resourcePolicies/{name}"
        )
        for (p, zone, mig), body in self.migs.items():
            if body.get("resourcePolicies", {}).get("workloadPolicy") == policy["selfLink"]:
                raise self._in_use(
                    f"resource policy '{name}'", f"projects/{p}/zones/{zone}/instanceGroupManagers/{mig}"
                )
        del self.policies[(project, region, name)]
        return self._done(project, ("regions", region), "delete", f"regions/{region}/resourcePolicies/{name}")

    # -- managed instance groups --------------------------------------------------------------------------

    def _insert_mig(self, project: str, zone: str, body: dict[str, Any]) -> dict[str, Any]:
        name = body.get("name", "")
        if (project, zone, name) in self.migs:
            raise ApiError(
                HTTPStatus.CONFLICT,
                f"The resource 'projects/{project}/zones/{zone}/instanceGroupManagers/{name}' already exists",
            )
        template_url = body.get("instanceTemplate", "")
        template = next(
            (t for t in self.templates.values() if t["selfLink"].endswith(template_url.removeprefix(BASE))), None
        )
        if template is None or not template_url:
            raise ApiError(
                HTTPStatus.BAD_REQUEST, f"Invalid value for field 'resource.instanceTemplate': '{template_url}'"
            )
        policy_url = body.get("resourcePolicies", {}).get("workloadPolicy")
        policy = next(
            (p for p in self.policies.values() if policy_url and p["selfLink"].endswith(policy_url.removeprefix(BASE))),
            None,
        )
        if policy_url and policy is None:
            raise ApiError(
                HTTPStatus.BAD_REQUEST,
                f"Invalid value for field 'resource.resourcePolicies.workloadPolicy': '{policy_url}'",
            )
        size = int(body.get("targetSize", 0))
        machine = template["properties"]["machineType"]
        if size > 1 and machine in TPU_MACHINE_TYPES and policy is None:
            raise ApiError(
                HTTPStatus.BAD_REQUEST,
                "A multi-host TPU slice needs a workload policy (resourcePolicies.workloadPolicy)",
            )
        mig = {
            **body,
            "instanceTemplate": template["selfLink"],
            "kind": "compute#instanceGroupManager",
            "id": str(next(self._ids)),
            "zone": f"{BASE}/projects/{project}/zones/{zone}",
            "selfLink": f"{BASE}/projects/{project}/zones/{zone}/instanceGroupManagers/{name}",
            "instanceGroup": f"{BASE}/projects/{project}/zones/{zone}/instanceGroups/{name}",
            "creationTimestamp": time.strftime("%Y-%m-%dT%H:%M:%S.000-00:00", time.gmtime()),
            "fingerprint": _fingerprint(body),
        }
        if policy_url:
            mig["resourcePolicies"] = {"workloadPolicy": policy["selfLink"]}  # type: ignore[index]
        self.migs[(project, zone, name)] = mig
        if zone in self.no_capacity_zones:
            mig["_failed"] = "ZONE_RESOURCE_POOL_EXHAUSTED"
        else:
            addresses = self.on_create(project, zone, name, size)
            base = body.get("baseInstanceName", name)
            names = sorted(
                {f"{base}-{''.join(self._random.choices(string.ascii_lowercase, k=4))}" for _ in range(size * 4)}
            )
            chosen = self._random.sample(names, size)
            order = sorted(chosen, reverse=True)  # worker order is not name order (a client must read the metadata)
            endpoints = ",".join(ip for ip, _ in addresses)
            metadata = {
                i["key"]: i.get("value", "") for i in template["properties"].get("metadata", {}).get("items", [])
            }
            for index, instance_name in enumerate(order):
                ip, external = addresses[index] if index < len(addresses) else (f"10.0.0.{index + 2}", None)
                extra = {"agent-worker-number": str(index), "worker-network-endpoints": endpoints}
                self._instance(project, zone, instance_name, machine, ip, external, {**metadata, **extra}, name)
        return self._done(project, ("zones", zone), "insert", f"zones/{zone}/instanceGroupManagers/{name}")

    def _instance(
        self,
        project: str,
        zone: str,
        name: str,
        machine_type: str,
        ip: str,
        external_ip: str | None,
        metadata: dict[str, str],
        mig: str | None,
    ) -> dict[str, Any]:
        interface: dict[str, Any] = {
            "kind": "compute#networkInterface",
            "name": "nic0",
            "networkIP": ip,
            "network": f"{BASE}/projects/{project}/global/networks/default",
        }
        if external_ip:
            interface["accessConfigs"] = [
                {"kind": "compute#accessConfig", "name": "External NAT", "type": "ONE_TO_ONE_NAT", "natIP": external_ip}
            ]
        items = [{"key": k, "value": v} for k, v in metadata.items()]
        if mig is not None:  # as Compute Engine writes it: the project's number, not its id
            number = self._project_number(project)
            items.append({"key": "created-by", "value": f"projects/{number}/zones/{zone}/instanceGroupManagers/{mig}"})
        instance = {
            "kind": "compute#instance",
            "id": str(next(self._ids)),
            "name": name,
            "zone": f"{BASE}/projects/{project}/zones/{zone}",
            "machineType": f"{BASE}/projects/{project}/zones/{zone}/machineTypes/{machine_type}",
            "status": "PROVISIONING",
            "networkInterfaces": [interface],
            "metadata": {"kind": "compute#metadata", "fingerprint": _fingerprint(items), "items": items},
            "selfLink": f"{BASE}/projects/{project}/zones/{zone}/instances/{name}",
            "creationTimestamp": time.strftime("%Y-%m-%dT%H:%M:%S.000-00:00", time.gmtime()),
            "_created": time.monotonic(),
        }
        self.instances[(project, zone, name)] = instance
        return instance

    def _instance_view(self, key: tuple[str, str, str]) -> dict[str, Any]:
        instance = self.instances[key]
        if instance["status"] == "PROVISIONING" and time.monotonic() - instance["_created"] >= self.create_delay_s:
            instance["status"] = "RUNNING"
        return {k: v for k, v in instance.items() if not k.startswith("_")}

    @staticmethod
    def _project_number(project: str) -> str:
        return str(int(hashlib.sha256(project.encode()).hexdigest()[:10], 16))

    def _members(self, project: str, zone: str, name: str) -> list[tuple[str, str, str]]:
        mine = f"projects/{self._project_number(project)}/zones/{zone}/instanceGroupManagers/{name}"
        return [
            key
            for key, instance in sorted(self.instances.items())
            if any(i["key"] == "created-by" and i["value"] == mine for i in instance["metadata"]["items"])
        ]

    def _mig_view(self, key: tuple[str, str, str]) -> dict[str, Any]:
        mig = self.migs[key]
        members = [self._instance_view(k) for k in self._members(*key)]
        stable = len(members) == int(mig.get("targetSize", 0)) and all(m["status"] == "RUNNING" for m in members)
        view = {k: v for k, v in mig.items() if not k.startswith("_")}
        view["status"] = {"isStable": stable}
        view["currentActions"] = {
            "none": len(members) if stable else 0,
            "creating": 0 if stable or mig.get("_failed") else int(mig.get("targetSize", 0)) - len(members),
            "verifying": 0 if stable else sum(m["status"] != "RUNNING" for m in members),
        }
        return view

    def _managed_instances(self, project: str, zone: str, name: str) -> dict[str, Any]:
        mig = self._get(
            self.migs, (project, zone, name), f"projects/{project}/zones/{zone}/instanceGroupManagers/{name}"
        )
        managed = []
        for key in self._members(project, zone, name):
            instance = self._instance_view(key)
            managed.append(
                {
                    "instance": instance["selfLink"],
                    "id": instance["id"],
                    "name": instance["name"],
                    "instanceStatus": instance["status"],
                    "currentAction": "NONE" if instance["status"] == "RUNNING" else "VERIFYING",
                }
            )
        if mig.get("_failed"):
            error = {"code": mig["_failed"], "message": f"The zone '{zone}' does not have enough resources"}
            managed = [{"currentAction": "CREATING", "lastAttempt": {"errors": {"errors": [error]}}}]
        return {"managedInstances": managed}

    def _delete_mig(self, project: str, zone: str, name: str) -> dict[str, Any]:
        self._get(self.migs, (project, zone, name), f"projects/{project}/zones/{zone}/instanceGroupManagers/{name}")
        for key in self._members(project, zone, name):
            del self.instances[key]
        del self.migs[(project, zone, name)]
        return self._done(project, ("zones", zone), "delete", f"zones/{zone}/instanceGroupManagers/{name}")

    # -- instances ----------------------------------------------------------------------------------------

    def _set_metadata(self, project: str, zone: str, name: str, body: dict[str, Any]) -> dict[str, Any]:
        instance = self._get(self.instances, (project, zone, name), f"projects/{project}/zones/{zone}/instances/{name}")
        if body.get("fingerprint") != instance["metadata"]["fingerprint"]:
            raise ApiError(
                HTTPStatus.PRECONDITION_FAILED,
                "Supplied fingerprint does not match current metadata fingerprint.",
                "conditionNotMet",
            )
        items = body.get("items", [])
        instance["metadata"] = {"kind": "compute#metadata", "fingerprint": _fingerprint(items), "items": items}
        return self._done(project, ("zones", zone), "setMetadata", f"zones/{zone}/instances/{name}")
