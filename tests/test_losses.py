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


def test_readout_cross_entropy_matches_the_logits_loss_in_value_and_gradient():
    """The chunked loss on a decoder's readout = the loss on the whole logits, and so are its gradients (hidden
    states, kernel, bias), for chunks that divide the length, one that does not, and no padding at all; it is one
    scan over the chunks (the whole (B, T, V) never formed), its backward adding no matmul."""
    import jax

    from trainer.models.text import Readout

    b, t, w, v = 3, 12, 8, 50
    hidden = jnp.asarray(rng.normal(size=(b, t, w)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(w, v)), jnp.float32)
    bias = jnp.asarray(rng.normal(size=(v,)), jnp.float32)
    targets = jnp.asarray(rng.integers(1, v, size=(b, t))).at[0, 7:].set(0).at[2, 3:].set(0)

    def whole(h, k, bias_):
        return losses.caption_cross_entropy(Readout(h, k, bias_).logits(), targets)

    want, want_grads = jax.value_and_grad(whole, argnums=(0, 1, 2))(hidden, kernel, bias)
    for chunk in (1, 4, 5, 12, 64):

        def chunked(h, k, bias_, chunk=chunk):
            return losses.readout_cross_entropy(Readout(h, k, bias_), targets, chunk=chunk)

        got, grads = jax.value_and_grad(chunked, argnums=(0, 1, 2))(hidden, kernel, bias)
        np.testing.assert_allclose(got, want, rtol=1e-5)
        np.testing.assert_allclose(chunked(hidden, kernel, bias), want, rtol=1e-5)  # the primal alone
        for g, wg in zip(grads, want_grads, strict=True):
            np.testing.assert_allclose(g, wg, rtol=1e-4, atol=1e-6)
    no_bias = jax.grad(lambda h: losses.readout_cross_entropy(Readout(h, kernel, None), targets, chunk=4))(hidden)
    np.testing.assert_allclose(no_bias, jax.grad(lambda h: whole(h, kernel, None))(hidden), rtol=1e-4, atol=1e-6)

    # the scan's body is (B, chunk, V); nothing in the program is (B, T, V)
    grad_jaxpr = str(
        jax.make_jaxpr(jax.grad(lambda h: losses.readout_cross_entropy(Readout(h, kernel, bias), targets, chunk=4)))(
            hidden
        )
    )
    assert f"f32[{b},4,{v}]" in grad_jaxpr and f"f32[{b},{t},{v}]" not in grad_jaxpr
    dots = grad_jaxpr.count("dot_general")
    assert dots == 3, f"expected the three matmuls of a linear layer's forward and backward, found {dots}"


MESH_SCRIPT = """
import jax, jax.numpy as jnp, numpy as np
from trainer import losses, sharding
from trainer.models.text import Readout
from trainer.recipe import Mesh

mesh = sharding.make_mesh(Mesh(data=2, fsdp=2, tensor=2))
rng = np.random.default_rng(1)
b, t, w, v = 8, 12, 16, 64
hidden, kernel, bias = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((b, t, w), (w, v), (v,)))
targets = jnp.asarray(rng.integers(1, v, size=(b, t))).at[3, 5:].set(0)

def whole(h, k, bias_):
    return losses.caption_cross_entropy(Readout(h, k, bias_).logits(), targets)

def chunked(h, k, bias_):
    return losses.readout_cross_entropy(Readout(h, k, bias_), targets, chunk=4)

want = jax.jit(jax.value_and_grad(whole, argnums=(0, 1, 2)))(hidden, kernel, bias)
rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("dcn", "data", "fsdp")))
hidden, targets = jax.device_put(hidden, rows), jax.device_put(targets, rows)
kernel = jax.device_put(kernel, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp", "tensor")))
with sharding.activation_layout(mesh):
    step = jax.jit(jax.value_and_grad(chunked, argnums=(0, 1, 2)))
    got = step(hidden, kernel, bias)
    hlo = step.lower(hidden, kernel, bias).compile().as_text()
np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
for g, wg in zip(got[1], want[1]):
    np.testing.assert_allclose(g, wg, rtol=1e-4, atol=1e-6)
print("collectives", hlo.count("all-reduce"))
"""


def test_readout_cross_entropy_on_a_mesh_splits_rows_and_vocabulary():
    """On 8 CPU devices (data 2 x fsdp 2 x tensor 2, the step's activation layout): each device's rows, its slice of
    the vocabulary, the softmax across the tensor axis; value and gradients = the whole logits' loss."""
    import subprocess
    import sys

    from standins import cpu_env

    r = subprocess.run([sys.executable, "-c", MESH_SCRIPT], env=cpu_env(8), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "collectives" in r.stdout


def test_traced_flops_count_a_shard_map_body_once_a_device():
    """trainer.models.flops.traced on the caption loss inside a mesh (the shard_map'd scan) = the same loss with no
    mesh: a body traced on one device's rows counts once for each device."""
    import subprocess
    import sys

    from standins import cpu_env

    script = MESH_SCRIPT.split("want = ")[0] + (
        "from trainer.models import flops\n"
        "plain = flops.traced(jax.value_and_grad(chunked, argnums=(0, 1, 2)), hidden, kernel, bias)\n"
        "with sharding.activation_layout(mesh):\n"
        "    meshed = flops.traced(jax.value_and_grad(chunked, argnums=(0, 1, 2)), hidden, kernel, bias)\n"
        "print('flops', plain, meshed)\n"
    )
    r = subprocess.run([sys.executable, "-c", script], env=cpu_env(8), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    plain, meshed = (float(x) for x in r.stdout.split("flops")[-1].split())
    assert plain == meshed == 3 * 2 * 8 * 12 * 16 * 64, (plain, meshed)  # three (B T, W) x (W, V) matmuls
