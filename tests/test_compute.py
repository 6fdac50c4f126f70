"""TPU slices on Compute Engine (tpuctl/gce.py, tpuctl/slices.py) against the local Compute Engine API
(standins/compute_api.py), the real google-cloud-compute client over REST, every answer and every body held to
compute.v1.json: a MIG made and removed with its template and workload policy, its VMs in the TPU runtime's worker
order, a key written to each VM, capacity refusals retried, the two sources side by side in `list`. The fleet drill
on a MIG of stand-in sshd workers is test_compute_fleet's."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from standins import warm
from standins.compute_api import SERVICE_PATH, FakeComputeApi
from standins.pod import PROJECT, ZONE
from standins.tpu_api import FakeTpuApi

from tpuctl import gce
from tpuctl.errors import ConfigError

Tpuctl = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture
def tpuctl(compute: FakeComputeApi, tpu_api: FakeTpuApi, tmp_path: Path) -> Tpuctl:
    env = {
        **os.environ,
        "HOME": str(tmp_path),
        "TPUCTL_API_ENDPOINT": tpu_api.endpoint,
        "TPUCTL_COMPUTE_ENDPOINT": compute.endpoint,
        "TPUCTL_PROJECT": PROJECT,
        "TPUCTL_ZONE": ZONE,
        "TPUCTL_API_TIMEOUT": "10",
        "TPUCTL_API_POLL": "0.05",
        "TPUCTL_SSH_KEYS": "off",
    }

    def run(*args: str, timeout: float = 60, **more_env: str) -> subprocess.CompletedProcess[str]:
        return warm.tpuctl(list(args), env=env | more_env, timeout=timeout)

    return run


@pytest.mark.parametrize(
    "kind, machine, hosts, topology",
    [
        ("v6e-16", "ct6e-standard-4t", 4, "4x4"),
        ("v6e-8", "ct6e-standard-8t", 1, ""),
        ("v6e-32", "ct6e-standard-4t", 8, "4x8"),
        ("v6e-256", "ct6e-standard-4t", 64, "16x16"),
        ("v5p-8", "ct5p-hightpu-4t", 1, ""),
        ("v5p-32", "ct5p-hightpu-4t", 4, "2x2x4"),
        ("v5p-128", "ct5p-hightpu-4t", 16, "4x4x4"),
        ("tpu7x-2", "tpu7x-standard-1t", 1, ""),
        ("tpu7x-16", "tpu7x-standard-4t", 2, "2x2x2"),
    ],
)
def test_an_accelerator_type_is_its_machine_type_hosts_and_topology(kind, machine, hosts, topology):
    assert gce.shape_of(kind) == gce.SliceShape(machine, hosts, topology)
    assert gce.accelerator_type_of(machine, hosts) == kind  # and back, as `list` shows a slice


@pytest.mark.parametrize(
    "kind, says",
    [
        ("v4-32", "not one Compute Engine offers as VMs"),
        ("v6e-12", "no whole power-of-two number of chips"),
        ("v5p-3", "no whole power-of-two number of chips"),
        ("v5p-4", "v5p has no 2-chip VM"),
    ],
)
def test_a_type_compute_engine_does_not_offer_is_one_line(kind, says):
    with pytest.raises(ConfigError, match=says):
        gce.shape_of(kind)


def test_a_mig_slice_is_made_found_in_worker_order_and_removed_with_its_parts(tpuctl: Tpuctl, compute: FakeComputeApi):
    workers = [(f"10.1.0.{i}", f"34.0.0.{i}") for i in range(4)]
    compute.on_create = lambda project, zone, name, n: workers[:n]
    compute.create_delay_s = 1.0  # long enough that the first look sees the VMs PROVISIONING
    r = tpuctl("create", "slice", "--backend", "compute", "--type", "v6e-16", "--spot", "--json")
    assert r.returncode == 0, r.stderr
    node = json.loads(r.stdout)
    assert node["source"] == "compute" and node["state"] == "READY" and node["accelerator_type"] == "v6e-16"
    assert node["spot"] is True and node["zone"] == ZONE
    # worker order is the VMs' agent-worker-number (what the TPU runtime and JAX read), not their names' order
    assert [(w["internal_ip"], w["external_ip"]) for w in node["workers"]] == workers
    names = sorted(k[2] for k in compute.instances)
    assert len(names) == 4 and all(n.startswith("slice-") and len(n) == len("slice-abcd") for n in names)
    by_worker = sorted(compute.instances.values(), key=lambda i: gce_worker(i))
    assert [i["name"] for i in by_worker] != names  # the stand-in numbers them against name order on purpose
    assert "slice: CREATING" in r.stderr and "slice: READY, 4 workers" in r.stderr
    # what was sent: a bare machine type, spot that stops, the workload policy with the topology, 4 VMs
    template = compute.templates[(PROJECT, "slice")]["properties"]
    assert template["machineType"] == "ct6e-standard-4t"
    assert template["scheduling"]["provisioningModel"] == "SPOT"
    assert template["scheduling"]["instanceTerminationAction"] == "STOP"
    assert template["scheduling"]["onHostMaintenance"] == "TERMINATE"
    region = ZONE.rsplit("-", 1)[0]
    policy = compute.policies[(PROJECT, region, "slice")]["workloadPolicy"]
    assert policy == {"type": "HIGH_THROUGHPUT", "acceleratorTopology": "4x4"}
    mig = compute.migs[(PROJECT, ZONE, "slice")]
    assert mig["targetSize"] == 4 and mig["resourcePolicies"]["workloadPolicy"].endswith("/resourcePolicies/slice")

    # list shows it beside the Cloud TPU API's nodes, with where each is
    r = tpuctl("list", "--json")
    assert r.returncode == 0, r.stderr
    assert [(n["name"], n["source"]) for n in json.loads(r.stdout)] == [("slice", "compute")]
    assert "Compute Engine" in tpuctl("list").stdout

    r = tpuctl("delete", "slice", "--yes")
    assert r.returncode == 0, r.stderr
    assert not compute.migs and not compute.instances and not compute.templates and not compute.policies
    r = tpuctl("describe", "slice")
    assert r.returncode != 0 and "TPU 'slice' not found" in r.stderr and "Traceback" not in r.stderr


def gce_worker(instance: dict) -> int:
    items = {i["key"]: i["value"] for i in instance["metadata"]["items"]}
    return int(items[gce.WORKER_KEY])


def test_a_zone_without_capacity_is_retried_and_leaves_nothing_behind(tpuctl: Tpuctl, compute: FakeComputeApi):
    compute.no_capacity_zones = {ZONE}
    compute.on_create = lambda project, zone, name, n: [(f"10.2.0.{i}", None) for i in range(n)]
    r = tpuctl("create", "slice", "--backend", "compute", "--type", "v5p-32", "--attempts", "2", "--backoff", "0")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "ZONE_RESOURCE_POOL_EXHAUSTED" in r.stderr and "gave up after 2 attempts" in r.stderr
    assert not compute.migs and not compute.templates and not compute.policies  # each failed attempt cleaned up
    mig_inserts = [q for q in compute.requests if q.method == "POST" and q.path.endswith("/instanceGroupManagers")]
    assert len(mig_inserts) == 2


def test_auto_finds_a_name_in_either_api_and_a_key_reaches_every_vm(tpuctl: Tpuctl, compute, tpu_api):
    tpu_api.add_node(PROJECT, ZONE, "node", [("10.9.0.1", "35.9.0.1")], accelerator_type="v4-8")
    compute.add_instance(PROJECT, ZONE, "lone-v6e", "ct6e-standard-4t", "10.3.0.1", "35.0.0.1")
    compute.add_instance(PROJECT, ZONE, "web", "n2-standard-4", "10.3.0.2")  # no TPU: not a slice
    r = tpuctl("list", "--json")
    assert r.returncode == 0, r.stderr
    listed = {n["name"]: (n["source"], n["accelerator_type"]) for n in json.loads(r.stdout)}
    assert listed == {"node": ("tpu", "v4-8"), "lone-v6e": ("compute", "v6e-4")}
    for name, source in (("node", "tpu"), ("lone-v6e", "compute")):
        r = tpuctl("describe", name, "--json")
        assert r.returncode == 0 and json.loads(r.stdout)["source"] == source, r.stderr
    r = tpuctl("describe", "web")
    assert r.returncode != 0 and "TPUs there: lone-v6e, node" in r.stderr
    r = tpuctl("describe", "node", "--backend", "compute")
    assert r.returncode != 0 and "not found on Compute Engine" in r.stderr

    from tpuctl import config, keys, lifecycle, slices

    settings = config.resolve(env={"TPUCTL_COMPUTE_ENDPOINT": compute.endpoint, "TPUCTL_PROJECT": PROJECT,
                                   "TPUCTL_ZONE": ZONE, "TPUCTL_API_ENDPOINT": tpu_api.endpoint,
                                   "TPUCTL_API_POLL": "0.05"})  # fmt: skip
    api, _ = slices.get(settings, "lone-v6e")
    assert lifecycle.add_ssh_key(api, "lone-v6e", "jane", "ssh-ed25519 AAAAC3Nza jane", poll=0.05) is True
    items = {i["key"]: i["value"] for i in compute.instances[(PROJECT, ZONE, "lone-v6e")]["metadata"]["items"]}
    assert keys.has_key(items[keys.SSH_KEYS], "jane", "ssh-ed25519 AAAAC3Nza")
    assert lifecycle.add_ssh_key(api, "lone-v6e", "jane", "ssh-ed25519 AAAAC3Nza jane", poll=0.05) is False


def test_compute_engine_s_refusals_are_one_line(tpuctl: Tpuctl, compute: FakeComputeApi):
    compute.denied.add(PROJECT)
    r = tpuctl("describe", "x", "--backend", "compute")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "permission denied" in r.stderr and "compute.instanceGroupManagers.get" in r.stderr
    r = tpuctl("create", "x", "--backend", "compute", "--type", "v4-8")
    assert r.returncode != 0 and "not one Compute Engine offers as VMs" in r.stderr
    r = tpuctl("create", "x", "--backend", "compute", "--type", "v6e-16", "--queued")
    assert r.returncode != 0 and "--queued is the Cloud TPU API's queue" in r.stderr


def test_create_dry_run_shows_what_compute_engine_would_be_sent(tpuctl: Tpuctl, compute: FakeComputeApi):
    r = tpuctl("create", "s", "--backend", "compute", "--type", "tpu7x-16", "--dry-run", "--json")
    assert r.returncode == 0, r.stderr
    sent = json.loads(r.stdout)
    assert [s["path"].rsplit("/", 1)[-1] for s in sent] == ["instanceTemplates", "resourcePolicies",
                                                            "instanceGroupManagers"]  # fmt: skip
    assert sent[0]["body"]["properties"]["machineType"] == "tpu7x-standard-4t"
    assert sent[1]["body"]["workloadPolicy"]["acceleratorTopology"] == "2x2x2"
    assert sent[2]["body"]["targetSize"] == 2
    assert not compute.requests  # nothing was sent
    r = tpuctl("create", "s", "--type", "tpu7x-16", "--dry-run")  # auto: TPU7x is Compute Engine's
    assert r.returncode == 0 and "would create on Compute Engine" in r.stdout and "2 VMs" in r.stdout, r.stderr


def test_babysit_remakes_a_preempted_mig_slice_like_it_was(compute: FakeComputeApi, tpu_api, monkeypatch, tmp_path):
    """babysit's TPU step on Compute Engine: a spot MIG whose VMs were taken back reads PREEMPTED, is deleted with
    its template and policy, and made again with the same type, spot-ness and keys; then it is READY again."""
    from tpuctl.babysit import Babysitter, Options
    from tpuctl.config import Settings
    from tpuctl.registry import RunRecord

    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    made = iter(range(100))
    compute.on_create = lambda project, zone, name, n: [(f"10.4.{next(made)}.1", None) for _ in range(n)]
    settings = Settings(project=PROJECT, zone=ZONE, tpu="s", backend="compute", compute_endpoint=compute.endpoint,
                        api_poll=0.05, ssh_keys="off")  # fmt: skip
    from tpuctl import cloud, lifecycle, slices

    request = cloud.NodeRequest("s", "v6e-16", "", spot=True, metadata=(("ssh-keys", "jane:ssh-ed25519 AAAAj jane"),))
    first = lifecycle.create(slices.for_create(settings), request, poll=0.05)
    assert first is not None and first.state == "READY"
    compute.preempt(PROJECT, ZONE, "s")
    record = RunRecord(name="r", recipe="r.toml", workdir="/w", target="tpu", cwd="~/tpuctl", project=PROJECT)
    said: list[str] = []
    sitter = Babysitter(settings, slices.for_create(settings), tmp_path, record, None, Options(recreate=True),
                        say=said.append, sleep=lambda _: None)  # fmt: skip
    node = sitter.ready_tpu()
    assert node.state == "READY" and node.accelerator_type == "v6e-16" and node.spot
    assert {w.internal_ip for w in node.workers}.isdisjoint(w.internal_ip for w in first.workers)  # new VMs
    assert [e.what for e in sitter.state.events[:2]] == ["deleting", "deleted"]
    assert "is PREEMPTED" in sitter.state.events[0].detail
    assert dict(node.metadata)["ssh-keys"] == "jane:ssh-ed25519 AAAAj jane"  # the keys came along
    assert len(compute.migs) == len(compute.templates) == len(compute.policies) == 1


def test_the_stand_in_is_held_to_compute_v1_both_ways(compute: FakeComputeApi):
    """What the stand-in is sent and answers is Google's discovery document's (compute.v1.json, in PyPI's
    google-api-python-client), not ours: a body with a field the API lacks is refused as the real front end refuses
    it, and an answer the document would not allow is found by the check every test's teardown runs."""
    import urllib.request

    from standins import discovery

    def post(path: str, body: dict) -> tuple[int, dict]:
        return rest(compute, path, body)

    wrong = {"machineType": "ct6e-standard-4t", "acceleratorTopology": "4x4"}
    status, answer = post("global/instanceTemplates", {"name": "t", "properties": wrong})
    assert status == 400 and "acceleratorTopology" in answer["error"]["message"]  # that is the policy's field
    status, _ = post("global/instanceTemplates", {"name": "t", "properties": {"machineType": "ct6e-standard-4t"}})
    assert status == 200 and (PROJECT, "t") in compute.templates
    policy = {"type": "HIGH_THROUGHPUT", "acceleratorTopology": "4x4"}
    status, answer = post("regions/zone/resourcePolicies", {"name": "p", "workloadPolicy": policy})
    assert status == 200 and answer["status"] == "DONE"
    doc = discovery.document("compute.v1.json")
    path = f"projects/{PROJECT}/global/instanceTemplates/t"
    good = json.loads(urllib.request.urlopen(f"{compute.endpoint}{SERVICE_PATH}/{path}").read())
    assert discovery.problems(doc, "GET", path, 200, good, enums_as_numbers=False) == []
    drifted = {**good, "properties": {**good["properties"], "topology": "4x4"}}
    assert discovery.problems(doc, "GET", path, 200, drifted, enums_as_numbers=False) == [
        "InstanceTemplate.properties.topology: a field InstanceProperties does not have"
    ]


