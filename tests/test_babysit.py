"""tpuctl babysit: the preemption drill on real stand-ins.

The local Cloud TPU API makes "VMs" when asked to create a TPU: a fresh pair of sshd workers (new addresses, new host
keys, the project's SSH key accepted, standins.image's Python image with the trainer's dependencies; the second pair
also the venv the first pair's prepare made, so their prepare is quick). The test then plays the cloud: it flips the
TPU to PREEMPTED and kills its workers mid-training. babysit must delete and recreate the TPU, sync, prepare,
relaunch, and the run must resume from the newest checkpoint the lost VMs committed to the bucket and finish. On the
way, babysit itself is killed and started again, and carries on from its state file.

The trainer is the stand-in of standins/trainer_main.py (the trainer's log lines and checkpoint layout, no JAX):
babysit's part is under test here. The real trainer on a pod stopped and resumed to the uninterrupted losses is
test_runs' drill; a real trainer killed hard and resumed exactly, locally and in a bucket, test_train's.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import standins
from standins import free_port, image, wait_until
from standins.pod import PROJECT, TPUCTL, ZONE
from test_runs import RECIPE, STEPS, VENV, copy_prepared_venv, env_args, logged_step, sets

from tpuctl.registry import slug
from trainer import contract, storage
from trainer.workdir import committed_steps

NODE = "drill"
RUN = "drill run"


def babysit_env(tpu_api, home: Path) -> dict[str, str]:
    """tpuctl's environment: its own home (state, cache), the local API, a key of its own (the drill uses the VMs')."""
    home.mkdir(parents=True, exist_ok=True)
    key = home / "key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    return {
        **os.environ,
        "HOME": str(home),
        "XDG_STATE_HOME": str(home / "state"),
        "XDG_CACHE_HOME": str(home / "cache"),
        "TPUCTL_API_ENDPOINT": tpu_api.endpoint,
        "TPUCTL_PROJECT": PROJECT,
        "TPUCTL_ZONE": ZONE,
        "TPUCTL_API_POLL": "0.05",
        "TPUCTL_SSH_KEY": str(key),
        "TPUCTL_SSH_KEYS": "metadata",  # the stand-in VMs go by their node's metadata (the project's: test_access)
        "TPUCTL_CONNECT_TIMEOUT": "2",
    }


def wait_for_logged_step(vms: list, step: int, timeout: float) -> None:
    """Until worker 0 of the newest VMs has logged `step` of the drill's run."""
    wait_until(lambda: vms and logged_step(vms[-1].workers[0], RUN) >= step, timeout, f"step {step} logged", poll=0.2)


