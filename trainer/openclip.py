"""open_clip's checkpoint format <-> ours: its model config <-> recipe keys, its state dict <-> our params tree.

NumPy arrays both ways (no torch): `trainer.convert` reads and writes the files. An architecture open_clip can build but
we cannot compute exactly is refused by name before any tensor is read; every tensor's shape is checked against the
one the model needs, and a tensor left over is an error too: nothing is ever half-loaded.

The one change of layout beyond transposes: open_clip adds a position to its class token; ours has none, so that
position is folded into the class token on import (exact: the sum is what open_clip computes first anyway) and
exported as zero.
"""

from __future__ import annotations

import dataclasses
import math
from fractions import Fraction
from typing import Any

import numpy as np

from trainer.errors import UserError
from trainer.models import variants
from trainer.models.clip import OPENAI_MEAN, OPENAI_STD, PIXEL_STATS
from trainer.models.vit import posemb_sincos_2d
from trainer.recipe import Recipe

INCEPTION = (0.5, 0.5, 0.5)
CLIP_BPE_VOCAB = 49408

# Options open_clip has and we don't compute: refused where set to anything but these defaults.
UNSUPPORTED_BLOCKS = {  # open_clip's "custom" attention blocks, in either tower
    "ls_init_value": None,
    "block_type": None,
    "qk_norm": False,
    "scaled_cosine_attn": False,
    "scale_heads": False,
    "scale_attn_inner": False,
    "scale_attn": False,
    "scale_fc": False,
}
UNSUPPORTED_VISION = {**UNSUPPORTED_BLOCKS, "attentional_pool": False, "timm_model_name": None}
UNSUPPORTED_TEXT = {
    **UNSUPPORTED_BLOCKS,
    "hf_model_name": None,
    "embed_cls": False,
    "proj_bias": False,
    "final_ln_after_pool": False,
}


class FormatError(UserError):
    """A checkpoint we cannot convert, as one line naming the tensor or config key."""


# --- config <-> recipe keys -----------------------------------------------------------------------------------


def find_variant(table: dict[str, variants.Size], size: variants.Size, what: str) -> str:
    for name, known in table.items():
        if known == size:
            return name
    raise FormatError(
        f"{what} (width {size.width}, depth {size.depth}, mlp {size.mlp}, heads {size.heads}) is none of our variants"
        f" ({', '.join(table)}): trainer/models/variants.py lists their shapes"
    )


def _refuse_unsupported(cfg: dict[str, Any], unsupported: dict[str, Any], where: str) -> None:
    for key, default in unsupported.items():
        if cfg.get(key, default) not in (default, "default"):
            raise FormatError(f"{where}.{key} = {cfg[key]!r}: this architecture is not supported (only {default!r})")


