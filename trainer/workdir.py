"""python -m trainer.workdir WORKDIR: what a run's workdir (local or gs://) holds, as one JSON line, for tpuctl.

    {"checkpoint": "STAGE/STEP" | null, "stages": [[STAGE, [STEP, ...]], ...]}

The newest committed checkpoint is the latest step of the last stage (in recipe.json's order) that has one. A
checkpoint counts once orbax has committed it: locally its step directory exists under its final name (orbax writes
to a temporary name and renames), on a bucket the step directory holds `commit_success.txt`. Only epath (with gcsfs)
is imported: no jax, no TensorFlow, so tpuctl can ask a worker's venv in about a second.
"""

from __future__ import annotations

import json
import sys

from etils import epath

from trainer import storage

COMMIT_MARKER = "commit_success.txt"  # orbax's mark of a finished save on object stores


def committed_steps(stage_dir: epath.Path) -> list[int]:
    directory = stage_dir / "checkpoints"
    if not directory.is_dir():
        return []
    steps = []
    for child in directory.iterdir():
        if child.name.isdigit() and (not storage.is_remote(child) or (child / COMMIT_MARKER).exists()):
            steps.append(int(child.name))
    return sorted(steps)


def describe(workdir: epath.Path) -> dict:
    recipe = workdir / "recipe.json"
    names = [s["name"] for s in json.loads(recipe.read_text())["stages"]] if recipe.exists() else []
    stages = [(name, committed_steps(workdir / name)) for name in names]
    newest = next((f"{name}/{steps[-1]}" for name, steps in reversed(stages) if steps), None)
    return {"checkpoint": newest, "stages": stages}


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m trainer.workdir WORKDIR", file=sys.stderr)
        return 2
    try:
        print(json.dumps(describe(storage.at(argv[0]))))
    except Exception as error:  # one line for tpuctl, whatever the client raised
        print(json.dumps({"error": f"{argv[0]}: {storage.describe(error)}"}))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
