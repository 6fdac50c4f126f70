"""The CLIP model: image tower + text tower (+ caption decoder), a learned temperature (and SigLIP's bias).

`build(recipe)` is the one way to make it; `Clip.__call__` returns everything the losses need.
"""

from __future__ import annotations

import math
from typing import Any, Literal, cast

import flax.linen as nn
import jax
import jax.numpy as jnp

from trainer.models import variants
from trainer.models.text import CaptionDecoder, QueryDecoder, TextTower
from trainer.models.vit import Arch, ImageTower, Implementation, Layers, Remat
from trainer.recipe import Recipe, RecipeError

BOS_ID = 1  # OpenVision's [bos] (BERT's [unused0])
QUERY_CHUNK = 128  # queries a chunk in the attention of a tower with remat "block" (vit.chunked_attention)


class Clip(nn.Module):
    image: ImageTower
    text: TextTower
    decoder: CaptionDecoder | QueryDecoder | None
    temperature_init: float
    sigmoid: bool = False
    decoder_sees_text: bool = True
    pixel_norm: str = "inception"

    @nn.compact
    def __call__(
        self,
        images: jnp.ndarray,
        texts: jnp.ndarray,
        captions: jnp.ndarray | None = None,
        patch_keep: float = 1.0,
        second_texts: jnp.ndarray | None = None,
    ) -> dict[str, Any]:
        """images (B, H, W, 3), texts (B, L) alt-text ids, captions (B, T) re-caption ids (decoder targets),
        second_texts (B, L) a second text per image to contrast with (OpenVision's re-caption sentence; its
        embeddings come back as "second_text_emb"); patch_keep < 1 drops image patches (needs a "dropout" rng);
        uint8 images are normalised (`pixel_norm`)."""
        image_emb, image_tokens = self.image(to_model_range(images, self.pixel_norm), patch_keep)
        both = texts if second_texts is None else jnp.concatenate([texts, second_texts], axis=0)
        all_text_emb, all_text_tokens = self.text(both)  # one pass over both texts, as OpenVision
        n = texts.shape[0]
        text_emb, text_tokens = all_text_emb[:n], all_text_tokens[:n]  # the decoder sees the alt-text's tokens
        init_scale = math.log(10.0) if self.sigmoid else math.log(self.temperature_init)
        out: dict[str, Any] = {
            "image_emb": normalize(image_emb),
            "text_emb": normalize(text_emb),
            "log_scale": self.param("log_scale", nn.initializers.constant(init_scale), (), jnp.float32),
        }
        if second_texts is not None:
            out["second_text_emb"] = normalize(all_text_emb[n:])
        if self.sigmoid:
            out["bias"] = self.param("bias", nn.initializers.constant(-10.0), (), jnp.float32)
        if self.decoder is not None and captions is not None:
            inputs = jnp.concatenate([jnp.full_like(captions[:, :1], BOS_ID), captions[:, :-1]], axis=1)
            context = text_tokens if self.decoder_sees_text else None
            out["caption"] = self.decoder(inputs, image_tokens, context)  # a Readout: .logits() forms them
        return out

    def encode_image(self, images: jnp.ndarray) -> jnp.ndarray:
        """L2-normalised image embeddings (evaluation)."""
        return normalize(self.image(to_model_range(images, self.pixel_norm))[0])

    def encode_text(self, texts: jnp.ndarray) -> jnp.ndarray:
        """L2-normalised text embeddings (evaluation)."""
        return normalize(self.text(texts)[0])


