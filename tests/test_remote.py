"""The command lines tpuctl sends to workers (tpuctl.remote), run through a real local shell."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from standins import wait_until

from tpuctl import remote

NASTY = ["a b", "$HOME", "it's", '"dq"', "`id`", "semi;colon", "back\\slash", "new\nline", "*", ""]


def sh(command: str, input: bytes = b"", **kw) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(["bash", "-c", command], capture_output=True, input=input, check=False, **kw)
    return subprocess.CompletedProcess(r.args, r.returncode, r.stdout.decode(), r.stderr.decode())


def test_several_words_arrive_exactly_as_given():
    command = remote.user_command([sys.executable, "-c", "import json, sys; print(json.dumps(sys.argv[1:]))", *NASTY])
    assert json.loads(sh(command).stdout) == NASTY


def test_one_argument_is_a_command_line_for_the_shell():
    assert remote.user_command(["echo $((6*7)) | tr 4 x"]) == "echo $((6*7)) | tr 4 x"
    assert sh(remote.user_command(["echo $((6*7)) | tr 4 x"])).stdout == "x2\n"
    with pytest.raises(ValueError):
        remote.user_command([])


def test_privileged_runs_directly_as_root_and_through_sudo_otherwise():
    probe = [sys.executable, "-c", "import os, sys; print(os.getuid(), sys.argv[1:])", "it's $HOME"]
    as_root = sh(remote.privileged(probe))
    assert as_root.stdout == '0 ["it\'s $HOME"]\n'
    # Not root: the same line must go through `sudo -n` with the argv intact. There is no sudo on this machine
    # (and nobody to become root as), so a stand-in `sudo` on PATH records what it was asked to run.
    with tempfile.TemporaryDirectory(dir="/var/tmp") as bin_dir:  # pytest's tmp_path is closed to other users
        shim = Path(bin_dir) / "sudo"
        shim.write_text('#!/bin/sh\nprintf "sudo:%s\\n" "$@"\n')
        shim.chmod(0o755)
        Path(bin_dir).chmod(0o755)
        env = {**os.environ, "PATH": f"{bin_dir}:/usr/bin:/bin"}
        inner = remote.shlex.quote(remote.privileged(probe))
        as_user = sh(f"exec setpriv --reuid=65534 --regid=65534 --clear-groups bash -c {inner}", env=env)
    assert as_user.stdout.splitlines() == ["sudo:-n", *(f"sudo:{a}" for a in probe)]


@pytest.mark.parametrize(
    ("given", "expected"), [("~/tpuctl", "tpuctl"), ("~", "."), ("/abs/dir", "/abs/dir"), ("rel", "rel")]
)
def test_rsync_path(given, expected):
    assert remote.rsync_path(given) == expected


def test_sync_batch_applies_only_on_the_expected_tree(tmp_path):
    src, mirror, worker = tmp_path / "src", tmp_path / "mirror", tmp_path / "worker"
    src.mkdir()
    worker.mkdir()
    (src / "f.txt").write_text("v1\n")
    batch = tmp_path / "batch"
    subprocess.run(["rsync", "-a", f"--write-batch={batch}", f"{src}/", f"{mirror}/"], check=True, capture_output=True)
    remote_dir = "code dir/it's $x"
    apply = remote.apply_sync_batch(remote_dir, ["-a"], "none", "gen1")
    r = sh(apply, cwd=worker, input=batch.read_bytes())
    assert r.returncode == 0, r.stderr
    assert (worker / remote_dir / "f.txt").read_text() == "v1\n"
    assert (worker / remote_dir / remote.SYNC_STAMP).read_text() == "gen1\n"
    # a worker on another tree refuses the batch and says what it holds
    stale = sh(remote.apply_sync_batch(remote_dir, ["-a"], "gen0", "gen2"), cwd=worker)
    assert stale.returncode == 98 and stale.stdout == "stale:gen1\n"
    stamp = sh(remote.write_sync_stamp(remote_dir, "gen9"), cwd=worker)
    assert stamp.returncode == 0 and (worker / remote_dir / remote.SYNC_STAMP).read_text() == "gen9\n"


def test_chip_script_arguments_travel_as_json():
    command = remote.chips_command("check", ["/dev/it's*"], dry_run=True)
    assert command.startswith('if [ "$(id -u)" -eq 0 ]; then python3 -I -S -c ')
    words = remote.shlex.split(command.split("; then ", 1)[1].split("; else", 1)[0])
    assert words[:4] == ["python3", "-I", "-S", "-c"] and "def inspect(args)" in words[4]
    args = json.loads(words[5])
    assert args["device_globs"] == ["/dev/it's*"] and args["dry_run"] is True
    assert args["lockfile_globs"] == list(remote.LOCKFILE_GLOBS)


def test_a_run_reaches_the_trainer_with_every_word_and_variable_intact(tmp_path):
    """scripts/runs.py start, through a real shell and a real tmux: the 'trainer' here prints what it received."""
    cwd = tmp_path / "project dir"
    cwd.mkdir()
    printer = "import json, os, sys; print(json.dumps([sys.argv[1:], os.environ['WEIRD'], os.getcwd()]))"
    argv = [sys.executable, "-c", printer, "trainer", *NASTY]
    run_dir = tmp_path / "run 'dir'"
    env = {**os.environ, "TMUX_TMPDIR": str(tmp_path)}
    env.pop("TMUX", None)
    args = {
        "name": "n",
        "session": "tpuctl-n",
        "run_dir": str(run_dir),
        "cwd": str(cwd),
        "argv": argv,
        "env": {"WEIRD": "it's $HOME `id`"},
        "device_globs": [],
    }
    try:
        r = sh(remote.run_command("start", sys.executable, **args), env=env)
        assert r.returncode == 0, r.stdout + r.stderr
        wait_until((run_dir / "exit").exists, 5, "the trainer's exit status")
        assert (run_dir / "exit").read_text().strip() == "0"
        words, weird, where = json.loads((run_dir / "log").read_text().splitlines()[-1])
        assert words == ["trainer", *NASTY] and weird == "it's $HOME `id`" and where == str(cwd)
        status = json.loads(sh(remote.run_command("status", sys.executable, session="tpuctl-n", run_dir=str(run_dir),
                                                  workdir=str(tmp_path)), env=env).stdout)  # fmt: skip
        assert status["state"] == "stopped" and status["exit_code"] == 0  # exit 0 without "done: every stage"
        tail = sh(remote.tail_command(str(run_dir), 1, follow=True), env=env, timeout=10)  # ends: the trainer has
        assert tail.stdout == (run_dir / "log").read_text().splitlines()[-1] + "\n"
        first = (run_dir / "log").read_text()
        assert sh(remote.run_command("start", sys.executable, **args), env=env).returncode == 0  # the same run again
        wait_until((run_dir / "exit").exists, 5, "the trainer's exit status")
        assert (run_dir / "log.1").read_text() == first  # the earlier start's log, kept apart
        assert (run_dir / "log").read_text().count("==> tpuctl run n started") == 1
    finally:
        subprocess.run(["tmux", "kill-server"], env=env, capture_output=True)


def test_a_tpu_vm_leaves_out_only_the_distributed_wiring(tmp_path):
    """scripts/runs.py start on a worker with TPU device files (a file matching device_globs here) keeps every
    TRAINER_* variable the user set, and drops only jax.distributed's wiring (JAX finds the workers itself)."""
    from tpuctl.launch import describe_plan
    from trainer import contract

    printer = "import json, os; print(json.dumps(sorted(k for k in os.environ if k.startswith('TRAINER_'))))"
    (tmp_path / "accel0").write_text("")
    env = {**os.environ, "TMUX_TMPDIR": str(tmp_path)}
    env.pop("TMUX", None)
    user = {"TRAINER_HEARTBEAT_TIMEOUT": "300", "TRAINER_COMPILE_CACHE": "/c", "TRAINER_OTHER": "x"}
    plan = {
        "name": "n",
        "session": "tpuctl-n",
        "cwd": str(tmp_path),
        "argv": [sys.executable, "-c", printer],
        "env": remote.trainer_env(user, "10.0.0.2:8476", 2, 1),
        "secret_env": [],
        "tpu_vm_drops": list(contract.DISTRIBUTED_ENV),
    }
    seen = {}
    try:
        for chips, globs in (("tpu", [str(tmp_path / "accel*")]), ("none", [str(tmp_path / "nothing*")])):
            run_dir = tmp_path / f"run-{chips}"
            args = {**plan, "session": f"tpuctl-{chips}", "run_dir": str(run_dir), "device_globs": globs}
            r = sh(remote.run_command("start", sys.executable, **args), env=env)
            assert r.returncode == 0, r.stdout + r.stderr
            wait_until((run_dir / "exit").exists, 5, "the trainer's exit status")
            seen[chips] = json.loads((run_dir / "log").read_text().splitlines()[-1])
    finally:
        subprocess.run(["tmux", "kill-server"], env=env, capture_output=True)
    assert seen["tpu"] == sorted(user)  # the user's variables reach the trainer; the wiring does not
    assert seen["none"] == sorted([*user, *contract.DISTRIBUTED_ENV])
    # --dry-run says so instead of showing variables the worker then drops
    shown = describe_plan({**plan, "device_globs": []})
    assert "TRAINER_HEARTBEAT_TIMEOUT=300" in shown
    assert "leaves out TRAINER_COORDINATOR, TRAINER_NUM_PROCESSES, TRAINER_PROCESS_ID" in shown


