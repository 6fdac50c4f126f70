"""Image-text retrieval, COCO / Flickr30k style: the test split of a Karpathy-split JSON (images with several
captions each). Image->text: an image is a hit at K when one of its captions is among the K texts nearest to it;
text->image: a caption is a hit when its image is among the K images nearest to it. Recall@1/5/10 both ways.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import numpy as np

from trainer.data import preprocess
from trainer.data.tfsetup import tf
from trainer.data.tokenizers import from_recipe
from trainer.evals.zeroshot import encoders, in_chunks
from trainer.models.clip import Clip
from trainer.recipe import Eval, Recipe, RecipeError

KS = (1, 5, 10)


def read_karpathy(path: str, key: str, split: str = "test") -> tuple[list[str], list[str], np.ndarray]:
    """(image files, captions, image index of each caption) of one split."""
    file = Path(path)
    if not file.is_file():
        raise RecipeError(f'{key}.path = "{path}" does not exist (a Karpathy-split JSON)')
    try:
        entries = json.loads(file.read_text())["images"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise RecipeError(f'{key}.path = "{path}" is not a Karpathy-split JSON ({{"images": [...]}})') from None
    images, captions, owner = [], [], []
    for entry in entries:
        if entry.get("split", split) != split:
            continue
        images.append(str(file.parent / entry.get("filepath", "") / entry["filename"]))
        for sentence in entry["sentences"]:
            captions.append(sentence["raw"])
            owner.append(len(images) - 1)
    if not images:
        raise RecipeError(f'{key}.path = "{path}" has no "{split}" images')
    return images, captions, np.array(owner)


def recall_at_k(sim: np.ndarray, owner: np.ndarray, ks: tuple[int, ...] = KS) -> dict[str, float]:
    """sim: (images, captions) similarities; owner[c] = the image of caption c."""
    out = {}
    order_t = np.argsort(-sim, axis=1)  # per image, captions best first
    rank_i2t = np.array([np.flatnonzero(owner[order_t[i]] == i)[0] for i in range(sim.shape[0])])
    order_i = np.argsort(-sim.T, axis=1)  # per caption, images best first
    rank_t2i = np.array([np.flatnonzero(order_i[c] == owner[c])[0] for c in range(sim.shape[1])])
    for k in ks:
        out[f"i2t_r@{k}"] = float(np.mean(rank_i2t < k))
        out[f"t2i_r@{k}"] = float(np.mean(rank_t2i < k))
    return out


def evaluate(
    recipe: Recipe, spec: Eval, model: Clip, params: Any, mesh: jax.sharding.Mesh, resolution: int
) -> dict[str, float]:
    key = f"evals[{recipe.evals.index(spec)}]"
    files, captions, owner = read_karpathy(spec.path, key)
    tokenize = from_recipe(recipe)
    ids = tokenize.batch(tf.constant(captions), recipe.text.context_length).numpy()

    def load(path: tf.Tensor) -> tf.Tensor:
        return preprocess.eval_image(
            preprocess.decode_accurately(tf.io.read_file(path)), resolution, recipe.data.eval_resize
        )

    pixels = np.concatenate(list(tf.data.Dataset.from_tensor_slices(files).map(load).batch(256).as_numpy_iterator()))
    encode_text, encode_image = encoders(model)
    text_emb = np.asarray(in_chunks(lambda x: encode_text({"params": params}, x), ids, mesh, spec.batch))
    image_emb = np.asarray(in_chunks(lambda x: encode_image({"params": params}, x), pixels, mesh, spec.batch))
    return {**recall_at_k(image_emb @ text_emb.T, owner), "images": float(len(files))}
