"""open_clip import and export against the real open_clip (torch, on the CPU): embeddings of imported random-weight
models equal open_clip's, exports load back into open_clip, the eval preprocessing equals open_clip's, imported
checkpoints start a stage and are evaluated, and every mismatch is one line."""

from __future__ import annotations

import dataclasses
import importlib.resources
import inspect
import io
import json
import os
import re
import shutil
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import open_clip
import orbax.checkpoint as ocp
import pytest
import torch
from click.testing import CliRunner
from etils import epath
from PIL import Image
from safetensors.numpy import load_file
from safetensors.torch import save_file
from sklearn.datasets import images as sample_images
from standins import warm
from test_real_data import make_data, run

from trainer import checkpoint, convert, openclip, pretrained
from trainer.data import preprocess
from trainer.data.tfsetup import tf
from trainer.models import variants
from trainer.models.clip import build, pixels_to_model_range
from trainer.models.vit import resize_positions
from trainer.program import init_variables
from trainer.recipe import Recipe
from trainer.recipe import load as load_recipe
from trainer.step import TrainState

OPENAI_MEAN = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
OPENAI_STD = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)

# A CPU-sized open_clip model of our tiny recipe's shapes (Mu/7 image tower, a one-layer Mu text tower), CLIPA-style
# (OpenVision's choices: bidirectional text pooled last, BERT's WordPiece, tanh GELU, LayerNorm eps 1e-6, [-1, 1]).
TINY_CONFIG = {
    "embed_dim": 96,
    "vision_cfg": {
        "image_size": 14,
        "layers": 3,
        "width": 96,
        "head_width": 32,
        "patch_size": 7,
        "no_ln_pre": True,
        "pool_type": "avg",
        "final_ln_after_pool": True,
        "act_kwargs": {"approximate": "tanh"},
        "norm_kwargs": {"eps": 1e-6},
    },
    "text_cfg": {
        "context_length": 12,
        "vocab_size": 128,
        "hf_tokenizer_name": "bert-base-uncased",
        "width": 96,
        "heads": 3,
        "layers": 1,
        "pool_type": "last",
        "no_causal_mask": True,
        "act_kwargs": {"approximate": "tanh"},
        "norm_kwargs": {"eps": 1e-6},
    },
}
TINY_PREPROCESS = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}


def random_open_clip(directory: Path, name: str | None = None, config: dict | None = None, preprocess=None) -> Path:
    """A random-weight open_clip model saved as the hub lays it out (open_clip_config.json + safetensors), with its
    zero-initialised tensors (biases, LayerNorms) randomised too so that a mix-up of any two shows."""
    torch.manual_seed(0)
    if name:
        model, config = open_clip.create_model(name), open_clip.get_model_config(name)
    else:
        assert config is not None
        model = open_clip.CLIP(**config)
    with torch.no_grad():
        for key, p in model.named_parameters():
            if key.endswith("bias") or "ln" in key or key == "logit_scale":
                p.add_(0.05 * torch.randn_like(p))
    directory.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, directory / "open_clip_model.safetensors")
    hub = {"model_cfg": config, "preprocess_cfg": preprocess or {}}
    (directory / "open_clip_config.json").write_text(json.dumps(hub))
    return directory / "open_clip_model.safetensors"


def convert_cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(convert.main, list(args))
    return result.exit_code, result.output


def inputs(settings: dict, count: int = 3) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    r, length, rows = settings["resolution"], settings["text"]["context_length"], settings["text"]["vocab_rows"]
    pixels = rng.integers(0, 256, (count, r, r, 3), dtype=np.uint8)
    tokens = rng.integers(1, rows - 1, (count, length)).astype(np.int32)
    for i in range(count):  # a BPE row: [sot] words [eot] padding; the end-of-text token is the highest id
        end = 2 + 3 * i % (length - 3)
        tokens[i, end], tokens[i, end + 1 :] = rows - 1, 0
    return pixels, tokens


def open_clip_embeddings(model, pixels: np.ndarray, tokens: np.ndarray, openai: bool) -> tuple[np.ndarray, ...]:
    mean, std = (OPENAI_MEAN, OPENAI_STD) if openai else (0.5, 0.5)
    return embeddings_with_stats(model, pixels, tokens, mean, std)


def embeddings_with_stats(model, pixels: np.ndarray, tokens: np.ndarray, mean, std) -> tuple[np.ndarray, ...]:
    """open_clip's image and text embeddings, its pixels standardised with `mean` and `std` (0-1 scale)."""
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div(255)
    mean, std = (torch.as_tensor(v, dtype=torch.float32).reshape(-1, 1, 1) for v in (mean, std))
    x = (x - mean) / std  # ToTensor + Normalize, as open_clip's
    with torch.no_grad():
        image = model.encode_image(x, normalize=True).numpy()
        text = model.encode_text(torch.from_numpy(tokens).long(), normalize=True).numpy()
    return image, text


