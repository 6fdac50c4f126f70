"""Model shapes and sizes: parameter counts of the image towers equal the published ViT sizes exactly.

Published totals (timm's ImageNet-1k ViTs) include what our towers leave out: a 1,000-class head, a class token,
learned positions for 1 + N tokens and the patchify bias. Taking those out must leave exactly our trunk.
"""

from __future__ import annotations

import re
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from trainer.models.variants import EMBED_DIM, IMAGE
from trainer.models.vit import ImageTower, posemb_sincos_2d


def param_count(module, *inputs) -> int:
    shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), *inputs))
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(shapes))


@pytest.mark.parametrize(
    ("variant", "patch", "published", "published_patch"),
    [
        ("Ti", 16, 5_717_416, 16),  # vit_tiny_patch16_224
        ("S", 16, 22_050_664, 16),  # vit_small_patch16_224
        ("B", 16, 86_567_656, 16),  # vit_base_patch16_224
        ("L", 14, 304_326_632, 16),  # vit_large_patch16_224, re-patched to /14 below
        ("H", 14, 632_045_800, 14),  # vit_huge_patch14_224
    ],
)
def test_image_tower_sizes_match_the_published_vits(variant, patch, published, published_patch):
    size = IMAGE[variant]
    w = size.width
    tokens = (224 // published_patch) ** 2 + 1
    trunk = published - (w * 1000 + 1000) - w - tokens * w - w  # head, class token, positions, patchify bias
    trunk += 3 * w * (patch**2 - published_patch**2)  # our patch size
    ours = param_count(ImageTower(size, patch, EMBED_DIM[variant]), jnp.zeros((1, 224, 224, 3)))
    assert ours - w * EMBED_DIM[variant] == trunk  # our bias-free head maps width -> the embedding


def test_so400m_is_the_shape_optimized_400m():
    ours = param_count(ImageTower(IMAGE["So400m"], 14, EMBED_DIM["So400m"]), jnp.zeros((1, 224, 224, 3)))
    assert 405e6 < ours - 1152 * 1152 < 420e6  # SigLIP's 428 M adds a MAP head (~15 M) and learned positions


@pytest.mark.slow
def test_the_tower_runs_and_positions_are_fixed_by_default():
    tower = ImageTower(IMAGE["Ti"], 8, 64)
    images = jnp.ones((2, 32, 32, 3))
    params = tower.init(jax.random.key(0), images)
    embedding, tokens = tower.apply(params, images)
    assert embedding.shape == (2, 64) and tokens.shape == (2, 16, 192)
    assert "pos_embedding" not in params["params"]
    learned = ImageTower(IMAGE["Ti"], 8, 64, posemb="learned", pooling="cls")
    p = learned.init(jax.random.key(0), images)["params"]
    assert p["pos_embedding"].value.shape == (16, 192) and p["cls"].value.shape == (192,)


def test_a_resolution_the_patch_does_not_divide_leaves_the_last_rows_and_columns_unused():
    """384 px at patch 14 is 27 x 27 patches (OpenVision's So400m/14 at 384), as a stride-14 convolution without
    padding computes it in open_clip and big_vision: the last 6 pixel rows and columns are never read. Here 30 px at
    patch 7: 4 x 4 patches, 2 unused."""
    tower = ImageTower(IMAGE["Mu"], 7, 32, posemb="learned")
    images = jax.random.uniform(jax.random.key(1), (2, 30, 30, 3))
    params = nn.unbox(tower.init(jax.random.key(0), images))
    assert params["params"]["pos_embedding"].shape == (16, IMAGE["Mu"].width)
    embedding, tokens = tower.apply(params, images)
    assert tokens.shape == (2, 16, IMAGE["Mu"].width)
    unused = images.at[:, 28:, :].set(0.0).at[:, :, 28:].set(0.0)
    np.testing.assert_array_equal(tower.apply(params, unused)[0], embedding)
    used = images.at[:, 27, 27].set(0.0)  # the last pixel of the last patch
    assert not np.allclose(tower.apply(params, used)[0], embedding)


def test_sincos_positions():
    pe = posemb_sincos_2d(3, 4, 8)
    assert pe.shape == (12, 8)
    np.testing.assert_allclose(pe[:, :2], np.sin(np.arange(4)[None, :].repeat(3, 0).reshape(-1, 1) * [1, 1e-4]))
    with pytest.raises(ValueError, match="divisible by 4"):
        posemb_sincos_2d(2, 2, 6)


def tiny_clip(*overrides):
    from pathlib import Path

    from trainer import recipe
    from trainer.models.clip import build

    r = recipe.load(Path(__file__).resolve().parent / "tiny_synthetic.toml", list(overrides))
    return r, build(r)


def randomized(params, seed=1):
    """Init leaves zero-initialised heads; random values everywhere make every dependency visible. Drawn by numpy:
    jax.random would compile a program per leaf shape (seconds for a CLIP's hundred leaves)."""
    leaves, tree = jax.tree_util.tree_flatten(params)
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_unflatten(
        tree, [jnp.asarray(0.05 * rng.standard_normal(leaf.shape), leaf.dtype) for leaf in leaves]
    )


def compiled(model):
    """model.apply as one compiled program (op by op, each op of a CLIP's forward compiles alone: ~2x the time);
    patch_keep, a Python number the forward branches on, static."""
    return jax.jit(model.apply, static_argnums=4)


def initialized(model, *inputs):
    """`randomized` parameters of `model` for `inputs`, initialised by one compiled program (op by op takes 2x)."""
    return randomized(jax.jit(model.init)(jax.random.key(0), *inputs))


@pytest.mark.slow
def test_clip_forward_from_the_tiny_recipe():
    _r, model = tiny_clip()
    images, texts = jnp.ones((2, 32, 32, 3)), jnp.ones((2, 16), jnp.int32)
    captions = jnp.array([[5, 6, 7, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]] * 2)
    params = jax.jit(model.init)(jax.random.key(0), images, texts, captions)
    out = compiled(model)(randomized(params), images, texts, captions)
    assert out["image_emb"].shape == (2, 192) and out["text_emb"].shape == (2, 192)
    np.testing.assert_allclose(np.linalg.norm(out["image_emb"], axis=-1), 1.0, rtol=1e-5)
    assert out["caption"].logits().shape == (2, 16, 32_000)
    assert float(params["params"]["log_scale"]) == pytest.approx(np.log(1 / 0.07))
    # the recipe's weights: 1 x contrastive + 2 x caption, the caption loss over the 4 non-padding tokens
    from trainer.step import loss_terms

    total, terms = jax.jit(partial(loss_terms, model, _r))(
        randomized(params)["params"], {"images": images, "texts": texts, "captions": captions}
    )
    assert float(total) == pytest.approx(float(terms["contrastive"]) + 2 * float(terms["caption"]), rel=1e-5)
    assert float(terms["caption"]) > 0
    sig = tiny_clip("loss.contrastive=sigmoid")[1]
    p = jax.jit(sig.init)(jax.random.key(0), images, texts)
    assert float(p["params"]["bias"]) == -10.0 and float(p["params"]["log_scale"]) == pytest.approx(np.log(10.0))


@pytest.mark.slow
def test_contrast_recaption_averages_the_images_contrast_with_either_text():
    r, model = tiny_clip("loss.contrast_recaption=true")
    images = jax.random.uniform(jax.random.key(2), (4, 32, 32, 3), minval=-1, maxval=1)
    texts = jnp.arange(64, dtype=jnp.int32).reshape(4, 16) + 3
    second = texts[::-1] + 100
    captions = jnp.array([[5, 6, 7, 2] + [0] * 12] * 4)
    params = initialized(model, images, texts, captions)
    apply = compiled(model)
    out = apply(params, images, texts, captions, 1.0, second)
    alone = apply(params, images, second, captions)  # the second text through the tower on its own
    np.testing.assert_allclose(out["second_text_emb"], alone["text_emb"], rtol=1e-5, atol=1e-6)
    # the decoder reads the alt-text's tokens, not the second text's
    alt_only = apply(params, images, texts, captions)["caption"].logits()
    np.testing.assert_allclose(out["caption"].logits(), alt_only, rtol=1e-5, atol=1e-6)
    from trainer import losses
    from trainer.step import loss_terms

    batch = {"images": images, "texts": texts, "captions": captions, "recaption_texts": second}
    total, terms = jax.jit(partial(loss_terms, model, r))(params["params"], batch)
    scale = out["log_scale"]
    alt = losses.softmax_contrastive(losses.logits(out["image_emb"], out["text_emb"], scale, 100.0))
    recap = losses.softmax_contrastive(losses.logits(out["image_emb"], out["second_text_emb"], scale, 100.0))
    assert float(terms["contrastive_alt"]) == pytest.approx(float(alt), rel=1e-5)
    assert float(terms["contrastive_recaption"]) == pytest.approx(float(recap), rel=1e-5)
    assert abs(float(alt) - float(recap)) > 1e-5  # two different terms (random embeddings: both near log 4)
    assert float(terms["contrastive"]) == pytest.approx((float(alt) + float(recap)) / 2, rel=1e-5)
    assert float(total) == pytest.approx(float(terms["contrastive"]) + 2 * float(terms["caption"]), rel=1e-5)


@pytest.mark.slow
def test_the_caption_decoder_is_causal():
    _, model = tiny_clip()
    images, texts = jnp.ones((1, 32, 32, 3)), jnp.ones((1, 16), jnp.int32)
    captions = jnp.arange(3, 19)[None]
    params = initialized(model, images, texts, captions)
    apply = compiled(model)
    before = apply(params, images, texts, captions)["caption"].logits()
    after = apply(params, images, texts, captions.at[0, 5].set(99))["caption"].logits()
    # position t predicts captions[t] from captions[:t]: changing captions[5] leaves positions 0-5 alone
    np.testing.assert_allclose(before[0, :6], after[0, :6], rtol=1e-5, atol=1e-6)
    assert not np.allclose(before[0, 6:], after[0, 6:])


@pytest.mark.slow
def test_openvisions_query_decoder_predicts_from_its_queries_causally():
    from trainer.models.text import prefix_mask

    assert prefix_mask(2, 3).astype(int).tolist() == [
        [1, 1, 0, 0, 0],  # the context attends to itself only
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],  # each query: the context and the queries up to itself
        [1, 1, 1, 1, 0],
        [1, 1, 1, 1, 1],
    ]
    r, model = tiny_clip("model.decoder_style=queries", "model.class_token=true", "model.norm_after_pool=true")
    images = jax.random.uniform(jax.random.key(2), (2, 32, 32, 3), minval=-1, maxval=1)
    texts, captions = jnp.arange(32, dtype=jnp.int32).reshape(2, 16) + 3, jnp.arange(3, 35).reshape(2, 16)
    params = nn.unbox(initialized(model, images, texts, captions))
    logits = model.apply(params, images, texts, captions)["caption"].logits()
    assert logits.shape == (2, 16, 32_000)
    # the captions' values are never read (only their length): every token is predicted from the queries at once
    np.testing.assert_array_equal(logits, model.apply(params, images, texts, captions[::-1])["caption"].logits())
    # the context: 16 patch tokens (no class token) and 15 alt-text tokens (not the pooled last one)
    decoder = params["params"]["decoder"]
    assert decoder["image_proj"]["kernel"].shape[0] == 192 and "queries" in decoder

    def position(t, queries):
        p = {**params["params"], "decoder": {**decoder, "queries": queries}}
        return model.apply({"params": p}, images, texts, captions)["caption"].logits()[:, t].sum()

    grad = jax.grad(position, argnums=1)(5, decoder["queries"])
    assert np.abs(grad[:6]).sum() > 0 and np.abs(grad[6:]).sum() == 0  # position 5 reads queries 0-5 only
    image_tokens = model.apply(params, images, method=lambda m, x: m.image(x)[1])
    text_tokens = model.apply(params, texts, method=lambda m, x: m.text(x)[1])
    assert image_tokens.shape == (2, 16, 192) and text_tokens.shape == (2, 15, 192)
    from trainer.models import flops

    assert flops.forward_per_sample(r, r.stages[0]) > flops.forward_per_sample(tiny_clip()[0], r.stages[0])


