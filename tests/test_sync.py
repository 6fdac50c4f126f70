"""tpuctl sync with real rsync over real ssh: incremental, .gitignore-aware, delta computed once."""

from __future__ import annotations

import json
import os
import subprocess
import time

import pytest
from standins import wait_until


@pytest.fixture
def project(tmp_path):
    src = tmp_path / "proj"
    (src / "pkg").mkdir(parents=True)
    for i in range(20):
        (src / "pkg" / f"mod{i}.py").write_text(f"VALUE = {i}\n" * 50)
    (src / "README.md").write_text("hello\n")
    (src / ".gitignore").write_text("*.log\nbuild/\n")
    (src / "train.log").write_text("ignored\n")
    (src / "build").mkdir()
    (src / "build" / "big.bin").write_bytes(b"0" * 1000)
    subprocess.run(["git", "init", "-q", str(src)], check=True)
    return src


def remote_files(worker, remote="/root/tpuctl"):
    root = worker.path(remote)
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def sync_json(pod, *args, **kw):
    r = pod.tpuctl("sync", *args, "--json", **kw)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_sync_copies_the_tree_skipping_git_and_ignored_files(pod4, project):
    data = sync_json(pod4, str(project))
    expected = sorted([".gitignore", "README.md", *(f"pkg/mod{i}.py" for i in range(20))])
    for w in pod4.fleet.workers:
        assert [f for f in remote_files(w) if f != ".tpuctl-sync"] == expected
        assert w.path("/root/tpuctl/pkg/mod7.py").read_text() == (project / "pkg" / "mod7.py").read_text()
    assert [d["ok"] for d in data] == [True] * 4
    assert all(d["files"] == len(expected) for d in data)


def test_caches_and_logs_stay_home_unless_told_otherwise(pod, project):
    """tpu_command.sh's excludes by default (__pycache__, *.pyc, logs/): a worker keeps its own logs even with
    --delete; SYNC_EXCLUDES set to nothing sends them all."""
    (project / "pkg" / "__pycache__").mkdir()
    (project / "pkg" / "__pycache__" / "mod1.cpython-311.pyc").write_bytes(b"\0" * 10)
    (project / "stale.pyc").write_bytes(b"\0")
    (project / "logs").mkdir()
    (project / "logs" / "run.txt").write_text("mine\n")
    w0 = pod.fleet.workers[0]
    w0.path("/root/tpuctl/logs").mkdir(parents=True)
    w0.path("/root/tpuctl/logs/worker.txt").write_text("the worker's\n")
    sync_json(pod, str(project), "--delete")
    kept_home = ["logs/run.txt", "pkg/__pycache__/mod1.cpython-311.pyc", "stale.pyc"]
    assert not set(kept_home) & set(remote_files(w0)) and w0.path("/root/tpuctl/logs/worker.txt").exists()
    sync_json(pod, str(project), "--sync-excludes", "")
    assert set(kept_home) <= set(remote_files(w0)) and set(kept_home) <= set(remote_files(pod.fleet.workers[1]))


def test_incremental_sync_sends_only_the_change_computed_once(pod4, project):
    sync_json(pod4, str(project))
    (project / "pkg" / "mod3.py").write_text("VALUE = 'changed'\n")
    data = sync_json(pod4, str(project))
    assert [d["method"] for d in data] == ["batch"] * 4
    assert [d["files"] for d in data] == [1] * 4
    assert all(d["bytes_sent"] < 4_000 for d in data)  # a tar of the one file (headers and a block)
    for w in pod4.fleet.workers:
        assert w.path("/root/tpuctl/pkg/mod3.py").read_text() == "VALUE = 'changed'\n"


def test_a_worker_that_differs_is_synced_in_full(pod, project):
    sync_json(pod, str(project))
    w1 = pod.fleet.workers[1]
    # worker 1 is "recreated": its disk is empty again
    subprocess.run(["rm", "-rf", str(w1.path("/root/tpuctl"))], check=True)
    (project / "README.md").write_text("hello again\n")
    data = sync_json(pod, str(project))
    assert [d["method"] for d in data] == ["batch", "full"]
    assert data[1]["files"] == 22
    assert w1.path("/root/tpuctl/README.md").read_text() == "hello again\n"
    assert w1.path("/root/tpuctl/pkg/mod19.py").exists()
    # and from then on it takes the batch like the others
    (project / "README.md").write_text("third\n")
    assert [d["method"] for d in sync_json(pod, str(project))] == ["batch", "batch"]


