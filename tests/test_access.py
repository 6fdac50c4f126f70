"""Day one on a real project: tpuctl gets its own key onto the workers before its first connection (tpuctl.access).

The workers here are real sshd processes whose keys come, as on a TPU VM, from the API: their sshd asks a guest
agent stand-in (standins/guest_agent.py) for the user's keys, which it reads from the node's `ssh-keys` metadata in
the local Cloud TPU API or from the OS Login profile in the local OS Login API, a second after they appear there. So
a key works only once tpuctl has put it there, and only after tpuctl waited for it.
"""

from __future__ import annotations

import json
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from standins.compute_api import SERVICE_PATH, FakeComputeApi
from standins.discovery import held_to_reference
from standins.guest_agent import GuestAgent, metadata_keys
from standins.oslogin_api import FakeOsLoginApi, posix_name
from standins.pod import NODE, PROJECT, ZONE, Pod, make_pod
from standins.sshfleet import SshFleet

USER = "jane"  # the local user name tpuctl logs in as (ssh_user's default), an account the workers have
OTHERS = "bob:ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBobsOwnKeyBobsOwnKeyBobsOwnKeyBobsOwnKey12 bob"
ACCOUNT = "jane@example.com"


@pytest.fixture
def oslogin_api() -> Iterator[FakeOsLoginApi]:
    with FakeOsLoginApi() as api:
        yield api
    held_to_reference(api, "oslogin.v1.json")


@pytest.fixture
def compute_api() -> Iterator[FakeComputeApi]:
    """The project's Compute Engine metadata: none of OS Login unless a test sets it."""
    with FakeComputeApi() as api:
        api.projects[PROJECT] = {"some-key": "some value"}
        yield api
    held_to_reference(api, "compute.v1.json", SERVICE_PATH, enums_as_numbers=False)


@pytest.fixture
def fresh_home(compute_api: FakeComputeApi) -> Callable[[Pod], dict[str, str]]:
    """fresh_home(pod): tpuctl as a new user runs it: no key yet (where gcloud would make it), its own name as
    ssh_user, ssh_keys as it comes (auto: the node's metadata, else the project's, decides)."""

    def env(pod: Pod) -> dict[str, str]:
        return {
            "TPUCTL_SSH_KEY": str(pod.home / ".ssh" / "google_compute_engine"),
            "TPUCTL_SSH_KEYS": "auto",
            "TPUCTL_SSH_USER": "",
            "USER": USER,
            "LOGNAME": USER,
            "TPUCTL_API_POLL": "0.2",
            "TPUCTL_KEY_WAIT": "30",
            "TPUCTL_COMPUTE_ENDPOINT": compute_api.endpoint,
        }

    return env


@pytest.fixture
def keyed_pod(
    make_fleet: Callable[..., SshFleet], tpu_api, tmp_path: Path
) -> Iterator[Callable[..., tuple[Pod, GuestAgent]]]:
    """keyed_pod(n, keys_for=None): a pod whose workers accept only the keys the API holds for a user (default: the
    node's ssh-keys metadata), with the guest agent's one-second delay."""
    agents: list[GuestAgent] = []

    def make(n: int, keys_for=None, users: tuple[str, ...] = (USER,)) -> tuple[Pod, GuestAgent]:
        agent = GuestAgent(keys_for or metadata_keys(tpu_api, PROJECT, ZONE, NODE), users=users, delay_s=1.0)
        agents.append(agent)
        agent.start()
        pod = make_pod(make_fleet(n, agent=agent), tpu_api, tmp_path / "home")
        node = tpu_api.nodes[(PROJECT, ZONE, NODE)]
        node["metadata"] = {"ssh-keys": OTHERS, "startup-script": "echo hi"}  # someone else's key, not ours
        return pod, agent

    yield make
    for agent in agents:
        agent.close()


def test_a_fresh_home_makes_the_key_adds_it_waits_and_succeeds(keyed_pod, fresh_home):
    pod, agent = keyed_pod(3)
    env = fresh_home(pod)
    key = Path(env["TPUCTL_SSH_KEY"])

    r = pod.tpuctl("exec", "--", "hostname", env=env)
    assert r.returncode == 0, r.stderr
    assert sorted(r.stdout.splitlines()) == [f"[w{w.index}] {w.hostname}" for w in pod.fleet.workers]
    assert f"Made SSH key {key}" in r.stderr
    assert "All 3 workers accept the key" in r.stderr
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    public = " ".join(key.with_name(key.name + ".pub").read_text().split()[:2])

    metadata = pod.api.nodes[(PROJECT, ZONE, NODE)]["metadata"]
    lines = metadata["ssh-keys"].splitlines()
    assert lines[0] == OTHERS  # another user's line survives, first, as it was
    assert lines[1:] == [f"{USER}:{public} {USER}"]  # ours, once
    assert metadata["startup-script"] == "echo hi"  # the rest of the metadata too
    patches = [q for q in pod.api.requests if q.method == "PATCH"]
    assert len(patches) == 1 and patches[0].query["updateMask"] == ["metadata"]
    assert set(agent.asked) == {USER}  # the workers asked for the keys of the user tpuctl logged in as

    # The next command finds the key there: nothing written, no wait, the same key used.
    key_before = key.read_bytes()
    r = pod.tpuctl("exec", "--", "true", env={**env, "TPUCTL_NODE_CACHE_S": "0"})
    assert r.returncode == 0, r.stderr
    assert "accept the key" not in r.stderr and "Adding SSH key" not in r.stderr
    assert len([q for q in pod.api.requests if q.method == "PATCH"]) == 1
    assert key.read_bytes() == key_before  # never overwritten