def test_normalize_has_finite_gradients_at_zero():
    from trainer.models.clip import normalize

    grad = jax.grad(lambda x: normalize(x).sum())(jnp.zeros((2, 4)))
    assert np.isfinite(np.asarray(grad)).all()
    np.testing.assert_allclose(np.linalg.norm(normalize(jnp.ones((3, 4))), axis=-1), 1.0, rtol=1e-6)


@pytest.mark.parametrize(
    ("variant", "published"),
    [
        ("B", 63_428_096),  # OpenAI CLIP ViT-B text transformer (open_clip: 63.43 M)
        ("L", 123_650_304),  # OpenAI CLIP ViT-L/14 text transformer (open_clip: 123.65 M)
    ],
)
def test_text_tower_sizes_match_the_published_clip_text_towers(variant, published):
    """CLIP's text towers have a 49,408-row BPE table and 77 positions; ours 32,000 rows (BERT) and 80 positions.
    Everything else (blocks, final LN, bias-free projection to the embedding) must be the same size exactly."""
    from trainer.models.text import VOCAB_ROWS, TextTower
    from trainer.models.variants import TEXT

    size = TEXT[variant]
    w = size.width
    ours = param_count(TextTower(size, w), jnp.zeros((1, 80), jnp.int32))
    assert ours == published + (VOCAB_ROWS - 49_408) * w + (80 - 77) * w


