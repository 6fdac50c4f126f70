"""The optimizer of a stage: AdamW (first moment in bf16 optional), decoupled weight decay on kernels only,
linear warmup then cosine to 0, optional global-norm clipping. Each stage gets a fresh one."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from trainer.recipe import Recipe, Stage


def schedule(stage: Stage, total_steps: int) -> optax.Schedule:
    if stage.warmup_steps == 0:
        return optax.cosine_decay_schedule(stage.peak_lr, max(total_steps, 1))
    return optax.warmup_cosine_decay_schedule(
        0.0, stage.peak_lr, stage.warmup_steps, max(total_steps, stage.warmup_steps + 1), end_value=0.0
    )


def decay_mask(params: Any) -> Any:
    """True for matrix weights ("kernel"); biases, norms, embeddings, temperature and positions are not decayed."""
    return jax.tree_util.tree_map_with_path(lambda path, _: _last_key(path) == "kernel", params)


def _last_key(path: tuple) -> str | None:
    """The innermost dict key (boxed parameters add an attribute step after it)."""
    keys = [entry.key for entry in path if hasattr(entry, "key")]
    return keys[-1] if keys else None


def make(recipe: Recipe, stage: Stage) -> optax.GradientTransformation:
    o = recipe.optimizer
    adamw = optax.adamw(
        schedule(stage, recipe.stage_steps(stage)),
        b1=o.b1,
        b2=o.b2,
        mu_dtype=jnp.dtype(o.mu_dtype),
        weight_decay=o.weight_decay,
        mask=decay_mask,
    )
    return optax.chain(optax.clip_by_global_norm(o.grad_clip_norm), adamw) if o.grad_clip_norm > 0 else adamw