def our_embeddings(directory: Path, pixels: np.ndarray, tokens: np.ndarray, **model_keys) -> tuple[np.ndarray, ...]:
    settings = pretrained.read_settings(directory)
    settings["model"].update(dtype="float32", **model_keys)
    model = build(pretrained.recipe_from_settings(settings))
    params = pretrained.restore_numpy(directory)
    image = model.apply({"params": params}, jnp.asarray(pixels), method=model.encode_image)
    text = model.apply({"params": params}, jnp.asarray(tokens), method=model.encode_text)
    return np.asarray(image), np.asarray(text)


def relative_error(ours: np.ndarray, theirs: np.ndarray) -> float:
    return float(np.linalg.norm(ours - theirs) / np.linalg.norm(theirs))


# OpenAI's choices at the tiny recipe's shapes: QuickGELU, ln_pre, class-token pooling, causal text pooled at the
# end-of-text token, CLIP's mean and std, torch's LayerNorm epsilon
QUICKGELU_TINY = {
    "embed_dim": 96,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 14, "layers": 3, "width": 96, "head_width": 32, "patch_size": 7},
    "text_cfg": {"context_length": 12, "vocab_size": 128, "width": 96, "heads": 3, "layers": 2},
}


# OpenVision's released open_clip config of ViT-Ti/16 at 160 px (its model_configs/openvision-vit-tiny-patch16-160
# layout and values): exact GELU in the image tower and tanh GELU in the text tower, a class token beside mean pooling
# with the LayerNorm after it, no ln_pre, bidirectional text pooled last, BERT's tokenizer, ImageNet's pixel stats
OPENVISION_TI16_160 = {
    "embed_dim": 192,
    "vision_cfg": {
        "image_size": 160,
        "layers": 12,
        "width": 192,
        "patch_size": 16,
        "no_ln_pre": True,
        "pool_type": "avg",
        "final_ln_after_pool": True,
        "norm_kwargs": {"eps": 1e-06},
        "head_width": 64,
    },
    "text_cfg": {
        "context_length": 80,
        "vocab_size": 32000,
        "hf_tokenizer_name": "bert-base-uncased",
        "tokenizer_kwargs": {"strip_sep_token": True},
        "width": 192,
        "heads": 3,
        "layers": 12,
        "pool_type": "last",
        "no_causal_mask": True,
        "act_kwargs": {"approximate": "tanh"},
        "norm_kwargs": {"eps": 1e-06},
    },
}
OPENVISION_PREPROCESS = {
    "mean": [0.485, 0.456, 0.406],
    "std": [0.229, 0.224, 0.225],
    "interpolation": "bilinear",
    "resize_mode": "squash",
}
CONFIGS = {
    "quickgelu-tiny": (QUICKGELU_TINY, None),
    "openvision-ti16-160": (OPENVISION_TI16_160, OPENVISION_PREPROCESS),
}


@pytest.mark.parametrize(
    ("name", "ours", "pooling"),
    [
        ("ViT-B-16", "B/16", "cls"),  # a named config of open_clip's; pool_type "tok"
        ("quickgelu-tiny", "Mu/7", "cls"),
        # CLIPA's layout (pool_type "avg" with final_ln_after_pool, no ln_pre, the text tower pooled last without a
        # causal mask) and a GELU of each kind, one per tower; benchmarks/parity_openclip.py covers every size to H/14
        ("openvision-ti16-160", "Ti/16", "mean"),
    ],
)
def test_imported_models_compute_what_open_clip_computes_and_export_back_exactly(tmp_path, name, ours, pooling):
    if name in CONFIGS:
        config, preprocess_cfg = CONFIGS[name]
        src = random_open_clip(tmp_path / "hub", config=config, preprocess=preprocess_cfg)
    else:
        src = random_open_clip(tmp_path / "hub", name)
    code, out = convert_cli("import", str(src), "--model", ours, "--out", str(tmp_path / "ours"))
    assert code == 0, out
    settings = pretrained.read_settings(tmp_path / "ours")
    assert settings["model"]["pooling"] == pooling
    reference = open_clip.create_model(f"local-dir:{tmp_path / 'hub'}").eval()
    pixels, tokens = inputs(settings)
    stats = reference.visual.image_mean, reference.visual.image_std  # the hub config's preprocess_cfg
    theirs = embeddings_with_stats(reference, pixels, tokens, *stats)
    mine = our_embeddings(tmp_path / "ours", pixels, tokens)
    assert relative_error(mine[0], theirs[0]) <= 1e-4
    assert relative_error(mine[1], theirs[1]) <= 1e-4
    # the bound tells architectures apart: the same weights with the other GELU in each tower are off by more
    swap = {"gelu_tanh": "gelu", "gelu": "gelu_tanh", "quick_gelu": "gelu"}
    image_act = settings["model"]["activation"]
    text_act = settings["model"].get("text_activation") or image_act
    wrong = our_embeddings(
        tmp_path / "ours", pixels, tokens, activation=swap[image_act], text_activation=swap[text_act]
    )
    assert relative_error(wrong[0], theirs[0]) > 1e-4 and relative_error(wrong[1], theirs[1]) > 1e-4

    code, out = convert_cli(
        "export", str(tmp_path / "ours"), "--out", str(tmp_path / "back" / "open_clip_model.safetensors")
    )
    assert code == 0, out
    again = open_clip.create_model(f"local-dir:{tmp_path / 'back'}").eval()
    back = embeddings_with_stats(again, pixels, tokens, *stats)
    np.testing.assert_array_equal(back[0], theirs[0])  # the same open_clip model, bit for bit
    np.testing.assert_array_equal(back[1], theirs[1])


