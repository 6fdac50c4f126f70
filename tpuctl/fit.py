"""Does the recipe fit the pod? The trainer's plan (`python -m trainer.plan`: every stage compiled by libtpu for the
pod's TPU type, on this machine, cached by the trainer) asked before a run starts, so that a stage too big for the
chips' HBM is refused here instead of failing on the pod after the queue, the sync and the prepare.

tpuctl never imports jax: the plan runs in a child process with this interpreter.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from tpuctl.errors import EXIT_FAILED, TpuctlError

PLAN_EXIT_DOES_NOT_FIT = 1  # trainer.plan's exit when a stage does not fit (it prints the refusal last on stderr)


class DoesNotFit(TpuctlError):
    exit_code = EXIT_FAILED


def plan_args(
    recipe: Path,
    accelerator_type: str,
    overrides: tuple[str, ...] = (),
    hbm_gib: float | None = None,
    largest_batch: bool = False,
) -> list[str]:
    """The command line of the trainer's plan (without --json)."""
    args = [sys.executable, "-m", "trainer.plan", str(recipe), "--type", accelerator_type]
    args += [x for item in overrides for x in ("--set", item)]
    args += [] if hbm_gib is None else ["--hbm-gib", str(hbm_gib)]
    return args + (["--largest-batch"] if largest_batch else [])


def can_plan() -> str | None:
    """None when a plan can run here, else why not (the trainer and libtpu are optional for tpuctl)."""
    if importlib.util.find_spec("jax") is None:
        return "the trainer is not installed here (pip install -e '.[train,tpu]')"
    library = os.environ.get("TPU_LIBRARY_PATH")
    if not (library and os.path.isfile(library)) and importlib.util.find_spec("libtpu") is None:
        return "libtpu is not installed here (pip install -e '.[tpu]')"
    return None


def check(
    recipe: Path, overrides: tuple[str, ...], accelerator_type: str, force: bool, say: Callable[[str], None]
) -> None:
    """Refuse (DoesNotFit, the plan's own line) a recipe with a stage that cannot fit a chip of `accelerator_type`;
    with `force`, say so and go on. Where no plan can be made here (no libtpu, a type the plan does not know), say
    why and go on: the plan is a check before the pod, never a reason not to use one."""
    missing = can_plan()
    if missing:
        say(f"Not checked whether {recipe} fits a {accelerator_type} chip: {missing}.")
        return
    say(f"Planning {recipe} for {accelerator_type} (libtpu compiles each stage here; cached after the first time)...")
    r = subprocess.run(
        [*plan_args(recipe, accelerator_type, overrides), "--json"], capture_output=True, text=True, check=False
    )
    last = (r.stderr.strip().splitlines() or ["(no output)"])[-1]
    if r.returncode == 0:
        stages = json.loads(r.stdout)["stages"]
        peak = max(s["total_bytes"] / s["hbm_bytes"] for s in stages)
        say(f"Plan: every stage fits a {accelerator_type} chip (at most {100 * peak:.0f}% of its HBM).")
    elif r.returncode == PLAN_EXIT_DOES_NOT_FIT and not force:
        raise DoesNotFit(last, "change the recipe (tpuctl plan shows each stage), or --force to start anyway")
    elif r.returncode == PLAN_EXIT_DOES_NOT_FIT:
        say(f"{last}; starting anyway (--force).")
    else:
        say(f"Not checked whether {recipe} fits a {accelerator_type} chip: the plan said: {last}")
