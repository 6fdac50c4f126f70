"""The trainer's parts that test_models/test_step leave out: MAP pooling, patch dropout, remat, scanned blocks,
gradient accumulation, uint8 images, position resizing, the analytic FLOPs and the synthetic data stream.

Everything runs in-process on CPU with tiny shapes.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from standins.params import random_params

from trainer import recipe
from trainer.data import Host, open_stage
from trainer.data.synthetic import EOS_ID, FIRST_WORD_ID
from trainer.models import flops, variants
from trainer.models.clip import attention_for, build
from trainer.models.variants import IMAGE, Size
from trainer.models.vit import REMAT_POLICIES, ImageTower, Layers, MapHead, drop_patches, resize_positions
from trainer.step import init_state, loss_terms, micro_batches, train_step

TINY = Path(__file__).resolve().parent / "tiny_synthetic.toml"
SMALL = Size(32, 2, 64, 2)  # a 2-layer tower: compiles in a blink


def tiny(*overrides: str) -> recipe.Recipe:
    """The tiny recipe, by default without its caption decoder (it triples the compile time) and with short texts."""
    given = {item.partition("=")[0] for item in overrides}
    defaults = [item for item in ("model.decoder=''", "text.context_length=8") if item.partition("=")[0] not in given]
    return recipe.load(TINY, [*defaults, *overrides])


def images_of(seed: int, shape: tuple[int, ...]) -> jnp.ndarray:
    return jax.random.normal(jax.random.key(seed), shape)


# --- MAP pooling -----------------------------------------------------------------------------------------------


def test_map_pooling_is_a_probe_attending_to_the_tokens():
    tower = ImageTower(IMAGE["Ti"], 8, 64, pooling="map")
    images = images_of(0, (2, 32, 32, 3))
    boxed = jax.eval_shape(lambda: tower.init(jax.random.key(0), images))
    assert boxed["params"]["map_head"]["probe"].value.shape == (1, 1, 192)
    assert tuple(nn.get_partition_spec(boxed)["params"]["map_head"]["probe"]) == (None, None, "embed")
    params = random_params(tower, images)
    apply = jax.jit(tower.apply)
    embedding, tokens = apply(params, images)
    assert embedding.shape == (2, 64) and tokens.shape == (2, 16, 192)
    # the embedding is the head over the MAP head's output on the returned tokens (not their mean, nor token 0)
    pooled = MapHead(IMAGE["Ti"]).apply({"params": params["params"]["map_head"]}, tokens)
    expected = pooled @ params["params"]["head"]["kernel"]
    np.testing.assert_allclose(embedding, expected, rtol=1e-5, atol=1e-5)
    assert not np.allclose(embedding, tokens.mean(axis=1) @ params["params"]["head"]["kernel"], atol=1e-3)
    # one patch of image 1 changes: image 1's embedding moves, image 0's stays (the probe is per image)
    changed, _ = apply(params, images.at[1, :8, :8].add(1.0))
    np.testing.assert_allclose(changed[0], embedding[0], rtol=1e-5, atol=1e-6)
    assert not np.allclose(changed[1], embedding[1], atol=1e-4)


# --- patch dropout ---------------------------------------------------------------------------------------------


def test_patch_dropout_keeps_a_random_fraction_of_the_tokens():
    tower = ImageTower(SMALL, 8, 16)
    images = images_of(0, (2, 32, 32, 3))  # 16 patches
    params = random_params(tower, images)
    _, full = tower.apply(params, images, patch_keep=1.0)  # no rng needed when nothing is dropped
    assert full.shape == (2, 16, 32)
    apply = jax.jit(lambda key: tower.apply(params, images, patch_keep=0.5, rngs={"dropout": key}))
    emb_a, tokens_a = apply(jax.random.key(1))
    emb_b, tokens_b = apply(jax.random.key(2))
    assert tokens_a.shape == tokens_b.shape == (2, 8, 32)
    assert not np.allclose(tokens_a, tokens_b, atol=1e-4) and not np.allclose(emb_a, emb_b, atol=1e-4)  # other patches
    np.testing.assert_array_equal(apply(jax.random.key(1))[0], emb_a)  # same key, same patches
    with pytest.raises(Exception, match="dropout"):  # dropping patches without an rng is an error, not a no-op
        tower.apply(params, images, patch_keep=0.5)
    cls_tower = ImageTower(SMALL, 8, 16, pooling="cls")
    cls_params = random_params(cls_tower, images)
    _, cls_tokens = cls_tower.apply(cls_params, images, patch_keep=0.25, rngs={"dropout": jax.random.key(1)})
    assert cls_tokens.shape == (2, 4 + 1, 32)  # the class token is never dropped


def test_drop_patches_samples_without_replacement_per_image():
    x = jnp.arange(4 * 16, dtype=jnp.float32).reshape(4, 16, 1)  # every token distinct
    kept = np.asarray(drop_patches(jax.random.key(0), x, 0.5))[..., 0]
    assert kept.shape == (4, 8)
    for i, row in enumerate(kept):
        assert len(set(row)) == 8 and set(row) <= set(np.asarray(x[i, :, 0]))  # own tokens, no repeats
    assert len({tuple(sorted(row % 16)) for row in kept}) > 1  # each image draws its own patches
    assert drop_patches(jax.random.key(0), x, 0.01).shape == (4, 1, 1)  # at least one token survives


# --- remat -----------------------------------------------------------------------------------------------------


def policies_in(jaxpr) -> list:
    """The policies of the rematerialised regions anywhere in a jaxpr (inside scan bodies too)."""
    found = []
    for eqn in jaxpr.eqns:
        if "policy" in eqn.params:
            found.append(eqn.params["policy"])
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    found += policies_in(inner)
    return found


@pytest.mark.slow
def test_remat_and_unrolled_layers_change_memory_and_code_not_results():
    images = images_of(0, (2, 16, 16, 3))
    plain = ImageTower(SMALL, 8, 16)
    params = random_params(plain, images)

    def loss(tower, p):
        embedding, tokens = tower.apply(p, images)
        return jnp.sum(embedding**2) + jnp.mean(tokens**3)

    value, grads = jax.jit(jax.value_and_grad(partial(loss, plain)))(params)
    assert policies_in(jax.make_jaxpr(partial(loss, plain))(params).jaxpr) == []
    for layers in (Layers(remat="block"), Layers(remat="dots"), Layers(scan=False)):
        other = ImageTower(SMALL, 8, 16, layers=layers)
        shapes = jax.eval_shape(lambda t=other: nn.unbox(t.init(jax.random.key(0), images)))
        assert jax.tree.structure(shapes) == jax.tree.structure(params)  # checkpoints load either way
        for a, b in zip(jax.tree.leaves(shapes), jax.tree.leaves(params), strict=True):
            assert a.shape == b.shape
        other_value, other_grads = jax.jit(jax.value_and_grad(partial(loss, other)))(params)
        np.testing.assert_allclose(other_value, value, rtol=1e-5)
        for a, b in zip(jax.tree.leaves(other_grads), jax.tree.leaves(grads), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
        jaxpr = jax.make_jaxpr(partial(loss, other))(params).jaxpr
        # the blocks really are rematerialised with the recipe's policy, or really unrolled
        assert policies_in(jaxpr) == ([REMAT_POLICIES[layers.remat]] if layers.remat != "none" else [])
        lowered = jax.jit(partial(loss, other)).lower(params).as_text()
        assert ("stablehlo.while" in lowered) == layers.scan  # unrolled: straight-line code, one copy per layer


def test_each_tower_recomputes_what_its_own_remat_says():
    # OpenVision's choice and more: the image tower's blocks whole, the text tower's all but the matmuls, the decoder's
    # not at all; model.remat stays the default of a tower that sets none, and "auto" is chosen before training
    tiny = Path(__file__).with_name("tiny_synthetic.toml")
    r = recipe.load(tiny, ["model.image_remat=block", "model.text_remat=dots"])
    assert [r.model.tower_remat(t) for t in ("image", "text", "decoder")] == ["block", "dots", "none"]
    model = build(r)
    assert (model.image.layers.remat, model.text.layers.remat, model.decoder.layers.remat) == ("block", "dots", "none")
    batch = {
        "images": jnp.zeros((2, 16, 16, 3), jnp.uint8),
        "texts": jnp.ones((2, 16), jnp.int32),
        "captions": jnp.ones((2, 16), jnp.int32),
    }
    init = lambda: nn.unbox(model.init(jax.random.key(0), batch["images"], batch["texts"], batch["captions"]))  # noqa: E731
    params = jax.eval_shape(init)
    grads = jax.make_jaxpr(jax.grad(lambda p: loss_terms(model, r, p, batch)[0]))(params["params"])
    assert sorted(map(str, policies_in(grads.jaxpr))) == sorted(
        map(str, [REMAT_POLICIES["block"], REMAT_POLICIES["dots"]])
    )
    assert build(recipe.load(tiny, ["model.remat=block", "model.decoder_remat=none"])).decoder.layers.remat == "none"
    with pytest.raises(recipe.RecipeError, match=r'model.remat = "auto" chooses every tower\'s, and model.text_remat'):
        recipe.load(tiny, ["model.remat=auto", "model.text_remat=block"])


@pytest.mark.slow
def test_the_traced_flop_count_counts_every_layer_and_the_recomputation():
    # XLA's cost analysis counts a scanned layer once; the count from the traced step (what the plan reports) is the
    # same on the scanned program as XLA's own on the unrolled one, and remat's recomputation shows in it
    from trainer import sharding
    from trainer.memory import train_step_args

    tiny = Path(__file__).with_name("tiny_synthetic.toml")
    counted = {}
    for remat in ("none", "block"):
        # three layers a tower: enough for a scan to differ from its unrolled loop, and quick to compile unrolled
        sets = [f"model.remat={remat}", "stages.0.global_batch=8", "text.vocab_rows=4096", "model.decoder="]
        sets += ["model.image_depth=3", "model.text_depth=3"]
        scanned = recipe.load(tiny, sets)
        step, state, batch = train_step_args(scanned, scanned.stages[0], sharding.checked_mesh(scanned))
        counted[remat] = flops.traced(step, state, batch)
        unrolled = recipe.load(tiny, [*sets, "model.scan_layers=false"])
        step, state, batch = train_step_args(unrolled, unrolled.stages[0], sharding.checked_mesh(unrolled))
        assert flops.traced(step, state, batch) == counted[remat]  # the same arithmetic either way
        # XLA adds the elementwise work (norms, softmax, GELU, AdamW) that only matmuls are counted of here
        assert 1.0 <= flops.xla_count(step.lower(state, batch)) / counted[remat] < 1.1
    model = flops.train_per_sample(scanned, scanned.stages[0]) * 8
    assert counted["none"] == pytest.approx(model, rel=0.01)  # nothing recomputed: the model's own count
    # "block" runs each block's forward pass again in the backward: up to a third more (heads and logits are not)
    assert 1.1 < counted["block"] / counted["none"] < 1.34


# --- scanned blocks --------------------------------------------------------------------------------------------


def test_blocks_are_stacked_on_a_leading_layers_axis():
    images = jnp.zeros((1, 32, 32, 3))
    tower = ImageTower(IMAGE["Ti"], 8, 64)
    boxed = jax.eval_shape(lambda: tower.init(jax.random.key(0), images))
    specs = nn.get_partition_spec(boxed)["params"]
    shapes = nn.unbox(boxed)["params"]
    assert shapes["blocks"]["mlp"]["fc1"]["kernel"].shape == (12, 192, 768)
    assert tuple(specs["blocks"]["mlp"]["fc1"]["kernel"]) == ("layers", "embed", "mlp")
    for spec, shape in zip(jax.tree.leaves(specs["blocks"]), jax.tree.leaves(shapes["blocks"]), strict=True):
        assert spec[0] == "layers" and shape.shape[0] == 12
    for name in ("patchify", "ln_final", "head"):  # outside the blocks: no layers axis
        for spec in jax.tree.leaves(specs[name]):
            assert "layers" not in tuple(spec)
    # one block in the program, run 12 times
    jaxpr = jax.make_jaxpr(lambda p: tower.apply(p, images))(nn.unbox(boxed)).jaxpr
    assert [e.params["length"] for e in jaxpr.eqns if e.primitive.name == "scan"] == [12]
    # each layer gets its own initial weights
    small = ImageTower(SMALL, 8, 16)
    fc1 = jax.jit(small.init)(jax.random.key(0), images)["params"]["blocks"]["mlp"]["fc1"]["kernel"].value
    assert fc1.shape == (2, 32, 64) and not np.allclose(fc1[0], fc1[1])


# --- gradient accumulation -------------------------------------------------------------------------------------


def test_micro_batches_take_every_count_th_row():
    batch = {"x": np.arange(12).reshape(6, 2), "y": np.arange(6)}
    micro = micro_batches(batch, 3)
    assert micro["x"].shape == (3, 2, 2)
    np.testing.assert_array_equal(micro["y"], [[0, 3], [1, 4], [2, 5]])  # micro-batch m = rows m, m + 3
    np.testing.assert_array_equal(micro["x"][1], [[2, 3], [8, 9]])


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides",
    [
        [],  # softmax: the temperature's gradient too
        ["loss.contrastive='sigmoid'", "model.decoder='Ti'", "text.caption_length=8"],
    ],
)
def test_grad_accumulation_is_the_whole_batch_s_gradient(overrides):
    """grad_accum = 4: every micro-batch contrasts with the whole batch's embeddings (open_clip's accum_freq), so
    the update, the loss and every term are the whole batch's at once (the sigmoid loss's bias and the caption
    decoder's token-weighted mean included)."""
    r = tiny("stages.0.global_batch=8", "stages.0.warmup_steps=0", "stages.0.grad_accum=4", *overrides)
    stage = r.stages[0]
    whole_stage = dataclasses.replace(stage, grad_accum=1)
    model = build(r)
    rng = np.random.default_rng(0)
    batch = {
        "images": rng.normal(size=(8, 16, 16, 3)).astype(np.float32),
        "texts": rng.integers(3, 30_000, size=(8, 8)).astype(np.int32),
    }
    if r.model.decoder:
        captions = rng.integers(3, 30_000, size=(8, 8)).astype(np.int32)
        captions[:, 5:] = 0
        captions[2, 2:] = 0  # micro-batches with unequal token counts: their mean is not the batch's
        batch["captions"] = captions
    firsts = [batch[k][:1] for k in ("images", "texts", "captions") if k in batch]
    params = random_params(model, *firsts)
    tx = optax.sgd(1.0)  # new params = params - the step's gradient
    step = lambda s: jax.jit(partial(train_step, model, r, s, tx))(init_state(params["params"], tx), batch)  # noqa: E731
    (accumulated, metrics), (whole, whole_metrics) = step(stage), step(whole_stage)
    for got, want in zip(jax.tree.leaves(accumulated.params), jax.tree.leaves(whole.params), strict=True):
        np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-6)
    for name, value in whole_metrics.items():
        np.testing.assert_allclose(metrics[name], value, rtol=2e-4, err_msg=name)
    # the check has teeth: each micro-batch alone (its own negatives) gives another update
    grad_of = jax.jit(jax.grad(lambda p, b: loss_terms(model, r, p, b)[0]))
    micro = micro_batches(batch, 4)
    alone = [grad_of(params["params"], {k: v[m] for k, v in micro.items()}) for m in range(4)]
    mean_alone = jax.tree.map(lambda *g: sum(g) / 4, *alone)
    assert not np.isclose(optax.tree.norm(mean_alone), float(whole_metrics["grad_norm"]), rtol=1e-2)