def test_pickled_state_dicts_import_as_safetensors_do(tmp_path):
    src = random_open_clip(tmp_path / "hub", config=TINY_CONFIG, preprocess=TINY_PREPROCESS)
    state = {k: torch.from_numpy(v) for k, v in load_file(src).items()}
    torch.save(
        {"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "hub" / "epoch_3.pt"
    )
    for source, out in ((src, "a"), (tmp_path / "hub" / "epoch_3.pt", "b")):
        code, text = convert_cli("import", str(source), "--model", "Mu/7", "--out", str(tmp_path / out))
        assert code == 0, text
    a, b = pretrained.restore_numpy(tmp_path / "a"), pretrained.restore_numpy(tmp_path / "b")
    np.testing.assert_array_equal(
        a["image"]["blocks"]["attn"]["key"]["kernel"], b["image"]["blocks"]["attn"]["key"]["kernel"]
    )
    assert pretrained.read_settings(tmp_path / "a") == pretrained.read_settings(tmp_path / "b")


def sample_photo(name: str) -> bytes:
    return (importlib.resources.files(sample_images) / name).read_bytes()  # real photos that scikit-learn ships


@pytest.mark.parametrize("resolution", [224, 336])
def test_eval_preprocessing_equals_open_clips_on_real_photos(resolution):
    transform = open_clip.image_transform(resolution, is_train=False)
    portrait = io.BytesIO()
    Image.open(io.BytesIO(sample_photo("china.jpg"))).transpose(Image.Transpose.ROTATE_90).save(portrait, "PNG")
    for encoded in (sample_photo("china.jpg"), sample_photo("flower.jpg"), portrait.getvalue()):
        theirs = transform(Image.open(io.BytesIO(encoded))).numpy().transpose(1, 2, 0)
        decoded = preprocess.decode_accurately(tf.constant(encoded))
        pixels = preprocess.eval_image(decoded, resolution, "pil_bicubic").numpy()
        ours = np.asarray(pixels_to_model_range(pixels, "openai"))
        assert ours.shape == theirs.shape
        assert np.abs(ours - theirs).max() <= 1e-5
        # the default (bilinear, as our training) is another resize: the comparison can tell them apart
        bilinear = np.asarray(pixels_to_model_range(preprocess.eval_image(decoded, resolution).numpy(), "openai"))
        assert np.abs(bilinear - theirs).max() > 1e-2


def one_line_error(code: int, out: str) -> str:
    assert code == 2, out
    lines = out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), out
    return lines[0]


