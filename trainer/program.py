"""What runs on the devices for one stage: the optimizer, where every array lives, and the jitted step.

The loop and the benchmark build it the same way, so `python -m trainer.bench` measures the step that trains.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from trainer import optimizer, sharding
from trainer.checkpoint import abstract
from trainer.data import JITTER_DRAWS
from trainer.models.clip import Clip
from trainer.models.vit import resize_positions
from trainer.recipe import Recipe, Stage
from trainer.step import TrainState, init_state, train_step


@dataclass(frozen=True)
class StageProgram:
    model: Clip
    recipe: Recipe
    stage: Stage
    mesh: jax.sharding.Mesh
    tx: optax.GradientTransformation
    state_shardings: Any  # a TrainState of NamedShardings
    abstract_state: Any  # a TrainState of ShapeDtypeStructs with those shardings: the restore target
    batch_sharding: jax.sharding.NamedSharding
    step: Callable[[TrainState, dict[str, jax.Array]], tuple[TrainState, dict[str, jax.Array]]]

    def init_state(self, params: Any | None = None) -> TrainState:
        """A fresh optimizer (and step 0) for `params`, or for freshly initialised params."""
        if params is None:
            init = lambda: nn.unbox(init_variables(self.model, self.recipe, self.stage))["params"]  # noqa: E731
            params = jax.jit(init, out_shardings=self.state_shardings.params)()
        make = partial(init_state, tx=self.tx, seed=self.recipe.data.seed)
        return jax.jit(make, out_shardings=self.state_shardings)(params)

    def global_batch(self, host_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """This host's rows of the batch -> global arrays sharded over (data, fsdp)."""
        return {k: jax.make_array_from_process_local_data(self.batch_sharding, v) for k, v in host_batch.items()}


def compile_stage(model: Clip, recipe: Recipe, stage: Stage, mesh: jax.sharding.Mesh) -> StageProgram:
    tx = optimizer.make(recipe, stage)
    boxed = jax.eval_shape(lambda: init_state(init_variables(model, recipe, stage)["params"], tx, recipe.data.seed))
    state_shardings = sharding.logical_shardings(boxed, mesh)
    batch_sharding = sharding.batch_sharding(mesh)

    def laid_out_step(state: TrainState, batch: dict[str, jax.Array]) -> tuple[TrainState, dict[str, jax.Array]]:
        with sharding.activation_layout(mesh):
            return train_step(model, recipe, stage, tx, state, batch)

    step = jax.jit(
        laid_out_step,
        in_shardings=(state_shardings, batch_sharding),
        out_shardings=(state_shardings, None),
        donate_argnums=0,
    )
    restore_target = abstract(nn.unbox(boxed), state_shardings)
    return StageProgram(model, recipe, stage, mesh, tx, state_shardings, restore_target, batch_sharding, step)


def fit_positions(recipe: Recipe, stage: Stage, params: Any) -> Any:
    """Learned image positions follow the resolution: interpolated when a stage changes it."""
    if recipe.model.posemb != "learned":
        return params
    grid = stage.resolution // recipe.model.patch
    pos = params["image"]["pos_embedding"]
    if pos.shape[0] == grid * grid:
        return params
    image = {**params["image"], "pos_embedding": jax.jit(partial(resize_positions, grid=grid))(pos)}
    return {**params, "image": image}


def example_batch(recipe: Recipe, stage: Stage, size: int = 1) -> dict[str, jax.ShapeDtypeStruct]:
    r = stage.resolution
    batch = {
        "images": jax.ShapeDtypeStruct((size, r, r, 3), jnp.uint8),
        "texts": jax.ShapeDtypeStruct((size, recipe.text.context_length), jnp.int32),
    }
    if recipe.model.decoder:
        batch["captions"] = jax.ShapeDtypeStruct((size, recipe.text.caption_length), jnp.int32)
    if recipe.loss.contrast_recaption:
        batch["recaption_texts"] = batch["texts"]
    if recipe.data.color_jitter > 0:  # each sample's jitter draws, which the step turns into its colour map
        batch["colour"] = jax.ShapeDtypeStruct((size, JITTER_DRAWS), jnp.float32)
    return batch


def init_variables(model: Clip, recipe: Recipe, stage: Stage) -> Any:
    batch = {k: jnp.zeros(v.shape, v.dtype) for k, v in example_batch(recipe, stage).items()}
    return model.init(jax.random.key(recipe.data.seed), batch["images"], batch["texts"], batch.get("captions"))


def abstract_params(model: Clip, recipe: Recipe, stage: Stage, mesh: jax.sharding.Mesh) -> Any:
    """The parameters' shapes with their shardings on `mesh` (to restore a previous stage's params onto)."""
    boxed = jax.eval_shape(lambda: init_variables(model, recipe, stage)["params"])
    return abstract(nn.unbox(boxed), sharding.logical_shardings(boxed, mesh))