# --- uint8 images ----------------------------------------------------------------------------------------------


def test_uint8_images_are_scaled_to_minus_one_one_inside_the_model():
    model = build(tiny())
    u = np.random.default_rng(0).integers(0, 256, size=(2, 16, 16, 3), dtype=np.uint8)
    texts = jnp.ones((2, 8), jnp.int32)
    params = random_params(model, u, texts)
    apply = jax.jit(model.apply)
    from_bytes = apply(params, u, texts)["image_emb"]
    from_floats = apply(params, u.astype(np.float32) / 127.5 - 1.0, texts)["image_emb"]
    np.testing.assert_allclose(from_bytes, from_floats, rtol=1e-5, atol=1e-6)
    unscaled = apply(params, u.astype(np.float32), texts)["image_emb"]  # floats are taken as they are
    assert not np.allclose(unscaled, from_floats, atol=1e-3)


# --- resize_positions ------------------------------------------------------------------------------------------


def test_resize_positions():
    pos = jax.random.normal(jax.random.key(0), (16, 6))
    assert resize_positions(pos, 8).shape == (64, 6)
    np.testing.assert_allclose(resize_positions(pos, 4), pos, rtol=1e-6)  # same grid: unchanged
    constant = jnp.full((16, 6), 0.3)
    np.testing.assert_allclose(resize_positions(constant, 8), 0.3, rtol=1e-6)
    np.testing.assert_allclose(resize_positions(constant, 2), 0.3, rtol=1e-6)  # shrinking too
    # row-major (y, x): a table that varies along x only still varies along x only, increasingly
    along_x = jnp.tile(jnp.arange(4.0), 4)[:, None]
    grid = np.asarray(resize_positions(along_x, 8)).reshape(8, 8)
    np.testing.assert_allclose(grid, np.broadcast_to(grid[:1], (8, 8)), rtol=1e-6)
    assert (np.diff(grid[0]) >= 0).all() and grid[0, -1] > grid[0, 0]
    with pytest.raises(ValueError, match="square"):
        resize_positions(jnp.zeros((12, 6)), 4)