def settings_from_config(config: dict[str, Any], model: str) -> dict[str, Any]:
    """An open_clip model config (model_configs/<name>.json, or the hub's open_clip_config.json) -> the recipe
    tables that build the same model: {"model": ..., "text": ..., "loss": ..., "resolution": int}."""
    cfg = config.get("model_cfg", config)  # the hub's file nests it
    preprocess = config.get("preprocess_cfg", cfg.get("preprocess_cfg", {}))
    vision, text = cfg.get("vision_cfg", {}), cfg.get("text_cfg", {})
    if cfg.get("custom_text") and text.get("hf_model_name"):
        raise FormatError(
            f"text_cfg.hf_model_name = {text['hf_model_name']!r}: Hugging Face text towers are unsupported"
        )
    _refuse_unsupported(vision, UNSUPPORTED_VISION, "vision_cfg")
    _refuse_unsupported(text, UNSUPPORTED_TEXT, "text_cfg")
    for key in ("layers", "image_size", "patch_size"):
        if not isinstance(vision.get(key, 0), int):
            raise FormatError(f"vision_cfg.{key} = {vision[key]!r}: only square ViTs (one integer) are supported")
    width = vision.get("width", 768)
    patch = vision.get("patch_size", 16)
    image_size = variants.Size(
        width,
        vision.get("layers", 12),
        round(width * vision.get("mlp_ratio", 4.0)),
        width // vision.get("head_width", 64),
    )
    # a tower of a variant's shape with fewer (or more) layers is that variant with model.image_depth (text_depth) set
    image_variant = find_variant(
        {k: dataclasses.replace(v, depth=image_size.depth) for k, v in variants.IMAGE.items()},
        image_size,
        "the image tower",
    )
    image_depth = 0 if variants.IMAGE[image_variant].depth == image_size.depth else image_size.depth
    if f"{image_variant}/{patch}" != model:
        raise FormatError(f'--model {model}: the config describes "{image_variant}/{patch}"; pass that')
    text_width = text.get("width", 512)
    text_size = variants.Size(
        text_width,
        text.get("layers", 12),
        round(text_width * text.get("mlp_ratio", 4.0)),
        text.get("heads", 8),
    )
    text_variant = find_variant(
        {k: dataclasses.replace(v, depth=text_size.depth) for k, v in variants.TEXT.items()},
        text_size,
        "the text tower",
    )
    text_depth = 0 if variants.TEXT[text_variant].depth == text_size.depth else text_size.depth
    pool = vision.get("pool_type", "tok")
    if pool not in ("tok", "avg"):
        raise FormatError(f"vision_cfg.pool_type = {pool!r}: only 'tok' and 'avg' are supported")
    text_pool = text.get("pool_type", "argmax")
    if text_pool not in ("argmax", "last"):
        raise FormatError(f"text_cfg.pool_type = {text_pool!r}: only 'argmax' and 'last' are supported")
    vocab = text.get("vocab_size", CLIP_BPE_VOCAB)
    tokenizer = text.get("hf_tokenizer_name")
    if tokenizer in (None, ""):
        tokenizer_key = "clip_bpe"
    elif "bert-base-uncased" in tokenizer:
        tokenizer_key = "bert_wordpiece"
        # the row open_clip's Hugging Face tokenizer makes: [CLS] pieces [SEP], the [SEP] zeroed by strip_sep_token
        row = "cls_pad" if text.get("tokenizer_kwargs", {}).get("strip_sep_token") else "cls_sep"
    else:
        raise FormatError(
            f"text_cfg.hf_tokenizer_name = {tokenizer!r}: only CLIP's BPE or BERT's WordPiece is supported"
        )
    (activation, eps), (text_activation, text_eps) = (
        _tower_arch(cfg, tower, where) for where, tower in (("vision_cfg", vision), ("text_cfg", text))
    )
    if text_eps != eps:
        raise FormatError(f"text_cfg's LayerNorm eps {text_eps} differs from vision_cfg's {eps}: our towers share it")
    mean, std = tuple(preprocess.get("mean", OPENAI_MEAN)), tuple(preprocess.get("std", OPENAI_STD))
    pixel_norm = next((name for name, stats in PIXEL_STATS.items() if stats == (mean, std)), None)
    if pixel_norm is None:
        raise FormatError(
            f"preprocess_cfg mean {mean} / std {std}: only CLIP's, ImageNet's and (0.5, 0.5, 0.5) are supported"
        )
    return {
        "model": {
            "image": model,
            "text": text_variant,
            "image_depth": image_depth,
            "text_depth": text_depth,
            "pooling": "cls" if pool == "tok" else "mean",
            "posemb": "learned",
            "class_token": True,
            "ln_pre": not vision.get("no_ln_pre", False),
            "norm_after_pool": bool(vision.get("final_ln_after_pool", False)),
            "activation": activation,
            "text_activation": "" if text_activation == activation else text_activation,
            "norm_eps": eps,
            "pixel_norm": pixel_norm,
            "text_causal": not text.get("no_causal_mask", False),
            "text_pooling": text_pool,
            "embed_dim": cfg.get("embed_dim", 512),
        },
        "text": {"tokenizer": tokenizer_key, "vocab_rows": vocab, "context_length": text.get("context_length", 77)}
        | ({"row": row} if tokenizer_key == "bert_wordpiece" else {}),
        "loss": {"contrastive": "sigmoid" if "init_logit_bias" in cfg else "softmax"},
        "resolution": vision.get("image_size", 224),
    }


