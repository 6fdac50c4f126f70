"""A stand-in TPU pod: an sshd fleet registered as a node in the local Cloud TPU API, and a way to run tpuctl
against it (tpuctl's console script in a process of its own, started warm: standins.warm; with an environment of the
test's own)."""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from standins import coordinator_port, warm
from standins.sshfleet import SshFleet
from standins.tpu_api import FakeTpuApi

TPUCTL = warm.TPUCTL
PROJECT, ZONE, NODE = "proj", "zone-a", "pod"
RUN_RECIPE = "tests/tiny_run.toml"  # tiny_synthetic.toml's first stage alone, written into a checkout by `project`


@dataclass
class Pod:
    fleet: SshFleet
    api: FakeTpuApi
    home: Path  # HOME of the tpuctl user: its config, cache (sync mirror) and known_hosts live here
    # its own (standins.coordinator_port): pods of parallel tests share this machine's ports
    coordinator_port: int = field(default_factory=coordinator_port, kw_only=True)

    tpuctl_path = TPUCTL

    @property
    def known_hosts(self) -> Path:
        return self.home / "known_hosts"

    @property
    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "HOME": str(self.home),
            "XDG_CACHE_HOME": str(self.home / ".cache"),
            "TPUCTL_API_ENDPOINT": self.api.endpoint,
            "TPUCTL_PROJECT": PROJECT,
            "TPUCTL_ZONE": ZONE,
            "TPUCTL_TPU": NODE,
            "TPUCTL_SSH_USER": self.fleet.user,
            "TPUCTL_SSH_KEY": str(self.fleet.key_path),
            # What the stand-in workers share (each has its own /root and /tmp), and /tmp/w: the workdir of the tests
            # about something else (chips, code identity, scale), whose trainers never read each other's checkpoints.
            "TPUCTL_SHARED_DIRS": "/var/tmp,/tmp/w",
            # The node's ssh-keys metadata is how these workers are reached; with "auto" tpuctl would first ask the
            # Compute Engine API whether the project turns OS Login on (test_access does, against its stand-in).
            "TPUCTL_SSH_KEYS": "metadata",
            "TPUCTL_SSH_PORT": str(self.fleet.port),
            "TPUCTL_COORDINATOR_PORT": str(self.coordinator_port),
            "TPUCTL_KNOWN_HOSTS": str(self.known_hosts),
            "TPUCTL_CONNECT_TIMEOUT": "5",
            "TPUCTL_API_TIMEOUT": "10",
            "TPUCTL_API_POLL": "0.1",  # the stand-in API creates and deletes in a fraction of a second, not minutes
            "XDG_STATE_HOME": str(self.home / ".local" / "state"),  # the run registry
        }

    def tpuctl(
        self,
        *args: str,
        env: dict[str, str] | None = None,
        timeout: float = 60,
        input: str | None = None,
        cwd: Path | None = None,
    ) -> subprocess.CompletedProcess[str]:
        return warm.tpuctl(list(args), env={**self.env, **(env or {})}, cwd=cwd, timeout=timeout, input=input)


def make_pod(fleet: SshFleet, api: FakeTpuApi, home: Path) -> Pod:
    home.mkdir(parents=True, exist_ok=True)
    api.add_fleet_node(PROJECT, ZONE, NODE, fleet)
    return Pod(fleet=fleet, api=api, home=home)
