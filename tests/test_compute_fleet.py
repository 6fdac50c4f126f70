"""A TPU slice on Compute Engine goes through the commands a Cloud TPU pod does, unchanged: a MIG of four stand-in
sshd workers behind the local Compute Engine API (standins/compute_api.py) is created, reached (exec, sync,
prepare), runs a recipe wired for jax.distributed in the TPU runtime's worker order, shows its status, stops, and is
deleted with its template and workload policy. The real trainer on a MIG's two hosts, joined by jax.distributed, is
the second test."""

from __future__ import annotations

import json
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import standins
from standins.compute_api import FakeComputeApi
from standins.pod import PROJECT, ZONE, Pod
from test_runs import RECIPE, ended_status, env_args, prepared, sets, status, wait_for_logged_step

from trainer import contract

SLICE = "my-slice"
ROOT = Path(__file__).resolve().parents[1]


def readme_steps() -> dict[str, list[str]]:
    """The README's Compute Engine first steps: each `tpuctl` line's words (after `tpuctl`), by its command."""
    section = (ROOT / "README.md").read_text().split("**On Compute Engine**", 1)[1]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    lines = [shlex.split(line, comments=True) for line in block.splitlines() if line.startswith("tpuctl ")]
    return {words[1]: words[1:] for words in lines}


@dataclass
class MigPod(Pod):
    """tpuctl against the project's two APIs: the Cloud TPU API (which has no such TPU) and Compute Engine, with the
    backend left at auto, as a user who has both would have it."""

    compute: FakeComputeApi | None = None

    @property
    def env(self) -> dict[str, str]:
        assert self.compute is not None
        return {**super().env, "TPUCTL_COMPUTE_ENDPOINT": self.compute.endpoint, "TPUCTL_TPU": SLICE,
                "TPUCTL_BACKEND": "auto"}  # fmt: skip


def mig_pod(fleet, tpu_api, compute: FakeComputeApi, home: Path) -> MigPod:
    """A pod whose VMs, once `create` makes the MIG, are `fleet`'s workers."""
    compute.on_create = lambda project, zone, name, n: [(w.ip, w.ip) for w in fleet.workers[:n]]
    home.mkdir(parents=True, exist_ok=True)
    return MigPod(fleet, tpu_api, home, compute)


