"""Which code a run trains with, on real stand-ins: `sync` records the tree it sent, `sync --verify` compares every
worker's tree with it by content, and `run` refuses a worker holding other code (a hand edit, a missed sync) unless
--force, records the tree hash and git commit, hands them to the trainer and `status` shows them.

The trainers here are stand-ins (a shell script in the project's venv that prints the code identity it was given,
then the trainer's progress lines until SIGTERM): what is under test is tpuctl's side; the real trainer writing the
identity into its workdir is asserted in test_runs' local run and in test_train.
"""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
from standins import wait_until
from standins.pod import RUN_RECIPE

from tpuctl import codetree

STAND_IN_TRAINER = """#!/bin/sh
echo "code: $TRAINER_CODE"
trap 'exit 0' TERM
i=0
while :; do i=$((i + 1)); echo "pretrain $i  loss 2.5 img_per_s 100.0"; sleep 0.5; done
"""
GIT = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com"]


@pytest.fixture
def code_project(project, tmp_path):
    """The tests' recipe and a small package, committed to git (so a run records a commit)."""
    src = tmp_path / "code"
    (src / RUN_RECIPE).parent.mkdir(parents=True)
    shutil.copy(project / RUN_RECIPE, src / RUN_RECIPE)
    (src / "pkg").mkdir()
    for i in range(5):
        (src / "pkg" / f"mod{i}.py").write_text(f"VALUE = {i}\n")
    (src / ".gitignore").write_text("private/\n")
    subprocess.run(["git", "init", "-q", str(src)], check=True)
    subprocess.run([*GIT, "-C", str(src), "add", "-A"], check=True)
    subprocess.run([*GIT, "-C", str(src), "commit", "-qm", "start"], check=True)
    return src


def stand_in_venv(pod):
    for w in pod.fleet.workers:  # what `prepare` would make (sync leaves .venv alone)
        python = w.path("/root/tpuctl/.venv/bin/python")
        python.parent.mkdir(parents=True, exist_ok=True)
        python.write_text(STAND_IN_TRAINER)
        python.chmod(0o755)


def synced_tree(pod, src) -> str:
    r = pod.tpuctl("sync", str(src), "--json")
    assert r.returncode == 0, r.stderr
    (tree,) = {row["tree"] for row in json.loads(r.stdout)}
    return tree


def test_the_tree_hash_is_sha256sum_of_the_manifest(tmp_path):
    """Anyone can recompute a tree hash with coreutils, and the worker-side check reads names needing escapes."""
    root = tmp_path / "t"
    (root / "a b").mkdir(parents=True)
    (root / "a b" / "x.py").write_text("x\n")
    (root / "back\\slash").write_text("odd\n")
    (root / "line\nbreak").write_text("odder\n")
    found = codetree.manifest(root)
    listing = subprocess.run(
        ["sha256sum", "a b/x.py", "back\\slash", "line\nbreak"], cwd=root, capture_output=True, check=True
    ).stdout
    lines = sorted(listing.decode().splitlines(keepends=True), key=lambda line: line.split("  ", 1)[1])
    assert found.check_input() == "".join(lines).encode()  # the very lines sha256sum writes, escapes included
    (root / "line\nbreak").write_text("ODDER\n")
    (root / "a b" / "x.py").unlink()
    check = subprocess.run(
        ["sha256sum", "--quiet", "--check", "-"], cwd=root, input=found.check_input(), capture_output=True
    )
    assert sorted(codetree.parse_check_output(check.stdout.decode())) == ["a b/x.py", "line\nbreak"]
    assert codetree.manifest(root).tree_hash != found.tree_hash


def test_verify_compares_every_worker_by_content(pod, code_project):
    tree = synced_tree(pod, code_project)
    r = pod.tpuctl("sync", str(code_project), "--verify")
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"Every one of 2 workers holds the tree the last sync sent ({tree[:12]}, 7 files)" in r.stderr
    w0, w1 = pod.fleet.workers
    w1.path("/root/tpuctl/pkg/mod3.py").write_text("VALUE = 9\n")  # by hand, same size
    w1.path("/root/tpuctl/pkg/mod4.py").unlink()
    w0.path("/root/tpuctl/pkg/stray.py").write_text("import os\n")
    w0.path("/root/tpuctl/private").mkdir()
    w0.path("/root/tpuctl/private/notes.txt").write_text("ignored by .gitignore: not a difference\n")
    r = pod.tpuctl("sync", str(code_project), "--verify", "--json")
    assert r.returncode == 1, r.stderr
    answer = json.loads(r.stdout)
    assert answer["tree"] == tree
    by_worker = {w["worker"]: w for w in answer["workers"]}
    assert (
        by_worker[0]["state"] == "differs"
        and by_worker[0]["differ"] == []
        and by_worker[0]["extra"] == ["pkg/stray.py"]
    )
    assert by_worker[1]["state"] == "differs" and sorted(by_worker[1]["differ"]) == ["pkg/mod3.py", "pkg/mod4.py"]
    r = pod.tpuctl("sync", str(code_project), "--verify")
    assert r.returncode == 1
    last = r.stderr.strip().splitlines()
    assert any("w1 (" in line and "pkg/mod" in line and "differs from what the last sync sent" in line for line in last)
    assert "--full" in last[-1] or any("--full" in line for line in last)
    # a full sync puts the content back; --delete also removes the stray file
    assert pod.tpuctl("sync", str(code_project), "--full", "--delete").returncode == 0
    r = pod.tpuctl("sync", str(code_project), "--verify")
    assert r.returncode == 0, r.stdout + r.stderr


