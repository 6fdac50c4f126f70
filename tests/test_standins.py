"""The stand-ins are real: sshd workers with own hostname, /root and /tmp; a TPU API the client parses."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import paramiko
import pytest
from google.api_core import exceptions as gexc
from google.api_core.client_options import ClientOptions
from google.auth.credentials import AnonymousCredentials
from google.cloud import tpu_v2
from standins import wait_until, warm
from standins.sshfleet import SshFleet, StandinWorker, start_fleet
from standins.tpu_api import FakeTpuApi

# -- helpers -------------------------------------------------------------------------------------------------


def connect(fleet: SshFleet, worker: StandinWorker, **kwargs: float) -> paramiko.SSHClient:
    client = paramiko.SSHClient()
    client.set_missing_host_key_policy(paramiko.AutoAddPolicy())
    client.connect(
        worker.ip,
        port=fleet.port,
        username=fleet.user,
        key_filename=str(fleet.key_path),
        look_for_keys=False,
        allow_agent=False,
        **{"timeout": 5.0, **kwargs},
    )
    return client


def run_on(client: paramiko.SSHClient, command: str) -> str:
    _, out, err = client.exec_command(command, timeout=10)
    stdout, stderr = out.read().decode(), err.read().decode()
    assert out.channel.recv_exit_status() == 0, f"{command!r} failed: {stderr}"
    return stdout.strip()


def ssh(fleet: SshFleet, worker: StandinWorker, command: str) -> str:
    with connect(fleet, worker) as client:
        return run_on(client, command)


def pids_in(namespaces: set[str]) -> set[int]:
    """Live processes in the given mount namespaces, found independently of the fleet's own cleanup code."""
    found = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.readlink(f"/proc/{pid}/ns/mnt") in namespaces:
                found.add(int(pid))
        except OSError:
            pass
    return found


# -- the sshd fleet ------------------------------------------------------------------------------------------


def test_workers_share_one_port_on_distinct_loopback_ips(fleet4: SshFleet) -> None:
    ips = [w.ip for w in fleet4.workers]
    prefix = ips[0].rsplit(".", 1)[0]
    assert ips == [f"{prefix}.{i + 2}" for i in range(4)]
    assert ips[0].startswith("127.") and not ips[0].startswith("127.0.0.")
    assert {w.port for w in fleet4.workers} == {fleet4.port}
    assert fleet4.root.parent == Path("/var/tmp") and fleet4.root.is_dir()
    assert not fleet4.known_hosts.exists()


def test_each_worker_answers_with_its_own_hostname(fleet4: SshFleet) -> None:
    names = [ssh(fleet4, w, "hostname") for w in fleet4.workers]
    assert names == [w.hostname for w in fleet4.workers]
    assert len(set(names)) == 4 and socket.gethostname() not in names


def test_home_is_root_but_per_worker(fleet: SshFleet) -> None:
    w0, w1 = fleet.workers
    marker = f"marker-{uuid.uuid4().hex}"
    assert ssh(fleet, w0, f"echo $HOME; pwd; echo hi > /root/{marker}") == "/root\n/root"
    assert w0.path(f"/root/{marker}").read_text() == "hi\n"
    assert not w1.path(f"/root/{marker}").exists()
    assert ssh(fleet, w1, f"test -e /root/{marker} && echo yes || echo no") == "no"
    assert not Path("/root", marker).exists()


def test_tmp_is_private_per_worker(fleet: SshFleet) -> None:
    w0, w1 = fleet.workers
    name = f"t-{uuid.uuid4().hex}"
    ssh(fleet, w0, f"echo zero > /tmp/{name}")
    ssh(fleet, w1, f"echo one > /tmp/{name}")
    assert w0.path(f"/tmp/{name}").read_text() == "zero\n"
    assert w1.path(f"/tmp/{name}").read_text() == "one\n"
    assert not Path("/tmp", name).exists()
    assert ssh(fleet, w0, "stat -c %a /tmp") == "1777"


def test_hostname_resolves_inside_worker(fleet: SshFleet) -> None:
    for w in fleet.workers:
        assert ssh(fleet, w, "hostname -i") == w.ip
        assert ssh(fleet, w, "getent hosts $(hostname)").split() == [w.ip, w.hostname]


