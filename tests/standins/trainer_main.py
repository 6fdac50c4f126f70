"""A stand-in for `python -m trainer`, for the fleet drills that exercise tpuctl's side of a run (test_babysit): a
test copies this file over its project's `trainer/__main__.py`, so the workers' `python -m trainer RECIPE --workdir
DIR --set ...` (tpuctl's own command line, unchanged) runs it. Every other module stays the real one: `python -m
trainer.workdir`, which status runs on a worker, reads what this writes.

It keeps the trainer's side of the contract (trainer/contract.py) and nothing else: the recipe is loaded and checked
by the real `trainer.recipe`; a progress line per step (a fifth of a second each, no JAX); every
`checkpoint.every_steps` steps host 0 commits a checkpoint directory in the real layout (`commit_success.txt` inside
on a bucket), after the recipe's JSON that status reads the stage names from; a start resumes from the newest
committed step; SIGTERM saves and says "preempted"; the end is the trainer's last line. What the real trainer does
under the same drills (a pod stopped and resumed to the uninterrupted losses, a hard kill resumed exactly) is
test_runs' and test_train's.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

from trainer import contract, storage
from trainer.recipe import load
from trainer.workdir import COMMIT_MARKER, committed_steps

STEP_S = 0.2  # 80 steps in 16 s: time for babysit to be killed, adopt the run and see a preemption


def main(argv: list[str]) -> int:
    recipe_path, workdir = argv[0], argv[argv.index("--workdir") + 1]
    sets = [argv[i + 1] for i, word in enumerate(argv) if word == "--set"]
    recipe = load(recipe_path, sets)
    stage = recipe.stages[0]  # the drills' recipe has one stage
    steps = stage.samples // stage.global_batch
    host0 = int(os.environ.get(contract.PROCESS_ID_ENV, "0")) == 0
    root = storage.at(workdir)
    stage_dir = root / stage.name
    if host0:
        root.mkdir(parents=True, exist_ok=True)
        (root / "recipe.json").write_text(json.dumps({"stages": [{"name": s.name} for s in recipe.stages]}))

    def save(step: int) -> None:
        if host0:
            checkpoint = stage_dir / "checkpoints" / str(step)
            checkpoint.mkdir(parents=True, exist_ok=True)
            (checkpoint / COMMIT_MARKER).write_text("")

    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    start = max(committed_steps(stage_dir), default=0)
    if start:
        print(f"resuming at step {start}/{steps}", flush=True)
    for step in range(start + 1, steps + 1):
        time.sleep(STEP_S)
        print(f"{stage.name} {step}  loss {1 / step:.3g}  img_per_s 160  eta 0m00s", flush=True)
        if step % (stage.checkpoint_every or recipe.checkpoint.every_steps) == 0:
            save(step)
        if stopping:
            save(step)
            print(f"preempted: saved stage {stage.name} step {step}/{steps}", flush=True)
            return 0
    save(steps)
    print(contract.finished_line(recipe_path, workdir), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