# --- analytic FLOPs --------------------------------------------------------------------------------------------


# XLA's cost analysis counts the body of a loop once, not times its trip count: compared with the scanned blocks it
# would see one layer whatever the depth. So the towers are built unrolled (model.scan_layers = false): same model.
UNROLLED = ("stages.0.resolution=32", "model.scan_layers=false")


def clip_flops(r: recipe.Recipe, batch: int) -> tuple[float, int]:
    """(XLA's forward FLOPs, the analytic count) for a batch of the recipe's first stage."""
    model, stage = build(r), r.stages[0]
    images = jnp.zeros((batch, stage.resolution, stage.resolution, 3))
    texts = jnp.zeros((batch, r.text.context_length), jnp.int32)
    captions = jnp.zeros((batch, r.text.caption_length), jnp.int32) if r.model.decoder else None
    params = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.key(0), images, texts, captions)))

    second = texts if r.loss.contrast_recaption else None

    def forward(p, key):
        out = model.apply(p, images, texts, captions, stage.patch_keep, second, rngs={"dropout": key})
        return out | ({"caption": out["caption"].logits()} if "caption" in out else {})  # the whole logits

    measured = flops.xla_count(jax.jit(forward).lower(params, jax.random.key(0)))
    return measured, flops.forward_per_sample(r, stage) * batch