def test_path_maps_worker_paths_to_this_machine(fleet: SshFleet) -> None:
    w = fleet.workers[1]
    assert w.path("/root/a/b") == w.home / "a/b"
    assert w.path("~/a") == w.path("a") == w.home / "a"
    assert w.path("/root") == w.home
    assert w.path("/tmp/x") == w.tmp / "x"
    assert w.path("/etc/hosts") == w.hosts_file
    assert w.path("/usr/bin/env") == Path("/usr/bin/env")  # shared with this machine


def test_sixteen_workers_start_fast_and_all_answer(make_fleet: Callable[[int], SshFleet]) -> None:
    started = time.monotonic()
    fleet = make_fleet(16)
    elapsed = time.monotonic() - started
    with ThreadPoolExecutor(16) as pool:
        names = list(pool.map(lambda w: ssh(fleet, w, "hostname"), fleet.workers))
    assert names == [w.hostname for w in fleet.workers]
    assert elapsed < 5, f"16 workers took {elapsed:.1f} s to start"


def test_system_ssh_client_and_sftp_work(fleet: SshFleet) -> None:
    w = fleet.workers[1]
    cmd = [
        "ssh", "-i", str(fleet.key_path), "-p", str(fleet.port),
        "-o", f"UserKnownHostsFile={fleet.known_hosts}", "-o", "StrictHostKeyChecking=accept-new",
        "-o", "BatchMode=yes", "-o", "LogLevel=ERROR", f"{fleet.user}@{w.ip}", "hostname",
    ]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    assert (result.returncode, result.stdout.strip()) == (0, w.hostname), result.stderr
    # Debian's ssh_config hashes known_hosts entries: look the worker up the way ssh does.
    lookup = ["ssh-keygen", "-F", f"[{w.ip}]:{fleet.port}", "-f", str(fleet.known_hosts)]
    assert subprocess.run(lookup, capture_output=True, timeout=10).returncode == 0
    with connect(fleet, w) as client, client.open_sftp() as sftp:
        sftp.putfo(io.BytesIO(b"payload"), "/root/sent.bin")
    assert w.path("/root/sent.bin").read_bytes() == b"payload"