def test_mismatches_and_unsupported_architectures_are_one_line(tmp_path):
    src = random_open_clip(tmp_path / "hub", config=TINY_CONFIG, preprocess=TINY_PREPROCESS)
    out = str(tmp_path / "ours")

    line = one_line_error(*convert_cli("import", str(src), "--model", "Mu/14", "--out", out))
    assert '--model Mu/14: the config describes "Mu/7"' in line

    state = load_file(src)
    state["visual.proj"] = state["visual.proj"][:, :64].copy()
    bad = tmp_path / "bad" / "open_clip_model.safetensors"
    bad.parent.mkdir()
    from safetensors.numpy import save_file as save_numpy

    save_numpy(state, bad)
    (bad.parent / "open_clip_config.json").write_text((tmp_path / "hub" / "open_clip_config.json").read_text())
    line = one_line_error(*convert_cli("import", str(bad), "--model", "Mu/7", "--out", out))
    assert "visual.proj" in line and "(96, 64)" in line and "(96, 96)" in line

    state = load_file(src)
    state["visual.attn_pool.query"] = np.zeros((4, 96), np.float32)
    save_numpy(state, bad)
    line = one_line_error(*convert_cli("import", str(bad), "--model", "Mu/7", "--out", out))
    assert "visual.attn_pool.query" in line and "refusing" in line

    coca = {**TINY_CONFIG, "vision_cfg": {**TINY_CONFIG["vision_cfg"], "attentional_pool": True}}
    (bad.parent / "open_clip_config.json").write_text(json.dumps(coca))
    line = one_line_error(*convert_cli("import", str(bad), "--model", "Mu/7", "--out", out))
    assert "vision_cfg.attentional_pool = True: this architecture is not supported" in line

    mixed = {**TINY_CONFIG, "text_cfg": {**TINY_CONFIG["text_cfg"], "norm_kwargs": {"eps": 1e-5}}}
    (bad.parent / "open_clip_config.json").write_text(json.dumps(mixed))
    line = one_line_error(*convert_cli("import", str(bad), "--model", "Mu/7", "--out", out))
    assert "text_cfg's LayerNorm eps 1e-05 differs from vision_cfg's 1e-06: our towers share it" in line

    (bad.parent / "open_clip_config.json").unlink()
    line = one_line_error(*convert_cli("import", str(bad), "--model", "Mu/7", "--out", out))
    assert "no model config" in line and "--config" in line
    assert not Path(out).exists()  # nothing half-written

    line = one_line_error(*convert_cli("export", str(tmp_path), "--out", str(tmp_path / "x.safetensors")))
    assert "neither a run's workdir" in line


def recipe_keys(directory: Path) -> list[str]:
    """--set items that make a recipe build the model a converted directory holds (its model.toml)."""
    settings = pretrained.read_settings(directory)
    return [
        f"{table}.{k}={pretrained.toml_value(v)}" for table in ("model", "text") for k, v in settings[table].items()
    ]


def train_from_an_import(root: Path) -> None:
    """The shared run of conftest's `shard_run` (made once per test run): a random open_clip model (learned 2x2
    positions at 14 px) imported, then the demo's recipe (21 px, then 30 px: 4 x 4 patches of 7) on real PNG shards
    with zero-shot and retrieval evals, its first stage starting from the import with a learning rate of 1e-12 (so its
    values stay)."""
    data = root / "data"
    data.mkdir()
    recipe = make_data(data)
    src = random_open_clip(root / "hub", config=TINY_CONFIG, preprocess=TINY_PREPROCESS)
    imported = root / "imported"
    assert convert_cli("import", str(src), "--model", "Mu/7", "--out", str(imported))[0] == 0
    sets = [*recipe_keys(imported), f"stages.0.init_from={imported}", "stages.0.peak_lr=1e-12"]
    args = [x for item in sets for x in ("--set", item)]
    r = run("trainer", recipe, data, *args)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (root / "args.json").write_text(json.dumps(args))
    (root / "out.txt").write_text(r.stdout + r.stderr)


