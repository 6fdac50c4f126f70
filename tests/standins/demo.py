"""The local demo: a 4-worker stand-in pod on this machine (real sshd workers, a local Cloud TPU API) and the
real tpuctl driving it: doctor, list, sync, exec, check, kill, clean-logs, then a run: run, status, logs, stop. Run
by `bash .ci/demo-fleet` (needs root; installs tpuctl alone).

It prints each command before running it, exactly as a user would type it against a real pod. The one stand-in
besides the pod is the trainer: a shell script in each worker's venv (what `tpuctl prepare` would make) that prints
the trainer's progress lines and, on SIGTERM, says it saved a checkpoint, as the real one does.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, so `standins` imports as a package

from standins.pod import Pod, make_pod
from standins.sshfleet import start_fleet
from standins.tpu_api import FakeTpuApi

REPO = Path(__file__).resolve().parents[2]
# A stand-in "training job": holds the worker's (stand-in) TPU device open, as libtpu does.
FAKE_JOB = "import time; f = open('/tmp/dev/accel0', 'rb'); time.sleep(3600)"
# The stand-in trainer (REMOTE_DIR/.venv/bin/python): the trainer's progress lines; SIGTERM: saved, exits.
STAND_IN_TRAINER = """#!/bin/sh
trap 'echo "tiny: preempted, checkpoint saved"; exit 0' TERM
i=0
while :; do i=$((i + 1)); echo "tiny $i  loss 2.5 img_per_s 100.0"; sleep 0.5; done
"""


def step(pod: Pod, *args: str, cwd: Path | None = None) -> int:
    print(f"\n$ tpuctl {shlex.join(args)}", flush=True)
    return subprocess.run([sys.executable, "-m", "tpuctl", *args], env=pod.env, cwd=cwd, check=False).returncode


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workers", type=int, default=4)
    args = parser.parse_args()
    # Never let google-auth look for a metadata server off this machine.
    os.environ.update(NO_GCE_CHECK="true", GCE_METADATA_HOST="127.0.0.1:9", GCE_METADATA_IP="127.0.0.1:9")
    with (
        tempfile.TemporaryDirectory(prefix="tpuctl-demo-") as home,
        start_fleet(args.workers) as fleet,
        FakeTpuApi() as api,
    ):
        pod = make_pod(fleet, api, Path(home))
        os.environ["TPUCTL_DEVICE_GLOBS"] = "/tmp/dev/accel*"
        for worker in fleet.workers:
            (worker.path("/tmp/dev")).mkdir()
            for i in range(4):
                worker.path(f"/tmp/dev/accel{i}").write_bytes(b"")
            worker.path("/tmp/tpu_logs").mkdir()  # what libtpu leaves behind
            worker.path("/tmp/tpu_logs/tpu_driver.INFO").write_bytes(b"I1126 log line\n" * 5000)
        print(f"A stand-in pod: {args.workers} sshd workers on {', '.join(fleet.ips)}, port {fleet.port};")
        print(f"the Cloud TPU API at {api.endpoint} (project proj, zone zone-a, node pod).")
        codes = [
            step(pod, "list"),
            step(pod, "sync", str(REPO), "--exclude", ".venv"),
            step(pod, "exec", "--", "hostname; ls ~/tpuctl | head -3"),
            step(pod, "doctor"),
        ]
        fleet.workers[-1].spawn(["python3", "-c", FAKE_JOB])
        time.sleep(0.3)
        print(f"\n(a stand-in training job now holds /tmp/dev/accel0 on worker {len(fleet.workers) - 1})")
        busy = step(pod, "check")
        codes += [step(pod, "kill", "--yes", "--grace", "2"), step(pod, "check"), step(pod, "clean-logs")]
        for worker in fleet.workers:  # what `tpuctl prepare` would make: the venv's python (here, the stand-in)
            python = worker.path("/root/tpuctl/.venv/bin/python")
            python.parent.mkdir(parents=True, exist_ok=True)
            python.write_text(STAND_IN_TRAINER)
            python.chmod(0o755)
        print("\n(each worker's venv: a stand-in trainer printing progress lines; `tpuctl prepare` makes the real one)")
        with tempfile.TemporaryDirectory(prefix="tpuctl-demo-run-", dir="/var/tmp") as workdir:  # all workers see it
            run = ["run", "recipes/tiny.toml", "--name", "demo", "--no-sync", "--workdir", workdir]
            codes += [step(pod, *run, cwd=REPO)]
            time.sleep(2)
            codes += [step(pod, "status", "demo"), step(pod, "logs", "demo", "-n", "3"), step(pod, "stop", "demo")]
    ok = busy == 1 and not any(codes)
    print("\nDemo finished: every command did what it says." if ok else "\nDemo FAILED: see the output above.")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