# CLIP's per-channel statistics (open_clip's OPENAI_DATASET_MEAN / _STD)
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
# model.pixel_norm -> (mean, std) of pixels in [0, 1], as torchvision's Normalize takes them
PIXEL_STATS = {
    "inception": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "openai": (OPENAI_MEAN, OPENAI_STD),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


def to_model_range(images: jnp.ndarray, pixel_norm: str = "inception") -> jnp.ndarray:
    """uint8 pixels -> the model's input range; data pipelines ship 1 byte per channel to the device. Other dtypes
    pass through."""
    return pixels_to_model_range(images, pixel_norm) if images.dtype == jnp.uint8 else images


def pixels_to_model_range(pixels: jnp.ndarray, pixel_norm: str = "inception") -> jnp.ndarray:
    """Pixel values in [0, 255] (uint8 or float) -> float32: [-1, 1] ("inception"), or standardised with CLIP's or
    ImageNet's mean and std, computed as torchvision's ToTensor + Normalize do, so imported models see the same
    numbers."""
    x = pixels.astype(jnp.float32)
    if pixel_norm == "inception":
        return x / 127.5 - 1.0
    mean, std = PIXEL_STATS[pixel_norm]
    return (x / 255.0 - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def normalize(x: jnp.ndarray, eps: float = 1e-6) -> jnp.ndarray:
    """L2-normalise; through rsqrt of the clamped squared norm, whose gradient stays finite at x = 0."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))


def attention_for(choice: str, dtype: str, sizes: list[variants.Size], backend: str) -> Implementation:
    """The recipe's attention choice made concrete: "auto" takes cuDNN's fused kernel where it is known to apply
    (a GPU, half precision, head sizes it supports: multiples of 8 up to 128), XLA's everywhere else."""
    if choice == "cudnn" and backend != "gpu":
        raise RecipeError(f"model.attention = 'cudnn' needs a GPU, and this run's devices are {backend}: use 'auto'")
    if choice != "auto":
        return "cudnn" if choice == "cudnn" else "xla"
    heads_fit = all(s.width // s.heads % 8 == 0 and s.width // s.heads <= 128 for s in sizes)
    return "cudnn" if backend == "gpu" and dtype in ("bfloat16", "float16") and heads_fit else "xla"


def build(recipe: Recipe) -> Clip:
    m = recipe.model
    sizes = [variants.image_tower(m), variants.text_tower(m)]
    sizes += [variants.TEXT[m.decoder]] if m.decoder else []
    attention = attention_for(m.attention, m.dtype, sizes, jax.default_backend())

    def towers(tower: Literal["image", "text", "decoder"]) -> dict[str, Any]:
        # "auto" is resolved per stage before training (trainer/fitting.py); what is left runs forward only (evals)
        remat = m.tower_remat(tower).replace("auto", "none")
        # remat "block" asks for the least memory: attention's scores then also come a chunk of queries at a time
        chunk = QUERY_CHUNK if remat == "block" else 0
        layers = Layers(cast(Remat, remat), attention, scan=m.scan_layers, query_chunk=chunk)
        return {"dtype": jnp.dtype(m.dtype), "param_dtype": jnp.dtype(m.param_dtype), "layers": layers}

    embed_dim = m.embed_dim or variants.EMBED_DIM[m.image_variant]
    arch = Arch(m.activation, m.norm_eps)
    queries = bool(m.decoder) and m.decoder_style == "queries"
    image = ImageTower(
        sizes[0],
        m.patch,
        embed_dim,
        pooling=m.pooling,
        posemb=m.posemb,
        class_token=m.class_token,
        ln_pre=m.ln_pre,
        norm_after_pool=m.norm_after_pool,
        raw_patch_tokens=queries,
        arch=arch,
        **towers("image"),
    )
    rows = recipe.text.vocab_rows
    text_arch = Arch(m.text_activation or m.activation, m.norm_eps)
    text = TextTower(sizes[1], embed_dim, rows, m.text_causal, m.text_pooling, queries, text_arch, **towers("text"))
    decoder: CaptionDecoder | QueryDecoder | None = None
    if m.decoder and queries:  # OpenVision's decoder blocks are its text tower's: tanh GELU
        decoder = QueryDecoder(sizes[2], vocab_rows=rows, arch=Arch("gelu_tanh", m.norm_eps), **towers("decoder"))
    elif m.decoder:
        decoder = CaptionDecoder(sizes[2], vocab_rows=rows, **towers("decoder"))
    return Clip(
        image=image,
        text=text,
        decoder=decoder,
        temperature_init=recipe.loss.temperature_init,
        sigmoid=recipe.loss.contrastive == "sigmoid",
        decoder_sees_text=m.decoder_context == "image+text",
        pixel_norm=m.pixel_norm,
    )
