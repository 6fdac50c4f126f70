"""Runs ON A WORKER, sent by tpuctl.remote.run_command: start, inspect or stop one training run in tmux.

Stdlib only, Python 3.8+. Prints one JSON document on stdout. A run on a worker is a tmux session running
`sh -c 'echo $$ > PID; exec env VARS TRAINER...'` whose output is tee'd to a log file, and whose exit status lands
in a file when the trainer ends (the session ends with it). The run directory keeps all three, so `status` can
tell "running", "exited N" and "gone without a trace" (killed with its shell) apart after the session is gone.
"""

import glob
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time

# A trainer log line: "STAGE STEP  loss 3.07  contrastive 2.98 ... img_per_s 435  eta 0m00s" (trainer.report).
LOG_LINE = re.compile(r"^(?P<stage>\S+) (?P<step>\d+)  loss (?P<loss>\S+)\s")
IMG_PER_S = re.compile(r"\bimg_per_s (\S+)")
TAIL_BYTES = 64 * 1024
KEEP_LOGS = 9  # logs of earlier starts of a run kept next to its current one (log.1 the latest)


def fail(message, code=3):
    json.dump({"error": message}, sys.stdout)
    sys.stdout.write("\n")
    sys.exit(code)


def expand(path):
    return os.path.abspath(os.path.expanduser(path))


def tmux(*argv):
    return subprocess.run(["tmux", *argv], capture_output=True, text=True, check=False)


def session_alive(session):
    return tmux("has-session", "-t", "=" + session).returncode == 0


def read(path):
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def pid_alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def trainer_pid(run_dir):
    """The trainer's pid from the run's pid file, if that process is still the trainer (pids get reused)."""
    text = read(os.path.join(run_dir, "pid"))
    if not text or not text.isdigit():
        return None
    pid = int(text)
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read()
    except OSError:
        return None
    return pid if b"trainer" in cmd and pid_alive(pid) else None


def start(args):
    if shutil.which("tmux") is None:
        fail("tmux is not installed on this worker: install it (apt install tmux)")
    run_dir = expand(args["run_dir"])
    cwd = expand(args["cwd"])
    python = args["argv"][0]
    if not os.path.isdir(cwd):
        fail(f"{cwd} does not exist: run `tpuctl sync` first")
    if os.sep in python and not os.access(os.path.join(cwd, python), os.X_OK):
        fail(f"{os.path.join(cwd, python)} does not exist: run `tpuctl prepare` first")
    if session_alive(args["session"]) or trainer_pid(run_dir):
        fail(f"run {args['name']!r} is already running on this worker: `tpuctl stop` it first, or pick another --name")
    env = dict(args["env"])
    if any(glob.glob(g) for g in args["device_globs"]):  # a TPU VM: JAX finds the other workers itself
        env = {k: v for k, v in env.items() if not k.startswith("TRAINER_") or k == "TRAINER_COMPILE_CACHE"}
    os.makedirs(run_dir, exist_ok=True)
    paths = {name: os.path.join(run_dir, name) for name in ("pid", "exit", "log")}
    for name in ("pid", "exit"):
        if os.path.exists(paths[name]):
            os.remove(paths[name])
    rotate(paths["log"])  # this start gets a log of its own: `logs` and `run --follow` show it alone
    trainer = ["env", *(f"{k}={v}" for k, v in sorted(env.items())), *args["argv"]]
    # The pane: the trainer writes its pid (exec keeps it), its output goes to the log too, its status to `exit`.
    pane = (
        f"cd {shlex.quote(cwd)} && {{ "
        f'sh -c \'echo $$ > "$0" && exec "$@"\' {shlex.quote(paths["pid"])} {shlex.join(trainer)} 2>&1; '
        f"echo $? > {shlex.quote(paths['exit'])}; }} | tee -a {shlex.quote(paths['log'])}"  # after the header
    )
    with open(paths["log"], "w") as f:
        when = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        f.write(f"==> tpuctl run {args['name']} started {when}: {shlex.join(trainer)}\n")
    result = tmux("new-session", "-d", "-s", args["session"], "-x", "200", "-y", "50", pane)
    if result.returncode != 0:
        fail(f"tmux new-session failed: {result.stderr.strip()[-200:]}")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and read(paths["pid"]) is None and read(paths["exit"]) is None:
        time.sleep(0.05)
    return {"session": args["session"], "pid": int(read(paths["pid"]) or 0) or None, "log": paths["log"]}


