"""python -m trainer.eval RECIPE --workdir DIR [--stage NAME] [--checkpoint STEP]
python -m trainer.eval RECIPE --checkpoint CONVERTED_DIR [--stage NAME]

Runs the recipe's [[evals]] on a checkpoint (default: the latest of the last stage that has one), at that stage's
resolution; prints a table and adds the results to the workdir's metrics (JSONL and TensorBoard) at the checkpoint's
global step. A converted directory (`python -m trainer.convert import`) is evaluated at the stage's resolution (the
last stage's unless --stage names one); its results are printed only.
"""

from __future__ import annotations

import sys
from typing import Any

import click

from trainer import contract
from trainer.errors import UserError
from trainer.recipe import Recipe, RecipeError, load


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("recipe_path", metavar="RECIPE", type=click.Path(dir_okay=False))
@click.option("--workdir", help="The training run's workdir (local or gs://).")
@click.option("--stage", "stage_name", default="", help="The stage whose checkpoint to evaluate (default: the last).")
@click.option("--checkpoint", default=None, help="Its step (default: its latest), or a converted directory.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a recipe key (repeatable).")
def main(
    recipe_path: str, workdir: str | None, stage_name: str, checkpoint: str | None, overrides: tuple[str, ...]
) -> None:
    """Evaluate a checkpoint of RECIPE's run in WORKDIR, or a converted checkpoint."""
    try:
        recipe = load(recipe_path, overrides)
    except RecipeError as e:
        raise UserError(str(e)) from None
    if not recipe.evals:
        raise UserError(f"{recipe_path} has no [[evals]]")
    names = [s.name for s in recipe.stages]
    if stage_name and stage_name not in names:
        raise UserError(f"--stage {stage_name}: the recipe's stages are {', '.join(names)}")
    step = int(checkpoint) if checkpoint is not None and checkpoint.isdigit() else None
    if checkpoint is not None and step is None:
        check_converted(recipe, checkpoint)  # before the eval inputs are read and tokenized: seconds sooner
    from trainer import preflight

    evaluators = preflight.inputs(recipe)  # inputs read once (a missing one is one line naming its key)
    if checkpoint is not None and step is None:
        return evaluate_converted(recipe, evaluators, checkpoint, names.index(stage_name) if stage_name else -1)
    if workdir is None:
        raise UserError("--workdir is needed to evaluate a run's checkpoint (or pass --checkpoint CONVERTED_DIR)")
    import jax

    from trainer import checkpoint as checkpoints
    from trainer import evals, sharding, storage
    from trainer.metrics import MetricsLog
    from trainer.models.clip import build
    from trainer.program import abstract_params
    from trainer.report import Report

    run_dir = storage.at(workdir)
    if step is None:
        newest = checkpoints.newest(recipe, run_dir, stage_name)
        if newest is None:
            raise UserError(f"no checkpoint in {workdir}" + (f" for stage {stage_name}" if stage_name else ""))
        index, found = newest
    else:
        index, found = names.index(stage_name) if stage_name else len(names) - 1, step
    stage = recipe.stages[index]
    ckpt = checkpoints.for_stage(recipe, run_dir, index)
    try:
        mesh = sharding.checked_mesh(recipe)
        model = build(recipe)
        params = ckpt.restore_params(found, abstract_params(model, recipe, stage, mesh))
    except FileNotFoundError:
        raise UserError(f"stage {stage.name} has no checkpoint {found} in {workdir}") from None
    except RecipeError as e:  # what depends on the devices
        raise UserError(str(e)) from None
    results = evals.run_all(evaluators, model, params, mesh, stage.resolution)
    host0 = jax.process_index() == 0
    Report(enabled=host0).table(contract.eval_table_title(stage.name, found), results)
    metrics = MetricsLog(run_dir, enabled=host0, start_step=None)
    metrics.write(recipe.global_step(index, found), {"stage": stage.name, "stage_step": found, **results})
    metrics.close()


def check_converted(recipe: Recipe, directory: str) -> None:
    """A converted checkpoint directory (local or gs://) that holds the model the recipe builds, or one line."""
    from trainer import pretrained, storage

    if not storage.at(directory).is_dir():
        raise UserError(f"--checkpoint {directory}: neither a step number nor a directory")
    pretrained.check_recipe(recipe, pretrained.read_settings(directory), directory)


def evaluate_converted(recipe: Recipe, evaluators: list[Any], directory: str, index: int) -> None:
    """A converted checkpoint (checked: check_converted) at stage `index`'s resolution; the table only (it is no
    run's)."""
    import jax

    from trainer import evals, pretrained, sharding
    from trainer.models.clip import build
    from trainer.program import fit_positions
    from trainer.report import Report

    stage = recipe.stages[index]
    try:
        mesh = sharding.checked_mesh(recipe)
    except RecipeError as e:  # what depends on the devices
        raise UserError(str(e)) from None
    model = build(recipe)
    params = fit_positions(recipe, stage, pretrained.restore(directory, recipe, stage, model, mesh))
    results = evals.run_all(evaluators, model, params, mesh, stage.resolution)
    Report(enabled=jax.process_index() == 0).table(f"evals: {directory} at {stage.resolution} px", results)


if __name__ == "__main__":
    sys.exit(main())