def _tower_arch(cfg: dict[str, Any], tower: dict[str, Any], where: str) -> tuple[str, float]:
    """(activation, LayerNorm eps) of one tower's config: open_clip's nn.GELU or QuickGELU, with act_kwargs."""
    act = tower.get("act_kwargs") or {}
    if set(act) - {"approximate"} or act.get("approximate", "none") not in ("none", "tanh"):
        raise FormatError(f"{where}.act_kwargs = {act!r}: only {{'approximate': 'tanh'}} is supported")
    eps = float((tower.get("norm_kwargs") or {}).get("eps", 1e-5))
    if cfg.get("quick_gelu"):
        return "quick_gelu", eps  # QuickGELU takes no act_kwargs
    return ("gelu_tanh" if act.get("approximate") == "tanh" else "gelu"), eps


def config_from_recipe(recipe: Recipe, resolution: int) -> dict[str, Any]:
    """Our model -> open_clip's config, as the hub lays it out (open_clip_config.json: {"model_cfg", "preprocess_cfg"}),
    refusing what open_clip cannot build.

    The keys, their order and the defaults left out are those of OpenVision's released configs (open_clip's
    model_configs/openvision-*.json): an OpenVision recipe at a released size and resolution gives that file's
    values in every key open_clip reads (tests/test_convert.py holds the files)."""
    m = recipe.model
    if m.pooling == "map":
        raise FormatError('model.pooling = "map": open_clip\'s attentional pooler is another design; not exported')
    if not (m.class_token or m.pooling == "cls"):
        raise FormatError(
            'model.pooling = "mean" without model.class_token: open_clip\'s ViT always attends with a class token,'
            " so it cannot compute this model; train with model.class_token = true to export"
        )
    image, text = variants.image_tower(m), variants.text_tower(m)
    activations = (m.activation, m.text_activation or m.activation)
    if "quick_gelu" in activations and activations != ("quick_gelu", "quick_gelu"):
        raise FormatError(
            f"model.activation / text_activation = {activations}: open_clip's quick_gelu is for both towers or none"
        )

    def arch(activation: str) -> dict[str, Any]:  # carried only off open_clip's defaults: exact GELU, eps 1e-5
        kwargs: dict[str, Any] = {"act_kwargs": {"approximate": "tanh"}} if activation == "gelu_tanh" else {}
        return kwargs | ({"norm_kwargs": {"eps": m.norm_eps}} if m.norm_eps != 1e-5 else {})

    def ratio(size: variants.Size) -> dict[str, float]:  # likewise: 4
        value = mlp_ratio(size)
        return {"mlp_ratio": value} if value != 4.0 else {}

    vision_cfg = {
        "image_size": resolution,
        "layers": image.depth,
        "width": image.width,
        "patch_size": m.patch,
        "no_ln_pre": not m.ln_pre,
        "pool_type": "tok" if m.pooling == "cls" else "avg",  # "avg": the patch tokens', as ours with a class token
        "final_ln_after_pool": m.norm_after_pool,
        **arch(activations[0]),
        "head_width": image.width // image.heads,
        **ratio(image),
    }
    text_cfg: dict[str, Any] = {"context_length": recipe.text.context_length, "vocab_size": recipe.text.vocab_rows}
    if recipe.text.tokenizer == "bert_wordpiece":  # OpenVision's release names it for its bos_eos_cls rows too
        text_cfg.update(hf_tokenizer_name="bert-base-uncased")
        if recipe.text.row != "cls_sep":
            text_cfg.update(tokenizer_kwargs={"strip_sep_token": True})
    text_cfg |= {
        "width": text.width,
        "heads": text.heads,
        "layers": text.depth,
        "pool_type": m.text_pooling,
        "no_causal_mask": not m.text_causal,
        **arch(activations[1]),
        **ratio(text),
    }
    model_cfg: dict[str, Any] = {"embed_dim": m.embed_dim or variants.EMBED_DIM[m.image_variant]}
    if m.activation == "quick_gelu":
        model_cfg["quick_gelu"] = True
    model_cfg |= {"vision_cfg": vision_cfg, "text_cfg": text_cfg}
    if recipe.loss.contrastive == "sigmoid":
        model_cfg["init_logit_bias"] = -10.0
    mean, std = PIXEL_STATS[m.pixel_norm]
    # open_clip's own eval transform (shorter side, centre crop, PIL's bicubic) where the recipe evaluates with it;
    # else OpenVision's released choice, which open_clip users of its checkpoints get (though its evaluator, as ours,
    # resizes the shorter side and crops the centre)
    if recipe.data.eval_resize == "pil_bicubic":
        resize = {"interpolation": "bicubic", "resize_mode": "shortest"}
    else:
        resize = {"interpolation": "bilinear", "resize_mode": "squash"}
    return {"model_cfg": model_cfg, "preprocess_cfg": {"mean": list(mean), "std": list(std), **resize}}


