"""Parameters from outside a run: the directory `python -m trainer.convert import` writes, and what reads it.

    DIR/params/     the params tree (orbax), at the image size it was trained at
    DIR/model.toml  the recipe tables that build that model ([model], [text], [loss]) and its resolution

A stage starts from it with `init_from = "DIR"`; `python -m trainer.eval RECIPE --checkpoint DIR` evaluates it. DIR
may be local or gs:// (every host of a pod reads it). The recipe must build the same model: every architecture key
of model.toml is compared first, then every tensor's shape, and a difference is one line naming it. Learned positions
follow the stage's resolution (interpolated); a caption decoder the recipe adds starts freshly initialised.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import orbax.checkpoint as ocp

from trainer import storage
from trainer.errors import UserError
from trainer.models import variants
from trainer.recipe import CONVERTED_SETTINGS, Model, Recipe, Stage, Text, tomllib

# what only changes how the model runs (precision, memory, kernels), never what its parameters mean
RUNTIME_KEYS = {
    "dtype",
    "param_dtype",
    "remat",
    "image_remat",
    "text_remat",
    "decoder_remat",
    "attention",
    "scan_layers",
}
# what a converted checkpoint does not hold (a caption decoder, and the text the decoder reads) or need not fix
NOT_CHECKED = RUNTIME_KEYS | {"vocab", "caption_length", "decoder", "decoder_context"}

# keys whose 0 (or "") stands for another value: compared by what they mean
EFFECTIVE: dict[str, Callable[[Model], int | str]] = {
    "embed_dim": lambda m: m.embed_dim or variants.EMBED_DIM[m.image_variant],
    "image_depth": lambda m: variants.image_tower(m).depth,
    "text_depth": lambda m: variants.text_tower(m).depth,
    "text_activation": lambda m: m.text_activation or m.activation,
}


Location = str | os.PathLike[str]


def write(location: Location, params: Any, settings: dict[str, Any]) -> None:
    """Save `params` (a tree of arrays) and the settings that build their model (openclip.settings_from_config's)."""
    directory = storage.at(location)
    directory.mkdir(parents=True, exist_ok=True)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(directory / "params", params, force=True)
    checkpointer.wait_until_finished()
    lines = [f"# written by python -m trainer.convert; copy these tables into a recipe that starts from {directory}"]
    lines.append(f"resolution = {settings['resolution']}")
    if settings["text"].get("tokenizer") == "bert_wordpiece":
        lines.append("# text.vocab: BERT's bert-base-uncased vocab.txt (not shipped: the recipe names the file)")
    for table in ("model", "text", "loss"):
        lines.append(f"\n[{table}]")
        lines += [f"{key} = {toml_value(value)}" for key, value in settings[table].items()]
    (directory / CONVERTED_SETTINGS).write_text("\n".join(lines) + "\n")


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value)  # strings (ASCII), integers and floats read back the same in TOML


def read_settings(location: Location) -> dict[str, Any]:
    directory = storage.at(location)
    path = directory / CONVERTED_SETTINGS
    if not path.is_file() or not (directory / "params").is_dir():
        raise UserError(
            f"{directory} is not a converted checkpoint (no {CONVERTED_SETTINGS} and params/): write one with"
            " python -m trainer.convert import"
        )
    return tomllib.loads(path.read_text())


def recipe_from_settings(settings: dict[str, Any]) -> Recipe:
    """A one-stage recipe that builds the model `settings` describe (export reads a converted directory with it)."""
    from trainer.recipe import from_dict

    stage = {"name": "imported", "resolution": settings["resolution"], "global_batch": 1, "peak_lr": 1.0, "samples": 1}
    return from_dict(
        {"model": settings["model"], "text": settings["text"], "loss": settings["loss"], "stages": [stage]}
    )


def check_recipe(recipe: Recipe, settings: dict[str, Any], directory: Location) -> None:
    """The recipe builds the model the directory holds: one line naming the first key that differs."""
    for table, cls, ours in (("model", Model, recipe.model), ("text", Text, recipe.text)):
        for f in dataclasses.fields(cls):
            if f.name in NOT_CHECKED:
                continue
            theirs = settings.get(table, {}).get(f.name, f.default)
            if f.name in EFFECTIVE:  # 0 means the variant's: compare what it means
                theirs = EFFECTIVE[f.name](dataclasses.replace(recipe.model, **{f.name: theirs}))
                if EFFECTIVE[f.name](recipe.model) == theirs:
                    continue
            if getattr(ours, f.name) != theirs:
                raise UserError(
                    f"{table}.{f.name} = {toml_value(getattr(ours, f.name))} in the recipe, but {directory} holds a"
                    f" model with {toml_value(theirs)}: set it (its model.toml lists every key)"
                )
    contrastive = settings.get("loss", {}).get("contrastive", "softmax")
    if recipe.loss.contrastive != contrastive:
        raise UserError(f'loss.contrastive = "{recipe.loss.contrastive}": {directory} holds a "{contrastive}" model')


def flat_shapes(tree: Any, prefix: str = "") -> dict[str, tuple[int, ...]]:
    if isinstance(tree, dict):
        return {k: v for name, sub in tree.items() for k, v in flat_shapes(sub, f"{prefix}{name}/").items()}
    return {prefix.rstrip("/"): tuple(tree.shape)}


def restore(location: Location, recipe: Recipe, stage: Stage, model: Any, mesh: jax.sharding.Mesh) -> Any:
    """The directory's params, laid out on `mesh` for `recipe`'s model, at the checkpoint's own resolution (the
    caller fits learned positions to the stage's: program.fit_positions). A caption decoder the directory lacks
    (open_clip has none) is initialised as a fresh run's would be."""
    from trainer.program import abstract_params, init_variables

    directory = storage.at(location)
    settings = read_settings(directory)
    check_recipe(recipe, settings, location)
    native = dataclasses.replace(stage, resolution=int(settings["resolution"]))
    target = abstract_params(model, recipe, native, mesh)
    checkpointer = ocp.StandardCheckpointer()
    saved = flat_shapes(checkpointer.metadata(directory / "params").item_metadata.tree)
    fresh_decoder = "decoder" in target and not any(name.startswith("decoder/") for name in saved)
    kept = {k: v for k, v in target.items() if not (fresh_decoder and k == "decoder")}
    wanted = flat_shapes(kept)
    for name, shape in wanted.items():
        if name not in saved:
            raise UserError(f"{location} has no tensor {name} ({shape}), which the recipe's model needs")
        if saved[name] != shape:
            raise UserError(f"{name}: {location} has shape {saved[name]}, the recipe's model needs {shape}")
    extra = sorted(set(saved) - set(wanted))
    if extra:
        raise UserError(f"{location} has {extra[0]}, which the recipe's model does not use: check its model keys")
    params = checkpointer.restore(directory / "params", kept)
    if fresh_decoder:
        shardings = jax.tree.map(lambda x: x.sharding, target["decoder"])
        init = lambda: nn.unbox(init_variables(model, recipe, native))["params"]["decoder"]  # noqa: E731
        params["decoder"] = jax.jit(init, out_shardings=shardings)()
    return params


def restore_numpy(location: Location) -> Any:
    """The params as NumPy arrays on this host (export)."""
    return ocp.StandardCheckpointer().restore(storage.at(location) / "params")
