"""OpenVision's image tower: a pre-LN ViT with a bias-free conv patchify, fixed 2-D sin-cos positions (learned as an
option), mean-pooled patch tokens (a class token or a MAP head as options), a final LayerNorm and a bias-free head.

Blocks are one `nn.scan` (parameters stacked on a leading "layers" axis): XLA compiles one block instead of `depth`,
which is what keeps compile times short for the big towers (and on CPU). Parameters carry logical axis names
(layers, embed, mlp, heads, kv); trainer/sharding.py maps them to mesh axes.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from trainer.models.variants import Size

Dtype = Any
Remat = Literal["none", "block", "dots"]
Implementation = Literal["xla", "cudnn"]
Activation = Literal["gelu_tanh", "gelu", "quick_gelu"]

# What the backward pass may keep from the forward pass of a block; the rest is recomputed.
REMAT_POLICIES = {
    "block": jax.checkpoint_policies.nothing_saveable,  # least memory: only the block inputs are kept
    "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,  # keep matmul outputs, redo the cheap parts
}


def logical(init: Any, *axes: str | None) -> Any:
    return nn.with_logical_partitioning(init, axes)


# The activations' logical axes: a token sequence (B, T, width), its MLP hidden (B, T, mlp), its heads (B, T, H, D).
TOKENS = ("batch", "length", "act_embed")
HIDDEN = ("batch", "length", "mlp")
HEADS = ("batch", "length", "heads", "kv")
POOLED = ("batch", "act_embed")  # a tower's pooled features (B, width)


# The rules that map those names to mesh axes, while a step is traced (trainer/sharding.py: activation_layout). Not
# flax's global rules: with those set, flax also constrains every parameter as it unboxes it, and fails on
# DenseGeneral's kernels, which it constrains before their reshape.
_ACTIVATION_RULES: contextvars.ContextVar[Any] = contextvars.ContextVar("activation_rules", default=None)


@contextlib.contextmanager
def activation_rules(rules: Any) -> Iterator[None]:
    token = _ACTIVATION_RULES.set(rules)
    try:
        yield
    finally:
        _ACTIVATION_RULES.reset(token)


def active_rules() -> Any:
    """The logical -> mesh axis rules of the step being traced (None outside trainer.sharding.activation_layout)."""
    return _ACTIVATION_RULES.get()


def constrain(x: jnp.ndarray, axes: tuple[str | None, ...]) -> jnp.ndarray:
    """Pin an activation's layout by logical axis names (a no-op outside activation_rules). Without it XLA is free
    to shard a block's activations like its weights (embed over fsdp): then it gathers the batch and all-reduces
    activations in every layer instead of gathering the layer's weights."""
    rules = _ACTIVATION_RULES.get()
    return x if rules is None else nn.with_logical_constraint(x, axes, rules=rules)


def whole(weight: jnp.ndarray) -> jnp.ndarray:
    """A weight used outside a matmul (added or concatenated to the tokens), gathered along its width (its last
    axis) first, as fsdp gathers a kernel: otherwise XLA lays the tokens out like the weight around it."""
    return constrain(weight, (None,) * (weight.ndim - 1) + ("act_embed",))


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
    """Multi-head attention; softmax statistics in float32 whatever the compute dtype (jax.nn.dot_product_attention).

    `implementation` "cudnn" is cuDNN's fused flash attention (GPUs, bf16/fp16; never materialises the T x S weights);
    "xla" is XLA's own, on every backend. `build` picks one per backend (trainer/models/clip.py: attention_for).
    """

    heads: int
    causal: bool = False
    implementation: Implementation = "xla"
    query_chunk: int = 0  # > 0: chunked_attention over this many queries at a time
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, context: jnp.ndarray | None = None, mask: jnp.ndarray | None = None):
        """`mask` (T, S) bool: which context positions each position may attend to (with or instead of causal)."""
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

        q = constrain(project("query", x), HEADS)
        k, v = constrain(project("key", context), HEADS), constrain(project("value", context), HEADS)
        if self.query_chunk and q.shape[1] > self.query_chunk:
            out = chunked_attention(q, k, v, mask, self.causal, self.query_chunk, self.implementation)
        else:
            out = jax.nn.dot_product_attention(
                q, k, v, mask=mask, is_causal=self.causal, implementation=self.implementation
            )
        return nn.DenseGeneral(
            width,
            axis=(-2, -1),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=logical(nn.initializers.xavier_uniform(), "heads", "kv", "embed"),
            bias_init=logical(nn.initializers.zeros, "embed"),
            name="out",
        )(out)


