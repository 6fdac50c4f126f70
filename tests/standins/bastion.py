"""A pod network out of this machine's reach, and a bastion into it: workers with internal addresses only, as on
projects whose TPUs get no external IPs.

    with private_network() as net:
        workers = start_fleet(4, network=net.network)   # sshds inside the namespace, at 127.A.B.x there
        bastion = start_bastion(net, workers)           # an sshd inside it too, listening on net.bastion_ip
        # ssh root@<worker ip> fails from here (this namespace's loopback has no such sshd); through the
        # bastion (ProxyJump root@net.bastion_ip:port) it works.

The namespace (`ip netns add`) gets a veth pair: this machine's end at `host_ip`, the namespace's at `bastion_ip`
(a /30 of 10.250.0.0/16 of its own), and its own loopback, where the workers listen. Nothing is routed beyond the
pair, so traffic never leaves this machine; the workers' 127.x addresses, asked from here, reach this machine's
loopback, where nothing listens on them.
"""

from __future__ import annotations

import contextlib
import secrets
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass

from standins.sshfleet import Network, SshFleet, start_fleet


@dataclass(frozen=True)
class PrivateNetwork:
    name: str  # the network namespace
    host_ip: str  # this machine's end of the veth pair
    bastion_ip: str  # the namespace's end: where a bastion listens

    @property
    def network(self) -> Network:
        return Network(netns=self.name)


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@contextlib.contextmanager
def private_network() -> Iterator[PrivateNetwork]:
    """A fresh network namespace linked to this one by a veth pair; removed on exit (close the fleets in it
    first: a namespace lives on while processes are in it)."""
    tag = secrets.token_hex(3)
    subnet = secrets.randbelow(256)
    net = PrivateNetwork(f"tpuctl-pod-{tag}", f"10.250.{subnet}.1", f"10.250.{subnet}.2")
    outside, inside = f"tvh{tag}", f"tvp{tag}"  # interface names: at most 15 characters
    _ip("netns", "add", net.name)
    try:
        _ip("link", "add", outside, "type", "veth", "peer", "name", inside)
        _ip("link", "set", inside, "netns", net.name)
        _ip("addr", "add", f"{net.host_ip}/30", "dev", outside)
        _ip("link", "set", outside, "up")
        for args in (("addr", "add", f"{net.bastion_ip}/30", "dev", inside), ("link", "set", inside, "up")):
            _ip("-n", net.name, *args)
        _ip("-n", net.name, "link", "set", "lo", "up")
        yield net
    finally:
        with contextlib.suppress(subprocess.CalledProcessError):
            _ip("link", "delete", outside)  # takes its peer with it
        _ip("netns", "delete", net.name)


def start_bastion(net: PrivateNetwork, workers: SshFleet) -> SshFleet:
    """A one-VM fleet inside the namespace listening on its veth address (on the workers' port, accepting the same
    key), reachable from here: the jump host into the pod network."""
    return start_fleet(1, like=workers, network=net.network, ips=[net.bastion_ip])