def test_delete_removes_files_gone_locally_but_keeps_the_venv(pod, project):
    sync_json(pod, str(project))
    w0 = pod.fleet.workers[0]
    w0.path("/root/tpuctl/.venv").mkdir()
    w0.path("/root/tpuctl/.venv/marker").write_text("")
    (project / "pkg" / "mod0.py").unlink()
    sync_json(pod, str(project))
    assert w0.path("/root/tpuctl/pkg/mod0.py").exists()  # no --delete: nothing removed
    sync_json(pod, str(project), "--delete")
    assert not w0.path("/root/tpuctl/pkg/mod0.py").exists()
    assert w0.path("/root/tpuctl/.venv/marker").exists()


def test_full_and_remote_dir_and_exclude(pod, project):
    data = sync_json(pod, str(project), "--full", "--remote-dir", "/tmp/code", "--exclude", "mod1*.py")
    assert [d["method"] for d in data] == ["full", "full"]
    files = remote_files(pod.fleet.workers[1], "/tmp/code")
    assert "pkg/mod2.py" in files and "pkg/mod1.py" not in files and "pkg/mod15.py" not in files


def test_dry_run_lists_changes_and_touches_nothing(pod, project):
    r = pod.tpuctl("sync", str(project), "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "pkg/mod5.py" in r.stdout.splitlines() and "train.log" not in r.stdout
    assert "Would send 22 changed files to 2 workers" in r.stderr
    assert not pod.fleet.workers[0].path("/root/tpuctl").exists()


def test_a_down_worker_fails_alone(pod, project):
    pod.fleet.workers[0].stop_sshd()
    r = pod.tpuctl("sync", str(project))
    assert r.returncode == 1
    assert "w0 (" in r.stderr.strip().splitlines()[-1] and "connection refused" in r.stderr.lower()
    assert pod.fleet.workers[1].path("/root/tpuctl/README.md").exists()


def test_sync_of_a_missing_directory_is_one_line(pod, tmp_path):
    r = pod.tpuctl("sync", str(tmp_path / "nope"))
    assert r.returncode == 2
    assert "does not exist" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_the_change_is_applied_while_the_api_is_still_answering(pod, project):
    """The batch goes to the workers the last sync reached (verified by their recorded host keys) in parallel with
    the API look-up, which on a real pod is a round trip across the internet."""
    sync_json(pod, str(project))
    # (a new size: rsync's quick check may not see a same-size rewrite within the mtime's second)
    (project / "README.md").write_text("early!\n")
    pod.api.delay_s = 8.0
    start = time.monotonic()
    env = pod.env | {"TPUCTL_NODE_CACHE_S": "0"}  # the workers' recorded addresses would spare the API altogether
    proc = subprocess.Popen(
        [pod.tpuctl_path, "sync", str(project), "--json"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    readme = pod.fleet.workers[1].path("/root/tpuctl/README.md")
    wait_until(lambda: readme.read_text() == "early!\n", 7.5 - (time.monotonic() - start), "the early apply")
    assert proc.poll() is None, proc.communicate()  # applied before the API answered
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0
    assert [d["method"] for d in json.loads(out)] == ["batch", "batch"]


def test_only_the_workers_the_api_names_are_reported_and_new_ones_are_synced(make_pod, project):
    pod = make_pod(3)
    node = pod.api.nodes[("proj", "zone-a", "pod")]
    endpoints = node["networkEndpoints"]
    node["networkEndpoints"] = endpoints[:2]
    sync_json(pod, str(project))
    node["networkEndpoints"] = endpoints[1:]  # worker 0 left the node, a new VM joined (say, after a repair)
    (project / "README.md").write_text("v2\n")
    data = sync_json(pod, str(project), env={"TPUCTL_NODE_CACHE_S": "0"})  # (within node_cache_s: see below)
    assert [d["ip"] for d in data] == [w.ip for w in pod.fleet.workers[1:]]
    assert [d["method"] for d in data] == ["batch", "full"]
    assert pod.fleet.workers[2].path("/root/tpuctl/README.md").read_text() == "v2\n"


def test_an_edit_reaches_recorded_workers_without_the_api(pod, project):
    """Within node_cache_s, workers the last sync reached whose host keys confirm them are all there is to sync:
    the API is not asked (it answers slowly here, and would be seen)."""
    sync_json(pod, str(project))
    asked = len(pod.api.requests)
    (project / "README.md").write_text("no API\n")
    pod.api.delay_s = 30.0
    data = sync_json(pod, str(project), timeout=20)
    assert [d["method"] for d in data] == ["batch", "batch"] and len(pod.api.requests) == asked
    assert all(w.path("/root/tpuctl/README.md").read_text() == "no API\n" for w in pod.fleet.workers)


def test_a_recreated_worker_with_a_new_host_key_is_refused_until_replaced(pod, project):
    sync_json(pod, str(project))
    w1 = pod.fleet.workers[1]
    w1.crash()  # the VM is gone, open connections included; a new one comes up at the same IP with a new key
    subprocess.run(["rm", "-rf", str(w1.path("/root/tpuctl"))], check=True)
    w1.new_host_key()
    (project / "README.md").write_text("v3\n")
    r = pod.tpuctl("sync", str(project), "--json")
    assert r.returncode == 1
    data = json.loads(r.stdout)
    assert data[0]["method"] == "batch" and not data[1]["ok"]
    assert "host key" in data[1]["error"].lower()
    data = sync_json(pod, str(project), "--replace-host-keys")
    assert [d["ok"] for d in data] == [True, True] and data[1]["method"] == "full"
    assert w1.path("/root/tpuctl/README.md").read_text() == "v3\n"


@pytest.mark.parametrize("how", ["delta", "full"])
def test_same_size_edits_back_to_back_all_arrive(pod, project, how):
    """rsync's quick check compares sizes and whole-second mtimes: an edit that keeps the size and lands in the same
    second as the copy a worker (or the mirror) holds was skipped, and sync said it was done (2 of 5 sweeps hit it).
    Every edit here keeps the size and is stamped within the same whole second as the one before (nanoseconds
    apart), so each is the case that was missed; every worker is read back."""
    target = project / "pkg" / "mod3.py"
    extra = ["--full"] if how == "full" else []
    second = time.time_ns() // 10**9 * 10**9
    for i in range(4):
        target.write_text(f"VALUE = {i:04d}\n")
        os.utime(target, ns=(second + 1000 * i,) * 2)
        sync_json(pod, str(project), *extra)
        for w in pod.fleet.workers:
            assert w.path("/root/tpuctl/pkg/mod3.py").read_text() == f"VALUE = {i:04d}\n", f"edit {i}, w{w.index}"


def test_where_an_rsync_lacks_nanosecond_mtimes_content_decides(tmp_path):
    """The quick check is made exact per end: nanoseconds from rsync 3.1.3 on, content checksums before (or when the
    version cannot be read). The fallback with real rsync: same size, same mtime to the nanosecond, other content."""
    from tpuctl.sync import EXACT_MTIME, exact_quick_check

    assert exact_quick_check("rsync  version 3.2.7  protocol version 31\n") == EXACT_MTIME
    assert exact_quick_check("rsync  version v3.1.3  protocol version 31\n") == EXACT_MTIME
    assert exact_quick_check("rsync  version 3.1.2  protocol version 31\n") == "--checksum"
    assert exact_quick_check("bash: rsync: command not found") == "--checksum"
    src, dst = tmp_path / "src", tmp_path / "dst"
    for d, text in ((src, "new\n"), (dst, "old\n")):
        d.mkdir()
        (d / "f").write_text(text)
        os.utime(d / "f", ns=(1_700_000_000_123_456_789,) * 2)
    subprocess.run(["rsync", "-a", f"{src}/", f"{dst}/"], check=True)
    assert (dst / "f").read_text() == "old\n"  # the quick check alone misses it
    subprocess.run(["rsync", "-a", exact_quick_check(""), f"{src}/", f"{dst}/"], check=True)
    assert (dst / "f").read_text() == "new\n"
