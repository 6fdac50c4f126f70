"""python -m trainer.convert import SRC --model B/16 --out DIR [--config JSON]
python -m trainer.convert export SRC --out FILE.safetensors

import: an open_clip checkpoint (a state dict in .safetensors, .bin or .pt, and its model config: --config, else
open_clip_config.json or SRC's name with .json beside it) -> a converted directory (trainer/pretrained.py) that a
stage starts from (`init_from = "DIR"`) or `python -m trainer.eval RECIPE --checkpoint DIR` evaluates.
OpenVision's own JAX checkpoints (its orbax directory, or a .npz of names) import too: trainer/openvision_jax.py.

export: a run's workdir (its last stage's latest checkpoint) or a converted directory -> FILE.safetensors with
open_clip_config.json beside it (at that stage's resolution; an OpenVision recipe's is OpenVision's released config of
that size); name the file open_clip_model.safetensors and `open_clip.create_model_and_transforms("local-dir:DIR")`
loads the pair. The caption decoder is not part of it.

Every source and output may be a local path or a gs:// one.
"""

from __future__ import annotations

import io
import json
import sys
from typing import Any

import click
from etils import epath

from trainer import storage
from trainer.errors import UserError

TORCH_SUFFIXES = (".bin", ".pt", ".pth")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Convert checkpoints between open_clip's format and ours."""


def read_state(src: epath.Path) -> dict[str, Any]:
    """A state dict as NumPy arrays; torch only for the pickled formats."""
    if not src.is_file():
        raise UserError(f"{src} does not exist")
    if src.suffix == ".safetensors":
        from safetensors.numpy import load

        return load(src.read_bytes())
    if src.suffix not in TORCH_SUFFIXES:
        raise UserError(f"{src}: not a .safetensors, .bin or .pt state dict")
    try:
        import torch
    except ModuleNotFoundError:
        raise UserError(
            f"{src}: reading {src.suffix} files needs torch (pip install torch), or pass .safetensors"
        ) from None
    state = torch.load(io.BytesIO(src.read_bytes()), map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):  # open_clip's training checkpoints
        state = state["state_dict"]
    return {k: v.float().numpy() for k, v in state.items() if hasattr(v, "numpy")}


def find_config(src: epath.Path, config: epath.Path | None) -> dict[str, Any]:
    if config is not None and not config.is_file():
        raise UserError(f"--config {config} does not exist")
    candidates = [config] if config else [src.parent / "open_clip_config.json", src.with_suffix(".json")]
    for path in candidates:
        if path is not None and path.is_file():
            try:
                return json.loads(path.read_text())
            except json.JSONDecodeError as e:
                raise UserError(f"{path}: not JSON ({e})") from None
    raise UserError(
        f"no model config for {src}: pass --config (open_clip's model_configs/<name>.json, or the hub's"
        " open_clip_config.json)"
    )


@main.command("import")
@click.argument("src", type=storage.at)
@click.option("--model", required=True, help='Our name for the image tower, VARIANT/PATCH (e.g. "B/16").')
@click.option("--out", required=True, type=storage.at, help="Directory to write (local or gs://).")
@click.option("--config", type=storage.at, help="open_clip model config.")
@click.option(
    "--resolution",
    type=click.IntRange(min=1),
    help="Image size of an OpenVision JAX checkpoint with sin-cos positions, which do not record it (default 224).",
)
def import_(src: epath.Path, model: str, out: epath.Path, config: epath.Path | None, resolution: int | None) -> None:
    """Import an open_clip checkpoint SRC, or OpenVision's own JAX one (an orbax directory or a .npz; local or gs://)."""
    from trainer import openclip, openvision_jax, pretrained

    notes: list[str] = []
    if openvision_jax.is_checkpoint(src):  # by content: OpenVision's orbax directory is named checkpoint.npz
        if config is not None:
            raise UserError(f"--config {config}: {src} is an OpenVision JAX checkpoint, whose model needs no config")
        settings, params, notes = openvision_jax.import_checkpoint(src, model, resolution)
    else:
        if resolution is not None:
            raise UserError(f"--resolution {resolution}: for OpenVision JAX checkpoints (open_clip's config has it)")
        settings = openclip.settings_from_config(find_config(src, config), model)
        params = openclip.params_from_state(read_state(src), settings, str(src))
    pretrained.write(out, params, settings)
    count = sum(v.size for v in _leaves(params))
    click.echo(f"{src} -> {out}: {model}, {count / 1e6:.1f}M parameters at {settings['resolution']} px")
    for note in notes:
        click.echo(note)
    click.echo(f"its recipe keys: {out / 'model.toml'}")


def _leaves(tree: Any) -> list[Any]:
    return [x for v in tree.values() for x in _leaves(v)] if isinstance(tree, dict) else [tree]


@main.command("export")
@click.argument("src", type=storage.at)
@click.option("--out", required=True, type=storage.at, help="FILE.safetensors (local or gs://)")
def export(src: epath.Path, out: epath.Path) -> None:
    """Export a workdir's (or a converted directory's) params as open_clip's SRC."""
    from safetensors.numpy import save

    from trainer import openclip

    if out.suffix != ".safetensors":
        raise UserError(f"--out {out}: name a .safetensors file")
    if not src.is_dir():
        raise UserError(f"{src} does not exist: name a run's workdir or a converted directory")
    recipe, resolution, params, where = load_params(src)
    config = openclip.config_from_recipe(recipe, resolution)  # first: it refuses what open_clip cannot build
    state = openclip.state_from_params(params, recipe, resolution)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(save(state))
    config_path = out.parent / "open_clip_config.json"
    config_path.write_text(json.dumps(config, indent=2) + "\n")  # laid out as OpenVision's released configs
    note = " (the caption decoder is not part of open_clip's CLIP)" if recipe.model.decoder else ""
    click.echo(f"{where} -> {out} + {config_path.name}: {len(state)} tensors{note}")


def load_params(src: epath.Path) -> tuple[Any, int, Any, str]:
    """(recipe, resolution, params as NumPy, what was read) from a workdir or a converted directory."""
    from trainer import pretrained

    if (src / "model.toml").is_file():
        settings = pretrained.read_settings(src)
        return (
            pretrained.recipe_from_settings(settings),
            int(settings["resolution"]),
            pretrained.restore_numpy(src),
            str(src),
        )
    if not (src / "recipe.json").is_file():
        raise UserError(f"{src} is neither a run's workdir (recipe.json) nor a converted directory (model.toml)")
    from trainer import checkpoint
    from trainer.recipe import RecipeError, from_dict

    try:
        recipe = from_dict(json.loads((src / "recipe.json").read_text()))
    except RecipeError as e:
        raise UserError(f"{src / 'recipe.json'}: {e}") from None
    newest = checkpoint.newest(recipe, src)
    if newest is None:
        raise UserError(f"{src} has no checkpoint yet")
    index, step = newest
    stage, ckpt = recipe.stages[index], checkpoint.for_stage(recipe, src, index)
    params = ckpt.params_as_saved(step)
    ckpt.close()
    return recipe, stage.resolution, params, f"{src} stage {stage.name} step {step}"


if __name__ == "__main__":
    sys.exit(main())
