"""One training step: the forward pass, the recipe's weighted losses, the gradient and the update.

`train_step` is pure (jit it with the state's shardings and donate the state); metrics come back as arrays, so the
step never waits on the host.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

from trainer import losses
from trainer.models.clip import Clip
from trainer.recipe import Recipe


@struct.dataclass
class TrainState:
    step: jnp.ndarray
    params: Any
    opt_state: Any


def init_state(params: Any, tx: optax.GradientTransformation) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def loss_terms(model: Clip, recipe: Recipe, params: Any, batch: dict[str, jnp.ndarray]) -> tuple[jnp.ndarray, dict]:
    """The weighted total and each term; batch: images, texts (alt-text ids), captions (re-caption ids)."""
    out: dict[str, Any] = model.apply(  # type: ignore[assignment]
        {"params": params}, batch["images"], batch["texts"], batch.get("captions")
    )
    sim = losses.logits(out["image_emb"], out["text_emb"], out["log_scale"], recipe.loss.max_temperature)
    if recipe.loss.contrastive == "sigmoid":
        contrastive = losses.sigmoid_contrastive(sim, out["bias"])
    else:
        contrastive = losses.softmax_contrastive(sim)
    terms = {"contrastive": contrastive, "temperature": jnp.exp(out["log_scale"])}
    total = recipe.loss.contrastive_weight * contrastive
    if "caption_logits" in out:
        terms["caption"] = losses.caption_cross_entropy(out["caption_logits"], batch["captions"])
        total = total + recipe.loss.caption_weight * terms["caption"]
    return total, terms


def train_step(
    model: Clip, recipe: Recipe, tx: optax.GradientTransformation, state: TrainState, batch: dict[str, jnp.ndarray]
) -> tuple[TrainState, dict[str, jnp.ndarray]]:
    (loss, terms), grads = jax.value_and_grad(lambda p: loss_terms(model, recipe, p, batch), has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss, "grad_norm": optax.global_norm(grads), **terms}
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics
