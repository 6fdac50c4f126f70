"""Random parameters for a model's tests: numpy noise of each leaf's shape, with no jitted init to compile."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def random_params(module: nn.Module, *inputs, seed: int = 0) -> dict:
    """Variables of `module` filled with numpy noise (LayerNorm scales near 1): no jitted init to compile (seconds
    on CPU), and no zero-initialised leaves hiding a dependency."""
    shapes = jax.eval_shape(lambda: nn.unbox(module.init(jax.random.key(0), *inputs)))
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        noise = rng.standard_normal(leaf.shape)
        return jnp.asarray(1 + 0.1 * noise if path[-1].key == "scale" else 0.05 * noise, leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)