@pytest.mark.timeout(600)  # two TPU creations, two prepares
def test_preemption_drill(tpu_api, make_fleet, project, shared, tmp_path, gcs, bucket):
    """The workdir is a bucket: the recreated VMs (fresh disks) resume from what the first ones checkpointed there."""
    image.require_matching_python()
    shutil.copy(Path(standins.__file__).parent / "trainer_main.py", project / "trainer" / "__main__.py")
    first = make_fleet(2, network=gcs.network())  # the first VMs; later ones: the same key, port and network
    vms = []

    def on_create(project_id, zone, name, node):
        fleet = first if not vms else make_fleet(2, like=first)
        image.install(fleet)
        if vms:  # the new VMs hold the venv the first ones' prepare made, as VMs made from a prepared image would:
            # their prepare finds it up to date (test_prepare is where a prepare installs; here, that babysit runs it)
            copy_prepared_venv(vms[0].workers[0].path(VENV), fleet.workers)
        vms.append(fleet)
        return [(w.ip, w.ip) for w in fleet.workers]

    tpu_api.on_create = on_create
    tpu_api.create_delay_s = 0.5
    home = tmp_path / "home"
    env = babysit_env(tpu_api, home) | {
        "TPUCTL_TPU": NODE,
        "TPUCTL_SSH_USER": first.user,
        "TPUCTL_SSH_KEY": str(first.key_path),
        "TPUCTL_SSH_PORT": str(first.port),
        "TPUCTL_COORDINATOR_PORT": str(standins.coordinator_port()),
        "TPUCTL_KNOWN_HOSTS": str(home / "known_hosts"),
        "TPUCTL_PIP_ARGS": image.OFFLINE_PIP_ARGS,
    }
    workdir = f"{bucket}/w"
    babysit = [TPUCTL, "babysit", RECIPE, "--name", RUN, "--type", "v4-16", "--workdir", workdir]
    babysit += ["--poll", "1", "--backoff", "1", "--max-restarts", "3", *env_args(shared, heartbeat=10)]
    babysit += sets(16 * STEPS)

    def start(log: Path) -> subprocess.Popen:
        with open(log, "w") as out:
            return subprocess.Popen(babysit, cwd=project, env=env, stdout=out, stderr=subprocess.STDOUT)

    sitter = start(tmp_path / "babysit-1.log")
    try:
        # babysit creates the missing TPU, prepares it and launches the run; then it is killed and started again
        wait_for_logged_step(vms, 3, timeout=400)
        sitter.send_signal(signal.SIGKILL)
        sitter.wait(timeout=30)
        sitter = start(tmp_path / "babysit-2.log")
        second = tmp_path / "babysit-2.log"
        wait_until(lambda: "adopted" in second.read_text(), 60, "babysit adopted the run", second.read_text)
        assert "adopted: run 'drill run' is training on 2 workers" in second.read_text()

        # the cloud takes the TPU back mid-run: PREEMPTED, and its VMs are gone
        wait_for_logged_step(vms, 12, timeout=300)
        tpu_api.set_state(PROJECT, ZONE, NODE, "PREEMPTED")
        for w in vms[0].workers:
            w.crash()
        preempted = time.time()
        last_step = logged_step(vms[0].workers[0], RUN)
        wait_until(lambda: "preempted: " in second.read_text(), 120, "babysit saw the preemption", second.read_text)
        saved = committed_steps(storage.at(workdir) / "pretrain16")  # what the lost VMs left (they write no more)
        assert sitter.wait(timeout=600) == 0, (tmp_path / "babysit-2.log").read_text()[-4000:]
    finally:
        if sitter.poll() is None:
            sitter.kill()
            sitter.wait()
    log = (tmp_path / "babysit-2.log").read_text()
    # each new TPU was prepared before its launch (the first one's prepare installed the project into the venv)
    for text in ((tmp_path / "babysit-1.log").read_text(), log):
        assert text.index("Preparing 2 workers") < text.index("launched: on 2 workers"), text[-3000:]
    state = json.loads((home / "state" / "tpuctl" / "babysit" / f"{slug(RUN)}.json").read_text())
    events = [e["what"] for e in state["events"]]
    # the whole story, across both babysit processes, in the state file
    assert events[:5] == ["creating", "created", "launched", "resumed", "adopted"], events
    recovery = ["preempted", "waiting", "deleting", "deleted", "creating", "created", "launched", "done"]
    assert events[5:] == recovery, events
    assert state["restarts"] == 1 and state["created_tpu"] and state["finished"]
    node = tpu_api.nodes[(PROJECT, ZONE, NODE)]
    assert len(vms) == 2 and node["state"] == "READY"
    assert [e["ipAddress"] for e in node["networkEndpoints"]] == [w.ip for w in vms[1].workers]  # the new VMs
    # the timeline table, and a run trained to its last step
    assert "run 'drill run' on TPU 'drill': 1 restarts" in log
    assert f"every stage trained (last checkpoint pretrain16/{STEPS})" in log
    # the new VMs resumed from the newest checkpoint the lost ones committed, and trained on from there
    trainer_log = vms[1].workers[0].path(f"/root/.tpuctl/runs/{slug(RUN)}/log").read_text()
    resumed_at = int(re.search(r"resuming at step (\d+)/", trainer_log)[1])
    assert resumed_at == saved[-1], (resumed_at, saved)
    assert [p["step"] for p in map(contract.parse_progress, trainer_log.splitlines()) if p] == list(
        range(resumed_at + 1, STEPS + 1)
    )
    # what the preemption cost: the steps trained again since the newest committed checkpoint (one interval of 4
    # steps, plus the steps of a save still in flight when the VMs died), and the time
    lost = last_step - resumed_at
    assert 0 <= lost <= 8, (last_step, resumed_at)
    relaunched = [e["at"] for e in state["events"] if e["what"] == "launched"][-1]
    took = relaunched - preempted
    print(f"DRILL: preempted at step {last_step}, resumed at {resumed_at}, relaunched after {took:.0f} s")
    # babysit again on a finished run: nothing to do, nothing touched
    again = subprocess.run(babysit, cwd=project, env=env, capture_output=True, text=True, timeout=60)
    assert again.returncode == 0, again.stderr
    assert "already finished earlier; to babysit run 'drill run' again, remove" in again.stderr and len(vms) == 2


