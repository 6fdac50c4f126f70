"""`tpuctl doctor` against the stand-ins: a healthy pod, a worker down, no credentials, an API that answers 403, a
key not there yet, a worker without tmux. Each finding is checked by what a user would act on: its result and fix."""

from __future__ import annotations

import json
import subprocess

from standins.pod import PROJECT, Pod

CHECKS = ["credentials", "tpu api", "tpu", "ssh key", "workers", "remote dir", "tools", "chips"]


def doctor(pod: Pod, *args: str, env: dict[str, str] | None = None) -> tuple[int, dict[str, dict[str, str]]]:
    r = pod.tpuctl("doctor", "--json", *args, env=env)
    answer = json.loads(r.stdout)
    assert [c["check"] for c in answer["checks"]] == CHECKS, r.stdout
    assert answer["ok"] == (r.returncode == 0)
    return r.returncode, {c["check"]: c for c in answer["checks"]}


def with_remote_dir(pod: Pod) -> None:
    for w in pod.fleet.workers:
        w.path("/root/tpuctl").mkdir(exist_ok=True)


def test_a_healthy_pod_passes_every_check(pod):
    with_remote_dir(pod)
    code, found = doctor(pod)
    assert code == 0
    assert {c: f["result"] for c, f in found.items()} == dict.fromkeys(CHECKS, "pass")
    assert "2/2 reachable over SSH as 'root'" in found["workers"]["detail"]
    assert "in the TPU's ssh-keys metadata for 'root'" in found["ssh key"]["detail"]
    assert "free on the 2 workers" in found["chips"]["detail"]

    r = pod.tpuctl("doctor")  # the table people read, and the verdict on stderr
    assert r.returncode == 0 and "All checks passed." in r.stderr
    assert all(check in r.stdout for check in CHECKS)


def test_a_worker_down_fails_workers_and_the_rest_is_checked_on_those_reached(pod):
    with_remote_dir(pod)
    pod.fleet.workers[1].stop_sshd()
    code, found = doctor(pod)
    assert code == 1
    assert found["workers"]["result"] == "fail"
    assert "1/2 reachable" in found["workers"]["detail"] and "w1" in found["workers"]["detail"]
    assert found["chips"]["result"] == "pass" and "the 1 workers reached" in found["chips"]["detail"]


def test_no_credentials_fails_first_and_skips_the_rest(pod):
    code, found = doctor(pod, env={"TPUCTL_API_ENDPOINT": "https://tpu.googleapis.com"})
    assert code == 1
    assert found["credentials"]["result"] == "fail"
    assert found["credentials"]["fix"] == "gcloud auth application-default login"
    assert {found[c]["result"] for c in CHECKS[1:]} == {"skipped"}


def test_an_api_answering_403_names_the_permission_and_the_role(pod):
    pod.api.denied_projects.add(PROJECT)
    code, found = doctor(pod)
    assert code == 1
    api = found["tpu api"]
    assert api["result"] == "fail"
    assert "tpu.nodes.list" in api["detail"] and "roles/tpu.viewer" in api["fix"]
    assert found["tpu"]["result"] == "skipped"


def test_a_disabled_api_says_how_to_enable_it(pod):
    pod.api.disabled_projects.add(PROJECT)
    code, found = doctor(pod)
    assert code == 1
    assert "gcloud services enable tpu.googleapis.com" in found["tpu api"]["fix"]


def test_a_key_not_there_yet_says_which_command_adds_it(pod, tmp_path):
    with_remote_dir(pod)
    key = tmp_path / "new-key"
    code, found = doctor(pod, env={"TPUCTL_SSH_KEY": str(key)})
    assert code == 1
    assert found["ssh key"]["result"] == "fail" and "does not exist" in found["ssh key"]["detail"]
    assert "tpuctl check" in found["ssh key"]["fix"]
    assert not key.exists()  # doctor changes nothing

    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)  # not in the metadata
    code, found = doctor(pod, env={"TPUCTL_SSH_KEY": str(key)})
    assert found["ssh key"]["result"] == "fail" and "not in the TPU's ssh-keys metadata" in found["ssh key"]["detail"]
    assert not [q for q in pod.api.requests if q.method == "PATCH"]


def test_missing_tools_and_dir_are_named_with_their_fix(pod):
    code, found = doctor(pod, env={"TPUCTL_PYTHON": "python3-not-here"})
    assert code == 1
    assert found["remote dir"]["result"] == "fail" and found["remote dir"]["fix"] == "tpuctl sync ."
    assert found["tools"]["result"] == "fail"
    assert "python3-not-here missing on w0, w1" in found["tools"]["detail"]