def test_a_stage_starts_from_an_import_at_a_new_resolution_and_the_run_exports_to_open_clip(shard_run, tmp_path):
    imported = shard_run / "imported"
    assert f"stage fmnist21: parameters from {imported}" in (shard_run / "out.txt").read_text()
    data = Path(shutil.copytree(shard_run / "data", tmp_path / "data"))  # the shared run stays as it was
    recipe, args = data / "recipe.toml", json.loads((shard_run / "args.json").read_text())
    first = ocp.StandardCheckpointer().restore(data / "run" / "fmnist21" / "checkpoints" / "4" / "params")
    start = pretrained.restore_numpy(imported)
    # a learning rate of 1e-12 leaves the imported values; the 2x2 learned positions are interpolated to 3x3
    np.testing.assert_allclose(
        first["text"]["embedding"]["embedding"], start["text"]["embedding"]["embedding"], atol=1e-6
    )
    assert first["image"]["pos_embedding"].shape == (9, 96)
    expected = np.asarray(resize_positions(jnp.asarray(start["image"]["pos_embedding"]), 3))
    np.testing.assert_allclose(first["image"]["pos_embedding"], expected, atol=1e-6)

    r = run("trainer.eval", recipe, data, "--checkpoint", str(imported), *args)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"evals: {imported} at 30 px" in r.stdout and "fashion_mnist" in r.stdout

    wrong = [a.replace('model.activation="gelu_tanh"', 'model.activation="gelu"') for a in args]
    assert wrong != args
    r = run("trainer.eval", recipe, data, "--checkpoint", str(imported), *wrong)
    assert r.returncode == 2 and 'model.activation = "gelu" in the recipe' in r.stderr and "gelu_tanh" in r.stderr

    out = tmp_path / "export" / "open_clip_model.safetensors"
    assert convert_cli("export", str(data / "run"), "--out", str(out))[0] == 0
    exported = open_clip.create_model(f"local-dir:{out.parent}").eval()
    final = ocp.StandardCheckpointer().restore(data / "run" / "ft30" / "checkpoints" / "2" / "params")
    settings = pretrained.read_settings(imported)
    settings["resolution"] = 30
    settings["model"]["dtype"] = "float32"
    model = build(pretrained.recipe_from_settings(settings))
    pixels, tokens = inputs(settings)
    theirs = open_clip_embeddings(exported, pixels, tokens, openai=False)
    image = np.asarray(model.apply({"params": final}, jnp.asarray(pixels), method=model.encode_image))
    text = np.asarray(model.apply({"params": final}, jnp.asarray(tokens), method=model.encode_text))
    assert relative_error(image, theirs[0]) <= 1e-4 and relative_error(text, theirs[1]) <= 1e-4


# --- export of our recipes: OpenVision's released configs, every shipped recipe ---------------------------------

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
RELEASED = Path(__file__).resolve().parent / "fixtures" / "openvision"  # OpenVision's model_configs, verbatim
OPENVISION_RECIPES = {"tiny": "ti16", "small": "s16", "base": "b16", "large": "l14", "so400m": "so400m", "huge": "h14"}
OPENVISION_VARIANTS = {"tiny": "Ti", "small": "S", "base": "B", "large": "L", "so400m": "So400m", "huge": "H"}


def shipped_recipe(name: str, *overrides: str) -> Recipe:
    return load_recipe(RECIPES / f"{name}.toml", overrides)


def open_clip_reads(hub: dict) -> dict[str, object]:
    """Every key open_clip reads from a hub config (open_clip_config.json), flattened, with open_clip's own default
    where the file leaves a key out: two configs that agree here build the same model and preprocessing."""
    model_cfg = hub["model_cfg"]
    top = inspect.signature(open_clip.CLIP.__init__).parameters
    assert set(model_cfg) <= set(top), f"keys open_clip's CLIP does not take: {set(model_cfg) - set(top)}"
    values: dict[str, object] = {
        f"model_cfg.{k}": model_cfg.get(k, p.default)
        for k, p in top.items()
        if k not in ("self", "vision_cfg", "text_cfg")
    }
    for tower, cls in (("vision_cfg", open_clip.model.CLIPVisionCfg), ("text_cfg", open_clip.model.CLIPTextCfg)):
        values |= {f"model_cfg.{tower}.{k}": v for k, v in dataclasses.asdict(cls(**model_cfg[tower])).items()}
    preprocess = open_clip.transform.PreprocessCfg(**hub["preprocess_cfg"])
    return values | {f"preprocess_cfg.{k}": v for k, v in dataclasses.asdict(preprocess).items()}


@pytest.mark.parametrize("released", sorted(p.name for p in RELEASED.glob("*.json")))
def test_openvision_recipes_export_openvisions_released_open_clip_configs(released):
    """openvision-vit-{size}-patch{p}-{resolution}.json: the recipe of that size, exported at that resolution (our
    stages' resolutions may differ from the released checkpoints': the export takes the stage's)."""
    _, _, size, _, resolution = Path(released).stem.split("-")
    theirs = json.loads((RELEASED / released).read_text())
    ours = openclip.config_from_recipe(shipped_recipe(OPENVISION_RECIPES[size]), int(resolution))
    mine, expected = open_clip_reads(ours), open_clip_reads(theirs)
    assert set(mine) == set(expected)
    differ = {k: (mine[k], v) for k, v in expected.items() if mine[k] != v}
    assert not differ, f"(ours, released) per key: {differ}"
    assert ours == theirs  # and the file itself: the same keys, none of open_clip's defaults spelled out


def released_config(name: str, layers: int) -> dict:
    """OpenVision's released open_clip config `name`, its towers cut to `layers` (the import maps every layer alike;
    the whole towers: benchmarks/parity_openclip.py --openvision)."""
    config = json.loads((RELEASED / name).read_text())
    for tower in ("vision_cfg", "text_cfg"):
        config["model_cfg"][tower]["layers"] = layers
    return config