def test_rsync_over_ssh_to_a_worker(fleet: SshFleet, tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "train.py").write_text("print('hi')\n")
    w = fleet.workers[0]
    rsh = f"ssh -i {fleet.key_path} -p {fleet.port} -o UserKnownHostsFile={fleet.known_hosts} " \
          "-o StrictHostKeyChecking=accept-new -o BatchMode=yes -o LogLevel=ERROR"  # fmt: skip
    cmd = ["rsync", "-az", "-e", rsh, f"{tmp_path}/src/", f"{fleet.user}@{w.ip}:/root/code/"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert w.path("/root/code/train.py").read_text() == "print('hi')\n"


def test_close_leaves_no_process_and_no_files(make_fleet: Callable[[int], SshFleet]) -> None:
    fleet = make_fleet(2)
    w0, w1 = fleet.workers
    session = connect(fleet, w0)
    session.exec_command("sleep 300")  # an open session
    # A daemon that left its SSH session entirely: only the namespace scan can find it.
    run_on(session, "setsid nohup sleep 301 >/dev/null 2>&1 < /dev/null &")
    spawned = w1.spawn(["sleep", "302"])
    namespaces = w0.namespaces | w1.namespaces
    sshd_pids = [w0.sshd_pid, w1.sshd_pid]
    assert len(namespaces) == 2
    assert spawned in pids_in(w1.namespaces)  # spawn() returns once the process is inside the worker
    # 2 sshd, session sleep, daemon sleep, spawned sleep
    wait_until(lambda: len(pids_in(namespaces)) >= 5, 5, "5 processes in the worker")

    # Held here past close: a namespace nobody holds goes, and a fleet another test starts meanwhile may get its number
    pinned = [os.open(f"/proc/{pid}/ns/mnt", os.O_RDONLY) for pid in sshd_pids]
    try:
        fleet.close()
        session.close()
        assert pids_in(namespaces) == set()
    finally:
        for fd in pinned:
            os.close(fd)
    for pid in sshd_pids:
        assert not Path(f"/proc/{pid}").exists()
    assert not fleet.root.exists()
    fleet.close()  # idempotent


def test_stop_sshd_refuses_and_start_sshd_brings_it_back(fleet: SshFleet) -> None:
    w0, w1 = fleet.workers
    ssh(fleet, w0, "echo kept > /root/kept")
    survivor = connect(fleet, w0)
    w0.stop_sshd()
    assert w0.sshd_pid is None
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((w0.ip, fleet.port), timeout=2).close()
    with pytest.raises(paramiko.ssh_exception.NoValidConnectionsError):
        connect(fleet, w0)
    assert ssh(fleet, w1, "hostname") == w1.hostname  # the other worker is unaffected
    assert run_on(survivor, "hostname") == w0.hostname  # like real sshd, open sessions outlive the listener
    survivor.close()

    w0.start_sshd()
    assert ssh(fleet, w0, "hostname; cat /root/kept") == f"{w0.hostname}\nkept"
    assert len(w0.namespaces) == 2  # both the old and the new namespace get cleaned up at close()


def test_frozen_worker_accepts_tcp_but_never_answers(fleet: SshFleet) -> None:
    w0 = fleet.workers[0]
    w0.freeze()
    socket.create_connection((w0.ip, fleet.port), timeout=2).close()  # the kernel still accepts
    started = time.monotonic()
    with pytest.raises(paramiko.SSHException, match="banner"):
        connect(fleet, w0, banner_timeout=1)
    assert time.monotonic() - started < 4
    assert ssh(fleet, fleet.workers[1], "hostname") == fleet.workers[1].hostname
    w0.thaw()
    assert ssh(fleet, w0, "hostname") == w0.hostname


def test_spawn_runs_inside_the_worker(fleet: SshFleet) -> None:
    w1 = fleet.workers[1]
    script = "hostname > /tmp/spawned; echo $HOME >> /tmp/spawned; pwd >> /tmp/spawned; exec sleep 300"
    pid = w1.spawn(["bash", "-c", script], cwd="/tmp")
    out = w1.path("/tmp/spawned")
    wait_until(lambda: out.exists() and out.read_text().count("\n") == 3, 5, "3 lines of output")
    assert out.read_text() == f"{w1.hostname}\n/root\n/tmp\n"
    assert pid in pids_in(w1.namespaces)  # the returned pid is the process itself, not an nsenter wrapper
    wait_until(lambda: Path(f"/proc/{pid}/comm").read_text().strip() == "sleep", 5, "the spawned sleep")
    assert ssh(fleet, w1, f"cat /tmp/spawned >/dev/null && ps -o comm= -p {pid}") == "sleep"
    assert not fleet.workers[0].path("/tmp/spawned").exists()


def test_fleet_refuses_a_base_dir_under_tmp() -> None:
    with pytest.raises(ValueError, match="outside /tmp"):
        start_fleet(1, base_dir=Path("/tmp"))


# -- the Cloud TPU API ---------------------------------------------------------------------------------------


def tpu_client(api: FakeTpuApi) -> tpu_v2.TpuClient:
    return tpu_v2.TpuClient(
        credentials=AnonymousCredentials(),
        transport="rest",
        client_options=ClientOptions(api_endpoint=api.endpoint),
    )


def test_session_env_keeps_google_auth_local() -> None:
    assert os.environ["NO_GCE_CHECK"] == "true"
    assert os.environ["GCE_METADATA_HOST"] == os.environ["GCE_METADATA_IP"] == "127.0.0.1:9"
    assert os.environ["TPUCTL_STORAGE_ENDPOINT"].startswith("http://127.")  # a run's gs:// paths: never Google
    assert "GOOGLE_APPLICATION_CREDENTIALS" not in os.environ
    assert os.listdir(os.environ["CLOUDSDK_CONFIG"]) == []
    assert not Path(os.environ["TPUCTL_CONFIG"]).exists()


def test_get_node_parses_with_the_real_client(tpu_api: FakeTpuApi) -> None:
    tpu_api.add_node(
        "proj", "us-central2-b", "pod", [("10.0.0.2", "34.1.1.1"), ("10.0.0.3", None)], labels={"team": "ml"}
    )
    node = tpu_client(tpu_api).get_node(name="projects/proj/locations/us-central2-b/nodes/pod")
    assert node.name == "projects/proj/locations/us-central2-b/nodes/pod"
    assert node.state == tpu_v2.Node.State.READY
    assert node.health == tpu_v2.Node.Health.HEALTHY
    assert (node.accelerator_type, node.runtime_version) == ("v4-32", "tpu-ubuntu2204-base")
    assert [e.ip_address for e in node.network_endpoints] == ["10.0.0.2", "10.0.0.3"]
    assert [e.access_config.external_ip for e in node.network_endpoints] == ["34.1.1.1", ""]
    assert node.network_endpoints[0].port == 8470
    assert dict(node.labels) == {"team": "ml"}
    assert node.create_time.year >= 2024
    assert tpu_api.requests[-1].path == "/v2/projects/proj/locations/us-central2-b/nodes/pod"
    # The REST client asks for numeric enums; the fake answers as Google does.
    assert tpu_api.requests[-1].query["$alt"] == ["json;enum-encoding=int"]


def test_list_nodes_follows_pages(tpu_api: FakeTpuApi) -> None:
    for i in range(5):
        state = "CREATING" if i == 3 else "READY"
        tpu_api.add_node("proj", "z1", f"n{i}", [(f"10.0.0.{i + 2}", None)], state=state)
    tpu_api.add_node("proj", "z2", "elsewhere", [("10.0.1.2", None)])
    pager = tpu_client(tpu_api).list_nodes(request={"parent": "projects/proj/locations/z1", "page_size": 2})
    nodes = list(pager)
    assert [n.name.rsplit("/", 1)[1] for n in nodes] == [f"n{i}" for i in range(5)]
    assert nodes[3].state == tpu_v2.Node.State.CREATING
    assert [r.query.get("pageToken") for r in tpu_api.requests] == [None, ["2"], ["4"]]
    assert {r.path for r in tpu_api.requests} == {"/v2/projects/proj/locations/z1/nodes"}


def test_state_changes_and_removal_show(tpu_api: FakeTpuApi) -> None:
    tpu_api.add_node("proj", "z", "pod", [("10.0.0.2", None)])
    client = tpu_client(tpu_api)
    tpu_api.set_state("proj", "z", "pod", "PREEMPTED")
    assert client.get_node(name="projects/proj/locations/z/nodes/pod").state == tpu_v2.Node.State.PREEMPTED
    tpu_api.remove_node("proj", "z", "pod")
    with pytest.raises(gexc.NotFound):
        client.get_node(name="projects/proj/locations/z/nodes/pod")
    assert list(client.list_nodes(parent="projects/proj/locations/z")) == []


def test_missing_node_is_not_found_and_denied_project_is_forbidden(tpu_api: FakeTpuApi) -> None:
    client = tpu_client(tpu_api)
    with pytest.raises(gexc.NotFound):
        client.get_node(name="projects/proj/locations/z/nodes/nope")
    tpu_api.denied_projects.add("secret")
    # Over REST a 403 becomes Forbidden, whose *subclass* PermissionDenied is what gRPC would raise:
    # `except PermissionDenied` does not catch it.
    with pytest.raises(gexc.Forbidden) as denied:
        list(client.list_nodes(parent="projects/secret/locations/z"))
    assert not isinstance(denied.value, gexc.PermissionDenied)
    with pytest.raises(gexc.Forbidden):
        client.get_node(name="projects/secret/locations/z/nodes/pod")


def test_error_bodies_are_googles_json(tpu_api: FakeTpuApi) -> None:
    url = f"{tpu_api.endpoint}/v2/projects/p/locations/z/nodes/nope"
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(url, timeout=5)
    assert err.value.code == 404
    body = json.loads(err.value.read())
    assert body["error"]["code"] == 404 and body["error"]["status"] == "NOT_FOUND"


def test_fleet_node_points_at_the_workers(tpu_api: FakeTpuApi, fleet: SshFleet) -> None:
    tpu_api.add_fleet_node("proj", "z", "pod", fleet, accelerator_type="v4-16")
    node = tpu_client(tpu_api).get_node(name="projects/proj/locations/z/nodes/pod")
    assert node.accelerator_type == "v4-16"
    assert [e.ip_address for e in node.network_endpoints] == fleet.ips
    assert [e.access_config.external_ip for e in node.network_endpoints] == fleet.ips
    # What the API reports is reachable: worker 0's address answers as worker 0.
    w0 = fleet.workers[0]
    assert ssh(fleet, w0, "hostname") == w0.hostname


def test_the_reference_check_catches_a_stand_in_that_drifts():
    """The discovery-document check every tpu_api test ends with (conftest) finds what the real API would not say."""
    from standins import discovery

    doc = discovery.document("tpu.v2.json")
    path = "/v2/projects/p/locations/z/nodes/n"
    good = {"name": "projects/p/locations/z/nodes/n", "state": 2, "health": 5, "acceleratorType": "v4-8"}
    assert discovery.problems(doc, "GET", path, 200, good) == []  # UNHEALTHY_MAINTENANCE is 5: numbers skip
    named = {**good, "state": "READY", "health": "UNHEALTHY_MAINTENANCE"}  # a request without enum-encoding=int
    assert discovery.problems(doc, "GET", path, 200, named, enums_as_numbers=False) == []
    drifted = {**good, "state": "READY", "health": "", "workers": [], "spot": "yes"}
    found = discovery.problems(doc, "GET", path, 200, drifted)
    assert any("Node.state: 'READY' is not an enum number" in p for p in found)
    assert any("Node.health: '' is not an enum number" in p for p in found)
    assert any("Node.workers: a field Node does not have" in p for p in found)
    assert any("Node.spot: a field Node does not have" in p for p in found)  # (spot is schedulingConfig.spot)
    assert discovery.problems(doc, "GET", path, 200, {**good, "state": 99})[0].endswith("UNKNOWN)")
    operation = {"name": "projects/p/locations/z/operations/o", "done": True, "response": {
        "@type": "type.googleapis.com/google.cloud.tpu.v2.QueuedResource", "state": {"state": "ACTIVE"}}}  # fmt: skip
    found = discovery.problems(doc, "GET", "/v2/projects/p/locations/z/operations/o", 200, operation)
    assert found == ["Operation.response<QueuedResource>.state.state: 'ACTIVE' is not an enum number (the request"
                     " asked for enum-encoding=int)"]  # fmt: skip
    error = {"error": {"code": 403, "message": "no", "status": "PERMISSION_DENIED", "reason": "x"}}
    assert discovery.problems(doc, "GET", path, 403, error) == ["error.reason: not in Google's error body"]
    assert discovery.problems(doc, "GET", "/v2/projects/p/elsewhere", 200, {})[0].endswith("has this path")
    # an Any naming another API version's type is no answer a v2 API gives (a test may send one on purpose)
    newer = {**operation, "metadata": {"@type": "type.googleapis.com/google.cloud.tpu.v3.OperationMetadata"}}
    found = discovery.problems(doc, "GET", "/v2/projects/p/locations/z/operations/o", 200, newer)
    assert any("tpu.v3.OperationMetadata is none the reference knows" in p for p in found)


def test_the_scheduling_order_names_tests_that_exist():
    """conftest's LONG_TESTS and DURATIONS order CI's run: a renamed long test would silently fall back to the
    default order (and two long tests could run at once again)."""
    from conftest import DURATIONS, LONG_TESTS

    here = Path(__file__).parent
    for entry in LONG_TESTS:
        module, test = entry.split("::")
        name, _, case = test.partition("[")  # a parametrized test's case: its function, and the case's id
        source = (here / module).read_text()
        assert f"\ndef {name}(" in source, f"conftest.LONG_TESTS: no {entry}"
        assert not case or case.rstrip("]").split("-")[0] in source, f"conftest.LONG_TESTS: no case {entry}"
        assert entry in json.loads(DURATIONS.read_text()), f"{DURATIONS.name} has no {entry}: store them again"


# -- warm processes ----------------------------------------------------------------------------------------------

ENDINGS = textwrap.dedent(
    """
    import atexit, sys, threading, time
    atexit.register(lambda: print("atexit ran", flush=True))
    threading.Thread(target=lambda: (time.sleep(0.3), print("thread done", end=" "))).start()
    print("unflushed", end=" ")
    how = sys.argv[1]
    if how == "raise":
        raise ValueError("boom")
    sys.exit(int(how) if how.isdigit() else how)
    """
)


@pytest.mark.slow  # the warm JAX server's TensorFlow import: the full tier has it started anyway
def test_a_warm_call_ends_as_a_cold_interpreter_would():
    """A warm call's process ends by os._exit (standins/warm.py): its threads, atexit, buffered output and exit
    status are still those of a cold run."""
    for how, status in (("0", 0), ("3", 3), ("a message", 1), ("raise", 1)):
        args = [sys.executable, "-c", ENDINGS, how]
        cold = subprocess.run(args, capture_output=True, text=True, timeout=60)
        hot = warm.run(args, timeout=60)
        assert hot.returncode == cold.returncode == status, (how, hot, cold)
        assert hot.stdout == cold.stdout == "unflushed thread done atexit ran\n", how
        assert hot.stderr.splitlines()[-1:] == cold.stderr.splitlines()[-1:], how
    assert "ValueError: boom" in hot.stderr and "Traceback" in hot.stderr
