"""Runs ON A WORKER, sent by tpuctl.remote.run_command: start, inspect or stop one training run in tmux.

Stdlib only, Python 3.8+. Prints one JSON document on stdout. A run on a worker is a tmux session running
`sh -c 'echo $$ > PID; exec env VARS TRAINER...'` whose output is tee'd to a log file, and whose exit status lands
in a file when the trainer ends (the session ends with it). The run directory keeps all three, so `status` can
tell "running", "exited N" and "gone without a trace" (killed with its shell) apart after the session is gone.
"""

import contextlib
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

# How the trainer's log reads (its progress lines, eval lines, last line, checkpoint layout) arrives with the
# arguments: args["log_rules"], trainer/contract.py's LOG_RULES, the one place it is written down.
BUCKET_PROBE_TIMEOUT_S = 30
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
        fail(f"{os.path.join(cwd, python)} does not exist: run `tpuctl prepare` first (or `tpuctl run --prepare`)")
    if session_alive(args["session"]) or trainer_pid(run_dir):
        fail(f"run {args['name']!r} is already running on this worker: `tpuctl stop` it first, or pick another --name")
    secrets = read_secrets(args.get("secret_env") or [])
    env = dict(args["env"])
    if any(glob.glob(g) for g in args["device_globs"]):  # a TPU VM: JAX finds the other workers itself
        env = {k: v for k, v in env.items() if k not in args.get("tpu_vm_drops", [])}
    os.makedirs(run_dir, exist_ok=True)
    paths = {name: os.path.join(run_dir, name) for name in ("pid", "exit", "log", "secrets")}
    for name in ("pid", "exit", "secrets"):
        if os.path.exists(paths[name]):
            os.remove(paths[name])
    rotate(paths["log"])  # this start gets a log of its own: `logs` and `run --follow` show it alone
    trainer = ["env", *(f"{k}={v}" for k, v in sorted(env.items())), *args["argv"]]
    # The pane: the trainer writes its pid (exec keeps it), its output goes to the log too, its status to `exit`.
    # Secrets are not on any command line (`ps` shows those): the shell exports them from a file it then deletes.
    launcher, words = 'echo $$ > "$0" && exec "$@"', [paths["pid"]]
    if secrets:
        write_secrets(paths["secrets"], secrets)
        launcher, words = '. "$1" && rm -f "$1" && shift && ' + launcher, [*words, paths["secrets"]]
    pane = (
        f"cd {shlex.quote(cwd)} && {{ sh -c {shlex.quote(launcher)} {shlex.join(words + trainer)} 2>&1; "
        f"echo $? > {shlex.quote(paths['exit'])}; }} | tee -a {shlex.quote(paths['log'])}"  # after the header
    )
    shown = {**env, **{k: "****" for k in secrets}}  # the header names the secrets, masked
    with open(paths["log"], "w") as f:
        when = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        header = ["env", *(f"{k}={v}" for k, v in sorted(shown.items())), *args["argv"]]
        f.write(f"==> tpuctl run {args['name']} started {when}: {shlex.join(header)}\n")
    result = tmux("new-session", "-d", "-s", args["session"], "-x", "200", "-y", "50", pane)
    if result.returncode != 0:
        remove(paths["secrets"])
        fail(f"tmux new-session failed: {result.stderr.strip()[-200:]}")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and read(paths["pid"]) is None and read(paths["exit"]) is None:
        time.sleep(0.05)
    if read(paths["pid"]) is not None or read(paths["exit"]) is not None:
        remove(paths["secrets"])  # the pane is past it (and deleted it itself unless it failed there)
    return {"session": args["session"], "pid": int(read(paths["pid"]) or 0) or None, "log": paths["log"]}


def read_secrets(names):
    """The values of the secret variables `names`, sent on stdin as one JSON object (never on a command line)."""
    if not names:
        return {}
    try:
        values = json.loads(sys.stdin.read() or "{}")
    except ValueError:
        values = {}
    if not isinstance(values, dict) or sorted(values) != sorted(names):
        fail(f"the values of {', '.join(names)} did not arrive on stdin")
    bad = [k for k, v in values.items() if not re.match(r"[A-Za-z_][A-Za-z0-9_]*$", k) or not isinstance(v, str)]
    if bad:
        fail(f"secret {bad[0]!r}: not an environment variable name, or its value is not a string")
    return values


def write_secrets(path, secrets):
    """`export NAME='value'` lines, in a file created readable by this user alone (for the pane's shell to source)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.writelines(f"export {k}={shlex.quote(v)}\n" for k, v in sorted(secrets.items()))


def remove(path):
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)


def rotate(log, keep=KEEP_LOGS):
    """log -> log.1 -> log.2 ... (the earlier starts of a run, the newest first); the oldest beyond `keep` goes."""
    for n in range(keep, 0, -1):
        older = f"{log}.{n - 1}" if n > 1 else log
        if os.path.exists(older):
            os.replace(older, f"{log}.{n}")


def tail_lines(log_path):
    """The lines of the log's last TAIL_BYTES (none when it cannot be read)."""
    try:
        with open(log_path, "rb") as f:
            f.seek(max(0, os.path.getsize(log_path) - TAIL_BYTES))
            return f.read().decode(errors="replace").splitlines()
    except OSError:
        return []