def test_verify_needs_a_sync_and_says_so(pod, code_project):
    r = pod.tpuctl("sync", str(code_project), "--verify")
    assert r.returncode == 2 and "nothing was synced from" in r.stderr and "Traceback" not in r.stderr


def test_run_refuses_a_worker_holding_other_code_and_force_starts_it(pod, code_project):
    """A file edited by hand on one worker: an incremental sync leaves it (it changed nothing locally), so `run`
    checks every worker by content after its sync and names the worker and the path; --force starts and records
    which worker differed."""
    tree = synced_tree(pod, code_project)
    stand_in_venv(pod)
    pod.fleet.workers[1].path("/root/tpuctl/pkg/mod2.py").write_text("VALUE = 7\n")
    run = ["run", RUN_RECIPE, "--name", "ident", "--workdir", "/tmp/w"]
    r = pod.tpuctl(*run, cwd=code_project)  # syncs first, then checks
    assert r.returncode != 0
    assert "code check failed on w1 (" in r.stderr and "pkg/mod2.py differs from what the last sync sent" in r.stderr
    assert "--force" in r.stderr and "Traceback" not in r.stderr
    assert pod.tpuctl("status", "ident").returncode == 2  # nothing recorded: it never started
    assert not pod.fleet.workers[0].path("/root/.tpuctl/runs/ident").exists()

    r = pod.tpuctl(*run, "--no-sync", "--force", cwd=code_project)
    assert r.returncode == 0, r.stderr
    assert "--force: starting although 1 workers hold other code (w1 (" in r.stderr
    commit = subprocess.run(["git", "-C", str(code_project), "rev-parse", "HEAD"], capture_output=True, text=True)
    r = pod.tpuctl("status", "ident", "--json")
    code = json.loads(r.stdout)["run"]["code"]
    assert code["tree"] == tree and code["commit"] == commit.stdout.strip() and code["dirty"] is False
    assert code["workers_differ"] == {"w1": ["pkg/mod2.py"]}
    r = pod.tpuctl("status", "ident")
    assert f"code: tree {tree[:12]}, git {commit.stdout[:12]}; started with --force although w1 held" in r.stderr
    log = pod.fleet.workers[0].path("/root/.tpuctl/runs/ident/log")
    wait_until(lambda: log.exists() and "code: {" in log.read_text(), 30, "the trainer's first line")
    (line,) = [line for line in log.read_text().splitlines() if line.startswith("code: {")]
    given = json.loads(line.removeprefix("code: "))
    assert given["tree"] == tree and given["commit"] == code["commit"]  # what the trainer writes into its workdir
    assert pod.tpuctl("stop", "ident", "--grace", "10").returncode == 0


def test_the_recipe_the_workers_read_is_the_one_checked(pod, code_project):
    synced_tree(pod, code_project)
    stand_in_venv(pod)
    recipe = code_project / RUN_RECIPE
    recipe.write_text(recipe.read_text() + "\n# edited after the sync\n")  # still valid, but not what was sent
    run = ["run", RUN_RECIPE, "--name", "rec", "--workdir", "/tmp/w", "--no-sync"]
    r = pod.tpuctl(*run, cwd=code_project)
    assert r.returncode != 0
    assert f"the recipe {RUN_RECIPE} the workers hold is not the one checked here" in r.stderr
    assert "without --no-sync" in r.stderr
    hidden = code_project / "private" / "r.toml"  # .gitignore keeps it out of every sync
    hidden.parent.mkdir()
    shutil.copy(recipe, hidden)
    r = pod.tpuctl("run", "private/r.toml", "--name", "rec", "--workdir", "/tmp/w", cwd=code_project)
    assert r.returncode != 0 and "the recipe private/r.toml is not among the files sync sends" in r.stderr
    assert ".gitignore" in r.stderr
    # synced, it starts
    r = pod.tpuctl(*run[:-1], cwd=code_project)
    assert r.returncode == 0, r.stderr
    assert pod.tpuctl("stop", "rec", "--grace", "10").returncode == 0