@pytest.mark.parametrize("tower", ["image", "text"])
def test_a_depth_key_sets_its_towers_layers_and_the_flop_count_follows(tower):
    """model.image_depth / model.text_depth: fewer (or more) layers than the variant's, one layer's parameters and
    FLOPs apart (an imported open_clip config of another depth sets them)."""
    from trainer.models import flops
    from trainer.models.variants import IMAGE, TEXT

    counts, per_sample = {}, {}
    for depth in (0, 1):  # 0: the variant's (Mu: 3 image layers, 2 text layers)
        r, model = tiny_clip("model.image=Mu/8", "model.text=Mu", f"model.{tower}_depth={depth}", "model.decoder=")
        if tower == "image":
            tokens = flops.image_tokens(r, r.stages[0])
            counts[depth] = param_count(model.image, jnp.ones((1, 16, 16, 3)))
        else:
            tokens = 16
            counts[depth] = param_count(model.text, jnp.ones((1, tokens), jnp.int32))
        per_sample[depth] = flops.forward_per_sample(r, r.stages[0])
    size = (IMAGE if tower == "image" else TEXT)["Mu"]
    assert size.depth == (3 if tower == "image" else 2)
    layer = 4 * size.width**2 + 4 * size.width + 2 * size.width * size.mlp + size.mlp + size.width + 4 * size.width
    assert counts[0] - counts[1] == (size.depth - 1) * layer  # attention (q, k, v, out + biases), MLP, 2 LayerNorms
    # one block: the QKV/out and MLP matmuls and the attention scores
    block = 2 * tokens * (4 * size.width**2 + 2 * size.width * size.mlp) + 2 * 2 * tokens * tokens * size.width
    assert per_sample[0] - per_sample[1] == (size.depth - 1) * block


