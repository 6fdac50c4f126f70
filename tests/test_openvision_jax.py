"""OpenVision's own JAX checkpoints import (trainer/openvision_jax.py): the same random weights, written in its JAX
layout (a .npz of names; an orbax checkpoint as its src/main_clip.py saves one) and in open_clip's (by OpenVision's own
name mapping, src/convert_upload/transfer_jax2hf.py, redone here as a reverse table), import to the same model, whose
embeddings are upstream open_clip's; every bad input is one line."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import orbax.checkpoint as ocp
import pytest
from safetensors.numpy import save_file
from test_convert import (
    OPENVISION_PREPROCESS,
    OPENVISION_TI16_160,
    convert_cli,
    embeddings_with_stats,
    inputs,
    one_line_error,
    our_embeddings,
    relative_error,
)

from trainer import pretrained
from trainer.models.vit import posemb_sincos_2d

# OpenVision's choices at CPU-test sizes (our Mu towers: a Mu/7 image tower at 14 px, a 2-layer Mu text tower)
TINY_OPENVISION = {
    "embed_dim": 96,
    "vision_cfg": {
        **OPENVISION_TI16_160["vision_cfg"],
        **{"image_size": 14, "layers": 3, "width": 96, "patch_size": 7, "head_width": 32},
    },
    "text_cfg": {**OPENVISION_TI16_160["text_cfg"], "context_length": 12, "vocab_size": 128, "width": 96, "layers": 2},
}


def random_jax_params(cfg: dict, learned_positions: bool = False, dense_general: bool = False) -> dict[str, Any]:
    """A random OpenVision two-towers params tree (big_vision's names) of an open_clip config's shapes; LayerNorms
    and biases random too, so that a mix-up of any two shows. `dense_general`: q/k/v/out kernels with the heads split
    out (OpenVision's use_dense_general = True) instead of nn.Dense's (its configs' setting)."""
    rng = np.random.default_rng(0)
    vision, text = cfg["vision_cfg"], cfg["text_cfg"]

    def normal(*shape: int, scale: float = 0.02) -> np.ndarray:
        return (scale * rng.standard_normal(shape)).astype(np.float32)

    def norm(width: int) -> dict:
        return {"scale": 1 + normal(width, scale=0.1), "bias": normal(width, scale=0.05)}

    def dense(fan_in: int, fan_out: int) -> dict:
        return {"kernel": normal(fan_in, fan_out, scale=fan_in**-0.5), "bias": normal(fan_out, scale=0.05)}

    def block(width: int, heads: int) -> dict:
        attn = {name: dense(width, width) for name in ("query", "key", "value", "out")}
        if dense_general:
            for name in ("query", "key", "value"):
                attn[name]["kernel"] = attn[name]["kernel"].reshape(width, heads, width // heads)
                attn[name]["bias"] = attn[name]["bias"].reshape(heads, width // heads)
            attn["out"]["kernel"] = attn["out"]["kernel"].reshape(heads, width // heads, width)
        return {
            "LayerNorm_0": norm(width),
            "MultiHeadDotProductAttention_0": attn,
            "LayerNorm_1": norm(width),
            "MlpBlock_0": {"Dense_0": dense(width, 4 * width), "Dense_1": dense(4 * width, width)},
        }

    w, p, e = vision["width"], vision["patch_size"], cfg["embed_dim"]
    img = {
        "embedding": {"kernel": normal(p, p, 3, w, scale=(3 * p * p) ** -0.5)},
        "cls": normal(1, 1, w),
        "Transformer": {f"encoderblock_{i}": block(w, w // vision["head_width"]) for i in range(vision["layers"])},
        "encoder_norm": norm(w),
        "head": {"kernel": normal(w, e, scale=w**-0.5)},
    }
    if learned_positions:
        img["pos_embedding"] = normal(1, (vision["image_size"] // p) ** 2 + 1, w, scale=0.1)
    wt = text["width"]
    txt = {
        "Embed_0": {"embedding": normal(text["vocab_size"], wt, scale=1.0)},
        "pos_embedding": normal(1, text["context_length"], wt, scale=0.1),
        "Transformer": {f"encoderblock_{i}": block(wt, text["heads"]) for i in range(text["layers"])},
        "encoder_norm": norm(wt),
        "head": {"kernel": normal(wt, e, scale=wt**-0.5)},
    }
    return {"img": img, "txt": txt, "t": np.array([math.log(1 / 0.07)], np.float32)}


def names(tree: Any, prefix: str = "") -> dict[str, np.ndarray]:
    """big_vision's flat names ('/'-joined), as its save_checkpoint writes them into a .npz."""
    if not isinstance(tree, dict):
        return {prefix.rstrip("/"): tree}
    return {k: v for key, sub in tree.items() for k, v in names(sub, f"{prefix}{key}/").items()}


# OpenVision's JAX -> open_clip mapping (transfer_jax2hf.py's rules), reversed into tables: name -> (name, reshape)
SAME = np.asarray
TOWER = {
    "img/cls": ("visual.class_embedding", lambda v: v[0, 0]),
    "img/embedding/kernel": ("visual.conv1.weight", lambda v: v.transpose(3, 2, 0, 1)),
    "img/encoder_norm/scale": ("visual.ln_post.weight", SAME),
    "img/encoder_norm/bias": ("visual.ln_post.bias", SAME),
    "img/head/kernel": ("visual.proj", SAME),
    "img/pos_embedding": ("visual.positional_embedding", lambda v: v[0]),
    "txt/Embed_0/embedding": ("token_embedding.weight", SAME),
    "txt/pos_embedding": ("positional_embedding", lambda v: v[0]),
    "txt/encoder_norm/scale": ("ln_final.weight", SAME),
    "txt/encoder_norm/bias": ("ln_final.bias", SAME),
    "txt/head/kernel": ("text_projection", SAME),
    "t": ("logit_scale", lambda v: v[0]),
}
BLOCK = {  # Transformer/encoderblock_{i}/... -> transformer.resblocks.{i}.... (q, k, v: in_proj, below)
    "LayerNorm_0/scale": ("ln_1.weight", SAME),
    "LayerNorm_0/bias": ("ln_1.bias", SAME),
    "LayerNorm_1/scale": ("ln_2.weight", SAME),
    "LayerNorm_1/bias": ("ln_2.bias", SAME),
    "MlpBlock_0/Dense_0/kernel": ("mlp.c_fc.weight", lambda v: v.T),
    "MlpBlock_0/Dense_0/bias": ("mlp.c_fc.bias", SAME),
    "MlpBlock_0/Dense_1/kernel": ("mlp.c_proj.weight", lambda v: v.T),
    "MlpBlock_0/Dense_1/bias": ("mlp.c_proj.bias", SAME),
    "MultiHeadDotProductAttention_0/out/kernel": ("attn.out_proj.weight", lambda v: v.reshape(-1, v.shape[-1]).T),
    "MultiHeadDotProductAttention_0/out/bias": ("attn.out_proj.bias", SAME),
}
QKV = "MultiHeadDotProductAttention_0/{}/{}"


def open_clip_state(tree: dict, cfg: dict) -> dict[str, np.ndarray]:
    """The open_clip state dict OpenVision's converter makes of a JAX params tree."""
    flat = names(tree)
    state = {}
    for name, (theirs, reshape) in TOWER.items():
        if name in flat:
            state[theirs] = reshape(flat[name])
    if "img/pos_embedding" not in flat:  # sin-cos: the converter writes them, with the class token's zero row
        grid, width = cfg["vision_cfg"]["image_size"] // cfg["vision_cfg"]["patch_size"], cfg["vision_cfg"]["width"]
        state["visual.positional_embedding"] = np.concatenate(
            [np.zeros((1, width)), posemb_sincos_2d(grid, grid, width)]
        )
    for tower, prefix in (("img", "visual.transformer"), ("txt", "transformer")):
        for i in range(len(tree[tower]["Transformer"])):
            here, there = f"{tower}/Transformer/encoderblock_{i}/", f"{prefix}.resblocks.{i}."
            for name, (theirs, reshape) in BLOCK.items():
                state[there + theirs] = reshape(flat[here + name])
            kernels = [flat[here + QKV.format(n, "kernel")] for n in ("query", "key", "value")]
            biases = [flat[here + QKV.format(n, "bias")] for n in ("query", "key", "value")]
            state[there + "attn.in_proj_weight"] = np.concatenate([k.reshape(k.shape[0], -1).T for k in kernels])
            state[there + "attn.in_proj_bias"] = np.concatenate([b.reshape(-1) for b in biases])
    return {k: np.array(v, np.float32, order="C") for k, v in state.items()}  # (ascontiguousarray: 0-d -> 1-d)


def write_hub(directory: Path, tree: dict, cfg: dict, preprocess: dict) -> Path:
    directory.mkdir(parents=True)
    save_file(open_clip_state(tree, cfg), directory / "open_clip_model.safetensors")
    (directory / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": preprocess}))
    return directory / "open_clip_model.safetensors"


def write_npz(path: Path, tree: dict, prefix: str = "params/") -> Path:
    """As big_vision's save_checkpoint: the train state's flat names (the optimizer's beside the params)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    opt = {"opt/count": np.array(7), "opt/mu/img/cls": np.ones((1, 1, 3), np.float32)} if prefix else {}
    np.savez(path, **{prefix + k: v for k, v in names(tree).items()}, **opt)
    return path


def write_orbax(root: Path, tree: dict, step: int = 1000) -> Path:
    """As OpenVision's main_clip.py: a CheckpointManager over workdir/checkpoint.npz (no item names), saving the
    train state {"params", "opt"} with StandardSave; the optimizer state has a shape of its own here."""
    options = ocp.CheckpointManagerOptions(create=True, max_to_keep=1, save_interval_steps=1)
    manager = ocp.CheckpointManager(root, options=options)
    opt = {"count": np.array(step, np.int32), "mu": {"img": {"cls": np.ones((1, 1, 3), np.float32)}}}
    manager.save(step, args=ocp.args.StandardSave({"params": tree, "opt": opt}))
    manager.wait_until_finished()
    manager.close()
    return root


def imported(src: Path, out: Path, model: str, *extra: str) -> dict:
    code, text = convert_cli("import", str(src), "--model", model, "--out", str(out), *extra)
    assert code == 0, text
    return pretrained.restore_numpy(out)


def assert_same_tree(a: Any, b: Any) -> None:
    flat_a, flat_b = names(a), names(b)
    assert sorted(flat_a) == sorted(flat_b)
    for name in flat_a:
        np.testing.assert_array_equal(flat_a[name], flat_b[name], err_msg=name)


def test_openvisions_jax_checkpoints_import_as_its_open_clip_conversion_and_compute_what_open_clip_does(tmp_path):
    tree = random_jax_params(OPENVISION_TI16_160)
    hub = write_hub(tmp_path / "hub", tree, OPENVISION_TI16_160, OPENVISION_PREPROCESS)
    npz = write_npz(tmp_path / "jax" / "params.npz", tree)
    root = write_orbax(tmp_path / "workdir" / "checkpoint.npz", tree)  # named so, and a directory, as OpenVision's

    from_hub = imported(hub, tmp_path / "oc", "Ti/16")
    from_step = imported(root / "1000", tmp_path / "step", "Ti/16", "--resolution", "160")
    assert_same_tree(imported(npz, tmp_path / "npz", "Ti/16", "--resolution", "160"), from_step)
    assert_same_tree(imported(root, tmp_path / "root", "Ti/16", "--resolution", "160"), from_step)  # latest step
    # the same model as the open_clip conversion's, with the positions computed instead of stored
    ours, theirs = pretrained.read_settings(tmp_path / "step"), pretrained.read_settings(tmp_path / "oc")
    assert ours["model"].pop("posemb") == "sincos2d" and theirs["model"].pop("posemb") == "learned"
    assert ours["text"].pop("row") == "bos_eos_cls"  # OpenVision's own tokenisation: [CLS] last, where it pools
    assert theirs["text"].pop("row") == "cls_pad"  # open_clip's: Hugging Face's [CLS] first, the [SEP] stripped
    assert ours == theirs
    image_pos = from_hub["image"].pop("pos_embedding")
    assert_same_tree(from_step, from_hub)
    np.testing.assert_array_equal(image_pos, posemb_sincos_2d(10, 10, 192))

    pixels, tokens = inputs(ours, count=2)
    jax_import = our_embeddings(tmp_path / "step", pixels, tokens)
    hub_import = our_embeddings(tmp_path / "oc", pixels, tokens)
    np.testing.assert_array_equal(jax_import[0], hub_import[0])  # the same numbers, bit for bit
    np.testing.assert_array_equal(jax_import[1], hub_import[1])
    reference = open_clip.create_model(f"local-dir:{tmp_path / 'hub'}").eval()  # loads strictly: every tensor named
    upstream = embeddings_with_stats(reference, pixels, tokens, reference.visual.image_mean, reference.visual.image_std)
    assert relative_error(jax_import[0], upstream[0]) <= 1e-4
    assert relative_error(jax_import[1], upstream[1]) <= 1e-4
    # the bound tells the towers' GELUs apart: the same weights with them swapped are off by more
    swapped = our_embeddings(tmp_path / "step", pixels, tokens, activation="gelu_tanh", text_activation="gelu")
    assert relative_error(swapped[0], upstream[0]) > 1e-4 and relative_error(swapped[1], upstream[1]) > 1e-4


def test_learned_positions_dense_general_bfloat16_and_bare_names_import_alike(tmp_path):
    tree = random_jax_params(TINY_OPENVISION, learned_positions=True)
    hub = write_hub(tmp_path / "hub", tree, TINY_OPENVISION, OPENVISION_PREPROCESS)
    from_hub = imported(hub, tmp_path / "oc", "Mu/7")
    bare = imported(write_npz(tmp_path / "bare.npz", tree, prefix=""), tmp_path / "bare", "Mu/7")
    assert_same_tree(bare, from_hub)  # learned positions: the class token's row folded into it, as open_clip's
    settings = pretrained.read_settings(tmp_path / "bare")
    assert settings["resolution"] == 14 and settings["model"]["posemb"] == "learned"

    general = random_jax_params(TINY_OPENVISION, learned_positions=True, dense_general=True)
    assert general["img"]["Transformer"]["encoderblock_0"]["MultiHeadDotProductAttention_0"]["out"]["kernel"].ndim == 3
    assert_same_tree(imported(write_orbax(tmp_path / "general", general), tmp_path / "g", "Mu/7"), from_hub)

    import ml_dtypes

    halved = {k: v.astype(ml_dtypes.bfloat16) for k, v in names(tree).items()}  # np.save writes them as void
    np.savez(tmp_path / "bf16.npz", **halved)
    got = imported(tmp_path / "bf16.npz", tmp_path / "bf16", "Mu/7")
    expected = halved["txt/Embed_0/embedding"].astype(np.float32)
    np.testing.assert_array_equal(got["text"]["embedding"]["embedding"], expected)

    sincos = names(random_jax_params(TINY_OPENVISION))
    decoder = {**sincos, "txt_decoder/Embed_0/embedding": np.zeros((128, 96), np.float32)}
    np.savez(tmp_path / "decoder.npz", **decoder)
    code, text = convert_cli("import", str(tmp_path / "decoder.npz"), "--model", "Mu/7", "--out", str(tmp_path / "d"))
    assert code == 0 and "not imported: the caption decoder (1 tensors under txt_decoder/)" in text, text
    assert "sin-cos positions record no image size: 224 px written (--resolution sets it)" in text


@pytest.fixture
def tiny_names() -> dict[str, np.ndarray]:
    return names(random_jax_params(TINY_OPENVISION))


def test_bad_openvision_jax_checkpoints_are_one_line(tmp_path, tiny_names):
    out = tmp_path / "out"

    def error(arrays: dict | None, *args: str, src: Path | None = None) -> str:
        if arrays is not None:
            src = tmp_path / "bad.npz"
            np.savez(src, **arrays)
        return one_line_error(*convert_cli("import", str(src), "--out", str(out), *args))

    line = error({**tiny_names, "img/MAPHead_0/probe": np.zeros((1, 1, 96))}, "--model", "Mu/7")
    assert "has img/MAPHead_0/probe, which is none of OpenVision's CLIP parameters" in line
    line = error({"model/weights": np.zeros(3)}, "--model", "Mu/7")
    assert "has model/weights, which is none of OpenVision's CLIP parameters" in line

    line = error(tiny_names, "--model", "Ti/7")  # a tower of another width
    assert "img/embedding/kernel:" in line and "(7, 7, 3, 96)" in line and "(7, 7, 3, 192)" in line
    line = error(tiny_names, "--model", "Mu/14")  # of another patch
    assert "img/embedding/kernel:" in line and "(7, 7, 3, 96)" in line and "(14, 14, 3, 96)" in line
    line = error(tiny_names, "--model", "Mu")
    assert "--model Mu: name VARIANT/PATCH" in line

    heads = {
        **tiny_names,
        "img/Transformer/encoderblock_1/MultiHeadDotProductAttention_0/key/kernel": np.zeros((96, 4, 24)),
    }
    line = error(heads, "--model", "Mu/7")
    assert "encoderblock_1/MultiHeadDotProductAttention_0/key/kernel:" in line and "(96, 4, 24)" in line
    assert "(96, 3, 32)" in line  # the layout with as many axes: another head count

    missing = {k: v for k, v in tiny_names.items() if k != "txt/encoder_norm/scale"}
    assert "has no tensor txt/encoder_norm/scale" in error(missing, "--model", "Mu/7")
    deeper = {**tiny_names, "img/Transformer/encoderblock_3/LayerNorm_0/scale": np.ones(96, np.float32)}
    line = error(deeper, "--model", "Mu/7")
    assert "img/Transformer/encoderblock_3/LayerNorm_0/scale" in line and "refusing it" in line
    odd_text = {**tiny_names, "txt/Embed_0/embedding": np.zeros((128, 80), np.float32)}
    assert "a text tower of width 80 and MLP 384" in error(odd_text, "--model", "Mu/7")

    assert "--config" in error(tiny_names, "--model", "Mu/7", "--config", str(tmp_path / "c.json"))
    learned = names(random_jax_params(TINY_OPENVISION, learned_positions=True))
    line = error(learned, "--model", "Mu/7", "--resolution", "28")
    assert "--resolution 28:" in line and "learned positions for 2 x 2 patches (14-20 px)" in line
    # any resolution of that grid imports (patch 7 leaves 20 px's last 6 rows and columns unused)
    imported(write_npz(tmp_path / "learned.npz", learned), tmp_path / "at20", "Mu/7", "--resolution", "20")
    assert pretrained.read_settings(tmp_path / "at20")["resolution"] == 20

    (tmp_path / "empty").mkdir()
    line = error(None, "--model", "Mu/7", src=tmp_path / "empty")
    assert "is a directory but no orbax checkpoint" in line
    assert not out.exists()  # nothing half-written
