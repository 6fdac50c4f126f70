"""model.remat = "auto": per stage, the least recomputation whose train step fits the devices' memory.

Candidates are tried in order of the compute they add, each tower's blocks recomputed whole ("block"), all but
their matmuls ("dots") or not at all; the first one the compiler fits in memory is taken. The plan tries them for a
TPU topology (libtpu, on any machine); the trainer for the devices it runs on, with the same compiler, so both make
the same choice. Devices that state no memory limit (a CPU) take the first: nothing to fit.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Literal, TypeVar

from trainer.models import flops
from trainer.recipe import Recipe, Stage

T = TypeVar("T")
Policy = Literal["none", "block", "dots"]

# (image, text, decoder), least memory saved first. "dots" keeps the matmuls' outputs and recomputes the rest (no
# matmul runs twice); "block" runs a tower's blocks twice. For a stage, `candidates` orders them by the matmul FLOPs
# recomputed (the "block" towers' forward), this order breaking ties: the decoder "block" costs less than the towers
# at B/16's 160 px, more at So400m's 84 px. OpenVision's own choice (towers block, decoder none) is among them.
CANDIDATES: tuple[tuple[Policy, Policy, Policy], ...] = (
    ("none", "none", "none"),
    ("dots", "dots", "dots"),
    ("dots", "dots", "block"),
    ("block", "block", "none"),
    ("block", "block", "dots"),
    ("block", "block", "block"),
)


def with_remat(recipe: Recipe, choice: tuple[Policy, Policy, Policy]) -> Recipe:
    image, text, decoder = choice
    model = dataclasses.replace(recipe.model, remat="none", image_remat=image, text_remat=text, decoder_remat=decoder)
    return dataclasses.replace(recipe, model=model)


def describe(recipe: Recipe) -> str:
    """The towers' remat as a person reads it: "block", or "image block, text block, decoder none"."""
    m = recipe.model
    towers = ("image", "text", "decoder") if m.decoder else ("image", "text")
    chosen = [m.tower_remat(t) for t in towers]  # type: ignore[arg-type]
    if len(set(chosen)) == 1:
        return chosen[0]
    return ", ".join(f"{t} {c}" for t, c in zip(towers, chosen, strict=True))


def recomputed_flops(recipe: Recipe, stage: Stage, choice: tuple[Policy, Policy, Policy]) -> int:
    """The matmul FLOPs per sample a choice adds: the forward of each tower it recomputes whole."""
    blocks = flops.blocks_per_sample(recipe, stage)
    return sum(
        blocks.get(tower, 0) for tower, p in zip(("image", "text", "decoder"), choice, strict=True) if p == "block"
    )


def candidates(recipe: Recipe, stage: Stage | None = None) -> list[Recipe]:
    """The recipe with each candidate in turn (those a model without a decoder cannot tell apart, once); for a
    stage, the least recomputed FLOPs first."""
    choices = list(CANDIDATES)
    if stage is not None:
        choices.sort(key=lambda c: recomputed_flops(recipe, stage, c))  # stable: ties keep CANDIDATES' order
    seen: set[tuple[Policy, ...]] = set()
    out = []
    for choice in choices:
        key = choice if recipe.model.decoder else choice[:2]
        if key not in seen:
            seen.add(key)
            out.append(with_remat(recipe, choice))
    return out


def choose(
    recipe: Recipe,
    measure: Callable[[Recipe], T],
    fits: Callable[[T], bool],
    tried: list[tuple[Recipe, T]] | None = None,
    stage: Stage | None = None,
) -> tuple[Recipe, T]:
    """The recipe as it runs and its measure: as given unless its remat is "auto", else the first candidate (for
    `stage`, the least recomputation first) whose measure fits (or, where none does, the last, for the plan to
    report as not fitting). `tried` collects each candidate measured, in order."""
    if recipe.model.remat != "auto":
        return recipe, measure(recipe)
    for option in candidates(recipe, stage):
        measured = measure(option)
        if tried is not None:
            tried.append((option, measured))
        if fits(measured):
            break
    return option, measured


def memory_limit(devices: list[Any]) -> int | None:
    """The least memory any of `devices` allows a program (bytes), or None where they do not say (CPU)."""
    limits = []
    for device in devices:
        stats = device.memory_stats() if hasattr(device, "memory_stats") else None
        if not stats or "bytes_limit" not in stats:
            return None
        limits.append(int(stats["bytes_limit"]))
    return min(limits) if limits else None


def for_devices(recipe: Recipe, stage: Stage, mesh: Any) -> Recipe:
    """`recipe` with "auto" resolved for `stage` on `mesh`'s devices (the trainer's choice)."""
    if recipe.model.remat != "auto":
        return recipe
    limit = memory_limit(list(mesh.local_devices))
    if limit is None:
        return candidates(recipe)[0]
    from trainer.memory import train_memory

    fits = lambda m: m.fits and m.total <= limit  # noqa: E731
    chosen, _ = choose(recipe, lambda r: train_memory(r, stage, mesh), fits, stage=stage)
    return chosen