def test_chunked_attention_is_attention_in_value_and_gradient():
    """Attention over chunks of queries (remat "block"'s, recomputed in the backward pass) = attention at once, for
    a mask, causal and neither, with a ragged last chunk; its scan body sees (B, chunk) queries only."""
    from trainer.models.vit import chunked_attention

    rng = np.random.default_rng(3)
    b, t, s, h, d = 2, 13, 13, 2, 8
    q, k, v = (jnp.asarray(rng.normal(size=(b, n, h, d)), jnp.float32) for n in (t, s, s))
    prefix = jnp.asarray(np.arange(s)[None, :] < 5) | jnp.tri(t, s, dtype=bool)
    for mask, causal in ((None, False), (None, True), (prefix, False)):

        def at_once(q_, mask=mask, causal=causal):
            return jax.nn.dot_product_attention(q_, k, v, mask=mask, is_causal=causal)

        def chunked(q_, mask=mask, causal=causal):
            return chunked_attention(q_, k, v, mask, causal, 4, "xla")

        np.testing.assert_allclose(chunked(q), at_once(q), rtol=1e-5, atol=1e-6)
        weights = jnp.asarray(rng.normal(size=(b, t, h, d)), jnp.float32)
        grads = [jax.grad(lambda q_, f=f, w=weights: (f(q_) * w).sum())(q) for f in (chunked, at_once)]
        np.testing.assert_allclose(grads[0], grads[1], rtol=1e-4, atol=1e-5)
    jaxpr = str(jax.make_jaxpr(lambda q_: chunked_attention(q_, k, v, None, False, 4, "xla"))(q))
    scores = {m for m in re.findall(r"f32\[([\d,]+)\]", jaxpr) if m.endswith(f",{s}") and len(m.split(",")) == 4}
    assert scores == {f"{b},{h},4,{s}"}, scores  # a chunk's (B, heads, 4, S) scores, never all T queries' at once


