"""check / kill / clean-logs against real processes holding (stand-in) TPU device files on real workers.

The chips themselves are the one thing that cannot exist here: each worker gets device files in its own /tmp
(TPUCTL_DEVICE_GLOBS points at them), and real processes hold them open or hold libtpu's lock, as libtpu does.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from standins import wait_until

HOLD_DEVICE = "import sys, time; f = open(sys.argv[1], 'rb'); time.sleep(600)"
HOLD_LOCK = "import fcntl, sys, time; f = open(sys.argv[1], 'a'); fcntl.lockf(f, fcntl.LOCK_EX); time.sleep(600)"
IGNORES_TERM = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"
# A job that ignores SIGTERM, as a wedged trainer might.
STUBBORN = (
    "import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); f = open(sys.argv[1], 'rb'); "
    "time.sleep(600)"
)


def devices(worker, n=4):
    d = worker.path("/tmp/dev")
    d.mkdir(exist_ok=True)
    for i in range(n):
        (d / f"accel{i}").write_bytes(b"")
    return "/tmp/dev/accel*"


def locked_by(pid):
    with open("/proc/locks") as f:
        return f" {pid} " in f.read()


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_check_finds_the_process_holding_a_device(pod4):
    globs = [devices(w) for w in pod4.fleet.workers].pop()
    holder = pod4.fleet.workers[2].spawn(["python3", "-c", HOLD_DEVICE, "/tmp/dev/accel1"])
    wait_until(lambda: holds(holder, "accel1"), 5, "the holder opened accel1")
    r = pod4.tpuctl("check", "--json", env={"TPUCTL_DEVICE_GLOBS": globs})
    assert r.returncode == 1, r.stderr
    data = json.loads(r.stdout)
    assert [d["state"] for d in data] == ["free", "free", "busy", "free"]
    (h,) = data[2]["holders"]
    assert h["pid"] == holder and h["user"] == "root" and "accel1" in h["cmd"]
    assert set(data[0]) == {"worker", "ip", "state", "holders", "lockfiles", "error"}
    assert data[0]["ip"] == pod4.fleet.workers[0].ip
    # the table names the holder too
    r = pod4.tpuctl("check", env={"TPUCTL_DEVICE_GLOBS": globs})
    assert r.returncode == 1 and str(holder) in r.stdout and "busy" in r.stdout


def _fds(pid):
    try:
        return os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return []


def holds(pid, name: str) -> bool:
    """Whether process `pid` has a file whose path contains `name` open. An fd listed may close before its link is
    read (the interpreter is still starting): that one is skipped, not an error."""
    for fd in _fds(pid):
        try:
            if name in os.readlink(f"/proc/{pid}/fd/{fd}"):
                return True
        except OSError:
            continue
    return False


def test_a_lockfile_alone_is_not_busy_but_a_held_lock_is(pod):
    w0, w1 = pod.fleet.workers
    w0.path("/tmp/libtpu_lockfile").write_text("")  # left behind by a dead process
    w1.path("/tmp/libtpu_lockfile").write_text("")
    holder = w1.spawn(["python3", "-c", HOLD_LOCK, "/tmp/libtpu_lockfile"])
    wait_until(lambda: locked_by(holder), 5, "the holder locked its file")
    r = pod.tpuctl("check", "--json", env={"TPUCTL_DEVICE_GLOBS": "/tmp/dev/none*"})
    data = json.loads(r.stdout)
    assert [d["state"] for d in data] == ["free", "busy"]
    assert [h["pid"] for h in data[1]["holders"]] == [holder]
    assert data[0]["lockfiles"] == [{"path": "/tmp/libtpu_lockfile", "held_by": []}]
    assert data[1]["lockfiles"] == [{"path": "/tmp/libtpu_lockfile", "held_by": [holder]}]
    assert r.returncode == 1
    table = pod.tpuctl("check", env={"TPUCTL_DEVICE_GLOBS": "/tmp/dev/none*"}).stdout
    assert "/tmp/libtpu_lockfile (stale)" in table and "/tmp/libtpu_lockfile (held)" in table


def test_an_unreachable_worker_is_unknown_never_free(pod):
    pod.fleet.workers[1].stop_sshd()
    r = pod.tpuctl("check", "--json")
    assert r.returncode == 3  # "unknown", its own code: neither free (0) nor bad input (2)
    data = json.loads(r.stdout)
    assert [d["state"] for d in data] == ["free", "unknown"]
    assert "connection refused" in data[1]["error"]


def test_kill_stops_holders_and_only_then_removes_their_lockfiles(pod):
    w0, w1 = pod.fleet.workers
    globs = devices(w0)
    devices(w1)
    for w in (w0, w1):
        w.path("/tmp/libtpu_lockfile").write_text("")
    polite = w0.spawn(["python3", "-c", HOLD_DEVICE, "/tmp/dev/accel0"])
    locker = w0.spawn(["python3", "-c", HOLD_LOCK, "/tmp/libtpu_lockfile"])
    stubborn = w1.spawn(["python3", "-c", STUBBORN, "/tmp/dev/accel2"])
    bystander = w1.spawn(["sleep", "600"])  # holds nothing: must survive
    wait_until(lambda: locked_by(locker), 5, "the locker locked its file")
    wait_until(lambda: len(_fds(stubborn)) >= 4, 5, "the stubborn holder opened its devices")

    dry = pod.tpuctl("kill", "--dry-run", "--json", env={"TPUCTL_DEVICE_GLOBS": globs})
    assert dry.returncode == 0, dry.stderr
    planned = json.loads(dry.stdout)
    assert sorted(h["pid"] for h in planned[0]["killed"]) == sorted([polite, locker])
    assert [h["pid"] for h in planned[1]["killed"]] == [stubborn]
    assert all(alive(p) for p in (polite, locker, stubborn))
    assert w0.path("/tmp/libtpu_lockfile").exists()  # held: a dry run removes nothing anyway

    r = pod.tpuctl("kill", "--yes", "--grace", "1", "--json", env={"TPUCTL_DEVICE_GLOBS": globs})
    assert r.returncode == 0, r.stderr
    done = json.loads(r.stdout)
    assert {h["pid"]: h["signal"] for h in done[0]["killed"]} == {polite: "TERM", locker: "TERM"}
    assert {h["pid"]: h["signal"] for h in done[1]["killed"]} == {stubborn: "KILL"}
    assert done[0]["lockfiles_removed"] == ["/tmp/libtpu_lockfile"]
    assert done[1]["lockfiles_removed"] == ["/tmp/libtpu_lockfile"]
    assert not any(alive(p) for p in (polite, locker, stubborn))
    assert alive(bystander)
    assert not w0.path("/tmp/libtpu_lockfile").exists()
    assert pod.tpuctl("check", env={"TPUCTL_DEVICE_GLOBS": globs}).returncode == 0


def test_kill_stops_tpuctl_tmux_sessions_only(pod):
    w0 = pod.fleet.workers[0]
    ours = w0.spawn(["tmux", "new-session", "-d", "-s", "tpuctl-run1", "sleep 600"])
    theirs = w0.spawn(["tmux", "new-session", "-d", "-s", "notebook", "sleep 600"])
    for pid in (ours, theirs):
        wait_until(lambda pid=pid: not alive(pid), 5, f"{pid} ended")  # `tmux new -d` returns once the server has it
    sessions = "tmux list-sessions -F '#{session_name}'"
    assert pod.tpuctl("ssh", "--", sessions).stdout.split() == ["notebook", "tpuctl-run1"]
    r = pod.tpuctl("kill", "--yes", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)[0]["sessions"] == ["tpuctl-run1"]
    assert pod.tpuctl("ssh", "--", sessions).stdout.split() == ["notebook"]


def test_kill_all_python_stops_the_users_pythons_on_the_workers_and_nothing_else(pod):
    """tpu_command.sh's `pkill -f python`, as an option: every Python process of the SSH user on each worker (a
    venv's python too), never tpuctl's own, never a process that is not Python, never one outside the worker."""
    w0, w1 = pod.fleet.workers
    venv = w0.path("/root/venv/bin")
    venv.mkdir(parents=True)
    (venv / "python").symlink_to("/usr/bin/python3")  # the workers run the system Python
    worker_pythons = [
        w0.spawn(["python3", "-c", "import time; time.sleep(600)"]),
        w0.spawn(["/root/venv/bin/python", "-c", "import time; time.sleep(600)"]),
        w1.spawn(
            ["python3", "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"]
        ),
    ]
    not_python = w0.spawn(["sleep", "600"])
    here = subprocess.Popen(["python3", "-c", "import time; time.sleep(600)"])  # this machine: not a worker
    for pid in worker_pythons:  # past nsenter's exec
        wait_until(lambda pid=pid: "python" in Path(f"/proc/{pid}/comm").read_text(), 5, f"{pid} runs python")
    try:
        r = pod.tpuctl("kill", "--all-python")
        assert r.returncode == 2 and "every Python process of" in r.stderr and "--yes" in r.stderr
        dry = json.loads(pod.tpuctl("kill", "--all-python", "--dry-run", "--json").stdout)
        assert sorted(k["pid"] for d in dry for k in d["killed"]) == sorted(worker_pythons)
        assert all(alive(pid) for pid in worker_pythons)  # a dry run kills nothing
        r = pod.tpuctl("kill", "--all-python", "--grace", "1", "--yes", "--json")
        assert r.returncode == 0, r.stdout + r.stderr  # tpuctl's own python on the workers lived to answer
        data = json.loads(r.stdout)
        assert [k["signal"] for k in data[1]["killed"]] == ["KILL"]  # ignored TERM: killed after --grace
        wait_until(lambda: not any(alive(pid) for pid in worker_pythons), 5, "the workers' pythons ended")
        assert alive(not_python) and here.poll() is None
    finally:
        here.kill()
        here.wait()


def test_kill_without_a_terminal_needs_yes(pod):
    r = pod.tpuctl("kill")
    assert r.returncode == 2
    assert "without confirmation" in r.stderr and "--yes" in r.stderr


def test_clean_logs_reports_freed_bytes_and_keeps_held_locks(pod):
    w0, w1 = pod.fleet.workers
    logs = w0.path("/tmp/tpu_logs")
    logs.mkdir()
    (logs / "tpu_driver.INFO").write_bytes(b"x" * 10_000)
    (logs / "sub").mkdir()
    (logs / "sub" / "trace").write_bytes(b"y" * 2_000)
    w0.path("/tmp/core.1234").write_bytes(b"z" * 500)
    w0.path("/var/crash/_usr_bin_python3.0.crash").write_bytes(b"c" * 300)  # the worker's own /var/crash
    w0.path("/var/crash/202612021200").mkdir()  # a kdump directory
    w0.path("/var/crash/202612021200/dmesg").write_bytes(b"d" * 200)
    w0.path("/tmp/libtpu_lockfile").write_text("")
    w1.path("/tmp/libtpu_lockfile").write_text("")
    locker = w1.spawn(["python3", "-c", HOLD_LOCK, "/tmp/libtpu_lockfile"])
    wait_until(lambda: locked_by(locker), 5, "the locker locked its file")

    dry = json.loads(pod.tpuctl("clean-logs", "--dry-run", "--json").stdout)
    assert dry[0]["freed_bytes"] == 13_000 and logs.exists()

    r = pod.tpuctl("clean-logs", "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data[0]["freed_bytes"] == 13_000
    crash = ["/var/crash/202612021200", "/var/crash/_usr_bin_python3.0.crash"]
    assert sorted(data[0]["removed"]) == ["/tmp/core.1234", "/tmp/tpu_logs", *crash]
    assert data[0]["lockfiles_removed"] == ["/tmp/libtpu_lockfile"]
    assert data[1]["lockfiles_removed"] == []  # held by a live process: left alone
    assert not logs.exists() and w1.path("/tmp/libtpu_lockfile").exists() and alive(locker)
    assert w0.path("/var/crash").is_dir() and not any(w0.path("/var/crash").iterdir())  # emptied, kept
    table = pod.tpuctl("clean-logs", "--dry-run")
    assert table.returncode == 0 and "would free" in table.stdout


def test_tables_show_worker_text_as_it_is(pod):
    """Command lines come from the workers: [brackets] in them are text, not rich markup."""
    w0 = pod.fleet.workers[0]
    globs = devices(w0)
    w0.path("/tmp/[bold]job.py").write_text(HOLD_DEVICE)
    holder = w0.spawn(["python3", "/tmp/[bold]job.py", "/tmp/dev/accel0"])
    wait_until(lambda: holds(holder, "accel0"), 5, "the holder opened accel0")
    r = pod.tpuctl("check", env={"TPUCTL_DEVICE_GLOBS": globs})
    assert r.returncode == 1
    assert f"{holder} root python3 /tmp/[bold]job.py /tmp/dev/accel0" in r.stdout
