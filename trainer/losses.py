"""CLIP losses on a global batch: softmax contrastive, SigLIP sigmoid, caption cross-entropy.

Each is one vectorized expression over the whole (sharded) batch: no per-device Python loop. Embeddings come in
L2-normalised; the temperature arrives as a learned log-scale, clamped here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def logits(image_emb: jnp.ndarray, text_emb: jnp.ndarray, log_scale: jnp.ndarray, max_scale: float) -> jnp.ndarray:
    """(B, B) similarities times the learned temperature exp(log_scale), clamped to max_scale (CLIP's 100)."""
    scale = jnp.minimum(jnp.exp(log_scale), max_scale)
    return scale * jnp.einsum("id,jd->ij", image_emb.astype(jnp.float32), text_emb.astype(jnp.float32))


def softmax_contrastive(sim: jnp.ndarray) -> jnp.ndarray:
    """Mean of image->text and text->image cross-entropy, the matching pair on the diagonal."""
    labels = jnp.arange(sim.shape[0])
    i2t = -jnp.take_along_axis(jax.nn.log_softmax(sim, axis=1), labels[:, None], axis=1).mean()
    t2i = -jnp.take_along_axis(jax.nn.log_softmax(sim, axis=0), labels[None, :], axis=0).mean()
    return (i2t + t2i) / 2


def sigmoid_contrastive(sim: jnp.ndarray, bias: jnp.ndarray) -> jnp.ndarray:
    """SigLIP: every pair is a binary decision, +1 on the diagonal and -1 elsewhere; summed per image, averaged."""
    signs = 2 * jnp.eye(sim.shape[0]) - 1
    return -jax.nn.log_sigmoid(signs * (sim + bias)).sum(axis=1).mean()


def caption_cross_entropy(logits: jnp.ndarray, targets: jnp.ndarray, pad_id: int = 0) -> jnp.ndarray:
    """Mean next-token cross-entropy over the non-padding targets. logits (B, T, V), targets (B, T)."""
    mask = (targets != pad_id).astype(jnp.float32)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)  # log-sum-exp form
    return (nll * mask).sum() / jnp.maximum(mask.sum(), 1.0)
