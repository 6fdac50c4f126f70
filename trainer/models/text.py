"""The text encoder and the caption decoder (OpenVision: BERT WordPiece ids, an embedding table of 32,000 rows).

TextTower: learned positions, pre-LN blocks, final LayerNorm, pooled at the last position, bias-free head.
CaptionDecoder: causal self-attention over the caption so far, cross-attention to the image's patch tokens (and the
alt-text's tokens), next-token logits over the vocabulary (CoCa-style, teacher-forced).
QueryDecoder: OpenVision's (its text_decoder.py, fusion_style "concat"): one transformer over the image's and the
alt-text's tokens followed by one learned query per caption position; the context attends within itself, each query
to the context and to the queries before it; every caption token is predicted at once, from the queries alone.
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

import flax.linen as nn
import jax.numpy as jnp

from trainer.models.variants import Size
from trainer.models.vit import (
    POOLED,
    TOKENS,
    Arch,
    Attention,
    Block,
    Dtype,
    Implementation,
    Layers,
    Mlp,
    constrain,
    layer_norm,
    logical,
    stacked,
    whole,
)

LOGITS = ("batch", "length", "vocab")  # a decoder's (B, T, V) output
VOCAB_ROWS = 32_000  # OpenVision's table (BERT's 30,522 word pieces, padded); text.vocab_rows sets it


class TokenEmbed(nn.Embed):
    """nn.Embed (same parameter) whose table is gathered along its width before the lookup, as fsdp gathers a
    kernel before its matmul: the looked-up rows then come out split like the batch, not like the table."""

    def __call__(self, inputs: jnp.ndarray) -> jnp.ndarray:
        (table,) = self.promote_dtype(self.embedding, dtype=self.dtype, inexact=False)
        assert table is not None
        return jnp.take(constrain(table, ("vocab", "act_embed")), inputs, axis=0)


def embed_tokens(
    name: str, tokens: jnp.ndarray, width: int, rows: int, dtype: Dtype, param_dtype: Dtype
) -> jnp.ndarray:
    table = TokenEmbed(  # float32 rows (OpenVision's), cast to `dtype` by the caller once positions are added
        rows,
        width,
        dtype=jnp.float32,
        param_dtype=param_dtype,
        embedding_init=logical(nn.initializers.normal(0.02), "vocab", "embed"),
        name=name,
    )
    return constrain(table(tokens), TOKENS)


def positions(module: nn.Module, length: int, width: int, param_dtype: Dtype) -> jnp.ndarray:
    pos = module.param(
        "pos_embedding", logical(nn.initializers.normal(0.01), None, "embed"), (length, width), param_dtype
    )
    return whole(pos)


class TextTower(nn.Module):
    """tokens (B, L) -> (embedding (B, embed_dim), tokens (B, L, width)).

    OpenVision's (and CLIPA's): bidirectional attention, pooled at the last position. OpenAI's CLIP (open_clip's
    default): causal attention, pooled at the end-of-text token, the highest id in each row of CLIP's BPE.
    """

    size: Size
    embed_dim: int
    vocab_rows: int = VOCAB_ROWS
    causal: bool = False
    pooling: Literal["last", "argmax"] = "last"
    # the tokens returned (a caption decoder's context): after the final LayerNorm, or (OpenVision's decoder) before
    # it and without the last (pooled) position
    raw_tokens: bool = False
    arch: Arch = Arch()
    layers: Layers = Layers()
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, tokens: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        width = self.size.width
        x = embed_tokens("embedding", tokens, width, self.vocab_rows, **kw)
        x = x + positions(self, tokens.shape[1], width, self.param_dtype).astype(jnp.float32)[None]
        x = constrain(x.astype(self.dtype), TOKENS)
        blocks = stacked(Block, self.size.depth, self.layers, 0)(
            self.size, self.layers.attention, self.arch, self.causal, self.layers.query_chunk, name="blocks", **kw
        )
        x, _ = blocks(x)
        raw = x[:, :-1]
        # float32 as OpenVision's (its final LayerNorm takes no dtype: flax computes it in its parameters' float32)
        x = layer_norm("ln_final", eps=self.arch.norm_eps, dtype=jnp.float32, param_dtype=self.param_dtype)(x)
        if self.pooling == "argmax":
            pooled = jnp.take_along_axis(x, jnp.argmax(tokens, axis=1)[:, None, None], axis=1)[:, 0]
        else:
            pooled = x[:, -1]
        embedding = nn.Dense(  # float32, as OpenVision's heads
            self.embed_dim,
            use_bias=False,
            kernel_init=logical(nn.initializers.lecun_normal(), "embed", None),
            name="head",
            dtype=jnp.float32,
            param_dtype=self.param_dtype,
        )(constrain(pooled, POOLED))
        return embedding, raw if self.raw_tokens else x.astype(self.dtype)


class DecoderBlock(nn.Module):
    """Causal self-attention, cross-attention to the context, MLP; pre-LN. Returns (x, None): a scan body."""

    size: Size
    attention: Implementation = "xla"
    query_chunk: int = 0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, context: jnp.ndarray) -> tuple[jnp.ndarray, None]:
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        attn = {"implementation": self.attention, "query_chunk": self.query_chunk, **kw}
        x = constrain(x, TOKENS)
        x = x + Attention(self.size.heads, causal=True, name="self_attn", **attn)(layer_norm("ln1", **kw)(x))
        x = x + Attention(self.size.heads, name="cross_attn", **attn)(layer_norm("ln2", **kw)(x), context=context)
        return constrain(x + Mlp(self.size.mlp, name="mlp", **kw)(layer_norm("ln3", **kw)(x)), TOKENS), None


def project_context(
    image_tokens: jnp.ndarray,
    text_tokens: jnp.ndarray | None,
    width: int,
    init: Any,
    use_bias: bool,
    dtype: Dtype,
    param_dtype: Dtype,
) -> list[jnp.ndarray]:
    """A decoder's context: the image's tokens and (where given) the alt-text's, each projected to its width (inside
    the calling module: parameters "image_proj", "text_proj")."""
    tokens = {"image_proj": image_tokens} | ({"text_proj": text_tokens} if text_tokens is not None else {})
    kw = {"dtype": dtype, "param_dtype": param_dtype, "use_bias": use_bias}
    return [
        constrain(nn.Dense(width, kernel_init=logical(init, None, "embed"), name=name, **kw)(x.astype(dtype)), TOKENS)
        for name, x in tokens.items()
    ]


class Readout(NamedTuple):
    """A decoder's next-token scores, not yet multiplied out: the last hidden states (B, T, W) in the compute dtype and
    the vocabulary projection's parameters (kernel (W, V), bias (V,) or None). The (B, T, V) logits are the largest
    tensor of a training step (f32, 4 GB a chip for B/16 at 256 images); trainer.losses.caption_cross_entropy takes
    the readout and never forms them whole. `logits()` forms them (tests, inspection)."""

    hidden: jnp.ndarray
    kernel: jnp.ndarray
    bias: jnp.ndarray | None

    def logits(self) -> jnp.ndarray:
        dtype = self.hidden.dtype
        out = jnp.einsum("btw,wv->btv", self.hidden, self.kernel.astype(dtype))
        return constrain(out if self.bias is None else out + self.bias.astype(dtype), LOGITS)


class VocabHead(nn.Module):
    """The decoder's vocabulary projection: nn.Dense's parameters ("kernel" (W, V), "bias"), returned unapplied."""

    rows: int
    use_bias: bool
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> Readout:
        init = logical(nn.initializers.zeros, "embed", "vocab")
        kernel = self.param("kernel", init, (x.shape[-1], self.rows), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (self.rows,), self.param_dtype) if self.use_bias else None
        return Readout(constrain(x.astype(self.dtype), TOKENS), kernel, bias)


class CaptionDecoder(nn.Module):
    """(caption inputs (B, T), image tokens (B, N, Wi), alt-text tokens (B, L, Wt) or None) -> Readout (B, T, V)."""

    size: Size
    vocab_rows: int = VOCAB_ROWS
    layers: Layers = Layers()
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self, inputs: jnp.ndarray, image_tokens: jnp.ndarray, text_tokens: jnp.ndarray | None = None
    ) -> Readout:
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        width = self.size.width

        parts = project_context(image_tokens, text_tokens, width, nn.initializers.xavier_uniform(), True, **kw)
        context = constrain(jnp.concatenate(parts, axis=1), TOKENS)
        x = embed_tokens("embedding", inputs, width, self.vocab_rows, **kw)
        x = x + positions(self, inputs.shape[1], width, self.param_dtype).astype(jnp.float32)[None]
        x = constrain(x.astype(self.dtype), TOKENS)
        blocks = stacked(DecoderBlock, self.size.depth, self.layers, 1)(
            self.size, self.layers.attention, self.layers.query_chunk, name="blocks", **kw
        )
        x, _ = blocks(x, context)
        x = layer_norm("ln_final", **kw)(x)
        return VocabHead(self.vocab_rows, use_bias=True, name="logits", **kw)(x)


class QueryDecoder(nn.Module):
    """(caption inputs (B, T): only their length is read, image tokens (B, N, Wi), alt-text tokens (B, L, Wt) or
    None) -> Readout (B, T, V)."""

    size: Size
    vocab_rows: int = VOCAB_ROWS
    arch: Arch = Arch()
    layers: Layers = Layers()
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self, inputs: jnp.ndarray, image_tokens: jnp.ndarray, text_tokens: jnp.ndarray | None = None
    ) -> Readout:
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        width, length = self.size.width, inputs.shape[1]

        parts = project_context(image_tokens, text_tokens, width, nn.initializers.lecun_normal(), False, **kw)
        queries = whole(self.param("queries", logical(nn.initializers.normal(1.0), None, "embed"), (length, width)))
        context = sum(part.shape[1] for part in parts)
        parts.append(jnp.broadcast_to(queries.astype(self.dtype), (inputs.shape[0], length, width)))
        x = constrain(jnp.concatenate(parts, axis=1), TOKENS)
        blocks = stacked(Block, self.size.depth, self.layers, 1)(
            self.size, self.layers.attention, self.arch, query_chunk=self.layers.query_chunk, name="blocks", **kw
        )
        x, _ = blocks(x, prefix_mask(context, length))
        x = layer_norm("ln_final", eps=self.arch.norm_eps, **kw)(x[:, context:])
        return VocabHead(self.vocab_rows, use_bias=False, name="logits", **kw)(x)


def prefix_mask(context: int, length: int) -> jnp.ndarray:
    """(context + length)^2 bool: the context attends to itself, each query to the context and to the queries up to
    itself (OpenVision's mask for its "concat" decoder)."""
    total = context + length
    rows, cols = jnp.arange(total)[:, None], jnp.arange(total)[None, :]
    return (cols < context) | ((rows >= context) & (cols <= rows))