def rotate(log, keep=KEEP_LOGS):
    """log -> log.1 -> log.2 ... (the earlier starts of a run, the newest first); the oldest beyond `keep` goes."""
    for n in range(keep, 0, -1):
        older = f"{log}.{n - 1}" if n > 1 else log
        if os.path.exists(older):
            os.replace(older, f"{log}.{n}")


def last_progress(log_path):
    """(stage, step, loss, img/s) of the last trainer log line, and the log's last line."""
    try:
        with open(log_path, "rb") as f:
            f.seek(max(0, os.path.getsize(log_path) - TAIL_BYTES))
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return {}, ""
    progress = {}
    for line in reversed(lines):
        m = LOG_LINE.match(line)
        if m:
            speed = IMG_PER_S.search(line)
            progress = {
                "stage": m["stage"],
                "step": int(m["step"]),
                "loss": float(m["loss"]),
                "img_per_s": float(speed[1]) if speed else None,
            }
            break
    last = next((line for line in reversed(lines) if line.strip()), "")
    return progress, last[-300:]


def last_checkpoint(workdir):
    """'STAGE/STEP' of the newest finished orbax checkpoint in a workdir this worker can see, else None."""
    if "://" in workdir:
        return None
    found = glob.glob(os.path.join(expand(workdir), "*", "checkpoints", "*"))
    steps = [d for d in found if os.path.basename(d).isdigit()]
    if not steps:
        return None
    newest = max(steps, key=os.path.getmtime)
    parts = newest.split(os.sep)
    return f"{parts[-3]}/{parts[-1]}"


def finished(last_line):
    """The trainer's last words when every stage is trained (trainer/__main__.py); exit 0 otherwise means it stopped
    on SIGTERM with a checkpoint saved: resumable."""
    return last_line.startswith("done: every stage")


def status(args):
    run_dir = expand(args["run_dir"])
    pid = trainer_pid(run_dir)
    code = read(os.path.join(run_dir, "exit"))
    alive = session_alive(args["session"])
    progress, last = last_progress(os.path.join(run_dir, "log"))
    if pid is not None:
        state = "running"
    elif code is not None and code.lstrip("-").isdigit():
        state = "failed" if int(code) != 0 else "done" if finished(last) else "stopped"
    elif alive:
        state = "starting"
    elif os.path.isdir(run_dir):
        state = "dead"  # no trainer, no exit status: killed with its shell (kill -9, a reboot)
    else:
        state = "absent"
    return {
        "state": state,
        "session": alive,
        "pid": pid,
        "exit_code": int(code) if code and code.lstrip("-").isdigit() else None,
        "progress": progress,
        "checkpoint": last_checkpoint(args["workdir"]),
        "last_line": last,
    }


def stop(args):
    """SIGTERM the trainer (it checkpoints and exits), wait up to `grace`; then kill it and its session."""
    run_dir = expand(args["run_dir"])
    pid = trainer_pid(run_dir)
    if pid is not None:
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + args["grace"]
    while pid is not None and pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    killed = pid is not None and pid_alive(pid)
    if killed:
        os.kill(pid, signal.SIGKILL)
    # the pane's shell writes the exit status once the trainer is gone; give it a moment before ending the session
    deadline = time.monotonic() + 2
    while session_alive(args["session"]) and time.monotonic() < deadline:
        time.sleep(0.05)
    if session_alive(args["session"]):
        tmux("kill-session", "-t", "=" + args["session"])
    code = read(os.path.join(run_dir, "exit"))
    return {
        "state": "killed" if killed else "stopped" if pid is not None else "not running",
        "pid": pid,
        "exit_code": int(code) if code and code.lstrip("-").isdigit() else None,
    }


def main():
    args = json.loads(sys.argv[1])
    actions = {"start": start, "status": status, "stop": stop}
    json.dump(actions[args["action"]](args), sys.stdout)
    sys.stdout.write("\n")


main()
