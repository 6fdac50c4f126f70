"""Checkpoints of one stage, with orbax: `<workdir>/<stage>/checkpoints/<step>/{params,train,meta}`; the workdir
may be local or gs:// (orbax writes the arrays through tensorstore, its metadata through epath).

- `params`: the model parameters (what the next stage starts from); `train`: step, optimizer state and RNG; `meta`
  (JSON): the stage, the step and the data position, so a resumed run takes exactly the next batch.
- Saves are asynchronous (the step loop goes on while the arrays are written); `keep` latest per stage. A stage's
  final checkpoint is the latest of its own directory, so it is never deleted by the later stages' saves.
- Restores take the target shardings: a checkpoint written on one mesh restores onto another (other device count).
"""

from __future__ import annotations

import logging
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from trainer import storage  # noqa: F401  (before orbax touches a gs:// path: which client epath uses)
from trainer.recipe import Recipe
from trainer.step import TrainState

ITEMS = ("params", "train", "meta")

logging.getLogger("absl").setLevel(logging.WARNING)  # orbax reports every save at INFO


def abstract(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying the shardings to restore onto."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def for_stage(recipe: Recipe, workdir: epath.Path, index: int) -> StageCheckpoints:
    """Stage `index`'s checkpoints in `workdir` (a manager: close it)."""
    return StageCheckpoints(workdir / recipe.stages[index].name, recipe.checkpoint.keep)


def newest(recipe: Recipe, workdir: epath.Path, stage_name: str | None = None) -> tuple[int, int] | None:
    """(stage index, step) of the newest checkpoint of the last stage that has one, or of stage `stage_name`; None
    if there is none. What a resumed run, `trainer.eval` and `trainer.convert export` look up alike."""
    for index in reversed(range(len(recipe.stages))):
        name = recipe.stages[index].name
        if (stage_name and name != stage_name) or not (workdir / name / "checkpoints").is_dir():
            continue  # (opening a manager would create the directory)
        ckpt = for_stage(recipe, workdir, index)
        step = ckpt.latest()
        ckpt.close()
        if step is not None:
            return index, step
    return None


class StageCheckpoints:
    def __init__(self, stage_dir: epath.Path, keep: int):
        self.directory = stage_dir / "checkpoints"
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=True, enable_background_delete=True
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

    def latest(self) -> int | None:
        return self.manager.latest_step()

    def save(self, state: TrainState, meta: dict[str, Any]) -> None:
        """Start writing `state` at its step; returns once the arrays are copied off the devices."""
        train = {"step": state.step, "opt_state": state.opt_state, "rng": state.rng}
        args = ocp.args.Composite(
            params=ocp.args.StandardSave(state.params),
            train=ocp.args.StandardSave(train),
            meta=ocp.args.JsonSave(meta),
        )
        self.manager.save(int(meta["step"]), args=args, force=True)

    def restore(self, step: int, target: TrainState) -> tuple[TrainState, dict[str, Any]]:
        """The full state at `step`, laid out like `target` (abstract arrays with shardings), and its meta."""
        train = {"step": target.step, "opt_state": target.opt_state, "rng": target.rng}
        args = ocp.args.Composite(
            params=ocp.args.StandardRestore(target.params),
            train=ocp.args.StandardRestore(train),
            meta=ocp.args.JsonRestore(),
        )
        got = self.manager.restore(step, args=args)
        state = TrainState(
            step=got.train["step"], params=got.params, opt_state=got.train["opt_state"], rng=got.train["rng"]
        )
        return state, got.meta

    def restore_params(self, step: int, target: Any) -> Any:
        return self.manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(target))).params

    def params_as_saved(self, step: int) -> Any:
        """The params at `step` as this host's arrays, without a target layout (export)."""
        return self.manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore())).params

    def meta(self, step: int) -> dict[str, Any]:
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