def test_check_waits_for_the_guest_agent_rather_than_failing(keyed_pod, fresh_home):
    """`tpuctl check` right after the key went in: the workers refuse it for a second (their guest agent's delay);
    tpuctl asks again until each accepts, and then answers about the chips, never 'unknown' for a key in transit."""
    pod, agent = keyed_pod(2)
    agent.delay_s = 2.5
    r = pod.tpuctl("check", "--json", env=fresh_home(pod))
    assert r.returncode == 0, r.stderr
    assert "0/2 workers accept the key so far" in r.stderr
    assert [w["state"] for w in json.loads(r.stdout)] == ["free", "free"]


def test_ssh_keys_off_says_what_to_do(keyed_pod, fresh_home):
    pod, _ = keyed_pod(1)
    env = {**fresh_home(pod), "TPUCTL_SSH_KEYS": "off"}
    r = pod.tpuctl("check", env=env)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1
    assert "does not exist and ssh_keys = off" in r.stderr and "ssh_keys = auto" in r.stderr
    assert not Path(env["TPUCTL_SSH_KEY"]).exists()
    assert not [q for q in pod.api.requests if q.method == "PATCH"]


def test_a_dry_run_adds_no_key(keyed_pod, fresh_home):
    pod, _ = keyed_pod(1)
    r = pod.tpuctl("exec", "--dry-run", "--", "true", env=fresh_home(pod))
    assert r.returncode == 0, r.stderr
    assert not [q for q in pod.api.requests if q.method == "PATCH"]