@pytest.mark.slow  # eight compiles of a Ti CLIP for XLA's cost analysis: the quick tier leaves them to CI
@pytest.mark.parametrize(
    "overrides",
    [
        ["model.pooling='mean'"],
        ["model.pooling='cls'", "stages.0.patch_keep=0.5"],
        # open_clip's ViT-L-14-CLIPA as imported: a class token beside average pooling, CLIP's text tower
        ["model.class_token=true", "model.ln_pre=true", "model.norm_after_pool=true", "model.text_causal=true"],
        ["model.pooling='map'"],
        ["model.decoder='Ti'", "text.caption_length=8"],
        ["model.decoder='Ti'", "text.caption_length=8", "model.decoder_context='image'"],
        # OpenVision's: the query decoder over the patch and alt-text tokens; the text tower on two texts
        ["model.decoder='Ti'", "text.caption_length=8", "model.decoder_style='queries'", "model.class_token=true"],
        ["model.decoder='Ti'", "model.decoder_style='queries'", "loss.contrast_recaption=true"],
    ],
)
def test_analytic_forward_flops_match_xla(overrides):
    measured, analytic = clip_flops(tiny(*UNROLLED, *overrides), batch=4)
    # XLA also counts the elementwise work (norms, GELU, softmax, the dropout's sort) the analytic count leaves out:
    # 0.5-4 % here, more where patch dropout has halved the matmuls
    assert 0.99 < measured / analytic < 1.06, (measured, analytic)


