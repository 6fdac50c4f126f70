"""ssh_proxy: workers with internal addresses only, in a network namespace of their own that this machine cannot
reach, and a bastion sshd into it (standins.bastion). Every SSH path goes through it: paramiko's fan-out (exec,
check), the OpenSSH client (ssh) and rsync over it (sync)."""

from __future__ import annotations

import contextlib
import json
import shlex
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from standins import free_port
from standins.bastion import PrivateNetwork, private_network, start_bastion
from standins.pod import NODE, PROJECT, ZONE, Pod
from standins.sshfleet import SshFleet, start_fleet
from standins.tpu_api import FakeTpuApi


@dataclass
class PrivatePod:
    pod: Pod
    bastion: SshFleet
    net: PrivateNetwork

    @property
    def jump(self) -> str:
        return f"root@{self.net.bastion_ip}:{self.bastion.port}"

    def tpuctl(self, *args: str, proxy: str | None = None, **kw):
        env = {"TPUCTL_SSH_PROXY": self.jump if proxy is None else proxy}
        return self.pod.tpuctl(*args, env=env | kw.pop("env", {}), **kw)


@pytest.fixture
def private_pod(tpu_api: FakeTpuApi, tmp_path) -> Iterator[PrivatePod]:
    """Three workers the API lists with internal IPs only, behind a bastion; everything torn down after."""
    with private_network() as net, contextlib.ExitStack() as closing:
        workers = start_fleet(3, network=net.network)
        closing.callback(workers.close)
        bastion = start_bastion(net, workers)
        closing.callback(bastion.close)
        tpu_api.add_node(PROJECT, ZONE, NODE, [(w.ip, None) for w in workers.workers])
        (tmp_path / "home").mkdir()
        yield PrivatePod(Pod(fleet=workers, api=tpu_api, home=tmp_path / "home"), bastion, net)


def test_fan_out_goes_through_the_jump_host_and_nothing_else_reaches_the_workers(private_pod: PrivatePod):
    workers = private_pod.pod.fleet.workers
    direct = private_pod.tpuctl("exec", "--internal-ip", "--", "hostname", proxy="")
    assert direct.returncode == 255 and "connection refused" in direct.stderr  # the pod network is out of reach
    r = private_pod.tpuctl("exec", "--", "hostname")  # internal addresses by default through a proxy
    assert r.returncode == 0, r.stderr
    assert sorted(r.stdout.splitlines()) == sorted(f"[w{w.index}] {w.hostname}" for w in workers)
    # the jump host's key is recorded like the workers', under its own name
    known = private_pod.pod.known_hosts.read_text()
    assert f"[{private_pod.net.bastion_ip}]:{private_pod.bastion.port} " in known
    assert all(f"[{w.ip}]:{w.port} " in known for w in workers)
    r = private_pod.tpuctl("check", "--json")
    assert r.returncode == 0, r.stderr
    assert [w["state"] for w in json.loads(r.stdout)] == ["free"] * 3


def test_sync_and_ssh_use_the_jump_host_through_the_openssh_client(private_pod: PrivatePod, tmp_path):
    src = tmp_path / "src"
    (src / "pkg").mkdir(parents=True)
    (src / "pkg" / "model.py").write_text("WIDTH = 768\n")
    r = private_pod.tpuctl("sync", str(src), "--json")
    assert r.returncode == 0, r.stderr
    assert all(d["ok"] for d in json.loads(r.stdout))
    for w in private_pod.pod.fleet.workers:
        assert w.path("/root/tpuctl/pkg/model.py").read_text() == "WIDTH = 768\n"
    (src / "pkg" / "model.py").write_text("WIDTH = 1024\n")  # an incremental sync, through the jump host again
    r = private_pod.tpuctl("sync", str(src), "--json")
    assert r.returncode == 0, r.stderr
    for w in private_pod.pod.fleet.workers:
        assert w.path("/root/tpuctl/pkg/model.py").read_text() == "WIDTH = 1024\n"
    w2 = private_pod.pod.fleet.workers[2]
    r = private_pod.tpuctl("ssh", "--worker", "2", "--", "hostname")
    assert r.returncode == 0 and r.stdout.strip() == w2.hostname, r.stderr


def test_a_proxy_command_serves_both_transports(private_pod: PrivatePod):
    """A ProxyCommand (how an IAP tunnel is given): paramiko and OpenSSH both run it, %h/%p replaced."""
    pod = private_pod.pod
    command = shlex.join(
        [
            "ssh", "-i", str(pod.fleet.key_path), "-p", str(private_pod.bastion.port), "-o", "BatchMode=yes",
            "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR",
            f"root@{private_pod.net.bastion_ip}",
        ]
    ) + " -W %h:%p"  # fmt: skip
    r = private_pod.tpuctl("exec", "--", "hostname", proxy=command)
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.splitlines()) == 3
    r = private_pod.tpuctl("ssh", "--worker", "1", "--", "hostname", proxy=command)
    assert r.returncode == 0 and r.stdout.strip() == pod.fleet.workers[1].hostname, r.stderr


def test_an_unreachable_jump_host_leaves_every_worker_unknown_and_a_bad_one_is_one_line(private_pod: PrivatePod):
    closed = f"root@127.0.0.1:{free_port()}"
    r = private_pod.tpuctl("check", proxy=closed, env={"TPUCTL_CONNECT_TIMEOUT": "2"})
    assert r.returncode == 3, r.stderr  # unknown, never free
    assert r.stderr.count(f"the jump host {closed} is unreachable") == 3 and "free" not in r.stdout
    for bad in ("root@host:99999", "a@b@c"):  # as the flag every fleet command takes (over the env's good one)
        r = private_pod.tpuctl("exec", "--ssh-proxy", bad, "--", "true")
        assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
        assert f"ssh_proxy {bad!r} is neither a jump host nor a command" in r.stderr
