"""Everything a recipe names, checked before the first step (and before compiling): a mistake is one line naming
the key and the path within seconds, not an exception at the first eval an hour in.

Two passes. First the paths alone, with nothing heavier than epath imported (a typo costs a second or two):
- the workdir can be written (created, a file written and removed: a missing bucket, no permission);
- every glob matches (data.train and each data.mixture entry's train, each zero-shot eval's shards), every TFDS
  builder directory has its dataset_info.json and the split named, every named file exists (text.vocab, class
  names, templates, the retrieval JSON), every init_from holds a converted checkpoint.
Then what needs TensorFlow: the tokenizer loads and fits text.vocab_rows, and every eval's inputs are loaded (class
names x templates tokenized, the retrieval JSON parsed and its first image found) — which is what the loop then
uses: `check` returns the evaluators, built once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from etils import epath

from trainer import storage
from trainer.errors import UserError
from trainer.recipe import Recipe, RecipeError

if TYPE_CHECKING:
    from trainer.evals import Evaluator


def check(recipe: Recipe, workdir: epath.Path) -> list[Evaluator]:
    """The recipe's evaluators, inputs loaded; a UserError naming what is wrong otherwise."""
    try:
        check_paths(recipe, workdir)
        return load_inputs(recipe)
    except (RecipeError, storage.StorageError) as error:
        raise UserError(str(error)) from None


def inputs(recipe: Recipe) -> list[Evaluator]:
    """The second pass alone (python -m trainer.eval: no workdir to write)."""
    try:
        return load_inputs(recipe)
    except (RecipeError, storage.StorageError) as error:
        raise UserError(str(error)) from None


def check_paths(recipe: Recipe, workdir: epath.Path) -> None:
    storage.check_writable(workdir, "--workdir")
    tfds_sources = {s.key("train"): s for s in recipe.data.sources()}
    for key, value, kind in recipe.named_paths():
        if kind == "converted":
            continue  # read whole below, then checked against the recipe
        if kind == "glob":
            storage.list_files(value, key)
            continue
        if kind == "tfds":
            from trainer.data import sources

            sources.check_builder(tfds_sources[key])
            continue
        try:
            exists = storage.at(value).is_file()
        except Exception as error:  # an unreadable bucket: gcsfs's own errors as well as OSError
            raise RecipeError(f'{key} = "{value}" cannot be read: {storage.describe(error)}') from None
        if not exists:
            raise RecipeError(f'{key} = "{value}" does not exist')
    for stage in recipe.stages:
        if stage.init_from:
            from trainer import pretrained

            settings = pretrained.read_settings(stage.init_from)  # a UserError naming the directory
            pretrained.check_recipe(recipe, settings, stage.init_from)
    if recipe.log.wandb_project:
        from trainer import wandb_log

        wandb_log.check_available(recipe)


def load_inputs(recipe: Recipe) -> list[Evaluator]:
    if recipe.data.source == "synthetic" and not recipe.data.mixture and not recipe.evals:
        return []
    from trainer import evals
    from trainer.data.tokenizers import from_recipe

    return evals.build(recipe, from_recipe(recipe))
