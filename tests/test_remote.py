"""The command lines tpuctl sends to workers (tpuctl.remote), run through a real local shell."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

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
    assert command.startswith('if [ "$(id -u)" -eq 0 ]; then python3 -c ')
    words = remote.shlex.split(command.split("; then ", 1)[1].split("; else", 1)[0])
    assert words[:2] == ["python3", "-c"] and "def inspect(args)" in words[2]
    args = json.loads(words[3])
    assert args["device_globs"] == ["/dev/it's*"] and args["dry_run"] is True
    assert args["lockfile_globs"] == list(remote.LOCKFILE_GLOBS)
