"""Model FLOPs per training sample, counted from the shapes (matmuls and attention; norms, softmax and the loss are
noise). MFU divides these by the chips' peak: recomputation (remat) is not counted, as is the convention."""

from __future__ import annotations

from typing import Any

from trainer.models import variants
from trainer.models.variants import Size
from trainer.recipe import Recipe, Stage


def _blocks(size: Size, tokens: int) -> int:
    """Forward FLOPs of the transformer blocks over `tokens` tokens: QKV+out, MLP, QK^T and AV."""
    w = size.width
    per_layer = 2 * tokens * (4 * w * w + 2 * w * size.mlp) + 4 * tokens * tokens * w
    return size.depth * per_layer


def image_tokens(recipe: Recipe, stage: Stage) -> int:
    patches = (stage.resolution // recipe.model.patch) ** 2
    return max(1, round(patches * stage.patch_keep)) + (recipe.model.pooling == "cls" or recipe.model.class_token)


def blocks_per_sample(recipe: Recipe, stage: Stage) -> dict[str, int]:
    """Each tower's transformer blocks, forward FLOPs per sample: what remat "block" runs a second time."""
    m, t = recipe.model, recipe.text
    image, text = variants.image_tower(m), variants.text_tower(m)
    n = image_tokens(recipe, stage)
    texts = 2 if recipe.loss.contrast_recaption else 1  # the text tower also reads a re-caption sentence
    out = {"image": _blocks(image, n), "text": texts * _blocks(text, t.context_length)}
    if m.decoder and m.decoder_style == "queries":  # one sequence: the context's tokens, then the queries
        text_context = t.context_length - 1 if m.decoder_context == "image+text" else 0
        patches = n - int(m.pooling == "cls" or m.class_token)  # the class token is not in the context
        out["decoder"] = _blocks(variants.TEXT[m.decoder], patches + text_context + t.caption_length)
    elif m.decoder:
        dec, steps = variants.TEXT[m.decoder], t.caption_length
        context, w = n + (t.context_length if m.decoder_context == "image+text" else 0), dec.width
        cross = 2 * steps * 2 * w * w + 2 * context * 2 * w * w + 4 * steps * context * w
        # causal self-attention and MLP (the mask is not skipped: counted in full), then cross-attention
        out["decoder"] = _blocks(dec, steps) + dec.depth * cross
    return out


def forward_per_sample(recipe: Recipe, stage: Stage) -> int:
    m, t = recipe.model, recipe.text
    image, text = variants.image_tower(m), variants.text_tower(m)
    embed = m.embed_dim or variants.EMBED_DIM[m.image_variant]
    n = image_tokens(recipe, stage)
    flops = sum(blocks_per_sample(recipe, stage).values())
    flops += 2 * n * 3 * m.patch**2 * image.width + 2 * image.width * embed  # patch embedding, head
    if m.pooling == "map":  # one probe token attending to n tokens, then its MLP
        flops += 2 * n * 2 * image.width**2 + 2 * 2 * image.width**2 + 4 * n * image.width
        flops += 2 * 2 * image.width * image.mlp
    texts = 2 if recipe.loss.contrast_recaption else 1
    flops += texts * 2 * text.width * embed
    if m.decoder:  # the context's projections and the vocabulary's
        dec, steps = variants.TEXT[m.decoder], t.caption_length
        queries = m.decoder_style == "queries"
        text_context = (t.context_length - int(queries)) if m.decoder_context == "image+text" else 0
        patches = n - int(queries and (m.pooling == "cls" or m.class_token))
        flops += 2 * (patches * image.width + text_context * text.width) * dec.width
        flops += 2 * steps * dec.width * t.vocab_rows
    return flops


def train_per_sample(recipe: Recipe, stage: Stage) -> int:
    """Forward + backward (2x forward)."""
    return 3 * forward_per_sample(recipe, stage)


def xla_count(lowered: Any) -> float:
    """XLA's own FLOP count of a lowered (jitted) function: the cost analysis of its compiled program, one device's.
    It counts a loop body once, so compare it with the counts above on unrolled layers (model.scan_layers = false)."""
    cost = lowered.compile().cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax: one dict per program
        cost = cost[0]
    return float(cost["flops"])


def traced(fn: Any, *args: Any) -> float:
    """The matmul FLOPs of `fn(*args)` as JAX traces it, every layer of a scan counted (XLA's cost analysis counts a
    loop's body once), a shard_map's body once a device, and the backward pass's recomputation (remat) included:
    what the compiler is given to run, the whole global batch (divide by the devices for one's share). Counts
    dot_general and convolutions, as above."""
    import jax

    return _jaxpr_flops(jax.make_jaxpr(fn)(*args).jaxpr)


def _jaxpr_flops(jaxpr: Any) -> float:
    import numpy as np

    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            (contracting, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2.0 * np.prod(eqn.outvars[0].aval.shape) * np.prod([lhs[d] for d in contracting])
        elif name == "conv_general_dilated":
            kernel = eqn.invars[1].aval.shape  # (out, in / groups, *window) in the rhs_spec's order
            spec = eqn.params["dimension_numbers"].rhs_spec
            window = np.prod([kernel[d] for d in spec[2:]])
            total += 2.0 * np.prod(eqn.outvars[0].aval.shape) * kernel[spec[1]] * window
        inner = [v for v in eqn.params.values() if hasattr(v, "eqns") or hasattr(getattr(v, "jaxpr", None), "eqns")]
        repeat = eqn.params.get("length", 1) if name == "scan" else 1
        if name == "shard_map":  # its body is traced on one device's block: it runs on every device of its axes
            mesh, manual = eqn.params["mesh"], eqn.params.get("newly_manual_axes") or eqn.params["mesh"].axis_names
            repeat = int(np.prod([mesh.shape[a] for a in manual]))
        for sub in inner:
            total += repeat * _jaxpr_flops(getattr(sub, "jaxpr", sub) if not hasattr(sub, "eqns") else sub)
        if name == "cond":  # one branch runs: count the costliest
            total += max(_jaxpr_flops(b.jaxpr) for b in eqn.params["branches"])
    return total