@pytest.mark.slow
def test_analytic_map_head_flops_match_xla():
    """The MAP head's own FLOPs (map minus mean pooling): small next to the blocks, so compared on their own."""
    map_xla, map_analytic = clip_flops(tiny(*UNROLLED, "model.pooling='map'"), batch=4)
    mean_xla, mean_analytic = clip_flops(tiny(*UNROLLED, "model.pooling='mean'"), batch=4)
    # XLA's extra elementwise work in the head (LN, softmax over 16 keys, GELU) is under 1 % of its matmuls
    assert (map_xla - mean_xla) / (map_analytic - mean_analytic) == pytest.approx(1.0, abs=0.02)


@pytest.mark.slow
def test_decoder_context_image_leaves_the_alt_text_out():
    images = images_of(0, (2, 32, 32, 3))
    texts = jnp.asarray(np.random.default_rng(0).integers(3, 100, (2, 8)), jnp.int32)
    captions = jnp.ones((2, 8), jnp.int32)
    for context, alt_text_matters in (("image+text", True), ("image", False)):
        r = tiny(
            "stages.0.resolution=32",
            "model.decoder='Mu'",
            "text.caption_length=8",
            f"model.decoder_context='{context}'",
        )
        model = build(r)
        params = random_params(model, images, texts, captions)
        apply = jax.jit(model.apply)  # one program, not op by op
        logits = [apply(params, images, t, captions)["caption"].logits() for t in (texts, texts[::-1])]
        assert bool(jnp.abs(logits[0] - logits[1]).max() > 1e-4) == alt_text_matters, context
        assert ("text_proj" in params["params"]["decoder"]) == alt_text_matters