def test_a_dead_tpu_babysit_did_not_create_is_left_alone_unless_recreate(tpu_api, project, tmp_path):
    tpu_api.add_node(PROJECT, ZONE, "theirs", [("127.0.0.1", None)], state="PREEMPTED")
    command = [TPUCTL, "babysit", RECIPE, "--tpu", "theirs", "--type", "v4-8", "--poll", "0.1"]
    r = subprocess.run(command, cwd=project, env=babysit_env(tpu_api, tmp_path), capture_output=True, text=True)
    assert r.returncode == 2, r.stderr
    assert "TPU 'theirs' is PREEMPTED; babysit did not create it, so it will not delete it" in r.stderr
    assert "--recreate" in r.stderr
    assert tpu_api.nodes[(PROJECT, ZONE, "theirs")]["state"] == "PREEMPTED"  # untouched
    assert not any(req.method == "DELETE" for req in tpu_api.requests)


def test_babysit_gives_up_after_max_restarts_and_says_how_to_go_on(tpu_api, project, tmp_path):
    tpu_api.on_create = lambda *_: [("127.0.0.1", "127.0.0.1")]  # VMs whose sshd never answers (refused at once)
    env = babysit_env(tpu_api, tmp_path) | {"TPUCTL_SSH_PORT": str(free_port())}
    command = [TPUCTL, "babysit", RECIPE, "--tpu", "new", "--type", "v4-8", "--poll", "0.1", "--backoff", "0.1"]
    tpu_api.denied_projects.add(PROJECT)  # the API fails for a while: babysit keeps asking
    with subprocess.Popen(
        [*command, "--max-restarts", "1"],
        cwd=project,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as sitter:
        wait_until(lambda: len(tpu_api.requests) >= 3, 30, "babysit asked the failing API 3 times")
        tpu_api.denied_projects.clear()
        stdout, stderr = sitter.communicate(timeout=120)
    r = subprocess.CompletedProcess(sitter.args, sitter.returncode, stdout, stderr)
    assert r.returncode == 4, r.stderr  # gave up: its own code, not bad input's 2
    assert "the Cloud TPU API failed (looking up TPU 'new': permission denied" in r.stderr
    assert "is not finished after 1 restarts (last: launch-failed)" in r.stderr.splitlines()[-1]
    assert r.stdout.count("launch-failed") == 2 and "gave-up" in r.stdout  # the timeline
    assert "sync failed on w0" in r.stdout


def test_babysit_creates_in_the_first_zone_with_room_and_stays_there(tpu_api, project, tmp_path):
    """--zones: babysit makes the TPU in the first zone with room, records the zone in its state, and a babysit
    started again looks for the TPU there (not in the zone tried first)."""
    from standins.tpu_api import OperationError

    tpu_api.full_zones = {"zone-full": OperationError(8, "There is no more capacity in the zone")}
    tpu_api.on_create = lambda *_: [("127.0.0.1", "127.0.0.1")]  # new VMs, whose sshd never answers
    env = babysit_env(tpu_api, tmp_path) | {"TPUCTL_SSH_PORT": str(free_port())}
    del env["TPUCTL_ZONE"]
    command = [TPUCTL, "babysit", RECIPE, "--tpu", "zoned", "--type", "v4-8", "--zones", f"zone-full,{ZONE}"]
    command += ["--poll", "0.1", "--max-restarts", "0", "--json"]
    r = subprocess.run(command, cwd=project, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 4, r.stderr  # the VMs never answer: the launch fails, and no restart is allowed
    state = json.loads(r.stdout)
    assert state["zone"] == ZONE and state["created_tpu"]
    assert ("created", f"v4-8, 1 workers in {ZONE}") in [(e["what"], e["detail"]) for e in state["events"]]
    assert "zone-full refused" in r.stderr and f"got zone {ZONE}" in r.stderr
    assert [c.path.split("/")[5] for c in tpu_api.creations()] == ["zone-full", ZONE]
    looked = len(tpu_api.requests)
    r = subprocess.run(command, cwd=project, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 4 and "resumed" in r.stderr, r.stderr
    later = tpu_api.requests[looked:]
    assert later and all(f"/locations/{ZONE}/" in q.path for q in later)  # straight to its zone
    assert len(tpu_api.creations()) == 2  # found, not made again


def test_babysit_finds_a_tpu_in_any_of_its_zones_and_follows_it_there(tpu_api, tmp_path, monkeypatch):
    """A TPU made earlier in the second of --zones: babysit finds it, and the run's record, the workers' settings
    and the state all name that zone (so `tpuctl status RUN` looks there)."""
    from tpuctl.babysit import Babysitter, Options
    from tpuctl.cloud import TpuApi
    from tpuctl.config import Settings
    from tpuctl.registry import RunRecord

    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    tpu_api.add_node(PROJECT, "zone-b", "elsewhere", [("127.0.0.1", None)])
    settings = Settings(project=PROJECT, zones=["zone-c", "zone-b"], tpu="elsewhere", api_endpoint=tpu_api.endpoint)
    record = RunRecord(name="r", recipe="r.toml", workdir="/w", target="tpu", cwd="~/tpuctl", project=PROJECT)
    sitter = Babysitter(settings, TpuApi(settings), tmp_path, record, None, Options(), say=lambda _: None)
    assert sitter.ready_tpu().zone == "zone-b"
    assert sitter.state.zone == sitter.record.zone == sitter.settings.zone == sitter.api.zone == "zone-b"
    sitter.note("found")  # saved: a babysit started again goes straight to zone-b
    again = Babysitter(settings, TpuApi(settings), tmp_path, record, None, Options(), say=lambda _: None)
    assert again.api.zone == "zone-b" and again.record.zone == "zone-b"


def test_an_unhealthy_tpu_is_remade_after_the_grace_with_recreate(tpu_api, project, tmp_path):
    node = tpu_api.add_node(PROJECT, ZONE, "sick", [("127.0.0.1", "127.0.0.1")], accelerator_type="v4-16")
    node.update(health="UNHEALTHY_MAINTENANCE", healthDescription="The TPU had a maintenance event.")
    keys = {"ssh-keys": "alice:ssh-ed25519 AAAAalice alice\njane:ssh-ed25519 AAAAjane jane", "owner": "alice"}
    node["metadata"] = keys
    tpu_api.on_create = lambda *_: [("127.0.0.1", "127.0.0.1")]  # new VMs, whose sshd never answers
    env = babysit_env(tpu_api, tmp_path) | {"TPUCTL_SSH_PORT": str(free_port())}
    command = [TPUCTL, "babysit", RECIPE, "--tpu", "sick", "--recreate", "--unhealthy-grace", "0.5", "--poll", "0.1"]
    r = subprocess.run(
        [*command, "--max-restarts", "0", "--json"], cwd=project, env=env, capture_output=True, text=True
    )
    assert r.returncode == 4, r.stderr
    events = [(e["what"], e["detail"]) for e in json.loads(r.stdout)["events"]]
    why = "TPU 'sick' is UNHEALTHY_MAINTENANCE: The TPU had a maintenance event."
    assert events[:4] == [("deleting", why), ("deleted", "sick"), ("creating", why), ("created", "v4-16, 1 workers")]
    assert [what for what, _ in events[4:]] == ["launch-failed", "gave-up"]
    remade = tpu_api.creations()
    assert len(remade) == 1 and remade[0].body["acceleratorType"] == "v4-16"  # the same type again, as it was
    assert remade[0].body["metadata"] == keys  # with its metadata: the new VMs accept whom the old ones did
    assert "waiting" in r.stderr  # it waited out the grace before acting


def test_judge_reads_the_run_from_its_workers_status():
    from tpuctl.babysit import judge
    from tpuctl.ops import WorkerReport

    def worker(i: int, state: str, **data) -> WorkerReport:
        return WorkerReport(index=i, ip=f"10.0.0.{i}", state=state, data=data)

    assert judge([worker(0, "running"), worker(1, "starting")]) is None  # still training
    done = judge([worker(0, "done", checkpoint="ft224/800"), worker(1, "done")])
    assert done == ("done", "every stage trained (last checkpoint ft224/800)")
    half = judge([worker(0, "done"), worker(1, "running")])
    assert half is None  # one host finished first: not done until every one is
    crashed = judge([worker(0, "running"), worker(1, "failed", exit_code=1, last_line="RuntimeError: boom")])
    assert crashed == ("crashed", "w1: trainer exit 1: RuntimeError: boom")
    assert judge([worker(0, "dead")]) == ("crashed", "w0: trainer dead: ")
    assert judge([worker(0, "stopped", last_line="preempted: saved")])[0] == "crashed"  # SIGTERM'd: resume it
    lost = WorkerReport(index=1, ip="10.0.0.1", error="connection refused")
    assert judge([worker(0, "running"), lost]) == ("unreachable", "w1 (10.0.0.1): connection refused")


def test_babysit_waits_with_a_queued_request_instead_of_asking_again(tpu_api, project, tmp_path):
    """`tpuctl create --queued --no-wait`, then babysit: the request has no node while it waits in line; babysit
    waits for its TPU (one creation in all), then goes on (here to VMs whose sshd never answers)."""
    env = babysit_env(tpu_api, tmp_path) | {"TPUCTL_SSH_PORT": str(free_port())}
    tpu_api.on_create = lambda *_: [("127.0.0.1", "127.0.0.1")]
    tpu_api.queue_wait_s = 4.0  # time for babysit to start and find it waiting, also on a loaded machine
    create = [TPUCTL, "create", "inline", "--type", "v4-8", "--queued", "--no-wait"]
    assert subprocess.run(create, env=env, capture_output=True, timeout=60).returncode == 0
    command = [TPUCTL, "babysit", RECIPE, "--tpu", "inline", "--type", "v4-8", "--poll", "0.2", "--max-restarts", "0"]
    r = subprocess.run(command, cwd=project, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 4, r.stderr  # the launch fails on the unreachable VMs, and no restart is allowed
    assert "queued resource 'inline' is WAITING_FOR_RESOURCES; waiting for its TPU" in r.stderr
    assert len(tpu_api.creations()) == 1  # the queued request alone: babysit asked for nothing
    assert tpu_api.nodes[(PROJECT, ZONE, "inline")]["queuedResource"].endswith("/queuedResources/inline")
