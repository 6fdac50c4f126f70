"""Everything a recipe names, checked before the first step (and before compiling): a mistake is one line naming
the key and the path within seconds, not an exception at the first eval an hour in.

- the workdir can be written (created, a file written and removed: a missing bucket, no permission);
- every glob matches (data.train, each eval's files), every named file exists (text.vocab, class names, templates,
  the retrieval JSON and its first image, each stage's init_from);
- the tokenizer loads and fits text.vocab_rows;
- every eval's inputs are loaded, which is what the loop then uses: `check` returns the evaluators, built once.
"""

from __future__ import annotations

from etils import epath

from trainer import storage
from trainer.errors import UserError
from trainer.recipe import Recipe, RecipeError


def check(recipe: Recipe, workdir: epath.Path) -> list:
    """The recipe's evaluators, inputs loaded; a UserError naming what is wrong otherwise."""
    try:
        return _check(recipe, workdir)
    except (RecipeError, storage.StorageError) as error:
        raise UserError(str(error)) from None


def _check(recipe: Recipe, workdir: epath.Path) -> list:
    storage.check_writable(workdir, "--workdir")
    if recipe.data.source != "synthetic":
        from trainer.data.tfdata import list_files

        list_files(recipe.data.train, "data.train")
    for stage in recipe.stages:
        if stage.init_from:
            from trainer import pretrained

            settings = pretrained.read_settings(stage.init_from)  # a UserError naming the directory
            pretrained.check_recipe(recipe, settings, stage.init_from)
    if recipe.log.wandb_project:
        from trainer import wandb_log

        wandb_log.check_available(recipe)
    if recipe.data.source == "synthetic" and not recipe.evals:
        return []
    from trainer import evals
    from trainer.data.tokenizers import from_recipe

    return evals.build(recipe, from_recipe(recipe))
