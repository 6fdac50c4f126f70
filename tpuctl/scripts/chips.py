"""Runs ON A WORKER (as root), sent by tpuctl.remote.chips_command: who holds the TPU chips, and kill/clean.

Stdlib only, Python 3.8+. Prints one JSON document on stdout. Files are matched by (device, inode), never by
path, so the answer is right across mount namespaces and symlinks. A lockfile existing does not mean busy:
only a process holding it (a lock in /proc/locks, or the file open) does.
"""

import contextlib
import glob
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import time


def file_id(path):
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def proc_info(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        uid = os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return None
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = str(uid)
    return {"pid": pid, "user": user, "cmd": cmd[:300]}


def pids():
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def open_files_by_id(wanted):
    """{file id: set of pids that have it open} for the file ids in `wanted`."""
    found = {}
    if not wanted:  # no device or lockfile here: nothing to look for in every process's fds
        return found
    for pid in pids():
        fd_dir = f"/proc/{pid}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in fds:
            fid = file_id(os.path.join(fd_dir, fd))
            if fid in wanted:
                found.setdefault(fid, set()).add(pid)
    return found


def locked_by_id():
    """{(dev, inode): set of pids} from /proc/locks (POSIX/flock locks; OFD locks have pid -1)."""
    locks = {}
    try:
        with open("/proc/locks") as f:
            lines = f.readlines()
    except OSError:
        return locks
    for line in lines:
        parts = line.split()
        if "->" in parts:  # a waiter, not a holder
            continue
        try:
            pid = int(parts[4])
            major, minor, inode = parts[5].split(":")
            dev = os.makedev(int(major, 16), int(minor, 16))
            locks.setdefault((dev, int(inode)), set()).add(pid)
        except (IndexError, ValueError):
            continue
    return locks


def expand(globs):
    paths = []
    for pattern in globs:
        for p in sorted(glob.glob(pattern)):
            if p not in paths:
                paths.append(p)
    return paths


def inspect(args):
    devices = [p for p in expand(args["device_globs"]) if not os.path.isdir(p)]
    lockfiles = [p for p in expand(args["lockfile_globs"]) if os.path.isfile(p)]
    ids = {}
    for p in devices + lockfiles:
        fid = file_id(p)
        if fid is not None:
            ids[fid] = p
    holders_by_id = open_files_by_id(set(ids))
    for fid, lock_pids in locked_by_id().items():
        if fid in ids:
            holders_by_id.setdefault(fid, set()).update(p for p in lock_pids if p > 0)

    def holders_of(path):
        return sorted(holders_by_id.get(file_id(path), set()))

    device_holders = sorted({pid for p in devices for pid in holders_of(p)})
    locks = [{"path": p, "holders": holders_of(p)} for p in lockfiles]
    lock_holders = sorted({pid for lock in locks for pid in lock["holders"]})
    holder_pids = sorted(set(device_holders) | set(lock_holders))
    holders = [info for info in (proc_info(pid) for pid in holder_pids) if info]
    return {
        "devices": devices,
        "lockfiles": locks,
        "holders": holders,
        "state": "busy" if holders else "free",
    }


def protected_pids():
    """This script, its ancestors (the shell, sudo, sshd session) and every sshd: never to be killed."""
    keep, pid = {1}, os.getpid()
    while pid > 1:
        keep.add(pid)
        try:
            with open(f"/proc/{pid}/stat") as f:
                pid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    for p in pids():
        try:
            with open(f"/proc/{p}/comm") as f:
                if f.read().strip() in ("sshd", "sshd-session"):
                    keep.add(p)
        except OSError:
            pass
    return keep


def tmux_sessions(prefix):
    """[(socket, session)] of tpuctl's tmux sessions, across the users' default tmux servers."""
    found = []
    sockets = glob.glob("/tmp/tmux-*/*")
    for sock in sockets:
        try:
            out = subprocess.run(
                ["tmux", "-S", sock, "list-sessions", "-F", "#{session_name}"],
                capture_output=True,
                text=True,
                timeout=10,
                check=False,
            ).stdout
        except (OSError, subprocess.TimeoutExpired):
            continue
        found += [(sock, s) for s in out.split() if s.startswith(prefix)]
    return found


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_gone(pids_, seconds):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not [p for p in pids_ if alive(p)]:
            return []
        time.sleep(0.05)
    return [p for p in pids_ if alive(p)]


def remove_free_lockfiles(state, dry_run):
    removed = []
    for lock in state["lockfiles"]:
        if lock["holders"]:
            continue
        if not dry_run:
            try:
                os.unlink(lock["path"])
            except OSError:
                continue
        removed.append(lock["path"])
    return removed


def login_uid():
    """The uid of the user tpuctl logged in as: sudo's caller when this runs through sudo, else our own."""
    try:
        return int(os.environ["SUDO_UID"])
    except (KeyError, ValueError):
        return os.getuid()


def is_python(pid):
    """Whether the process is a Python interpreter, by its name or its argv[0] (a venv's python, a script whose
    shebang runs one): what `pkill -f python` in tpu_command.sh meant to hit, without matching arguments."""
    try:
        with open(f"/proc/{pid}/comm") as f:
            comm = f.read().strip()
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv0 = f.read().split(b"\0")[0].decode(errors="replace")
    except OSError:
        return False
    return "python" in comm or "python" in os.path.basename(argv0)


def mount_namespace(pid):
    try:
        return os.readlink(f"/proc/{pid}/ns/mnt")
    except OSError:
        return None


def pythons_of(uid, keep):
    """Every live Python process of `uid` on this machine, but none in `keep` (this script and its ancestors) and
    none in a container (another mount namespace than ours: a container's processes are its own business)."""
    ours, found = mount_namespace("self"), []
    for pid in pids():
        try:
            owner = os.stat(f"/proc/{pid}").st_uid
        except OSError:
            continue
        if owner != uid or pid in keep or mount_namespace(pid) != ours:
            continue
        if alive(pid) and is_python(pid):
            info = proc_info(pid)
            if info:
                found.append(info)
    return found


def kill(args):
    dry_run = args.get("dry_run", False)
    sessions = tmux_sessions(args["session_prefix"])
    if not dry_run:
        for sock, name in sessions:
            subprocess.run(["tmux", "-S", sock, "kill-session", "-t", "=" + name], capture_output=True, check=False)
        if sessions:
            time.sleep(0.2)  # let the session's processes take their SIGHUP before we look again
    state = inspect(args)
    keep = protected_pids()
    targets = [h for h in state["holders"] if h["pid"] not in keep]
    if args.get("all_python"):
        chosen = {h["pid"] for h in targets}
        targets += [p for p in pythons_of(login_uid(), keep) if p["pid"] not in chosen]
    survivors = []
    if not dry_run and targets:
        for h in targets:
            with contextlib.suppress(ProcessLookupError):
                os.kill(h["pid"], signal.SIGTERM)
        left = wait_gone([h["pid"] for h in targets], args.get("grace", 10.0))
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        survivors = wait_gone(left, 5.0)
        for h in targets:
            h["signal"] = "KILL" if h["pid"] in left else "TERM"
        state = inspect(args)  # lockfiles are removed only once their holders are gone
    return {
        "dry_run": dry_run,
        "sessions": [name for _, name in sessions],
        "killed": targets,
        "survivors": survivors,
        "lockfiles_removed": remove_free_lockfiles(state, dry_run),
        "state": state["state"],
    }


def tree_size(path):
    if os.path.islink(path) or not os.path.isdir(path):
        try:
            return os.lstat(path).st_size
        except OSError:
            return 0
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total


def clean(args):
    dry_run = args.get("dry_run", False)
    state = inspect(args)
    removed, freed = [], 0
    # The whole log dir goes: one left behind by another user breaks later runs (permissions); libtpu recreates it.
    targets = expand([args["log_dir"]] + args["crash_globs"])
    for path in targets:
        size = tree_size(path)
        if not dry_run:
            try:
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path)
                else:
                    os.unlink(path)
            except OSError:
                continue
        removed.append(path)
        freed += size
    return {
        "dry_run": dry_run,
        "removed": removed,
        "freed_bytes": freed,
        "lockfiles_removed": remove_free_lockfiles(state, dry_run),
        "state": state["state"],
    }


def main():
    args = json.loads(sys.argv[1])
    action = {"check": inspect, "kill": kill, "clean": clean}[args["action"]]
    json.dump(action(args), sys.stdout)
    sys.stdout.write("\n")


main()
