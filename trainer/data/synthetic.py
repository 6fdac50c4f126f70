"""A deterministic synthetic dataset that can be learned: for tests, benchmarks and the first minutes of a new setup.

Sample g of the stream belongs to one of `CONCEPTS` concepts; its image is the concept's colour pattern (plus a
brightness shift), its alt-text and re-caption are the concept's fixed token sequences (the re-caption only for a
model with a caption decoder, as from shards; a re-caption sentence with loss.contrast_recaption). Everything is a
function of (seed, stage, global sample index), so a global batch is the same whatever the number of hosts, and the
position is just the number of batches taken. No colour jitter: a concept IS its colours.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from trainer.data import Batch, Host, Position, wants_captions
from trainer.recipe import Recipe

CONCEPTS = 100
EOS_ID = 2
FIRST_WORD_ID = 1000  # clear of BERT's special and unused ids


def batches(
    recipe: Recipe, stage_index: int, host: Host, position: Position | None
) -> Iterator[tuple[Batch, Position]]:
    stage = recipe.stages[stage_index]
    seed = recipe.data.seed
    patterns = concept_images(seed, stage.resolution)
    texts = concept_tokens(seed + 1, recipe.text.context_length, words=(3, 8))
    captions = concept_tokens(seed + 2, recipe.text.caption_length, words=(6, 14)) if wants_captions(recipe) else None
    # loss.contrast_recaption's second text: another fixed sentence per concept
    sentences = concept_tokens(seed + 3, recipe.text.context_length, words=(3, 8))
    mine = host.share(stage.global_batch)
    index = 0 if position is None else int(position["batch"])
    while True:
        rng = np.random.default_rng([seed, stage_index, index])
        concept = rng.integers(0, CONCEPTS, stage.global_batch)[mine]
        shift = rng.integers(-24, 25, stage.global_batch)[mine]
        images = np.clip(patterns[concept].astype(np.int16) + shift[:, None, None, None], 0, 255).astype(np.uint8)
        index += 1
        batch = {"images": images, "texts": texts[concept]}
        if captions is not None:
            batch["captions"] = captions[concept]
        if recipe.loss.contrast_recaption:
            batch["recaption_texts"] = sentences[concept]
        yield batch, {"batch": index}


def concept_images(seed: int, resolution: int) -> np.ndarray:
    """(CONCEPTS, resolution, resolution, 3) uint8: a coarse 4x4 colour grid per concept, scaled up."""
    grid = np.random.default_rng([seed, 0]).integers(0, 256, (CONCEPTS, 4, 4, 3), dtype=np.uint8)
    cell = -(-resolution // 4)
    return grid.repeat(cell, axis=1).repeat(cell, axis=2)[:, :resolution, :resolution]


def concept_tokens(seed: int, length: int, words: tuple[int, int]) -> np.ndarray:
    """(CONCEPTS, length) int32: each concept's word ids, then [eos], then padding (0)."""
    rng = np.random.default_rng([seed, 1])
    out = np.zeros((CONCEPTS, length), np.int32)
    for row in out:
        n = min(int(rng.integers(*words)), length - 1)
        row[:n] = rng.integers(FIRST_WORD_ID, 30_000, n)
        row[n] = EOS_ID
    return out
