"""The losses against direct numpy references (written out loop by loop, the way the papers define them)."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from trainer import losses

rng = np.random.default_rng(0)


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_logits_scale_and_clamp():
    img, txt = unit(rng.normal(size=(4, 8))), unit(rng.normal(size=(4, 8)))
    sim = np.asarray(losses.logits(jnp.asarray(img), jnp.asarray(txt), jnp.log(1 / 0.07), 100.0))
    # float32 dot products of unit vectors err by ~1e-7 absolute, times the scale: an entry near 0 (the draws depend
    # on which of this module's tests ran first) needs the absolute tolerance, not a relative one
    np.testing.assert_allclose(sim, img @ txt.T / 0.07, rtol=1e-5, atol=1e-5)
    clamped = np.asarray(losses.logits(jnp.asarray(img), jnp.asarray(txt), jnp.asarray(10.0), 100.0))
    np.testing.assert_allclose(clamped, img @ txt.T * 100.0, rtol=1e-5, atol=1e-4)


def test_softmax_contrastive_matches_the_reference():
    sim = rng.normal(size=(6, 6)) * 5
    ref_i2t = np.mean([-sim[i, i] + math.log(np.exp(sim[i]).sum()) for i in range(6)])
    ref_t2i = np.mean([-sim[j, j] + math.log(np.exp(sim[:, j]).sum()) for j in range(6)])
    got = float(losses.softmax_contrastive(jnp.asarray(sim)))
    assert math.isclose(got, (ref_i2t + ref_t2i) / 2, rel_tol=1e-5)


def test_sigmoid_contrastive_matches_the_reference():
    sim, bias = rng.normal(size=(5, 5)) * 3, -2.0
    ref = 0.0
    for i in range(5):
        for j in range(5):
            z = 1.0 if i == j else -1.0
            ref += math.log1p(math.exp(-z * (sim[i, j] + bias)))
    got = float(losses.sigmoid_contrastive(jnp.asarray(sim), jnp.asarray(bias)))
    assert math.isclose(got, ref / 5, rel_tol=1e-5)


def test_caption_loss_ignores_padding():
    logits = rng.normal(size=(2, 5, 11))
    targets = np.array([[3, 4, 5, 0, 0], [7, 1, 0, 0, 0]])
    ref = []
    for b in range(2):
        for t in range(5):
            if targets[b, t]:
                row = logits[b, t]
                ref.append(-row[targets[b, t]] + math.log(np.exp(row).sum()))
    got = float(losses.caption_cross_entropy(jnp.asarray(logits), jnp.asarray(targets)))
    assert math.isclose(got, float(np.mean(ref)), rel_tol=1e-5)
    # what sits under the padding changes nothing
    scrambled = logits.copy()
    scrambled[0, 3:] = 1e3
    scrambled[1, 2:] = -1e3
    assert math.isclose(
        float(losses.caption_cross_entropy(jnp.asarray(scrambled), jnp.asarray(targets))), got, rel_tol=1e-6
    )