def mlp_ratio(size: variants.Size) -> float:
    """The shortest decimal ratio from which open_clip's `int(width * mlp_ratio)` gives the tower's MLP width: 4.0,
    or So400m's 4304 / 1152 as 3.7362 (OpenVision's released configs carry that value; rounded, 3.7361 gives 4303)."""
    for places in range(10):
        ratio = math.ceil(Fraction(size.mlp * 10**places, size.width)) / 10**places
        if int(size.width * ratio) == size.mlp:
            return ratio
    raise FormatError(f"MLP width {size.mlp} of a {size.width}-wide tower has no ratio open_clip computes it from")


# --- state dict <-> params ------------------------------------------------------------------------------------


class StateReader:
    """Takes tensors out of a state dict by name, checking each shape; what is left at the end is an error."""

    def __init__(self, state: dict[str, np.ndarray], source: str):
        self.state, self.source = dict(state), source

    def take(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        if name not in self.state:
            raise FormatError(f"{self.source} has no tensor {name} (shape {shape}), which this architecture needs")
        value = np.asarray(self.state.pop(name), np.float32)
        if value.shape != shape:
            raise FormatError(f"{name}: {self.source} has shape {value.shape}, the model needs {shape}")
        return value

    def finish(self) -> None:
        left = sorted(self.state)
        if left:
            more = f" (and {len(left) - 1} more)" if len(left) > 1 else ""
            raise FormatError(f"{self.source} has {left[0]}{more}, which this architecture does not use: refusing it")


def _blocks_from_state(read: StateReader, prefix: str, size: variants.Size) -> dict[str, Any]:
    w, h, m = size.width, size.heads, size.mlp
    d = w // h
    layers: list[dict[str, Any]] = []
    for i in range(size.depth):
        p = f"{prefix}.resblocks.{i}"
        qkv_w = read.take(f"{p}.attn.in_proj_weight", (3 * w, w))
        qkv_b = read.take(f"{p}.attn.in_proj_bias", (3 * w,))
        attn = {
            name: {
                "kernel": qkv_w[j * w : (j + 1) * w].T.reshape(w, h, d),
                "bias": qkv_b[j * w : (j + 1) * w].reshape(h, d),
            }
            for j, name in enumerate(("query", "key", "value"))
        }
        attn["out"] = {
            "kernel": read.take(f"{p}.attn.out_proj.weight", (w, w)).T.reshape(h, d, w),
            "bias": read.take(f"{p}.attn.out_proj.bias", (w,)),
        }
        layers.append(
            {
                "ln1": {"scale": read.take(f"{p}.ln_1.weight", (w,)), "bias": read.take(f"{p}.ln_1.bias", (w,))},
                "attn": attn,
                "ln2": {"scale": read.take(f"{p}.ln_2.weight", (w,)), "bias": read.take(f"{p}.ln_2.bias", (w,))},
                "mlp": {
                    "fc1": {
                        "kernel": read.take(f"{p}.mlp.c_fc.weight", (m, w)).T,
                        "bias": read.take(f"{p}.mlp.c_fc.bias", (m,)),
                    },
                    "fc2": {
                        "kernel": read.take(f"{p}.mlp.c_proj.weight", (w, m)).T,
                        "bias": read.take(f"{p}.mlp.c_proj.bias", (w,)),
                    },
                },
            }
        )
    return _stack(layers)


def _stack(layers: list[Any]) -> Any:
    """Per-layer trees -> one tree with a leading layers axis (our scanned blocks' layout)."""
    first = layers[0]
    if isinstance(first, dict):
        return {k: _stack([layer[k] for layer in layers]) for k in first}
    return np.stack(layers)


def _norm(read: StateReader, name: str, width: int) -> dict[str, np.ndarray]:
    return {"scale": read.take(f"{name}.weight", (width,)), "bias": read.take(f"{name}.bias", (width,))}


def params_from_state(state: dict[str, np.ndarray], settings: dict[str, Any], source: str) -> dict[str, Any]:
    """open_clip's state dict -> our params tree, for the model `settings` (settings_from_config's) describes."""
    read = StateReader({k.removeprefix("module."): v for k, v in state.items()}, source)
    m = settings["model"]
    variant, patch = m["image"].split("/")
    image, text = variants.IMAGE[variant], variants.TEXT[m["text"]]
    image = dataclasses.replace(image, depth=m.get("image_depth") or image.depth)
    text = dataclasses.replace(text, depth=m.get("text_depth") or text.depth)
    grid = settings["resolution"] // int(patch)
    wi, wt, embed = image.width, text.width, m["embed_dim"]
    pos = read.take("visual.positional_embedding", (grid * grid + 1, wi))
    image_params: dict[str, Any] = {
        "patchify": {"kernel": read.take("visual.conv1.weight", (wi, 3, int(patch), int(patch))).transpose(2, 3, 1, 0)},
        "pos_embedding": pos[1:],
        "cls": read.take("visual.class_embedding", (wi,)) + pos[0],
        "blocks": _blocks_from_state(read, "visual.transformer", image),
        "ln_final": _norm(read, "visual.ln_post", wi),
        "head": {"kernel": read.take("visual.proj", (wi, embed))},
    }
    if m["ln_pre"]:
        image_params["ln_pre"] = _norm(read, "visual.ln_pre", wi)
    rows, length = settings["text"]["vocab_rows"], settings["text"]["context_length"]
    text_params = {
        "embedding": {"embedding": read.take("token_embedding.weight", (rows, wt))},
        "pos_embedding": read.take("positional_embedding", (length, wt)),
        "blocks": _blocks_from_state(read, "transformer", text),
        "ln_final": _norm(read, "ln_final", wt),
        "head": {"kernel": read.take("text_projection", (wt, embed))},
    }
    params: dict[str, Any] = {"image": image_params, "text": text_params}
    params["log_scale"] = read.take("logit_scale", ())
    if settings["loss"]["contrastive"] == "sigmoid":
        params["bias"] = read.take("logit_bias", ())
    read.state.pop("attn_mask", None)  # a buffer some versions saved: the causal mask, rebuilt from the config
    read.finish()
    return params


def _blocks_to_state(blocks: dict[str, Any], prefix: str, size: variants.Size, out: dict[str, np.ndarray]) -> None:
    w = size.width
    for i in range(size.depth):
        p = f"{prefix}.resblocks.{i}"
        layer = _layer(blocks, i)
        attn = layer["attn"]
        out[f"{p}.ln_1.weight"], out[f"{p}.ln_1.bias"] = layer["ln1"]["scale"], layer["ln1"]["bias"]
        out[f"{p}.attn.in_proj_weight"] = np.concatenate(
            [attn[n]["kernel"].reshape(w, w).T for n in ("query", "key", "value")]
        )
        out[f"{p}.attn.in_proj_bias"] = np.concatenate([attn[n]["bias"].reshape(w) for n in ("query", "key", "value")])
        out[f"{p}.attn.out_proj.weight"] = attn["out"]["kernel"].reshape(w, w).T
        out[f"{p}.attn.out_proj.bias"] = attn["out"]["bias"]
        out[f"{p}.ln_2.weight"], out[f"{p}.ln_2.bias"] = layer["ln2"]["scale"], layer["ln2"]["bias"]
        mlp = layer["mlp"]
        out[f"{p}.mlp.c_fc.weight"], out[f"{p}.mlp.c_fc.bias"] = mlp["fc1"]["kernel"].T, mlp["fc1"]["bias"]
        out[f"{p}.mlp.c_proj.weight"], out[f"{p}.mlp.c_proj.bias"] = mlp["fc2"]["kernel"].T, mlp["fc2"]["bias"]


def _layer(tree: Any, i: int) -> Any:
    return {k: _layer(v, i) for k, v in tree.items()} if isinstance(tree, dict) else np.asarray(tree[i])


def state_from_params(params: dict[str, Any], recipe: Recipe, resolution: int) -> dict[str, np.ndarray]:
    """Our params tree -> open_clip's state dict (float32, contiguous), for the config config_from_recipe made (and
    so checked: it refuses what open_clip cannot build)."""
    m = recipe.model
    image, text = variants.image_tower(m), variants.text_tower(m)
    p = _float32(params)
    out: dict[str, np.ndarray] = {}
    vi = p["image"]
    grid = resolution // m.patch
    patches = vi["pos_embedding"] if m.posemb == "learned" else posemb_sincos_2d(grid, grid, image.width)
    out["visual.positional_embedding"] = np.concatenate([np.zeros((1, image.width), np.float32), patches])
    out["visual.class_embedding"] = vi["cls"]
    out["visual.conv1.weight"] = vi["patchify"]["kernel"].transpose(3, 2, 0, 1)
    if m.ln_pre:
        out["visual.ln_pre.weight"], out["visual.ln_pre.bias"] = vi["ln_pre"]["scale"], vi["ln_pre"]["bias"]
    _blocks_to_state(vi["blocks"], "visual.transformer", image, out)
    out["visual.ln_post.weight"], out["visual.ln_post.bias"] = vi["ln_final"]["scale"], vi["ln_final"]["bias"]
    out["visual.proj"] = vi["head"]["kernel"]
    vt = p["text"]
    out["token_embedding.weight"] = vt["embedding"]["embedding"]
    out["positional_embedding"] = vt["pos_embedding"]
    _blocks_to_state(vt["blocks"], "transformer", text, out)
    out["ln_final.weight"], out["ln_final.bias"] = vt["ln_final"]["scale"], vt["ln_final"]["bias"]
    out["text_projection"] = vt["head"]["kernel"]
    out["logit_scale"] = p["log_scale"]
    if "bias" in p:
        out["logit_bias"] = p["bias"]
    return {k: np.ascontiguousarray(v, np.float32) for k, v in out.items()}


def _float32(tree: Any) -> Any:
    return {k: _float32(v) for k, v in tree.items()} if isinstance(tree, dict) else np.asarray(tree, np.float32)
