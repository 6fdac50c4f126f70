"""Evaluations of a CLIP model: zero-shot classification and image-text retrieval.

`run_all(recipe, model, params, mesh, resolution)` runs the recipe's [[evals]] and returns `{"<name>/<metric>":
value}`; the loop calls it every stage's `eval_every` steps and at each stage's end, `python -m trainer.eval` on a
checkpoint. Each host reads its share of the eval files; padded rows are masked, so every sample counts once.
"""

from __future__ import annotations

from typing import Any

import jax

from trainer.models.clip import Clip
from trainer.recipe import Recipe


def run_all(recipe: Recipe, model: Clip, params: Any, mesh: jax.sharding.Mesh, resolution: int) -> dict[str, float]:
    from trainer.evals import retrieval, zeroshot

    results: dict[str, float] = {}
    for spec in recipe.evals:
        evaluate = zeroshot.evaluate if spec.kind == "zeroshot" else retrieval.evaluate
        found = evaluate(recipe, spec, model, params, mesh, resolution)
        results.update({f"{spec.name}/{k}": v for k, v in found.items()})
    return results
