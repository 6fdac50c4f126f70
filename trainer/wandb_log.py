"""Weights & Biases, optional (the `wandb` extra): host 0 logs the scalars TensorBoard gets, plus each evaluation's
results as a table, to the project the recipe names in `[log] wandb_project` ("" = off).

A resumed run continues the same W&B run: its id is kept in the workdir (`wandb_id`, local or gs://). wandb's own
files (its offline copy, logs) go to a local directory, never into the workdir: `WANDB_DIR` if set, else
~/.cache/trainer/wandb. W&B drops points logged at a step below one the run already has, so after a crash (not a
preemption, which saves the step it stopped at) the steps re-trained since the last checkpoint are not logged again
until the run passes its earlier last step. Authentication is wandb's own: `WANDB_API_KEY` (which `tpuctl run`
forwards without showing it) or `wandb login`; `WANDB_MODE=offline` writes locally for a later `wandb sync`.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
from collections.abc import Mapping
from typing import Any, Protocol

from trainer.recipe import Recipe, RecipeError

ID_FILE = "wandb_id"  # in the workdir: the W&B run id, so a resumed run continues it
DEFAULT_DIR = "~/.cache/trainer/wandb"  # wandb's local files when WANDB_DIR is not set
TABLE_COLUMNS = ["eval", "metric", "value"]  # as the console's eval table


class Workdir(Protocol):
    """What is used of the workdir: an etils.epath.Path (local or gs://); a pathlib.Path fits too."""

    @property
    def name(self) -> str: ...

    def __truediv__(self, key: str) -> Workdir: ...

    def exists(self) -> bool: ...

    def read_text(self) -> str: ...

    def write_text(self, data: str) -> Any: ...


def check_available(recipe: Recipe) -> None:
    """At start-up, on every host: a recipe that asks for W&B where wandb is not installed is one line."""
    if not recipe.log.wandb_project:
        return
    try:
        import wandb  # noqa: F401
    except ImportError:
        raise RecipeError(
            f'log.wandb_project = "{recipe.log.wandb_project}" needs wandb, which is not installed:'
            " pip install '.[wandb]' (on a pod: tpuctl prepare --extras train,wandb)"
        ) from None


def local_dir() -> str:
    """Where wandb keeps its own files on this host."""
    path = os.path.expanduser(os.environ.get("WANDB_DIR") or DEFAULT_DIR)
    os.makedirs(path, exist_ok=True)
    return path


class WandbRun:
    """The W&B run of a workdir; every method is a no-op unless enabled (a project is named, and this is host 0)."""

    def __init__(self, recipe: Recipe, workdir: Workdir, host0: bool):
        self.run: Any = None
        self.enabled = bool(recipe.log.wandb_project) and host0
        if not self.enabled:
            return
        import wandb

        id_file = workdir / ID_FILE
        run_id = id_file.read_text().strip() if id_file.exists() else ""
        if not run_id:
            run_id = secrets.token_hex(6)  # W&B run ids: letters, digits, - and _
            id_file.write_text(run_id + "\n")  # before init: a run that dies starting still resumes the same id
        self.run = wandb.init(
            project=recipe.log.wandb_project,
            entity=recipe.log.wandb_entity or None,
            name=recipe.log.wandb_name or workdir.name,
            id=run_id,
            resume="allow",
            dir=local_dir(),
            config=dataclasses.asdict(recipe),
            # the trainer's output is its log (tpuctl reads it): wandb neither captures nor adds to it
            settings=wandb.Settings(console="off", silent=True),
        )

    @property
    def run_id(self) -> str | None:
        return self.run.id if self.run is not None else None

    def log(self, step: int, record: Mapping[str, Any]) -> None:
        """One logged step at global step `step`: the numbers of `record` (strings, like the stage name, are not)."""
        if self.run is None:
            return
        values = {k: v for k, v in record.items() if isinstance(v, int | float) and not isinstance(v, bool)}
        self.run.log(values, step=step)

    def table(self, title: str, step: int, results: Mapping[str, float]) -> None:
        """An evaluation's results ("NAME/METRIC": value) as a table under key `title` (e.g. "evals/STAGE"), a row per
        metric, at global step `step` (a later table under the same title is its next version)."""
        if self.run is None or not results:
            return
        import wandb

        columns: list[str | int] = list(TABLE_COLUMNS)
        rows = [[*key.rpartition("/")[::2], float(value)] for key, value in results.items()]
        self.run.log({title: wandb.Table(columns=columns, data=rows)}, step=step)

    def close(self, exit_code: int = 0) -> None:
        """Finish the run (uploads what is left); exit_code != 0 marks it failed."""
        if self.run is not None:
            run, self.run = self.run, None
            run.finish(exit_code=exit_code)
