"""OpenVision's image tower: a pre-LN ViT with a bias-free conv patchify, fixed 2-D sin-cos positions (learned as an
option), mean-pooled patch tokens (a class token as an option), a final LayerNorm and a bias-free head.

Parameters carry logical axis names (embed, mlp, heads, kv); trainer/sharding.py maps them to mesh axes.
"""

from __future__ import annotations

from typing import Any, Literal

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from trainer.models.variants import Size

Dtype = Any


def logical(init: Any, *axes: str | None) -> Any:
    return nn.with_logical_partitioning(init, axes)


def posemb_sincos_2d(h: int, w: int, width: int, temperature: float = 10_000.0) -> np.ndarray:
    """Fixed 2-D sin-cos position embeddings, (h*w, width): a quarter of the channels each for sin/cos of y/x."""
    if width % 4:
        raise ValueError(f"width {width} must be divisible by 4 for 2-D sin-cos position embeddings")
    y, x = np.mgrid[:h, :w]
    omega = 1.0 / temperature ** (np.arange(width // 4) / (width // 4 - 1))
    y = y.reshape(-1)[:, None] * omega[None, :]
    x = x.reshape(-1)[:, None] * omega[None, :]
    return np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1).astype(np.float32)


class Attention(nn.Module):
    heads: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, context: jnp.ndarray | None = None, mask: jnp.ndarray | None = None):
        width = x.shape[-1]
        head_dim = width // self.heads
        context = x if context is None else context

        def project(name: str, inputs: jnp.ndarray) -> jnp.ndarray:
            return nn.DenseGeneral(
                (self.heads, head_dim),
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                kernel_init=logical(nn.initializers.xavier_uniform(), "embed", "heads", "kv"),
                bias_init=logical(nn.initializers.zeros, "heads", "kv"),
                name=name,
            )(inputs)

        q, k, v = project("query", x), project("key", context), project("value", context)
        out = nn.dot_product_attention(q, k, v, mask=mask, dtype=self.dtype)
        return nn.DenseGeneral(
            width,
            axis=(-2, -1),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=logical(nn.initializers.xavier_uniform(), "heads", "kv", "embed"),
            bias_init=logical(nn.initializers.zeros, "embed"),
            name="out",
        )(out)


class Mlp(nn.Module):
    mlp: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        width = x.shape[-1]
        dense = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        x = nn.Dense(
            self.mlp,
            kernel_init=logical(nn.initializers.xavier_uniform(), "embed", "mlp"),
            bias_init=logical(nn.initializers.normal(1e-6), "mlp"),
            name="fc1",
            **dense,
        )(x)
        x = nn.gelu(x)
        return nn.Dense(
            width,
            kernel_init=logical(nn.initializers.xavier_uniform(), "mlp", "embed"),
            bias_init=logical(nn.initializers.normal(1e-6), "embed"),
            name="fc2",
            **dense,
        )(x)


def layer_norm(name: str, dtype: Dtype, param_dtype: Dtype) -> nn.LayerNorm:
    return nn.LayerNorm(
        dtype=dtype,
        param_dtype=param_dtype,
        scale_init=logical(nn.initializers.ones, "embed"),
        bias_init=logical(nn.initializers.zeros, "embed"),
        name=name,
    )


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(LN(x)), then x + mlp(LN(x))."""

    size: Size
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, mask: jnp.ndarray | None = None) -> jnp.ndarray:
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        x = x + Attention(self.size.heads, name="attn", **kw)(layer_norm("ln1", **kw)(x), mask=mask)
        return x + Mlp(self.size.mlp, name="mlp", **kw)(layer_norm("ln2", **kw)(x))


class ImageTower(nn.Module):
    """images (B, H, W, 3) -> (embedding (B, embed_dim), patch tokens (B, N, width))."""

    size: Size
    patch: int
    embed_dim: int
    pooling: Literal["mean", "cls"] = "mean"
    posemb: Literal["sincos2d", "learned"] = "sincos2d"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        width = self.size.width
        x = nn.Conv(
            width,
            (self.patch, self.patch),
            strides=self.patch,
            padding="VALID",
            use_bias=False,
            kernel_init=logical(nn.initializers.lecun_normal(), None, None, None, "embed"),
            name="patchify",
            **kw,
        )(images.astype(self.dtype))
        b, h, w, _ = x.shape
        x = x.reshape(b, h * w, width)
        if self.posemb == "sincos2d":
            x = x + jnp.asarray(posemb_sincos_2d(h, w, width), self.dtype)[None]
        else:
            pos = self.param(
                "pos_embedding", logical(nn.initializers.normal(0.02), None, "embed"), (h * w, width), self.param_dtype
            )
            x = x + pos.astype(self.dtype)[None]
        if self.pooling == "cls":
            cls = self.param("cls", logical(nn.initializers.zeros, "embed"), (width,), self.param_dtype)
            x = jnp.concatenate([jnp.broadcast_to(cls.astype(self.dtype), (b, 1, width)), x], axis=1)
        for i in range(self.size.depth):
            x = Block(self.size, name=f"block{i}", **kw)(x)
        x = layer_norm("ln_final", **kw)(x)
        pooled = x[:, 0] if self.pooling == "cls" else x.mean(axis=1)
        embedding = nn.Dense(
            self.embed_dim,
            use_bias=False,
            kernel_init=logical(nn.initializers.lecun_normal(), "embed", None),
            name="head",
            **kw,
        )(pooled)
        return embedding, x
