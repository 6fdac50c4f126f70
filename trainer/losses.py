"""CLIP losses on a global batch: softmax contrastive, SigLIP sigmoid, caption cross-entropy.

Each is one vectorized expression over the whole (sharded) batch: no per-device Python loop; the caption loss on a
decoder's readout runs over chunks of caption positions, its gradient formed as it goes (readout_cross_entropy).
Embeddings come in L2-normalised; the temperature arrives as a learned log-scale, clamped here.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P

from trainer.models.text import LOGITS, Readout
from trainer.models.vit import active_rules


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


def readout_cross_entropy(
    readout: Readout, targets: jnp.ndarray, pad_id: int = 0, chunk: int = 8, tokens: jnp.ndarray | None = None
) -> jnp.ndarray:
    """caption_cross_entropy(readout.logits(), targets), value and gradient, without the (B, T, V) logits: a scan over
    `chunk` caption positions at a time forms that chunk's f32 logits, its loss and at once its gradient (softmax -
    one-hot): the hidden states' (kept per chunk) and the projection's (summed). The backward pass only scales them
    by the incoming cotangent, so the matmuls are the three autodiff would run, none recomputed, and memory holds one
    chunk's logits instead of all of them (the fused linear cross-entropy of LLM trainers).

    On a mesh (inside trainer.sharding.activation_layout) each device runs the scan on its own rows (shard_map): the
    projection's gradient is summed over the batch's devices once, after the scan, not once a chunk; a vocabulary
    split over `tensor` takes its softmax's max and sum across those devices. `tokens`: divide by this many target
    tokens instead of these targets' (a micro-batch's share of a whole batch's mean)."""
    mask = (targets != pad_id).astype(jnp.float32)
    weights = mask / jnp.maximum(mask.sum() if tokens is None else tokens.astype(jnp.float32), 1.0)
    length = targets.shape[1]
    chunk = max(c for c in range(1, min(chunk, length) + 1) if length % c == 0)
    bias = readout.bias if readout.bias is not None else jnp.zeros(readout.kernel.shape[1], readout.kernel.dtype)
    return _fused_cross_entropy(chunk, readout.hidden, readout.kernel, bias, targets, weights)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fused_cross_entropy(chunk, hidden, kernel, bias, targets, weights):
    return _on_mesh(chunk, hidden, kernel, bias, targets, weights, with_grads=False)[0]


def _fused_forward(chunk, hidden, kernel, bias, targets, weights):
    total, (dx, dk, db) = _on_mesh(chunk, hidden, kernel, bias, targets, weights, with_grads=True)
    return total, (dx, dk.astype(kernel.dtype), db.astype(bias.dtype))


def _fused_backward(chunk, residuals, cotangent):
    scale = lambda grad: (cotangent * grad).astype(grad.dtype)  # noqa: E731
    return *(scale(g) for g in residuals), None, None


_fused_cross_entropy.defvjp(_fused_forward, _fused_backward)


def _on_mesh(chunk, hidden, kernel, bias, targets, weights, with_grads):
    """_local_cross_entropy on each device's rows where a mesh is active, else on the whole arrays."""
    rules, mesh = active_rules(), jax.sharding.get_abstract_mesh()
    if rules is None or mesh.empty:
        return _local_cross_entropy(chunk, hidden, kernel, bias, targets, weights, with_grads, (), None)
    spec = nn.logical_to_mesh_axes(LOGITS, rules)
    assert spec is not None  # rules are given: a spec comes back
    rows, _, vocab = spec
    batch_axes = tuple(a for a in (rows if isinstance(rows, tuple) else (rows,)) if a is not None)
    vocab_axis = vocab if vocab is not None and mesh.shape[vocab] > 1 else None
    tokens, table, row = P(rows, None, None), P(None, vocab_axis), P(rows, None)
    grads_spec = (tokens, table, P(vocab_axis)) if with_grads else (P(), P(), P())
    local = functools.partial(
        _local_cross_entropy, chunk, with_grads=with_grads, batch_axes=batch_axes, vocab_axis=vocab_axis
    )
    return jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(tokens, table, P(vocab_axis), row, row),
        out_specs=(P(), grads_spec),
        check_vma=False,
    )(hidden, kernel, bias, targets, weights)


def _chunks(x: jnp.ndarray, chunk: int) -> jnp.ndarray:
    """(B, T, ...) -> (T / chunk, B, chunk, ...): the scan's leading axis."""
    return jnp.swapaxes(x.reshape(x.shape[0], x.shape[1] // chunk, chunk, *x.shape[2:]), 0, 1)


def _unchunk(x: jnp.ndarray) -> jnp.ndarray:
    x = jnp.swapaxes(x, 0, 1)
    return x.reshape(x.shape[0], x.shape[1] * x.shape[2], *x.shape[3:])


def _local_cross_entropy(chunk, hidden, kernel, bias, targets, weights, with_grads, batch_axes, vocab_axis):
    """sum(weights * nll) and, with_grads, its gradients (hidden, kernel, bias), over the rows given (summed over
    `batch_axes` at the end) and the vocabulary's columns given (a slice of them where `vocab_axis` splits it). The
    matmuls run in the hidden states' dtype with f32 accumulation, as nn.Dense on TPU; the gradients come back f32."""
    dtype, columns = hidden.dtype, kernel.shape[1]
    k, b = kernel.astype(dtype), bias.astype(jnp.float32)
    first = 0 if vocab_axis is None else jax.lax.axis_index(vocab_axis) * columns
    across = (lambda f, x: x) if vocab_axis is None else (lambda f, x: f(x, vocab_axis))

    def step(carry, xs):
        total, dk, db = carry
        x, t, w = xs
        logits = jnp.einsum("bcw,wv->bcv", x, k, preferred_element_type=jnp.float32) + b
        top = across(jax.lax.pmax, jax.lax.stop_gradient(logits.max(axis=-1)))
        lse = top + jnp.log(across(jax.lax.psum, jnp.exp(logits - top[..., None]).sum(axis=-1)))
        here = t - first  # the target's column in this slice of the vocabulary (outside it: another device's)
        held = (here >= 0) & (here < columns)
        picked = jnp.take_along_axis(logits, jnp.clip(here, 0, columns - 1)[..., None], axis=-1)[..., 0]
        picked = across(jax.lax.psum, jnp.where(held, picked, 0.0))
        total = total + ((lse - picked) * w).sum()
        if not with_grads:
            return (total, dk, db), None
        hit = jnp.arange(columns) == here[..., None]
        dlogits = ((jnp.exp(logits - lse[..., None]) - hit) * w[..., None]).astype(dtype)
        dx = across(jax.lax.psum, jnp.einsum("bcv,wv->bcw", dlogits, k))
        dk = dk + jnp.einsum("bcw,bcv->wv", x, dlogits, preferred_element_type=jnp.float32)
        db = db + dlogits.astype(jnp.float32).sum(axis=(0, 1))
        return (total, dk, db), dx

    shapes = (kernel.shape, bias.shape) if with_grads else ((), ())
    zeros = (jnp.zeros((), jnp.float32), *(jnp.zeros(shape, jnp.float32) for shape in shapes))
    xs = (_chunks(hidden, chunk), _chunks(targets, chunk), _chunks(weights, chunk))
    (total, dk, db), dx = jax.lax.scan(step, zeros, xs)
    if batch_axes:  # each device summed its own rows: once over the batch's devices, after the scan
        total, dk, db = jax.lax.psum((total, dk, db), batch_axes)
    return total, (None if dx is None else _unchunk(dx), dk, db)