def test_run_names_become_distinct_safe_slugs_and_resume_commands_quote_them():
    from tpuctl.cli.runs import resume_command
    from tpuctl.registry import RunRecord, slug

    assert slug("b16") == "b16"
    assert slug("my run") != slug("my_run") and slug("my run").startswith("my-run-")
    assert slug("a.b:c") != slug("a-b-c") and all(c.isalnum() or c in "-_" for c in slug("x'; rm -rf /"))
    record = RunRecord(name="it's", recipe="my recipes/r.toml", workdir="/w", target="tpu", cwd="~/t", tpu="pod",
                       overrides=["a.b=c d"], env={"K": "v w"})  # fmt: skip
    words = shlex.split(resume_command(record))
    assert words == ["tpuctl", "run", "my recipes/r.toml", "--name", "it's", "--tpu", "pod", "--set", "a.b=c d",
                     "--env", "K=v w"]  # fmt: skip


def test_the_trainer_environment_wires_workers_unless_told_otherwise():
    env = remote.trainer_env({"XLA_FLAGS": "--x"}, "10.0.0.2:8476", 4, 3)
    assert env == {
        "PYTHONUNBUFFERED": "1",
        "TRAINER_COORDINATOR": "10.0.0.2:8476",
        "TRAINER_NUM_PROCESSES": "4",
        "TRAINER_PROCESS_ID": "3",
        "XLA_FLAGS": "--x",
    }
    assert "TRAINER_COORDINATOR" not in remote.trainer_env({}, None, 1, 0)
    assert remote.trainer_env({"TRAINER_PROCESS_ID": "7"}, "h:1", 2, 1)["TRAINER_PROCESS_ID"] == "7"  # the user's wins


