"""Evaluations of a CLIP model: zero-shot classification and image-text retrieval.

`build(recipe, tokenizer)` makes one evaluator per [[evals]] entry with its inputs read, checked and tokenized once
(class names, templates, the retrieval JSON, the eval file list): a missing or unreadable one is a RecipeError naming
its key, raised before the first training step. `run_all(evaluators, model, params, mesh, resolution)` then runs
them, as often as the loop asks, and returns `{"<name>/<metric>": value}`. Each host reads its share of the eval
files; padded rows are masked, so every sample counts once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

import jax

from trainer.models.clip import Clip
from trainer.recipe import Recipe

if TYPE_CHECKING:  # the tokenizers import TensorFlow: a run without evals or tf.data never needs it
    from trainer.data.tokenizers import Tokenizer


class Evaluator(Protocol):
    name: str

    def run(self, model: Clip, params: Any, mesh: jax.sharding.Mesh, resolution: int) -> dict[str, float]: ...


def build(recipe: Recipe, tokenizer: Tokenizer) -> list[Evaluator]:
    from trainer.evals import retrieval, zeroshot

    made: list[Evaluator] = []
    for index, spec in enumerate(recipe.evals):
        kind = zeroshot.ZeroShot if spec.kind == "zeroshot" else retrieval.Retrieval
        made.append(kind(recipe, spec, f"evals[{index}]", tokenizer))
    return made


def run_all(
    evaluators: list[Evaluator],
    model: Clip,
    params: Any,
    mesh: jax.sharding.Mesh,
    resolution: int,
    errors: dict[str, str] | None = None,
) -> dict[str, float]:
    """Every evaluator's results. With `errors`, one that fails is recorded there (name -> one-line error) and the
    others still run (training must go on); without, its exception propagates."""
    results: dict[str, float] = {}
    for evaluator in evaluators:
        try:
            found = evaluator.run(model, params, mesh, resolution)
        except Exception as error:  # a bucket hiccup, an undecodable image, ...
            if errors is None:
                raise
            errors[evaluator.name] = one_line(error)
            continue
        results.update({f"{evaluator.name}/{k}": v for k, v in found.items()})
    return results


def one_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"[:300]