def rest(compute: FakeComputeApi, path: str, body: dict) -> tuple[int, dict]:
    """POST `body` to the stand-in as another client would (gcloud, the console): (HTTP status, answer)."""
    import urllib.error
    import urllib.request

    url = f"{compute.endpoint}{SERVICE_PATH}/projects/{PROJECT}/{path}"
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST")
    try:
        with urllib.request.urlopen(request) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_deleting_a_mig_made_elsewhere_keeps_its_template(tpuctl: Tpuctl, compute: FakeComputeApi):
    """A MIG someone made with gcloud from a template of their own: `tpuctl delete` removes the group (and so its
    VMs), never the template, which may serve other groups."""
    compute.on_create = lambda project, zone, name, n: [("10.5.0.1", None)]
    assert rest(compute, "global/instanceTemplates", {"name": "team-v6e", "properties": {
        "machineType": "ct6e-standard-8t"}})[0] == 200  # fmt: skip
    group = {"name": "theirs", "baseInstanceName": "theirs", "targetSize": 1,
             "instanceTemplate": f"projects/{PROJECT}/global/instanceTemplates/team-v6e"}  # fmt: skip
    assert rest(compute, f"zones/{ZONE}/instanceGroupManagers", group)[0] == 200
    r = tpuctl("describe", "theirs", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["accelerator_type"] == "v6e-8", r.stderr
    r = tpuctl("delete", "theirs", "--yes")
    assert r.returncode == 0, r.stderr
    assert not compute.migs and not compute.instances and (PROJECT, "team-v6e") in compute.templates


def test_os_login_is_read_from_a_slices_vms_then_from_the_project(compute: FakeComputeApi, tmp_path, monkeypatch):
    """The day-one key handling on Compute Engine: whether the workers take keys from OS Login is what the slice's
    VMs' metadata says (a MIG's, from its template; a lone VM's own), else the project's, as on a Cloud TPU node."""
    from tpuctl import access, config, slices

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # the project's answer is remembered for a day
    compute.on_create = lambda project, zone, name, n: [(f"10.6.0.{i}", None) for i in range(n)]
    compute.add_instance(
        PROJECT, ZONE, "says-no", "tpu7x-standard-4t", "10.6.1.1", metadata={"enable-oslogin": "FALSE"}
    )
    compute.add_instance(PROJECT, ZONE, "says-nothing", "tpu7x-standard-4t", "10.6.1.2")
    compute.projects[PROJECT] = {"enable-oslogin": "TRUE"}
    env = {
        "TPUCTL_COMPUTE_ENDPOINT": compute.endpoint,
        "TPUCTL_PROJECT": PROJECT,
        "TPUCTL_ZONE": ZONE,
        "TPUCTL_BACKEND": "compute",
        "TPUCTL_API_POLL": "0.05",
        "TPUCTL_METADATA": "enable-oslogin=FALSE",  # the MIG's template: its VMs say no, the project yes
        "TPUCTL_ACCELERATOR_TYPE": "tpu7x-8",
    }
    settings = config.resolve(env=env)
    from tpuctl import cloud, lifecycle

    lifecycle.create(slices.for_create(settings), cloud.NodeRequest.from_settings(settings, "mig-says-no"), poll=0.05)
    for name, expected in (("mig-says-no", False), ("says-no", False), ("says-nothing", True)):
        _, node = slices.get(settings, name)
        assert access.uses_oslogin(settings, node) is expected, name
