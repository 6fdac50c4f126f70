"""The README's "First steps on a real project", typed line by line into a shell in a real terminal (a tmux pane),
against a stand-in project: the exact lines of that section, in order, each checked to succeed and to do what its
comment says.

What stands in for what: the Cloud TPU API is the local one (held to Google's discovery document), which makes the
TPU's VMs out of two sshd workers when `tpuctl create` asks for a v4-16; Cloud Storage is the GCS emulator; `gcloud` is
standins/gcloud.py (its four commands, each doing to the stand-in project what the real one does to a real one);
the trainer is standins/trainer_main.py (a run's progress lines, checkpoints and stop, no JAX: the real trainer on a
pod is test_runs'). Set for the stand-ins only: the VMs' SSH login and port, the local endpoints, and pip's offline
arguments (the VMs cannot download wheels here).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import standins
from standins import image, wait_until
from standins.pod import Pod

from trainer import storage
from trainer.workdir import committed_steps

ROOT = Path(__file__).resolve().parents[1]
PROJECT, ZONE, TPU, BUCKET = "my-proj", "us-central2-b", "my-pod", "my-bucket"
EXIT = re.compile(r"@@ exit (\d+)")
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][A-Z0-9]|\r")


def first_steps() -> list[str]:
    """The lines of the README's first-steps block, as a user would copy them."""
    section = (ROOT / "README.md").read_text().split("## First steps on a real project\n", 1)[1]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip()]


class ApiDisabledUntilEnabled(set):
    """The local API's disabled projects: PROJECT until the stand-in gcloud has enabled the Cloud TPU API there."""

    def __init__(self, record: Path):
        super().__init__()
        self.record = record

    def __contains__(self, project: object) -> bool:
        enabled = self.record.read_text().split("\n") if self.record.exists() else []
        return project == PROJECT and f"{PROJECT} tpu.googleapis.com" not in enabled


def put_the_data_in_the_bucket(project: Path) -> None:
    """What "first put your bucket where it says YOUR-BUCKET" means: the recipe names the user's bucket, which holds
    what the recipe reads (stand-in files: the stand-in trainer reads none of them; tpuctl checks they are there)."""
    from google.cloud import storage as gcs

    recipe = project / "recipes" / "b16.toml"
    recipe.write_text(recipe.read_text().replace("YOUR-BUCKET", BUCKET))
    bucket = gcs.Client(project=PROJECT).bucket(BUCKET)
    info = {"name": "recap_datacomp_1b", "splits": [{"name": "train", "shardLengths": ["1"]}]}
    files = {
        "tensorflow_datasets/recap_datacomp_1b/1.0.0/dataset_info.json": json.dumps(info),
        "bert_base_vocab_bos_eos.txt": "[PAD]\n[UNK]\n",
        "imagenet2012/val-00000-of-00001.tfrecord": "",
        "coco/karpathy.json": "{}",
        "flickr30k/karpathy.json": "{}",
    }
    for name, text in files.items():
        bucket.blob(name).upload_from_string(text)


@contextlib.contextmanager
def terminal(env: dict[str, str], cwd: Path, tmp_path: Path):
    """A bash in a 250x50 tmux pane, everything it prints copied to a file; yields (type_line, output): type_line
    types a line and Enter ("C-c": Ctrl-C). Each prompt first prints `@@ exit N`, the status of the line before. The
    tmux server goes, also on failure."""
    log = tmp_path / "terminal.log"
    log.touch()
    env = {**env, "TMUX_TMPDIR": str(tmp_path), "PROMPT_COMMAND": 'echo "@@ exit $?"', "PS1": "$ "}
    env.pop("TMUX", None)

    def tmux(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["tmux", *args], env=env, capture_output=True, text=True, check=False)

    def output() -> str:
        return ANSI.sub("", log.read_text(errors="replace"))

    def type_line(line: str) -> None:
        if line == "C-c":
            tmux("send-keys", "-t", "steps", "C-c")
            return
        tmux("send-keys", "-t", "steps", "-l", line)
        tmux("send-keys", "-t", "steps", "Enter")

    try:
        started = tmux("new-session", "-d", "-s", "steps", "-x", "250", "-y", "50", "-c", str(cwd), "bash --norc -i")
        assert started.returncode == 0, started.stderr
        assert tmux("pipe-pane", "-t", "steps", "-o", f"cat >> {log}").returncode == 0
        type_line("")  # a first prompt once the copy runs
        wait_until(lambda: EXIT.search(output()), 20, "the shell's first prompt", output)
        yield type_line, output
    finally:
        tmux("kill-server")