@pytest.mark.parametrize(
    "on_sigterm, state, code",
    [("signal.SIG_IGN", "killed", 137), ("lambda *_: sys.exit(3)", "failed", 3)],
    ids=["outlives-its-grace", "fails-its-save"],
)
def test_stop_names_a_trainer_that_does_not_stop_cleanly(tmp_path, on_sigterm, state, code):
    """scripts/runs.py stop: SIGTERM first; a trainer still alive after the grace period is SIGKILLed ("killed"); one
    that exits non-zero on the SIGTERM (its save failed) is "failed", never "stopped"."""
    stubborn = (
        f"import signal, sys, time; signal.signal(signal.SIGTERM, {on_sigterm}); print('up', flush=True);"
        " time.sleep(60)"
    )
    run_dir = tmp_path / "run"
    env = {**os.environ, "TMUX_TMPDIR": str(tmp_path)}
    env.pop("TMUX", None)
    where = {"session": "tpuctl-s", "run_dir": str(run_dir)}
    start = {**where, "name": "s", "cwd": str(tmp_path), "env": {}, "device_globs": []}
    try:
        r = sh(remote.run_command("start", sys.executable, argv=[sys.executable, "-c", stubborn, "trainer"], **start),
               env=env)  # fmt: skip
        assert r.returncode == 0 and json.loads(r.stdout)["pid"], r.stdout + r.stderr
        status = json.loads(sh(remote.run_command("status", sys.executable, workdir="/none", **where), env=env).stdout)
        assert status["state"] == "running" and status["session"]
        log = run_dir / "log"  # its SIGTERM handler is set from its "up" on (before it, SIGTERM alone would stop it)
        wait_until(lambda: "up" in log.read_text().splitlines(), 30, "the trainer's 'up' in its log", log.read_text)
        stop = json.loads(sh(remote.run_command("stop", sys.executable, grace=0.5, **where), env=env).stdout)
        assert (stop["state"], stop["exit_code"]) == (state, code)  # 137: the pane's shell saw it die of SIGKILL
        status = json.loads(sh(remote.run_command("status", sys.executable, workdir="/none", **where), env=env).stdout)
        assert status["state"] == "failed" and not status["session"] and status["pid"] is None
    finally:
        subprocess.run(["tmux", "kill-server"], env=env, capture_output=True)