# --- synthetic data --------------------------------------------------------------------------------------------


def test_synthetic_batches_are_the_same_for_any_host_count_and_resume_exactly():
    r = tiny("model.decoder=Ti", "stages.0.global_batch=8", "stages.1.global_batch=8", "text.caption_length=12")
    one = open_stage(r, 0, Host())
    first, _ = next(one)
    second, position = next(one)
    third, _ = next(one)
    assert not np.array_equal(first["images"], second["images"])  # the stream moves on
    halves = [next(open_stage(r, 0, Host(i, 2), None))[0] for i in range(2)]
    for key in ("images", "texts", "captions"):
        np.testing.assert_array_equal(np.concatenate([h[key] for h in halves]), first[key])
        np.testing.assert_array_equal(next(open_stage(r, 0, Host(), position))[0][key], third[key])
    # host 1 of 2, restarted after batch 2: the second half of the third global batch
    resumed, after = next(open_stage(r, 0, Host(1, 2), position))
    np.testing.assert_array_equal(resumed["images"], third["images"][4:])
    assert after == {"batch": 3}

    assert first["images"].dtype == np.uint8 and first["images"].shape == (8, 16, 16, 3)
    ft, _ = next(open_stage(r, 1, Host()))
    assert ft["images"].shape == (8, 32, 32, 3)  # the stage's resolution
    assert first["texts"].shape == (8, 8) and first["captions"].shape == (8, 12)
    for rows in (first["texts"], first["captions"]):
        assert rows.dtype == np.int32
        for row in rows:
            (eos,) = np.flatnonzero(row == EOS_ID)  # exactly one [eos] ...
            assert eos >= 1 and (row[:eos] >= FIRST_WORD_ID).all()  # ... after the words ...
            assert (row[eos + 1 :] == 0).all()  # ... then padding
    without = next(open_stage(tiny("stages.0.global_batch=8"), 0, Host()))[0]
    assert sorted(without) == ["images", "texts"]  # re-captions only for a caption decoder, as from shards
    np.testing.assert_array_equal(without["texts"], first["texts"])


# --- attention kernel choice -----------------------------------------------------------------------------------


def test_auto_attention_takes_cudnn_only_on_gpus_in_half_precision_with_head_sizes_it_supports():
    b16 = [IMAGE["B"], variants.TEXT["B"]]  # 64-wide heads
    assert attention_for("auto", "bfloat16", b16, "gpu") == "cudnn"
    assert attention_for("auto", "float32", b16, "gpu") == "xla"  # cuDNN's flash kernel is half precision only
    assert attention_for("auto", "bfloat16", b16, "tpu") == "xla"
    assert attention_for("auto", "bfloat16", b16, "cpu") == "xla"
    assert attention_for("auto", "bfloat16", [Size(96, 1, 384, 3)], "gpu") == "cudnn"  # 32-wide heads
    assert attention_for("auto", "bfloat16", [Size(96, 1, 384, 3), Size(300, 1, 1200, 1)], "gpu") == "xla"
    assert attention_for("xla", "bfloat16", b16, "gpu") == "xla"
    with pytest.raises(recipe.RecipeError, match="needs a GPU"):
        attention_for("cudnn", "bfloat16", b16, "cpu")


def test_cadences_fall_on_their_steps_and_always_on_the_last():
    from trainer.loop import due

    assert [s for s in range(1, 11) if due(s, 4, 10)] == [4, 8, 10]
    assert [s for s in range(1, 11) if due(s, 0, 10)] == [10]  # 0: only at the end of the stage
    assert [s for s in range(1, 7) if due(s, 3, 6)] == [3, 6]
    assert [s for s in range(1, 4) if due(s, 100, 3)] == [3]
