"""Day one, timed: from a fresh HOME (no key, no known_hosts, no recorded addresses) to a successful
`tpuctl exec -- hostname` on every worker of a stand-in pod whose workers take keys only from the API (issue 31).

tpuctl asks the project's metadata whether OS Login is on (the Compute Engine API; "oslogin" rows: on project-wide),
makes the key, adds it (the node's ssh-keys metadata through UpdateNode, or the OS Login profile), waits until
every worker's sshd accepts it, then runs the command. The workers' guest agent (tests/standins/guest_agent.py)
serves a key only `--agent-delay` seconds after it first sees it: 0 shows tpuctl's own cost, a few seconds shows how
closely its polling follows a real agent's lag. The second figure of each row is the same command right after, with
the key in place (what every later command costs), from the same HOME.

    .venv/bin/python benchmarks/bench_day_one.py --workers 32 --repeat 3 --agent-delay 0,5 \
        --markdown benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the stand-ins live in tests/standins

from standins.compute_api import FakeComputeApi  # noqa: E402
from standins.guest_agent import GuestAgent, metadata_keys  # noqa: E402
from standins.oslogin_api import FakeOsLoginApi, posix_name  # noqa: E402
from standins.pod import NODE, PROJECT, ZONE, make_pod  # noqa: E402
from standins.sshfleet import start_fleet  # noqa: E402
from standins.tpu_api import FakeTpuApi  # noqa: E402

SAFE_ENV = {"NO_GCE_CHECK": "true", "GCE_METADATA_HOST": "127.0.0.1:9", "GCE_METADATA_IP": "127.0.0.1:9"}
USER, ACCOUNT = "jane", "jane@example.com"
OTHERS = "bob:ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBobsOwnKeyBobsOwnKeyBobsOwnKeyBobsOwnKey12 bob"


def run(pod, env: dict[str, str], workers: list) -> float:
    start = time.monotonic()
    r = subprocess.run(
        [pod.tpuctl_path, "exec", "--", "hostname"],
        env={**pod.env, **env},
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )
    seconds = time.monotonic() - start
    expected = sorted(f"[w{w.index}] {w.hostname}" for w in workers)
    if r.returncode != 0 or sorted(r.stdout.splitlines()) != expected:
        raise SystemExit(f"tpuctl exec failed (exit {r.returncode}):\n{r.stderr[-2000:]}")
    return seconds


def measure(mode: str, n: int, delay: float, repeat: int, work: Path) -> tuple[list[float], list[float]]:
    firsts, seconds = [], []
    with FakeTpuApi() as api, FakeOsLoginApi() as oslogin, FakeComputeApi() as compute:
        keys_for = oslogin.keys_of_user if mode == "oslogin" else metadata_keys(api, PROJECT, ZONE, NODE)
        with GuestAgent(keys_for, users=(USER, posix_name(ACCOUNT)), delay_s=delay) as agent:
            fleet = start_fleet(n, agent=agent)
            try:
                for i in range(repeat):
                    home = work / f"home-{mode}-{delay:g}-{i}"
                    pod = make_pod(fleet, api, home)  # the node afresh: no key of ours in its metadata
                    # OS Login turned on project-wide, as organisations do: tpuctl asks the Compute Engine API
                    compute.projects[PROJECT] = {"enable-oslogin": "TRUE"} if mode == "oslogin" else {}
                    oslogin.profiles.clear()
                    api.nodes[(PROJECT, ZONE, NODE)]["metadata"] = {"ssh-keys": OTHERS}
                    env = {
                        **SAFE_ENV,
                        "TPUCTL_SSH_KEY": str(home / ".ssh" / "google_compute_engine"),
                        "TPUCTL_SSH_KEYS": "auto",
                        "TPUCTL_COMPUTE_ENDPOINT": compute.endpoint,
                        "TPUCTL_SSH_USER": "",
                        "USER": USER,
                        "TPUCTL_ACCOUNT": ACCOUNT,
                        "TPUCTL_OSLOGIN_ENDPOINT": oslogin.endpoint,
                    }
                    firsts.append(run(pod, env, fleet.workers))
                    seconds.append(run(pod, env, fleet.workers))
                    shutil.rmtree(home, ignore_errors=True)
            finally:
                fleet.close()
    return firsts, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--agent-delay", default="0,5", help="the guest agent's delays to measure, seconds")
    parser.add_argument("--modes", default="metadata,oslogin")
    parser.add_argument("--markdown", type=Path, help="append the results to this file")
    args = parser.parse_args()
    for name, value in SAFE_ENV.items():
        os.environ[name] = value
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-day-one-", dir="/var/tmp") as work:
        for mode in args.modes.split(","):
            for delay in [float(d) for d in args.agent_delay.split(",")]:
                firsts, seconds = measure(mode, args.workers, delay, args.repeat, Path(work))
                row = (mode, delay, statistics.median(firsts), min(firsts), max(firsts), statistics.median(seconds))
                rows.append(row)
                print(
                    f"{mode:9} agent delay {delay:4.1f} s: fresh HOME -> exec {row[2]:.2f} s median "
                    f"({row[3]:.2f}-{row[4]:.2f}), then {row[5]:.2f} s",
                    flush=True,
                )
    if args.markdown:
        cpu = next(
            (
                line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")
            ),
            platform.machine(),
        )
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M")
        lines = [
            f"\n## {stamp} — issue 31: day one, fresh HOME to `tpuctl exec -- hostname` on {args.workers} workers,"
            f" {os.cpu_count()} × {cpu}, Python {platform.python_version()}\n",
            f"`{' '.join(['.venv/bin/python', *sys.argv])}`: median of {args.repeat} (min-max); the stand-in workers"
            " take keys only through the guest-agent stand-in, which serves a new key after the delay given.\n",
            "| keys through | agent delay | fresh HOME -> exec done | the next exec |",
            "|---|---|---|---|",
            *(f"| {m} | {d:g} s | {med:.2f} s ({lo:.2f}-{hi:.2f}) | {nxt:.2f} s |" for m, d, med, lo, hi, nxt in rows),
        ]
        with args.markdown.open("a") as out:
            out.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
