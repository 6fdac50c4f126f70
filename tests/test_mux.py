"""tpuctl.mux: sessions asked of a real OpenSSH master directly (its multiplexing protocol), and the small-change
form of a sync's delta read from real rsync output."""

from __future__ import annotations

import os
import subprocess

import pytest

from tpuctl import mux
from tpuctl.config import Settings
from tpuctl.ssh import control_path, ssh_command
from tpuctl.sync import archive, itemized_changes


def test_a_session_through_the_master_gives_status_output_and_takes_stdin(fleet, tmp_path):
    settings = Settings(
        ssh_user=fleet.user, ssh_key=str(fleet.key_path), ssh_port=fleet.port, known_hosts=str(tmp_path / "kh")
    )
    host = fleet.workers[0].ip
    master = control_path(settings, host)
    assert master is not None
    with pytest.raises(mux.NoMaster):  # no master yet: the caller starts ssh
        mux.run(master, "true", b"", 5)
    assert subprocess.run([*ssh_command(settings, host), "true"], check=False).returncode == 0  # makes the master
    assert master.exists()
    payload = os.urandom(300_000)  # more than a pipe holds
    r = mux.run(master, "sha256sum; echo to-stderr >&2; hostname; exit 7", payload, 10)
    import hashlib

    assert r.returncode == 7
    assert r.stdout.decode().split()[0] == hashlib.sha256(payload).hexdigest()
    assert r.stdout.decode().splitlines()[1] == fleet.workers[0].hostname and r.stderr == b"to-stderr\n"
    with pytest.raises(TimeoutError):
        mux.run(master, "sleep 5", b"", 0.5)
    subprocess.run([*ssh_command(settings, host), "-O", "exit"], capture_output=True, check=False)


def test_small_changes_travel_as_a_tar_and_large_ones_as_the_rsync_batch(tmp_path):
    src, mirror = tmp_path / "src", tmp_path / "mirror"
    (src / "pkg").mkdir(parents=True)
    for i in range(300):
        (src / "pkg" / f"m{i}.py").write_text(f"x = {i}\n")
    (src / "old.txt").write_text("going\n")
    subprocess.run(["rsync", "-a", f"{src}/", f"{mirror}/"], check=True)

    def itemized() -> str:
        argv = ["rsync", "-a", "--delete", "--itemize-changes", "--stats", f"{src}/", f"{mirror}/"]
        return subprocess.run(argv, capture_output=True, text=True, check=True).stdout

    (src / "pkg" / "m7.py").write_text("x = 'edited'\n")
    (src / "new").mkdir()
    (src / "new" / "f.py").write_text("new\n")
    (src / "old.txt").unlink()
    changes = itemized_changes(itemized())
    assert changes == (["new", "new/f.py", "pkg/m7.py"], ["old.txt"])
    tar = archive(mirror, changes)
    out = tmp_path / "worker"
    out.mkdir()
    subprocess.run(["tar", "-xf", "-", "-C", str(out)], input=tar, check=True)
    assert (out / "pkg" / "m7.py").read_text() == "x = 'edited'\n" and (out / "new" / "f.py").read_text() == "new\n"
    assert os.stat(out / "pkg" / "m7.py").st_mtime_ns == os.stat(mirror / "pkg" / "m7.py").st_mtime_ns  # as rsync -a
    for i in range(300):  # a sweeping change: the rsync batch
        (src / "pkg" / f"m{i}.py").write_text(f"x = {i} + 1000\n")  # (a new size: seen within the same second)
    assert itemized_changes(itemized()) is None