@pytest.mark.parametrize("released", sorted(p.name for p in RELEASED.glob("*.json")))
def test_every_released_openvision_config_imports_computes_what_open_clip_does_and_exports_back(tmp_path, released):
    """Each OpenVision checkpoint's layout (its released open_clip config, So400m/14 at 384 px among them: 27 x 27
    patches, 6 pixel rows and columns unused) as open_clip builds it, with random weights and one layer per tower:
    imported at the config's resolution, our embeddings within 1e-4 of open_clip's (fp32), exported back to that very
    config."""
    config = released_config(released, layers=1)
    _, _, size, patch, resolution = Path(released).stem.split("-")
    src = random_open_clip(tmp_path / "hub", config=config["model_cfg"], preprocess=config["preprocess_cfg"])
    model = f"{OPENVISION_VARIANTS[size]}/{patch.removeprefix('patch')}"
    code, out = convert_cli("import", str(src), "--model", model, "--out", str(tmp_path / "ours"))
    assert code == 0, out
    settings = pretrained.read_settings(tmp_path / "ours")
    assert settings["resolution"] == int(resolution)
    assert settings["model"]["image_depth"] == settings["model"]["text_depth"] == 1

    reference = open_clip.create_model(f"local-dir:{tmp_path / 'hub'}").eval()
    pixels, tokens = inputs(settings, count=2)
    theirs = embeddings_with_stats(reference, pixels, tokens, reference.visual.image_mean, reference.visual.image_std)
    mine = our_embeddings(tmp_path / "ours", pixels, tokens)
    assert relative_error(mine[0], theirs[0]) <= 1e-4 and relative_error(mine[1], theirs[1]) <= 1e-4

    back = tmp_path / "back" / "open_clip_model.safetensors"
    code, out = convert_cli("export", str(tmp_path / "ours"), "--out", str(back))
    assert code == 0, out
    assert json.loads((back.parent / "open_clip_config.json").read_text()) == config
    np.testing.assert_array_equal(load_file(back)["visual.conv1.weight"], load_file(src)["visual.conv1.weight"])


def so400m_at_384(root: Path, evals: bool) -> tuple[dict, Path, Path, list[str]]:
    """OpenVision's So400m/14 at 384 px (its released config, one layer per tower), random weights, imported; a recipe
    of one stage at 384 px starting from it on real PNG shards (with a zero-shot eval on 10 of them: `evals`), and the
    --set items that give the recipe the import's model keys. -> (config, imported, recipe, sets)"""
    config = released_config("openvision-vit-so400m-patch14-384.json", layers=1)
    src = random_open_clip(root / "hub", config=config["model_cfg"], preprocess=config["preprocess_cfg"])
    imported = root / "imported"
    assert convert_cli("import", str(src), "--model", "So400m/14", "--out", str(imported))[0] == 0
    d = root / "data"
    d.mkdir()
    make_data(d)
    recipe = root / "so400m384.toml"
    text = f"""
[model]
dtype = "float32"
[text]
vocab = "{d}/vocab.txt"
[data]
source = "tfrecord"
train = "{d}/train-*.tfrecord"
shuffle_buffer = 50
[[stages]]
name = "ft384"
resolution = 384
global_batch = 2
samples = 2
peak_lr = 1e-5
init_from = "{imported}"
"""
    if evals:
        text += f"""
[[evals]]
kind = "zeroshot"
name = "toy"
path = "{sorted(d.glob("test-*.tfrecord"))[0]}"
classnames = "{d}/classnames.txt"
templates = "{d}/templates.txt"
batch = 4
"""
    recipe.write_text(text)
    return config, imported, recipe, [x for item in recipe_keys(imported) for x in ("--set", item)]


