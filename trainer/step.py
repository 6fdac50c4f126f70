"""One training step: the forward pass, the recipe's weighted losses, the gradient (accumulated over micro-batches)
and the update.

`train_step` is pure (jit it with the state's shardings and donate the state); metrics come back as arrays, so the
step never waits on the host.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

from trainer import augment, losses, replicas
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


EMBEDDINGS = ("image_emb", "text_emb", "second_text_emb")  # what the contrastive loss reads of the model's output
SUMMED_TERMS = ("caption",)  # a micro-batch's share of the batch's term, added up over micro-batches (the rest: equal)


@struct.dataclass
class Negatives:
    """The whole batch's embeddings from grad_accum's first pass, (micro-batches, rows, dim) each, and its caption
    tokens' count: a micro-batch's loss contrasts with every one of them and divides by all of them."""

    embeddings: dict[str, jnp.ndarray]
    caption_tokens: jnp.ndarray
    index: jnp.ndarray  # this micro-batch's row in `embeddings`


def forward(
    model: Clip,
    recipe: Recipe,
    params: Any,
    batch: dict[str, jnp.ndarray],
    patch_keep: float,
    rng: jax.Array | None,
    captions: bool = True,
) -> dict[str, Any]:
    """The model's outputs for a batch: its images colour-jittered where the recipe jitters (the draws in the batch),
    the caption decoder run where `captions` and the batch has them."""
    images = batch["images"]
    if "colour" in batch:
        jittered = augment.colour_jitter(images, batch["colour"], recipe.data.color_jitter)
        images = pixels_to_model_range(jittered, recipe.model.pixel_norm)
    return model.apply(  # type: ignore[return-value]
        {"params": params},
        images,
        batch["texts"],
        batch.get("captions") if captions else None,
        patch_keep,
        batch.get("recaption_texts"),
        rngs={"dropout": rng} if rng is not None else None,
    )


def scored(
    model: Clip,
    recipe: Recipe,
    params: Any,
    batch: dict[str, jnp.ndarray],
    patch_keep: float,
    rng: jax.Array | None,
    tokens: jnp.ndarray | None = None,
) -> dict[str, Any]:
    """forward's outputs with the caption readout scored: "caption_loss", the batch's token-weighted mean (or its
    share of a mean over `tokens` target tokens)."""
    out = forward(model, recipe, params, batch, patch_keep, rng)
    if "caption" in out:
        out["caption_loss"] = losses.readout_cross_entropy(out.pop("caption"), batch["captions"], tokens=tokens)
    return out


def through(
    on: replicas.Replicas | None,
    f: Callable[..., dict[str, Any]],
    params: Any,
    batch: dict[str, jnp.ndarray],
    key: jax.Array | None,
    merge: Callable[[dict[str, Any]], dict[str, Any]],
) -> dict[str, Any]:
    """f(params, batch, key), or where `on` gives replicas, f on each replica's copy and rows, merged as one batch's."""
    return f(params, batch, key) if on is None else merge(on.run(f, params, batch, key))


def caption_tokens(batch: dict[str, jnp.ndarray]) -> jnp.ndarray:
    return (batch["captions"] != 0).sum() if "captions" in batch else jnp.zeros((), jnp.int32)


def merged(per_replica: dict[str, jnp.ndarray]) -> dict[str, jnp.ndarray]:
    """The replicas' outputs as the whole batch's: embeddings' rows concatenated, caption shares summed, and the
    temperature and bias averaged (so each replica's copy takes its share of their gradient)."""
    how = {name: replicas.merge_rows for name in EMBEDDINGS} | {"caption_loss": lambda x: x.sum(0)}
    return {name: how.get(name, lambda x: x.mean(0))(x) for name, x in per_replica.items()}


def loss_terms(
    model: Clip,
    recipe: Recipe,
    params: Any,
    batch: dict[str, jnp.ndarray],
    patch_keep: float = 1.0,
    rng: jax.Array | None = None,
    negatives: Negatives | None = None,
    on: replicas.Replicas | None = None,
) -> tuple[jnp.ndarray, dict]:
    """The weighted total and each term; batch: images, texts (alt-text ids), captions (re-caption ids),
    recaption_texts (a re-caption sentence's ids, with loss.contrast_recaption) and colour (each sample's jitter
    draws) when the recipe jitters colours.

    With `negatives` (a micro-batch of grad_accum), this micro-batch's embeddings take their rows among the whole
    batch's and the contrastive loss is the whole batch's: its gradient reaches this micro-batch's rows (the others
    are constants) and 1/micro-batches of the temperature's, so the gradients summed over the micro-batches are the
    whole batch's (open_clip's accum_freq). The caption loss is this micro-batch's share of the batch's mean.
    `on`: `params` are stacked one copy per replica and each replica's rows run through its own (trainer.replicas)."""
    tokens = None if negatives is None else negatives.caption_tokens  # a share of the whole batch's caption mean
    if tokens is None and on is not None:  # each replica's share of this batch's
        tokens = caption_tokens(batch)
    score = lambda p, rows, key: scored(model, recipe, p, rows, patch_keep, key, tokens)  # noqa: E731
    out = through(on, score, params, batch, rng, merged)
    log_scale, bias = out["log_scale"], out.get("bias")
    embeddings = {name: out[name] for name in EMBEDDINGS if name in out}
    if negatives is not None:
        micro_count = next(iter(negatives.embeddings.values())).shape[0]

        def among(name: str, mine: jnp.ndarray) -> jnp.ndarray:
            cached = jax.lax.stop_gradient(negatives.embeddings[name])
            return cached.at[negatives.index].set(mine).reshape(-1, mine.shape[-1])

        embeddings = {name: among(name, mine) for name, mine in embeddings.items()}
        share = lambda p: p / micro_count + jax.lax.stop_gradient(p * (1 - 1 / micro_count))  # noqa: E731
        log_scale, bias = share(log_scale), None if bias is None else share(bias)

    def contrast(text_emb: jnp.ndarray) -> jnp.ndarray:
        sim = losses.logits(embeddings["image_emb"], text_emb, log_scale, recipe.loss.max_temperature)
        if recipe.loss.contrastive == "sigmoid":
            assert bias is not None  # a sigmoid model has its bias
            return losses.sigmoid_contrastive(sim, bias)
        return losses.softmax_contrastive(sim)

    contrastive = contrast(embeddings["text_emb"])
    terms = {"contrastive": contrastive, "temperature": jnp.exp(out["log_scale"])}
    if "second_text_emb" in embeddings:  # OpenVision: the mean of the image's contrast with either text
        terms["contrastive_alt"], terms["contrastive_recaption"] = contrastive, contrast(embeddings["second_text_emb"])
        terms["contrastive"] = (contrastive + terms["contrastive_recaption"]) / 2
    if "caption_loss" in out:
        terms["caption"] = out["caption_loss"]
    return weighted_total(recipe, terms), terms


def weighted_total(recipe: Recipe, terms: dict[str, jnp.ndarray]) -> jnp.ndarray:
    total = recipe.loss.contrastive_weight * terms["contrastive"]
    return total + recipe.loss.caption_weight * terms["caption"] if "caption" in terms else total


def micro_key(rng: jax.Array | None, index: jnp.ndarray) -> jax.Array | None:
    """Micro-batch `index`'s patch-dropout key: the same in grad_accum's two passes."""
    return None if rng is None else jax.random.fold_in(rng, index)


def embeddings_of(
    model: Clip,
    recipe: Recipe,
    params: Any,
    micros: dict[str, jnp.ndarray],
    patch_keep: float,
    rng: jax.Array | None,
    on: replicas.Replicas | None = None,
) -> dict[str, jnp.ndarray]:
    """grad_accum's first pass: every micro-batch's embeddings (no caption decoder, no gradient), (count, rows, dim)
    each, with the same patch dropout (and replicas) as the second pass."""

    def embed(p: Any, rows: dict[str, jnp.ndarray], key: jax.Array | None) -> dict[str, jnp.ndarray]:
        out = forward(model, recipe, p, rows, patch_keep, key, captions=False)
        return {name: out[name] for name in EMBEDDINGS if name in out}

    def one(_: None, xs: tuple[dict[str, jnp.ndarray], jnp.ndarray]) -> tuple[None, dict[str, jnp.ndarray]]:
        micro, index = xs
        merge = lambda out: jax.tree.map(replicas.merge_rows, out)  # noqa: E731
        return None, through(on, embed, params, micro, micro_key(rng, index), merge)

    count = micros["texts"].shape[0]
    return jax.lax.scan(one, None, (micros, jnp.arange(count)))[1]


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

    def grads_of(
        params: Any,
        micro: dict[str, jnp.ndarray],
        key: jax.Array | None,
        negatives: Negatives | None = None,
        on: replicas.Replicas | None = None,
    ) -> tuple[tuple[jnp.ndarray, dict], Any]:
        terms_of = lambda p: loss_terms(model, recipe, p, micro, stage.patch_keep, key, negatives, on)  # noqa: E731
        return jax.value_and_grad(terms_of, has_aux=True)(params)

    if stage.grad_accum == 1:
        (loss, terms), grads = grads_of(state.params, batch, rng)
    else:  # open_clip's accum_freq: every micro-batch contrasts with the whole batch's embeddings (a first pass)
        micros = micro_batches(batch, stage.grad_accum)
        on = replicas.Replicas.of_active_mesh()  # each replica's gradient summed where it lies, all-reduced once
        params = state.params if on is None else on.stack(state.params)
        cached = embeddings_of(model, recipe, params, micros, stage.patch_keep, rng, on)
        whole_batch = caption_tokens(batch)

        def accumulate(total: Any, xs: tuple[dict[str, jnp.ndarray], jnp.ndarray]) -> tuple[Any, Any]:
            micro, index = xs
            negatives = Negatives(cached, whole_batch, index)
            (_, terms), grads = grads_of(params, micro, micro_key(rng, index), negatives, on)
            return jax.tree.map(jnp.add, total, grads), terms

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
        with jax.named_scope("accumulate"):
            grads, terms = jax.lax.scan(
                accumulate, zeros if on is None else on.stack(zeros), (micros, jnp.arange(stage.grad_accum))
            )
        if on is not None:
            grads = jax.tree.map(lambda g: g.sum(0), grads)  # the replicas' gradients: the step's one all-reduce
        grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state.params)  # the sum is the batch's gradient
        terms = {k: v.sum() if k in SUMMED_TERMS else v.mean() for k, v in terms.items()}
        loss = weighted_total(recipe, terms)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), **terms}
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state, rng=state.rng), metrics