@pytest.mark.timeout(300)
def test_the_readmes_first_steps_work_as_written(tpu_api, make_fleet, gcs, project, tmp_path):
    lines = first_steps()
    assert [line.split()[0] for line in lines].count("gcloud") == 4, lines
    image.require_matching_python()
    vms = make_fleet(2, network=gcs.network())  # what `create` gets for a v4-16: two VMs that reach the bucket
    image.install(vms)
    tpu_api.on_create = lambda *_: [(w.ip, w.ip) for w in vms.workers]
    home = tmp_path / "home"
    gcloud_config = home / ".config" / "gcloud"
    tpu_api.disabled_projects = ApiDisabledUntilEnabled(gcloud_config / "stand-in-enabled-services")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shutil.copy(Path(standins.__file__).parent / "gcloud.py", bin_dir / "gcloud")
    (bin_dir / "gcloud").chmod(0o755)
    (bin_dir / "tpuctl").symlink_to(Pod.tpuctl_path)
    shutil.copy(Path(standins.__file__).parent / "trainer_main.py", project / "trainer" / "__main__.py")
    env = {
        k: v
        for k, v in Pod(vms, tpu_api, home).env.items()
        if k not in ("TPUCTL_PROJECT", "TPUCTL_ZONE", "TPUCTL_TPU", "TPUCTL_SHARED_DIRS")  # the steps set these
    }
    env |= {
        "PATH": f"{bin_dir}:{os.path.dirname(sys.executable)}:{env['PATH']}",
        "TPUCTL_PIP_ARGS": image.OFFLINE_PIP_ARGS,
        "CLOUDSDK_CONFIG": str(gcloud_config),
    }
    workdir = f"gs://{BUCKET}/runs/b16"
    with terminal(env, project, tmp_path) as (type_line, output):

        def run(line: str, until: str | None = None, then: list[str] | None = None, timeout: float = 120) -> str:
            """Type `line`; where it waits for the user, wait for `until` on screen and type `then`. Its output and
            exit status: the first `@@ exit` after the terminal's echo of the line (the previous prompt's may reach
            the log after this line was typed)."""
            start = len(output())
            type_line(line)

            def end() -> re.Match[str] | None:
                said = output()[start:]
                echo = said.find(line[:30])
                return EXIT.search(said, echo + 30) if echo >= 0 else None

            if until:
                wait_until(lambda: until in output()[start:], timeout, f"{until!r} after {line!r}", output)
                for keys in then or []:
                    type_line(keys)
            wait_until(end, timeout, f"{line!r} to end", output)
            ended = end()
            assert ended is not None
            return output()[start:], int(ended.group(1))

        for line in lines:
            command = line.split("  #", 1)[0].strip()
            if command.startswith("tpuctl run recipes/b16.toml --dry-run"):
                put_the_data_in_the_bucket(project)
            if command == "tpuctl status && tpuctl logs -f":  # follows until Ctrl-C, once a step is logged
                said, status = run(line, until="pretrain160 3 ", then=["C-c"])
                assert status == 130 and "running" in said, said  # 130: ended by Ctrl-C, as a shell reports it
                continue
            if command == f"tpuctl delete {TPU}":  # asks for the TPU's name, as a person types it
                said, status = run(line, until="Type the TPU name", then=[TPU])
            else:
                said, status = run(line)
            assert status == 0, f"{line!r} ended {status}:\n{said}"
            check_what_it_did(command, said, tpu_api, vms, workdir)


def check_what_it_did(command: str, said: str, tpu_api, vms, workdir: str) -> None:
    """The effect each first step's comment promises, seen from the stand-ins."""
    node = tpu_api.nodes.get((PROJECT, ZONE, TPU))
    if command.startswith("tpuctl create"):
        assert node and node["state"] == "READY" and node["acceleratorType"] == "v4-16", node
        assert node["schedulingConfig"].get("spot"), node["schedulingConfig"]
        key = vms.key_path.with_suffix(".pub").read_text().split()[1]
        assert key in node["metadata"]["ssh-keys"], node["metadata"]  # "your SSH key goes in its metadata"
    elif command.startswith("tpuctl exec"):
        assert all(w.ip in said for w in vms.workers), said
    elif command.startswith("gcloud storage buckets create"):
        from google.cloud import storage as gcs

        assert gcs.Client(project=PROJECT).bucket(BUCKET).exists()
    elif command.startswith("tpuctl sync"):
        for w in vms.workers:
            assert w.path("/root/tpuctl/recipes/b16.toml").exists()
            assert (w.path("/root/tpuctl/.venv") / ".tpuctl-prepared").exists()
    elif command == "tpuctl doctor":
        assert "FAIL" not in said, said
    elif command == "tpuctl run recipes/b16.toml --dry-run":
        assert f"--workdir {workdir}" in said and "Would " in said, said
    elif command == "tpuctl run recipes/b16.toml":
        assert "Started run 'b16' on 2 workers" in said and workdir in said, said
    elif command == "tpuctl stop":
        steps = committed_steps(storage.at(workdir) / "pretrain160")
        assert steps, f"no checkpoint in {workdir}:\n{said}"
    elif command == f"tpuctl delete {TPU}":
        assert node is None, node
        assert committed_steps(storage.at(workdir) / "pretrain160"), "the bucket's checkpoints stay"