def test_openvisions_so400m_at_384_is_evaluated_at_384(tmp_path):
    """`trainer.eval` on the import as released, at its 384 px (27 x 27 patches; 6 pixel rows and columns unused)."""
    _, imported, recipe, sets = so400m_at_384(tmp_path, evals=True)
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    r = warm.run([sys.executable, "-m", "trainer.eval", str(recipe), "--checkpoint", str(imported), *sets], env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"evals: {imported} at 384 px" in r.stdout
    assert re.search(r"toy\s.*samples\s.*\b10\b", r.stdout), r.stdout


def test_openvisions_so400m_at_384_fine_tunes_at_384_and_exports_to_the_same_config(tmp_path):
    """A stage at 384 px that starts from the import; the run exported back to OpenVision's released config, which
    open_clip then computes as we do (fp32, within 1e-4)."""
    config, imported, recipe, sets = so400m_at_384(tmp_path, evals=False)
    workdir = tmp_path / "run"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    r = warm.run([sys.executable, "-m", "trainer", str(recipe), "--workdir", str(workdir), *sets], env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"stage ft384: parameters from {imported}" in r.stdout + r.stderr

    out = tmp_path / "export" / "open_clip_model.safetensors"
    assert convert_cli("export", str(workdir), "--out", str(out))[0] == 0
    assert json.loads((out.parent / "open_clip_config.json").read_text()) == config
    exported = open_clip.create_model(f"local-dir:{out.parent}").eval()
    final = ocp.StandardCheckpointer().restore(workdir / "ft384" / "checkpoints" / "1" / "params")
    start = pretrained.restore_numpy(imported)
    assert not np.array_equal(final["image"]["patchify"]["kernel"], start["image"]["patchify"]["kernel"])  # trained
    settings = pretrained.read_settings(imported)
    settings["model"]["dtype"] = "float32"
    model = build(pretrained.recipe_from_settings(settings))
    pixels, tokens = inputs(settings, count=2)
    theirs = embeddings_with_stats(exported, pixels, tokens, exported.visual.image_mean, exported.visual.image_std)
    image = np.asarray(model.apply({"params": final}, jnp.asarray(pixels), method=model.encode_image))
    text = np.asarray(model.apply({"params": final}, jnp.asarray(tokens), method=model.encode_text))
    assert relative_error(image, theirs[0]) <= 1e-4 and relative_error(text, theirs[1]) <= 1e-4


# Every shipped recipe: exported (its towers cut to one layer here: the export maps each layer alike) and loaded by
# open_clip, or refused in one line that says why.
REFUSED = {
    "tiny": "without model.class_token",
    "tuxpaint": "without model.class_token",
}


@pytest.mark.parametrize("name", sorted(p.stem for p in RECIPES.glob("*.toml")))
def test_every_recipe_exports_a_state_open_clip_loads_or_says_why(monkeypatch, name):
    for table in (variants.IMAGE, variants.TEXT):
        for key, size in list(table.items()):
            monkeypatch.setitem(table, key, dataclasses.replace(size, depth=1))
    recipe = shipped_recipe(name)
    if name in REFUSED:
        with pytest.raises(openclip.FormatError, match=REFUSED[name]) as refusal:
            openclip.config_from_recipe(recipe, recipe.stages[-1].resolution)
        assert "\n" not in str(refusal.value)
        return
    stage = recipe.stages[-1]
    abstract = nn.unbox(jax.eval_shape(lambda: init_variables(build(recipe), recipe, stage)["params"]))
    params = jax.tree.map(lambda x: np.zeros(x.shape, np.float32), abstract)
    config = openclip.config_from_recipe(recipe, stage.resolution)
    state = openclip.state_from_params(params, recipe, stage.resolution)
    model = open_clip.CLIP(**config["model_cfg"])
    model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)  # every name and shape


def workdir_with_checkpoint(workdir: Path, recipe: Recipe, params) -> None:
    """A run's workdir as the trainer leaves it: recipe.json and a checkpoint of the last stage."""
    workdir.mkdir(parents=True)
    (workdir / "recipe.json").write_text(json.dumps(dataclasses.asdict(recipe), indent=1))
    ckpt = checkpoint.for_stage(recipe, epath.Path(workdir), len(recipe.stages) - 1)
    state = TrainState(
        step=jnp.ones((), jnp.int32), params=params, opt_state=jnp.zeros(()), rng=jnp.zeros(2, jnp.uint32)
    )
    ckpt.save(state, {"step": 1})
    ckpt.wait()
    ckpt.close()


def random_params(recipe: Recipe):
    """The recipe's fresh params, every tensor (zero-initialised biases, LayerNorms, class token) randomised."""
    params = nn.unbox(init_variables(build(recipe), recipe, recipe.stages[-1])["params"])
    leaves, tree = jax.tree.flatten(params)
    rng = np.random.default_rng(0)
    return tree.unflatten([np.asarray(x) + 0.05 * rng.standard_normal(x.shape).astype(np.float32) for x in leaves])


def test_an_openvision_recipes_run_exports_to_open_clip_which_computes_what_we_do(tmp_path):
    recipe = shipped_recipe("ti16", "stages.2.resolution=32", "model.dtype=float32")
    params = random_params(recipe)
    workdir_with_checkpoint(tmp_path / "run", recipe, params)
    out = tmp_path / "export" / "open_clip_model.safetensors"
    code, text = convert_cli("export", str(tmp_path / "run"), "--out", str(out))
    assert code == 0, text
    assert "stage ft384 step 1" in text and "the caption decoder is not part of open_clip's CLIP" in text
    config = json.loads((out.parent / "open_clip_config.json").read_text())
    released = json.loads((RELEASED / "openvision-vit-tiny-patch16-160.json").read_text())
    released["model_cfg"]["vision_cfg"]["image_size"] = 32
    assert config == released

    exported = open_clip.create_model(f"local-dir:{out.parent}").eval()
    settings = {"resolution": 32, "text": {"context_length": 80, "vocab_rows": 32000}}
    pixels, tokens = inputs(settings)
    theirs = embeddings_with_stats(exported, pixels, tokens, exported.visual.image_mean, exported.visual.image_std)
    model = build(recipe)
    image = np.asarray(model.apply({"params": params}, jnp.asarray(pixels), method=model.encode_image))
    text_emb = np.asarray(model.apply({"params": params}, jnp.asarray(tokens), method=model.encode_text))
    assert relative_error(image, theirs[0]) <= 1e-4 and relative_error(text_emb, theirs[1]) <= 1e-4
    # the bound tells the image tower's exact GELU from the text tower's tanh one
    wrong = build(dataclasses.replace(recipe, model=dataclasses.replace(recipe.model, activation="gelu_tanh")))
    image = np.asarray(wrong.apply({"params": params}, jnp.asarray(pixels), method=wrong.encode_image))
    assert relative_error(image, theirs[0]) > 1e-4


def test_a_run_open_clip_cannot_compute_is_refused_in_one_line(tmp_path):
    recipe = shipped_recipe("tiny")  # OpenVision's default: mean pooling, no class token
    workdir_with_checkpoint(tmp_path / "run", recipe, random_params(recipe))
    out = tmp_path / "export" / "open_clip_model.safetensors"
    line = one_line_error(*convert_cli("export", str(tmp_path / "run"), "--out", str(out)))
    assert 'model.pooling = "mean" without model.class_token' in line and "model.class_token = true to export" in line
    assert not out.parent.exists()  # refused before anything is written


def test_convert_never_needs_torch_for_safetensors(tmp_path):
    src = random_open_clip(tmp_path / "hub", config=TINY_CONFIG, preprocess=TINY_PREPROCESS)
    code = "import sys; sys.modules['torch'] = None; from trainer.convert import main; main()"
    args = [sys.executable, "-c", code, "import", str(src), "--model", "Mu/7", "--out", str(tmp_path / "o")]
    r = warm.run(args, timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert r.returncode == 0, r.stderr[-2000:]


def test_clip_bpe_ids_are_open_clips():
    """The tokenizer an OpenAI-style import names gives the ids its text tower was trained on."""
    from trainer.data.tokenizers import ClipBpe

    captions = [
        "a photo of a cat.",
        "Two dogs playing in the snow, 2 frisbees!",
        "  A   LOT of   spaces\tand CAPS ",
        "it's the kids' toys; they'll've re-used them (mostly) 100%",
        "a " * 100,  # truncated: the end-of-text token stays last
    ]
    ours = ClipBpe().encode(captions, 77)
    theirs = open_clip.tokenize(captions, context_length=77).numpy()
    np.testing.assert_array_equal(ours, theirs)


def test_a_recipe_with_a_caption_decoder_starts_it_fresh_beside_the_imported_towers(tmp_path):
    from trainer import sharding
    from trainer.recipe import from_dict

    src = random_open_clip(tmp_path / "hub", config=TINY_CONFIG, preprocess=TINY_PREPROCESS)
    imported = tmp_path / "imported"
    assert convert_cli("import", str(src), "--model", "Mu/7", "--out", str(imported))[0] == 0
    settings = pretrained.read_settings(imported)
    stage = {"name": "ft", "resolution": 14, "global_batch": 2, "peak_lr": 1e-4, "samples": 2}
    model_keys = {**settings["model"], "decoder": "Mu", "decoder_context": "image"}
    recipe = from_dict({"model": model_keys, "text": {**settings["text"], "caption_length": 6}, "stages": [stage]})
    params = pretrained.restore(imported, recipe, recipe.stages[0], build(recipe), sharding.checked_mesh(recipe))
    start = pretrained.restore_numpy(imported)
    np.testing.assert_array_equal(np.asarray(params["image"]["head"]["kernel"]), start["image"]["head"]["kernel"])
    decoder = np.asarray(params["decoder"]["embedding"]["embedding"])
    assert decoder.shape == (128, 96) and 0 < decoder.std() < 0.1  # initialised as a fresh run's (normal, 0.02)