def last_progress(lines, rules):
    """(stage, step, loss, img/s) of the last trainer progress line, and the log's last line."""
    progress = {}
    for line in reversed(lines):
        m = re.match(rules["progress"], line)
        if m:
            speed = re.search(rules["speed"], line)
            progress = {
                "stage": m["stage"],
                "step": int(m["step"]),
                "loss": float(m["loss"]),
                "img_per_s": float(speed["img_per_s"]) if speed else None,
            }
            break
    last = next((line for line in reversed(lines) if line.strip()), "")
    return progress, last[-300:]


def last_eval_error(lines, rules):
    """The latest eval's error, if the latest eval in the log failed (else None)."""
    for line in reversed(lines):
        if line.startswith(rules["eval_failed"]):
            return line[len(rules["eval_failed"]) :][:300]
        if re.search(rules["eval_table"], line):
            return None
    return None


def bucket_checkpoint(workdir, python, cwd):
    """'STAGE/STEP' of the newest committed checkpoint in a gs:// workdir, asked of the trainer's own venv
    (`python -m trainer.workdir`: epath and gcsfs, no jax); an error text when it cannot tell."""
    python = python if os.path.isabs(python) else os.path.join(expand(cwd), python)
    try:
        done = subprocess.run(
            [python, "-m", "trainer.workdir", workdir],
            cwd=expand(cwd),
            capture_output=True,
            text=True,
            timeout=BUCKET_PROBE_TIMEOUT_S,
            check=False,
        )
        answer = json.loads(done.stdout.strip().splitlines()[-1])
    except (OSError, ValueError, IndexError, subprocess.TimeoutExpired) as e:
        return None, f"cannot read {workdir}: {e}"
    return answer.get("checkpoint"), answer.get("error")


def last_checkpoint(workdir, rules):
    """'STAGE/STEP' of the newest finished orbax checkpoint in a local workdir this worker can see, else None."""
    found = glob.glob(os.path.join(expand(workdir), *rules["checkpoint_glob"]))
    steps = [d for d in found if os.path.basename(d).isdigit()]
    if not steps:
        return None
    newest = max(steps, key=os.path.getmtime)
    parts = newest.split(os.sep)
    return f"{parts[-3]}/{parts[-1]}"


def finished(last_line, rules):
    """The trainer's last words when every stage is trained (trainer/__main__.py); exit 0 otherwise means it stopped
    on SIGTERM with a checkpoint saved: resumable."""
    return last_line.startswith(rules["finished"])


def status(args):
    run_dir = expand(args["run_dir"])
    pid = trainer_pid(run_dir)
    code = read(os.path.join(run_dir, "exit"))
    alive = session_alive(args["session"])
    lines = tail_lines(os.path.join(run_dir, "log"))
    rules = args["log_rules"]
    progress, last = last_progress(lines, rules)
    checkpoint, checkpoint_error = None, None
    if "://" not in args["workdir"]:
        checkpoint = last_checkpoint(args["workdir"], rules)
    elif args.get("probe"):  # one worker asks the bucket for all (they share it)
        checkpoint, checkpoint_error = bucket_checkpoint(args["workdir"], args["trainer_python"], args["cwd"])
    if pid is not None:
        state = "running"
    elif code is not None and code.lstrip("-").isdigit():
        state = "failed" if int(code) != 0 else "done" if finished(last, rules) else "stopped"
    elif alive:  # the pane is up: the trainer has not started yet, or has just ended and its status is on its way
        state = "exiting" if os.path.exists(os.path.join(run_dir, "pid")) else "starting"
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
        "checkpoint": checkpoint,
        "checkpoint_error": checkpoint_error,
        "eval_error": last_eval_error(lines, rules),
        "last_line": last,
    }


def stop(args):
    """SIGTERM the trainer (it checkpoints and exits), wait up to `grace`; then kill it and its session. "failed": it
    ended within the grace with a non-zero status (its checkpoint may be missing: its log says why)."""
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
    exit_code = int(code) if code and code.lstrip("-").isdigit() else None
    if killed:
        state = "killed"
    elif pid is None:
        state = "not running"
    else:
        state = "failed" if exit_code else "stopped"
    return {"state": state, "pid": pid, "exit_code": exit_code}


def main():
    args = json.loads(sys.argv[1])
    actions = {"start": start, "status": status, "stop": stop}
    json.dump(actions[args["action"]](args), sys.stdout)
    sys.stdout.write("\n")


main()
