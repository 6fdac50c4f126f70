"""One training step: the forward pass, the recipe's weighted losses, the gradient (accumulated over micro-batches)
and the update.

`train_step` is pure (jit it with the state's shardings and donate the state); metrics come back as arrays, so the
step never waits on the host.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

from trainer import augment, losses
from trainer.models.clip import Clip, pixels_to_model_range
from trainer.recipe import Recipe, Stage


@struct.dataclass
class TrainState:
    step: jnp.ndarray  # within the stage
    params: Any
    opt_state: Any
    rng: jnp.ndarray  # raw key data (uint32): checkpoints as a plain array


def init_state(params: Any, tx: optax.GradientTransformation, seed: int = 0) -> TrainState:
    rng = jax.random.key_data(jax.random.key(seed))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=rng)


def loss_terms(
    model: Clip,
    recipe: Recipe,
    params: Any,
    batch: dict[str, jnp.ndarray],
    patch_keep: float = 1.0,
    rng: jax.Array | None = None,
) -> tuple[jnp.ndarray, dict]:
    """The weighted total and each term; batch: images, texts (alt-text ids), captions (re-caption ids),
    recaption_texts (a re-caption sentence's ids, with loss.contrast_recaption) and colour (each sample's jitter
    draws) when the recipe jitters colours."""
    images = batch["images"]
    if "colour" in batch:
        jittered = augment.colour_jitter(images, batch["colour"], recipe.data.color_jitter)
        images = pixels_to_model_range(jittered, recipe.model.pixel_norm)
    out: dict[str, Any] = model.apply(  # type: ignore[assignment]
        {"params": params},
        images,
        batch["texts"],
        batch.get("captions"),
        patch_keep,
        batch.get("recaption_texts"),
        rngs={"dropout": rng} if rng is not None else None,
    )

    def contrast(text_emb: jnp.ndarray) -> jnp.ndarray:
        sim = losses.logits(out["image_emb"], text_emb, out["log_scale"], recipe.loss.max_temperature)
        if recipe.loss.contrastive == "sigmoid":
            return losses.sigmoid_contrastive(sim, out["bias"])
        return losses.softmax_contrastive(sim)

    contrastive = contrast(out["text_emb"])
    terms = {"contrastive": contrastive, "temperature": jnp.exp(out["log_scale"])}
    if "second_text_emb" in out:  # OpenVision: the mean of the image's contrast with either text
        terms["contrastive_alt"], terms["contrastive_recaption"] = contrastive, contrast(out["second_text_emb"])
        contrastive = terms["contrastive"] = (contrastive + terms["contrastive_recaption"]) / 2
    total = recipe.loss.contrastive_weight * contrastive
    if "caption" in out:
        terms["caption"] = losses.readout_cross_entropy(out["caption"], batch["captions"])
        total = total + recipe.loss.caption_weight * terms["caption"]
    return total, terms


def micro_batches(batch: dict[str, jnp.ndarray], count: int) -> dict[str, jnp.ndarray]:
    """(B, ...) -> (count, B / count, ...), micro-batch m = rows m, m + count, ...: each device's rows split evenly
    over the micro-batches, so the split needs no communication."""
    return {k: v.reshape(v.shape[0] // count, count, *v.shape[1:]).swapaxes(0, 1) for k, v in batch.items()}


def train_step(
    model: Clip,
    recipe: Recipe,
    stage: Stage,
    tx: optax.GradientTransformation,
    state: TrainState,
    batch: dict[str, jnp.ndarray],
) -> tuple[TrainState, dict[str, jnp.ndarray]]:
    step_key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    rng = step_key if stage.patch_keep < 1 else None  # only patch dropout draws random numbers

    def grads_of(micro: dict[str, jnp.ndarray], key: jax.Array | None) -> tuple[tuple[jnp.ndarray, dict], Any]:
        terms_of = lambda p: loss_terms(model, recipe, p, micro, stage.patch_keep, key)  # noqa: E731
        return jax.value_and_grad(terms_of, has_aux=True)(state.params)

    if stage.grad_accum == 1:
        (loss, terms), grads = grads_of(batch, rng)
    else:

        def accumulate(total: Any, xs: tuple[dict[str, jnp.ndarray], jnp.ndarray]) -> tuple[Any, Any]:
            micro, index = xs
            out, grads = grads_of(micro, None if rng is None else jax.random.fold_in(rng, index))
            return jax.tree.map(jnp.add, total, grads), out

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
        indices = jnp.arange(stage.grad_accum)
        grads, (losses_, terms) = jax.lax.scan(accumulate, zeros, (micro_batches(batch, stage.grad_accum), indices))
        grads = jax.tree.map(lambda g, p: (g / stage.grad_accum).astype(p.dtype), grads, state.params)
        loss, terms = losses_.mean(), jax.tree.map(jnp.mean, terms)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), **terms}
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state, rng=state.rng), metrics
