"""OpenVision's own JAX checkpoints (big_vision's parameter names) -> our params tree and the recipe keys of its model.

Read as OpenVision's src/main_clip.py writes them: an orbax checkpoint of {"params", "opt"} (the manager's directory,
named checkpoint.npz, as its releases ship it under jax_orbax_weight/, whose latest step is read; one step's
directory; or that step's item), of which only "params" is restored, never the optimizer state; or a .npz of
'/'-joined names (big_vision's save_checkpoint: "params/img/...", or a bare params tree, as its utils.load_params
reads). Which one is told by content, not by name (`is_checkpoint`).

The model is OpenVision's (src/configs/openvision.py; src/models/vit.py, text_transformer.py, two_towers.py): a class
token beside mean ("gap") pooling of the patch tokens, the LayerNorm after pooling, no ln_pre, exact GELU in the image
tower and tanh GELU in the text tower, LayerNorm eps 1e-6 (flax's), bidirectional text pooled at the last position,
ImageNet's pixel statistics, 2-D sin-cos positions (learned where the checkpoint has img/pos_embedding), BERT's
WordPiece in OpenVision's row layout (CLIP's BPE where the token table has its 49408 rows). The caption decoder
(txt_decoder/) is not imported. Every shape is checked against our model's own (its init's, for --model's image tower
and the text tower the checkpoint holds) and every name must be used: nothing is half-loaded.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import zipfile
from collections.abc import Iterator
from typing import Any

import numpy as np
from etils import epath

from trainer.models import variants
from trainer.openclip import CLIP_BPE_VOCAB, FormatError, StateReader

TOWERS = {"image": "img", "text": "txt"}
# ours -> OpenVision's, inside a tower
TOWER_NAMES = {
    "patchify/kernel": "embedding/kernel",  # the same (p, p, 3, width) conv kernel, no bias (emb_head_bias False)
    "cls": "cls",
    "pos_embedding": "pos_embedding",
    "embedding/embedding": "Embed_0/embedding",
    "ln_final/scale": "encoder_norm/scale",
    "ln_final/bias": "encoder_norm/bias",
    "head/kernel": "head/kernel",
}
# ours -> OpenVision's, inside a block; the leaves (kernel, bias, scale) are named alike. Our blocks are stacked on a
# leading layers axis, OpenVision's are Transformer/encoderblock_{i}
BLOCK_NAMES = {
    "ln1": "LayerNorm_0",
    "attn/query": "MultiHeadDotProductAttention_0/query",
    "attn/key": "MultiHeadDotProductAttention_0/key",
    "attn/value": "MultiHeadDotProductAttention_0/value",
    "attn/out": "MultiHeadDotProductAttention_0/out",
    "ln2": "LayerNorm_1",
    "mlp/fc1": "MlpBlock_0/Dense_0",
    "mlp/fc2": "MlpBlock_0/Dense_1",
}
TOP_NAMES = {"log_scale": "t", "bias": "b"}  # the log temperature; SigLIP's bias
DECODER = "txt_decoder/"
# Reshape rules (OpenVision's shape -> ours) beyond identity: leading axes of 1 (cls (1, 1, W), the text positions
# (1, L, W), t and b (1,)); the attention projections in nn.Dense's layout (OpenVision's configs: use_dense_general
# False) have their heads split out as ours (DenseGeneral's, which OpenVision's other setting writes and is read too)
LEADING_ONES = {"image/cls": (1, 1), "text/pos_embedding": (1,), "log_scale": (1,), "bias": (1,)}
KNOWN = re.compile(
    r"t|b|(img|txt)/(?:{}|Transformer/encoderblock_\d+/(?:{})/(?:kernel|bias|scale))".format(
        "|".join(map(re.escape, TOWER_NAMES.values())), "|".join(map(re.escape, BLOCK_NAMES.values()))
    )
)
DEFAULT_RESOLUTION = 224


def is_checkpoint(src: epath.Path) -> bool:
    """Whether SRC is one of OpenVision's JAX checkpoints by its content: a directory (orbax's), or a zip of .npy
    files (a .npz; torch's zip format holds a pickle, safetensors is no zip)."""
    if src.is_dir():
        return True
    if not src.is_file():
        return False
    with src.open("rb") as f:
        if f.read(4) != b"PK\x03\x04":
            return False
        f.seek(0)
        try:
            with zipfile.ZipFile(f) as archive:
                names = archive.namelist()
        except zipfile.BadZipFile:
            return False
    return bool(names) and all(name.endswith(".npy") for name in names)


def import_checkpoint(
    src: epath.Path, model: str, resolution: int | None
) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    """(settings as openclip.settings_from_config gives them, our params tree, notes for the user) of SRC."""
    names = read_names(src)
    decoder = [name for name in names if name.startswith(DECODER)]
    for name in decoder:
        del names[name]
    unknown = sorted(name for name in names if not KNOWN.fullmatch(name))
    if unknown:
        raise FormatError(
            f"{src} has {unknown[0]}, which is none of OpenVision's CLIP parameters (img/..., txt/..., t, b):"
            " not an OpenVision JAX checkpoint of a model we build"
        )
    settings = settings_from_names(names, model, resolution, str(src))
    params = params_from_names(names, settings, str(src))
    notes = [f"not imported: the caption decoder ({len(decoder)} tensors under {DECODER})"] if decoder else []
    if resolution is None and settings["model"]["posemb"] == "sincos2d":
        notes.append(f"sin-cos positions record no image size: {DEFAULT_RESOLUTION} px written (--resolution sets it)")
    return settings, params, notes


# --- reading ----------------------------------------------------------------------------------------------------


def read_names(src: epath.Path) -> dict[str, np.ndarray]:
    """'/'-joined names -> float32 arrays of the params in SRC (an orbax directory or a .npz)."""
    if src.is_dir():
        return dict(_flatten(_restore_params(_orbax_item(src), str(src))))
    with src.open("rb") as f, np.load(f, allow_pickle=False) as npz:
        files = list(npz.files)
        prefix = next((p for p in ("params/", "opt/target/") if any(n.startswith(p) for n in files)), "")
        return {name.removeprefix(prefix): _float32(npz[name]) for name in files if name.startswith(prefix)}


def _float32(value: Any) -> np.ndarray:
    value = np.asarray(value)
    if value.dtype.kind == "V" and value.itemsize == 2:  # np.save's bfloat16 (big_vision's recover_dtype)
        import ml_dtypes

        value = value.view(ml_dtypes.bfloat16)
    return value.astype(np.float32)


def _flatten(tree: Any, prefix: str = "") -> Iterator[tuple[str, np.ndarray]]:
    if isinstance(tree, dict):
        for key, sub in tree.items():
            yield from _flatten(sub, f"{prefix}{key}/")
    else:
        yield prefix.rstrip("/"), _float32(tree)


def _orbax_item(src: epath.Path) -> epath.Path:
    """The item directory of an orbax checkpoint: a step's default/, the latest step's of a manager's directory, or
    SRC itself."""
    if (src / "default").is_dir():
        return src / "default"
    steps = [p for p in src.iterdir() if p.name.isdigit() and p.is_dir()]
    return _orbax_item(max(steps, key=lambda p: int(p.name))) if steps else src


@contextlib.contextmanager
def _quiet_absl() -> Iterator[None]:
    """orbax warns (via absl) that an item directory has no step metadata: it is the step's, one level up."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _restore_params(item: epath.Path, source: str) -> Any:
    """The "params" of an orbax checkpoint (all of it if it has none) as NumPy arrays; nothing else is read."""
    import orbax.checkpoint as ocp

    checkpointer = ocp.PyTreeCheckpointer()
    with _quiet_absl():
        try:
            metadata = checkpointer.metadata(item).item_metadata
        except (FileNotFoundError, ValueError, KeyError, TypeError) as e:
            raise FormatError(f"{source}: no orbax checkpoint in {item} ({type(e).__name__}: {e})") from None
        tree = getattr(metadata, "tree", None)
        if not isinstance(tree, dict):
            raise FormatError(
                f"{source} is a directory but no orbax checkpoint of named arrays (a manager's directory, a step's"
                f" or its item's): {item} has no tree metadata"
            )
        wanted = {"params": tree["params"]} if "params" in tree else tree
        as_numpy = lambda sub: ocp.RestoreArgs(restore_type=np.ndarray)  # noqa: E731
        args = ocp.args.PyTreeRestore(
            item=wanted,
            restore_args=_map(as_numpy, wanted),
            partial_restore=True,
        )
        restored = checkpointer.restore(item, args=args)
    return restored["params"] if "params" in tree else restored


def _map(fn: Any, tree: Any) -> Any:
    return {k: _map(fn, v) for k, v in tree.items()} if isinstance(tree, dict) else fn(tree)


# --- the model's recipe keys ------------------------------------------------------------------------------------


def settings_from_names(names: dict[str, np.ndarray], model: str, resolution: int | None, source: str) -> dict:
    """The recipe tables of OpenVision's model with these parameters: {"model", "text", "loss", "resolution"}."""
    variant, _, patch = model.partition("/")
    if variant not in variants.IMAGE or not patch.isdigit():
        raise FormatError(f'--model {model}: name VARIANT/PATCH, a variant of {", ".join(variants.IMAGE)} ("B/16")')

    def dim(name: str, axis: int) -> int:
        if name not in names:
            raise FormatError(f"{source} has no tensor {name}, which OpenVision's CLIP has")
        shape = names[name].shape
        if len(shape) < 2:
            raise FormatError(f"{name}: {source} has shape {shape}, OpenVision's has at least 2 axes")
        return int(shape[axis])

    rows, width = dim("txt/Embed_0/embedding", 0), dim("txt/Embed_0/embedding", -1)
    mlp = dim("txt/Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel", -1)
    depth = len({m[1] for name in names if (m := re.match(r"txt/Transformer/encoderblock_(\d+)/", name))})
    text = next((k for k, size in variants.TEXT.items() if (size.width, size.mlp) == (width, mlp)), None)
    if text is None:
        raise FormatError(
            f"{source}: a text tower of width {width} and MLP {mlp} (txt/Embed_0/embedding, txt/.../Dense_0/kernel)"
            f" is none of our variants ({', '.join(variants.TEXT)}): trainer/models/variants.py lists their shapes"
        )
    posemb = "learned" if "img/pos_embedding" in names else "sincos2d"
    if posemb == "learned":  # it records the image size: patches + the class token's (zero) row
        grid = math.isqrt(dim("img/pos_embedding", -2) - 1)
        # any resolution of that grid (384 px at patch 14 is 27 x 27, as is 378); without --resolution, the least
        if resolution is not None and resolution // int(patch) != grid:
            low, high = grid * int(patch), (grid + 1) * int(patch) - 1
            raise FormatError(
                f"--resolution {resolution}: {source} has learned positions for {grid} x {grid} patches"
                f" ({low}-{high} px)"
            )
        resolution = resolution or grid * int(patch)
    bpe = rows == CLIP_BPE_VOCAB
    return {
        "model": {
            "image": model,
            "text": text,
            "image_depth": 0,  # the variant's: a block beyond it is refused as a name outside the layout
            "text_depth": 0 if variants.TEXT[text].depth == depth else depth,
            "pooling": "mean",
            "posemb": posemb,
            "class_token": True,
            "ln_pre": False,
            "norm_after_pool": True,
            "activation": "gelu",
            "text_activation": "gelu_tanh",
            "norm_eps": 1e-6,
            "pixel_norm": "imagenet",
            "text_causal": False,
            "text_pooling": "last",
            "embed_dim": dim("txt/head/kernel", -1),
        },
        "text": {
            "tokenizer": "clip_bpe" if bpe else "bert_wordpiece",
            "vocab_rows": rows,
            "context_length": dim("txt/pos_embedding", -2),
            **({} if bpe else {"row": "bos_eos_cls"}),  # my_bert_tokenize: [bos] words [eos] padding [CLS]
        },
        "loss": {"contrastive": "sigmoid" if "b" in names else "softmax"},
        "resolution": resolution or DEFAULT_RESOLUTION,
    }


# --- the params -------------------------------------------------------------------------------------------------


def our_shapes(settings: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Our model's parameter shapes ('/'-joined names, blocks stacked) for `settings`, from the model itself."""
    import flax.linen as nn
    import jax

    from trainer import pretrained
    from trainer.models.clip import build
    from trainer.program import init_variables

    recipe = pretrained.recipe_from_settings(settings)
    model = build(recipe)
    boxed = jax.eval_shape(lambda: init_variables(model, recipe, recipe.stages[0])["params"])
    return pretrained.flat_shapes(nn.unbox(boxed))


def their_name(ours: str, layer: int | None = None) -> str:
    """OpenVision's name of our parameter `ours` (of block `layer` for our stacked blocks)."""
    if ours in TOP_NAMES:
        return TOP_NAMES[ours]
    tower, rest = ours.split("/", 1)
    if layer is None:
        return f"{TOWERS[tower]}/{TOWER_NAMES[rest]}"
    module, leaf = rest.removeprefix("blocks/").rsplit("/", 1)
    return f"{TOWERS[tower]}/Transformer/encoderblock_{layer}/{BLOCK_NAMES[module]}/{leaf}"


def their_shapes(ours: str, shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    """The shapes OpenVision stores our `ours` (one block's) in: its configs' layout first."""
    projection = re.search(r"attn/(query|key|value|out)/(kernel|bias)$", ours)
    if projection and projection[2] == "kernel":
        merged = (shape[0], shape[1] * shape[2]) if projection[1] != "out" else (shape[0] * shape[1], shape[2])
        return [merged, shape]
    if projection and projection[1] != "out":
        return [(math.prod(shape),), shape]
    return [LEADING_ONES.get(ours, ()) + shape]


def _take(read: StateReader, ours: str, shape: tuple[int, ...], layer: int | None = None) -> np.ndarray:
    name = their_name(ours, layer)
    shapes = their_shapes(ours, shape)
    found = read.state[name].shape if name in read.state else ()
    # the layout it is in, else (for the message) the one with as many axes
    want = found if found in shapes else next((s for s in shapes if len(s) == len(found)), shapes[0])
    return read.take(name, want).reshape(shape)


def params_from_names(names: dict[str, np.ndarray], settings: dict[str, Any], source: str) -> dict[str, Any]:
    """OpenVision's named arrays -> our params tree for the model `settings` describes; each shape checked, every
    name used."""
    read = StateReader(names, source)
    params: dict[str, Any] = {}
    shapes = our_shapes(settings)
    # the patch kernel first: it tells --model's tower apart (width and patch), then the other single tensors
    for ours in sorted(shapes, key=lambda k: (k != "image/patchify/kernel", "/blocks/" in k, k)):
        shape = shapes[ours]
        if ours == "image/pos_embedding":
            continue  # below, once the class token is read
        if "/blocks/" in ours:
            value = np.stack([_take(read, ours, shape[1:], i) for i in range(shape[0])])
        else:
            value = _take(read, ours, shape)
        node = params
        *path, leaf = ours.split("/")
        for key in path:
            node = node.setdefault(key, {})
        node[leaf] = value
    if "image/pos_embedding" in shapes:  # learned: OpenVision's has the class token's row, ours adds it to the token
        n, width = shapes["image/pos_embedding"]
        pos = read.take("img/pos_embedding", (1, n + 1, width))[0]
        params["image"]["pos_embedding"] = pos[1:]
        params["image"]["cls"] = params["image"]["cls"] + pos[0]
    read.finish()
    return params