def test_an_os_login_node_logs_in_as_the_profile_user(keyed_pod, oslogin_api, fresh_home):
    name = posix_name(ACCOUNT)
    pod, agent = keyed_pod(2, keys_for=oslogin_api.keys_of_user, users=(name, USER))
    pod.api.nodes[(PROJECT, ZONE, NODE)]["metadata"]["enable-oslogin"] = "TRUE"
    env = {**fresh_home(pod), "TPUCTL_ACCOUNT": ACCOUNT, "TPUCTL_OSLOGIN_ENDPOINT": oslogin_api.endpoint}

    r = pod.tpuctl("exec", "--", "echo $USER", env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split().count(name) == 2  # both workers: logged in as the profile's POSIX user
    assert f"OS Login profile of {ACCOUNT} (user {name!r})" in r.stderr
    public = " ".join(Path(env["TPUCTL_SSH_KEY"] + ".pub").read_text().split()[:2])
    assert [k.split()[:2] for k in oslogin_api.profiles[ACCOUNT]["keys"].values()] == [public.split()]
    assert not [q for q in pod.api.requests if q.method == "PATCH"]  # OS Login VMs ignore ssh-keys metadata
    assert set(agent.asked) == {name}
    imports = [q for q in oslogin_api.requests if q.method == "POST"]
    assert len(imports) == 1 and imports[0].query["projectId"] == [PROJECT]

    # Next time: the profile has the key; one read, no import; on the recorded addresses, the same user.
    r = pod.tpuctl("exec", "--", "echo $USER", env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split().count(name) == 2
    assert len([q for q in oslogin_api.requests if q.method == "POST"]) == 1

    # ssh_user set by the user wins over the profile's name (the workers then refuse: one line says why, by the
    # way the key went: OS Login, found in the node's metadata)
    r = pod.tpuctl("exec", "--ssh-user", USER, "--", "true", env={**env, "TPUCTL_NODE_CACHE_S": "0"})
    assert r.returncode == 255
    said = " ".join(r.stderr.split())  # (a long line may be folded)
    assert f"authentication failed as {USER!r}" in said and "the key is in your OS Login profile" in said


def test_os_login_without_an_account_is_one_line(keyed_pod, oslogin_api, fresh_home):
    pod, _ = keyed_pod(1)
    env = {**fresh_home(pod), "TPUCTL_SSH_KEYS": "oslogin", "TPUCTL_OSLOGIN_ENDPOINT": oslogin_api.endpoint}
    r = pod.tpuctl("check", env=env)
    assert r.returncode == 2
    assert "OS Login needs your Google account" in r.stderr.splitlines()[-1]  # the error: one line, last


def test_os_login_refused_names_the_account(keyed_pod, oslogin_api, fresh_home):
    pod, _ = keyed_pod(1)
    oslogin_api.denied.add(ACCOUNT)
    env = {
        **fresh_home(pod),
        "TPUCTL_SSH_KEYS": "oslogin",
        "TPUCTL_ACCOUNT": ACCOUNT,
        "TPUCTL_OSLOGIN_ENDPOINT": oslogin_api.endpoint,
    }
    r = pod.tpuctl("check", env=env)
    assert r.returncode == 2
    assert f"the OS Login profile of {ACCOUNT}: permission denied" in r.stderr.splitlines()[-1]


def test_os_login_turned_on_for_the_project_is_found_in_its_metadata(keyed_pod, oslogin_api, compute_api, fresh_home):
    """Organisations turn OS Login on project-wide: the node's metadata says nothing, the project's says TRUE."""
    name = posix_name(ACCOUNT)
    pod, _ = keyed_pod(2, keys_for=oslogin_api.keys_of_user, users=(name, USER))
    compute_api.projects[PROJECT]["enable-oslogin"] = "TRUE"
    env = {**fresh_home(pod), "TPUCTL_ACCOUNT": ACCOUNT, "TPUCTL_OSLOGIN_ENDPOINT": oslogin_api.endpoint}
    r = pod.tpuctl("exec", "--", "echo $USER", env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split().count(name) == 2
    assert not [q for q in pod.api.requests if q.method == "PATCH"]
    assert [q.path for q in compute_api.requests] == [f"/compute/v1/projects/{PROJECT}"]

    # The project's answer is remembered (a day): the next command on the API path does not ask again.
    r = pod.tpuctl("exec", "--", "true", env={**env, "TPUCTL_NODE_CACHE_S": "0"})
    assert r.returncode == 0, r.stderr
    assert len(compute_api.requests) == 1


def test_the_nodes_own_metadata_overrides_the_projects(keyed_pod, compute_api, fresh_home):
    pod, _ = keyed_pod(1)
    compute_api.projects[PROJECT]["enable-oslogin"] = "TRUE"
    pod.api.nodes[(PROJECT, ZONE, NODE)]["metadata"]["enable-oslogin"] = "FALSE"  # this VM opts out, as on GCE
    r = pod.tpuctl("exec", "--", "true", env=fresh_home(pod))
    assert r.returncode == 0, r.stderr
    assert len([q for q in pod.api.requests if q.method == "PATCH"]) == 1  # its ssh-keys metadata
    assert not compute_api.requests  # the node decided: the project was not asked


def test_a_project_whose_metadata_cannot_be_read_goes_by_ssh_keys_and_says_so(keyed_pod, compute_api, fresh_home):
    pod, _ = keyed_pod(1)
    compute_api.denied.add(PROJECT)
    r = pod.tpuctl("exec", "--", "true", env=fresh_home(pod))
    assert r.returncode == 0, r.stderr
    assert "lacks compute.projects.get" in r.stderr and "going by the TPU's ssh-keys metadata" in r.stderr
    assert "set ssh_keys = oslogin or ssh_keys = metadata" in r.stderr


def test_a_tpu_viewer_is_told_which_permission_adding_the_key_needs(keyed_pod, fresh_home):
    pod, _ = keyed_pod(1)
    pod.api.read_only_projects.add(PROJECT)  # roles/tpu.viewer: the node can be read, not changed
    r = pod.tpuctl("check", env=fresh_home(pod))
    assert r.returncode == 2
    last = r.stderr.splitlines()[-1]
    assert "updating the metadata of TPU 'pod'" in last and "tpu.nodes.update" in last and "roles/tpu.admin" in last


def test_a_new_key_on_recorded_addresses_is_authorised_when_the_workers_refuse_it(keyed_pod, fresh_home):
    """The workers' addresses were recorded a moment ago (no API call), then the user switches to another key: the
    workers refuse it, tpuctl asks the API, adds the key, waits, and the command runs on every worker."""
    pod, _ = keyed_pod(2)
    env = fresh_home(pod)
    assert pod.tpuctl("exec", "--", "true", env=env).returncode == 0
    other = {**env, "TPUCTL_SSH_KEY": str(pod.home / ".ssh" / "second_key")}
    r = pod.tpuctl("exec", "--", "hostname", env=other)
    assert r.returncode == 0, r.stderr
    assert sorted(r.stdout.splitlines()) == [f"[w{w.index}] {w.hostname}" for w in pod.fleet.workers]
    assert "Adding SSH key" in r.stderr and len([q for q in pod.api.requests if q.method == "PATCH"]) == 2