def test_remat_block_and_only_block_chunks_attention():
    """The least-memory remat also bounds attention's working set: a tower with remat "block" attends in chunks of
    clip.QUERY_CHUNK queries; "dots" and "none" at once."""
    from trainer.models import clip as clip_module

    for remat in ("none", "dots", "block"):
        _, model = tiny_clip("model.decoder='Ti'", f"model.remat='{remat}'")
        chunk = clip_module.QUERY_CHUNK if remat == "block" else 0
        assert (model.image.layers.query_chunk, model.decoder.layers.query_chunk) == (chunk, chunk)


def test_bf16_towers_keep_openvision_s_float32_stem_embeddings_and_heads():
    """With bf16 compute, what OpenVision keeps in float32 stays float32: the patch embedding (a convolution of f32
    pixels), the token table's rows, the text tower's final LayerNorm and both heads; the blocks run in bf16."""
    r, model = tiny_clip("model.dtype='bfloat16'")
    images = jnp.zeros((2, r.stages[0].resolution, r.stages[0].resolution, 3), jnp.float32)
    texts = jnp.ones((2, r.text.context_length), jnp.int32)
    params = nn.unbox(model.init(jax.random.key(0), images, texts))
    jaxpr = str(jax.make_jaxpr(lambda p: model.apply(p, images, texts))(params))
    conv = next(line for line in jaxpr.splitlines() if "conv_general_dilated" in line)
    assert conv.split("=")[0].strip().endswith("f32[2,2,2,32]") or "f32[" in conv.split("=")[0], conv
    dots = [line.split("=")[0] for line in jaxpr.splitlines() if "dot_general" in line]
    assert any("bf16[" in d for d in dots), "the blocks' matmuls run in bf16"
    out = model.apply(params, images, texts)
    assert out["image_emb"].dtype == out["text_emb"].dtype == jnp.float32
    gathers = [line.split("=")[0] for line in jaxpr.splitlines() if " gather[" in line or "= gather" in line]
    assert gathers and all("f32[" in g for g in gathers), gathers  # the token table's rows, looked up in f32