def chunked_attention(
    q: jnp.ndarray,
    k: jnp.ndarray,
    v: jnp.ndarray,
    mask: jnp.ndarray | None,
    causal: bool,
    chunk: int,
    implementation: Implementation,
) -> jnp.ndarray:
    """dot_product_attention over at most `chunk` queries at a time (a scan), each chunk recomputed in the backward:
    the (B, heads, T, S) f32 scores, probabilities and their gradients then exist for one chunk at a time, not for
    all T queries (for the decoder's ~300 positions at 256 images a chip, 0.9 GiB each, three at once). The cost: the
    scores' matmul once more in the backward pass. Ragged ends are padded with queries that attend everywhere."""
    b, t, heads, d = q.shape
    count = -(-t // chunk)
    chunk = -(-t // count)  # as even as they come: 307 queries are 3 x 103, not 3 x 128 (the padding costs FLOPs)
    pad = count * chunk - t
    allowed = jnp.ones((t, k.shape[1]), bool) if mask is None else mask
    if causal:
        allowed = allowed & jnp.tri(t, k.shape[1], dtype=bool)
    allowed = jnp.pad(allowed, ((0, pad), (0, 0)), constant_values=True)
    queries = jnp.swapaxes(jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(b, count, chunk, heads, d), 0, 1)

    @jax.checkpoint
    def one(queries_and_mask: tuple[jnp.ndarray, jnp.ndarray]) -> jnp.ndarray:
        q_chunk, allowed_chunk = queries_and_mask
        return jax.nn.dot_product_attention(q_chunk, k, v, mask=allowed_chunk, implementation=implementation)

    out = jax.lax.map(one, (queries, allowed.reshape(count, chunk, -1)))
    return jnp.swapaxes(out, 0, 1).reshape(b, count * chunk, heads, d)[:, :t]


ACTIVATIONS: dict[str, Callable[[jnp.ndarray], jnp.ndarray]] = {
    "gelu_tanh": partial(nn.gelu, approximate=True),  # big_vision's (and so OpenVision's)
    "gelu": partial(nn.gelu, approximate=False),  # torch's nn.GELU: open_clip's default
    "quick_gelu": lambda x: x * nn.sigmoid(1.702 * x),  # OpenAI CLIP's
}


@dataclasses.dataclass(frozen=True)
class Arch:
    """What a tower's blocks compute beyond their shape: the choices that differ between OpenVision's towers and
    open_clip's (OpenAI's) ones, so that imported weights compute what they computed there."""

    activation: Activation = "gelu_tanh"
    norm_eps: float = 1e-6  # flax's LayerNorm default; torch's (open_clip's) is 1e-5


class Mlp(nn.Module):
    mlp: int
    activation: Activation = "gelu_tanh"
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
        x = ACTIVATIONS[self.activation](constrain(x, HIDDEN))
        return nn.Dense(
            width,
            kernel_init=logical(nn.initializers.xavier_uniform(), "mlp", "embed"),
            bias_init=logical(nn.initializers.normal(1e-6), "embed"),
            name="fc2",
            **dense,
        )(x)


def layer_norm(name: str, dtype: Dtype, param_dtype: Dtype, eps: float = 1e-6) -> nn.LayerNorm:
    return nn.LayerNorm(
        epsilon=eps,
        dtype=dtype,
        param_dtype=param_dtype,
        scale_init=logical(nn.initializers.ones, "embed"),
        bias_init=logical(nn.initializers.zeros, "embed"),
        name=name,
    )


@dataclasses.dataclass(frozen=True)
class Layers:
    """How a tower's blocks are built and run (not what they compute): the same parameters either way."""

    remat: Remat = "none"
    attention: Implementation = "xla"
    # > 0: attention over this many queries at a time (chunked_attention); the builder sets it with remat "block"
    query_chunk: int = 0
    # False unrolls the scan into straight-line code: longer compiles, and XLA's cost analysis counts every layer
    # (it counts a loop body once)
    scan: bool = True


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(LN(x)), then x + mlp(LN(x)). Returns (x, None): a scan body; `mask`
    (T, T) bool limits what each position attends to."""

    size: Size
    attention: Implementation = "xla"
    arch: Arch = Arch()
    causal: bool = False
    query_chunk: int = 0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, mask: jnp.ndarray | None = None) -> tuple[jnp.ndarray, None]:
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        eps = self.arch.norm_eps
        x = constrain(x, TOKENS)
        attn = Attention(self.size.heads, self.causal, self.attention, self.query_chunk, name="attn", **kw)
        x = constrain(x + attn(layer_norm("ln1", eps=eps, **kw)(x), mask=mask), TOKENS)
        mlp = Mlp(self.size.mlp, self.arch.activation, name="mlp", **kw)
        return constrain(x + mlp(layer_norm("ln2", eps=eps, **kw)(x)), TOKENS), None


def stacked(block: Any, depth: int, layers: Layers, broadcast_args: int) -> Any:
    """`depth` copies of a scan-body block as one module; its extra call arguments are the same for every layer."""
    if layers.remat != "none":
        block = nn.remat(block, policy=REMAT_POLICIES[layers.remat], prevent_cse=False)  # moot under scan
    return nn.scan(
        block,
        variable_axes={"params": 0},
        split_rngs={"params": True},
        in_axes=(nn.broadcast,) * broadcast_args,
        length=depth,
        unroll=1 if layers.scan else depth,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )


class MapHead(nn.Module):
    """Multihead attention pooling: a learned probe attends to the tokens, then an MLP (as SigLIP's towers)."""

    size: Size
    attention: Implementation = "xla"
    arch: Arch = Arch()
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        probe = self.param("probe", logical(nn.initializers.xavier_uniform(), None, None, "embed"), (1, 1, x.shape[-1]))
        probe = whole(probe)
        probe = jnp.broadcast_to(probe.astype(self.dtype), (x.shape[0], 1, x.shape[-1]))
        x = Attention(self.size.heads, implementation=self.attention, name="attn", **kw)(probe, context=x)
        mlp = Mlp(self.size.mlp, self.arch.activation, name="mlp", **kw)
        x = x + mlp(layer_norm("ln", eps=self.arch.norm_eps, **kw)(x))
        return x[:, 0]


def drop_patches(rng: jax.Array, x: jnp.ndarray, keep: float) -> jnp.ndarray:
    """CLIPA-style patch dropout: a random `keep` fraction of each image's tokens (at least one), in random order."""
    b, n, _ = x.shape
    kept = max(1, round(n * keep))
    order = jnp.argsort(jax.random.uniform(rng, (b, n)), axis=1)[:, :kept]
    return jnp.take_along_axis(x, order[:, :, None], axis=1)


class ImageTower(nn.Module):
    """images (B, H, W, 3) -> (embedding (B, embed_dim), patch tokens (B, N, width)).

    The options other than OpenVision's defaults are open_clip's ViT: a class token that every pooling can carry
    (open_clip's "avg" pools the patch tokens but attends with one), a LayerNorm before the blocks, and the final
    LayerNorm after pooling rather than before (CLIPA).
    """

    size: Size
    patch: int
    embed_dim: int
    pooling: Literal["mean", "cls", "map"] = "mean"
    posemb: Literal["sincos2d", "learned"] = "sincos2d"
    class_token: bool = False  # implied by pooling "cls"
    ln_pre: bool = False
    norm_after_pool: bool = False
    # the tokens returned (a caption decoder's context): the blocks' output as it is, or (OpenVision's decoder)
    # the patch tokens before the final LayerNorm, without the class token
    raw_patch_tokens: bool = False
    arch: Arch = Arch()
    layers: Layers = Layers()
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jnp.ndarray, patch_keep: float = 1.0) -> tuple[jnp.ndarray, jnp.ndarray]:
        """`patch_keep` < 1 drops patches at random (training only; needs a "dropout" rng)."""
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        eps = self.arch.norm_eps
        width = self.size.width
        # OpenVision's stem: the patch embedding, positions and class token in float32 whatever the compute dtype
        # (bf16 rounds the pixels' projection before the first block); the blocks then run in `dtype`
        x = nn.Conv(
            width,
            (self.patch, self.patch),
            strides=self.patch,
            padding="VALID",
            use_bias=False,
            kernel_init=logical(nn.initializers.lecun_normal(), None, None, None, "embed"),
            name="patchify",
            dtype=jnp.float32,
            param_dtype=self.param_dtype,
        )(images.astype(jnp.float32))
        b, h, w, _ = x.shape
        x = constrain(x.reshape(b, h * w, width), TOKENS)
        if self.posemb == "sincos2d":
            x = x + jnp.asarray(posemb_sincos_2d(h, w, width), jnp.float32)[None]
        else:
            pos = self.param(
                "pos_embedding", logical(nn.initializers.normal(0.02), None, "embed"), (h * w, width), self.param_dtype
            )
            x = x + whole(pos).astype(jnp.float32)[None]
        if patch_keep < 1:
            x = drop_patches(self.make_rng("dropout"), x, patch_keep)
        has_cls = self.class_token or self.pooling == "cls"
        if has_cls:  # no position of its own: open_clip's is folded into it on import (trainer/openclip.py)
            cls = whole(self.param("cls", logical(nn.initializers.zeros, "embed"), (width,), self.param_dtype))
            x = jnp.concatenate([jnp.broadcast_to(cls.astype(jnp.float32), (b, 1, width)), x], axis=1)
        x = constrain(x.astype(self.dtype), TOKENS)
        if self.ln_pre:
            x = layer_norm("ln_pre", eps=eps, **kw)(x)
        blocks = stacked(Block, self.size.depth, self.layers, 0)(
            self.size, self.layers.attention, self.arch, query_chunk=self.layers.query_chunk, name="blocks", **kw
        )
        x, _ = blocks(x)
        patch_tokens = x[:, int(has_cls) :]
        final_norm = layer_norm("ln_final", eps=eps, **kw)
        if not self.norm_after_pool:
            x = final_norm(x)
        if self.pooling == "map":
            pooled = MapHead(self.size, self.layers.attention, self.arch, name="map_head", **kw)(x)
        elif self.pooling == "cls":
            pooled = x[:, 0]
        else:
            pooled = x[:, int(has_cls) :].mean(axis=1)
        if self.norm_after_pool:
            pooled = final_norm(pooled)
        embedding = nn.Dense(  # float32, as OpenVision's heads ("for logit training stability")
            self.embed_dim,
            use_bias=False,
            kernel_init=logical(nn.initializers.lecun_normal(), "embed", None),
            name="head",
            dtype=jnp.float32,
            param_dtype=self.param_dtype,
        )(constrain(pooled, POOLED))
        return embedding, patch_tokens if self.raw_patch_tokens else x


def resize_positions(pos: jnp.ndarray, grid: int) -> jnp.ndarray:
    """Learned (h*w, width) positions of a square grid, interpolated to grid x grid for a new resolution."""
    side = round(pos.shape[0] ** 0.5)
    if side * side != pos.shape[0]:
        raise ValueError(f"{pos.shape[0]} learned positions are not a square grid")
    square = pos.reshape(side, side, pos.shape[1])
    return jax.image.resize(square, (grid, grid, pos.shape[1]), "bilinear").reshape(grid * grid, pos.shape[1])
