"""Image-text retrieval, COCO / Flickr30k style: the test split of a Karpathy-split JSON (images with several
captions each). Image->text: an image is a hit at K when one of its captions is among the K texts nearest to it;
text->image: a caption is a hit when its image is among the K images nearest to it. Recall@1/5/10 both ways.

The JSON and the images it names may be local or on gs:// (image paths are relative to the JSON's directory).
"""

from __future__ import annotations

import json
from typing import Any

import jax
import numpy as np

from trainer import storage
from trainer.data import Host, preprocess
from trainer.data.tfsetup import tf
from trainer.data.tokenizers import Tokenizer
from trainer.evals.zeroshot import encoders, in_chunks, raise_if_any_host_failed
from trainer.models.clip import Clip
from trainer.recipe import Eval, Recipe, RecipeError

KS = (1, 5, 10)


def read_karpathy(path: str, key: str, split: str = "test") -> tuple[list[str], list[str], np.ndarray]:
    """(image files, captions, image index of each caption) of one split."""
    try:
        text = storage.read_text(path, f"{key}.path")
    except storage.StorageError as error:
        raise RecipeError(f"{error} (a Karpathy-split JSON)") from None
    try:
        entries = json.loads(text)["images"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise RecipeError(f'{key}.path = "{path}" is not a Karpathy-split JSON ({{"images": [...]}})') from None
    folder = storage.at(path).parent
    images, captions, owner = [], [], []
    for entry in entries:
        if entry.get("split", split) != split:
            continue
        images.append(str(folder / entry.get("filepath", "") / entry["filename"]))
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


class Retrieval:
    """The split's images and tokenized captions, read once; `run` encodes both and scores Recall@K."""

    def __init__(self, recipe: Recipe, spec: Eval, key: str, tokenizer: Tokenizer):
        self.name, self.spec, self.eval_resize = spec.name, spec, recipe.data.eval_resize
        self.antialias = recipe.data.antialias
        self.files, captions, self.owner = read_karpathy(spec.path, key)
        if not storage.at(self.files[0]).is_file():  # one look: a wrong folder layout fails now, not at step 1,000
            raise RecipeError(f'{key}.path = "{spec.path}" names images that do not exist, e.g. {self.files[0]}')
        self.ids = tokenizer.batch(tf.constant(captions), recipe.text.context_length).numpy()

    def run(self, model: Clip, params: Any, mesh: jax.sharding.Mesh, resolution: int) -> dict[str, float]:
        def load(path: tf.Tensor) -> tf.Tensor:
            image = preprocess.decode_accurately(tf.io.read_file(path))
            return preprocess.eval_image(image, resolution, self.eval_resize, self.antialias)

        images = tf.data.Dataset.from_tensor_slices(self.files).map(load, num_parallel_calls=tf.data.AUTOTUNE)
        failure: Exception | None = None
        try:  # every host reads every image; one may fail where the others do not: all must know before computing
            pixels = np.concatenate(list(images.batch(256).as_numpy_iterator()))
        except Exception as error:
            failure = error
        raise_if_any_host_failed(failure, Host(jax.process_index(), jax.process_count()))
        encode_text, encode_image = encoders(model)
        batch = self.spec.batch
        text_emb = np.asarray(in_chunks(lambda x: encode_text({"params": params}, x), self.ids, mesh, batch))
        image_emb = np.asarray(in_chunks(lambda x: encode_image({"params": params}, x), pixels, mesh, batch))
        return {**recall_at_k(image_emb @ text_emb.T, self.owner), "images": float(len(self.files))}