def test_a_four_worker_mig_slice_goes_through_a_pods_commands(make_fleet, tpu_api, compute, project, shared, tmp_path):
    fleet = make_fleet(4)
    pod = mig_pod(fleet, tpu_api, compute, tmp_path / "home")
    shutil.copy(Path(standins.__file__).parent / "trainer_main.py", project / "trainer" / "__main__.py")

    steps = readme_steps()  # create, list, delete: as the README shows them
    assert steps["create"][1] == SLICE and steps["delete"][1] == SLICE
    r = pod.tpuctl(*steps["create"], "--json")
    assert r.returncode == 0, r.stderr
    node = json.loads(r.stdout)
    assert node["source"] == "compute" and node["accelerator_type"] == "v6e-16" and len(node["workers"]) == 4
    region = ZONE.rsplit("-", 1)[0]
    assert node["spot"] and compute.policies[(PROJECT, region, SLICE)]["workloadPolicy"]["acceleratorTopology"] == "4x4"
    # the key went into the template: every VM accepts tpuctl from its first boot, nothing to add later
    template = compute.templates[(PROJECT, SLICE)]["properties"]["metadata"]["items"]
    assert any(i["key"] == "ssh-keys" and fleet.user in i["value"] for i in template)

    r = pod.tpuctl(*steps["list"])
    assert r.returncode == 0 and SLICE in r.stdout and "Compute Engine" in r.stdout, r.stderr
    r = pod.tpuctl("exec", "--", "cat /etc/hostname 2>/dev/null || hostname")
    assert r.returncode == 0, r.stderr
    assert sorted(line.split()[0] for line in r.stdout.splitlines()) == ["[w0]", "[w1]", "[w2]", "[w3]"]
    prepared(pod, project)  # sync, then prepare: the workers' venv, as on a pod
    r = pod.tpuctl("doctor", "--json")
    found = {c["check"]: c for c in json.loads(r.stdout)["checks"]}
    assert r.returncode == 0 and all(c["result"] == "pass" for c in found.values()), r.stdout
    assert "Compute Engine" in found["tpu api"]["detail"] and "4/4 reachable" in found["workers"]["detail"]

    # the run's wiring: worker 0 (agent-worker-number 0) coordinates, each VM's process id is its worker number
    common = [RECIPE, "--no-sync", *env_args(shared), *sets(16 * 400, checkpoint_every=1000)]
    r = pod.tpuctl("run", *common, "--name", "mig run", "--workdir", str(shared / "w"), "--dry-run", "--json",
                   cwd=project)  # fmt: skip
    assert r.returncode == 0, r.stderr
    plans = json.loads(r.stdout)["workers"]
    numbers = worker_numbers(compute)
    for plan in plans:
        assert plan["tpu_vm_drops"] == []  # kept on Compute Engine's VMs even where they have TPU chips
        wired = dict(zip(contract.DISTRIBUTED_ENV, (plan["env"].get(k) for k in contract.DISTRIBUTED_ENV), strict=True))
        assert wired[contract.COORDINATOR_ENV].startswith(f"{fleet.workers[0].ip}:")
        assert wired[contract.NUM_PROCESSES_ENV] == "4"
        assert wired[contract.PROCESS_ID_ENV] == str(numbers[plan["host"]]) == str(plan["worker"])

    r = pod.tpuctl("run", *common, "--name", "mig run", "--workdir", str(shared / "w"), cwd=project)
    assert r.returncode == 0, r.stderr
    for worker in fleet.workers:
        wait_for_logged_step(worker, "mig run", 2)
    code, workers = status(pod, "mig run")
    assert code == 0 and [w["state"] for w in workers] == ["running"] * 4, workers
    r = pod.tpuctl("logs", "mig run", "--workers", "all", "-n", "1")
    assert r.returncode == 0 and sorted(line[:4] for line in r.stdout.splitlines()) == ["[w0]", "[w1]", "[w2]", "[w3]"]
    r = pod.tpuctl("check", "--json")  # what holds the chips: nothing here (no TPU device files on these VMs)
    assert r.returncode == 0 and [w["state"] for w in json.loads(r.stdout)] == ["free"] * 4, r.stdout + r.stderr
    r = pod.tpuctl("stop", "mig run", "--grace", "60", "--json", timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert [w["state"] for w in json.loads(r.stdout)["workers"]] == ["stopped"] * 4

    r = pod.tpuctl(*steps["delete"], "--yes")
    assert r.returncode == 0, r.stderr
    assert not compute.migs and not compute.instances and not compute.templates and not compute.policies
    r = pod.tpuctl("exec", "--", "true", env={"TPUCTL_NODE_CACHE_S": "0"})
    assert r.returncode != 0 and f"TPU {SLICE!r} not found" in r.stderr and "Traceback" not in r.stderr


def worker_numbers(compute: FakeComputeApi) -> dict[str, int]:
    """Each VM's address -> its agent-worker-number, as the platform set it."""
    found = {}
    for instance in compute.instances.values():
        items = {i["key"]: i["value"] for i in instance["metadata"]["items"]}
        found[instance["networkInterfaces"][0]["networkIP"]] = int(items["agent-worker-number"])
    return found


@pytest.mark.slow
def test_the_trainer_runs_on_a_two_host_mig_joined_by_jax_distributed(make_fleet, tpu_api, compute, project, shared,
                                                                       tmp_path):  # fmt: skip
    """The real trainer (`python -m trainer`, JAX on each VM's CPU) on a TPU7x slice of two hosts: `tpuctl run`
    wires the two processes for jax.distributed in the MIG's worker order; they train the stage to its end and save
    one checkpoint holding both hosts' data positions."""
    fleet = make_fleet(2)
    pod = mig_pod(fleet, tpu_api, compute, tmp_path / "home")
    r = pod.tpuctl("create", SLICE, "--backend", "compute", "--type", "tpu7x-16", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["accelerator_type"] == "tpu7x-16"
    region = ZONE.rsplit("-", 1)[0]
    assert compute.policies[(PROJECT, region, SLICE)]["workloadPolicy"]["acceleratorTopology"] == "2x2x2"
    prepared(pod, project)
    workdir = shared / "w"
    steps = 4
    start = [RECIPE, "--name", "two hosts", "--no-sync", *env_args(shared), *sets(16 * steps, checkpoint_every=1000)]
    r = pod.tpuctl("run", *start, "--workdir", str(workdir), cwd=project, timeout=120)
    assert r.returncode == 0, r.stderr
    r = pod.tpuctl("logs", "two hosts", "--follow", timeout=300)
    assert r.returncode == 0 and r.stdout.rstrip().endswith(f"checkpoints in {workdir}"), r.stdout[-3000:]
    code, workers = ended_status(pod, "two hosts")
    assert code == 0 and [w["state"] for w in workers] == ["done", "done"], workers
    meta = json.loads((workdir / "pretrain16" / "checkpoints" / str(steps) / "meta" / "metadata").read_text())
    assert len(meta["data"]) == 2  # one data position per process: both joined the one run
    assert pod.tpuctl("delete", SLICE, "--yes").returncode == 0
    assert not compute.migs and not compute.templates and not compute.policies
