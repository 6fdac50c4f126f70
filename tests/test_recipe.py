"""Recipes: every shipped one loads, OpenVision's schedules are what its train.sh says, and every mistake is one
line naming the key."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from trainer import recipe
from trainer.recipe import RecipeError

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
SHIPPED = sorted(p.stem for p in RECIPES.glob("*.toml"))


def test_the_expected_recipes_ship():
    assert SHIPPED == ["b16", "finetune_b16", "h14", "l14", "s16", "so400m", "ti16", "tiny", "tuxpaint"]


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_recipe_loads_and_says_how_it_is_launched(name):
    path = RECIPES / f"{name}.toml"
    r = recipe.load(path)
    assert r.stages and all(recipe.Recipe.stage_steps(r, s) > 0 for s in r.stages)
    head = path.read_text().splitlines()[:10]
    assert any(line.startswith("# Launch:") for line in head) and any(line.startswith("# Cost:") for line in head)
    if r.model.remat == "auto":  # what the plan chose on the pod the recipe names, and the command that says so
        assert any(line.startswith(f"# Fits:   `tpuctl plan recipes/{name}.toml --type v") for line in head)


@pytest.mark.parametrize(
    ("name", "image", "resolutions"),
    [
        ("ti16", "Ti/16", [160, 224, 384]),
        ("s16", "S/16", [160, 224, 384]),
        ("b16", "B/16", [160, 224, 384]),
        ("l14", "L/14", [84, 224, 336]),
        ("so400m", "So400m/14", [84, 224, 384]),
        ("h14", "H/14", [84, 224]),
    ],
)
def test_openvision_schedules(name, image, resolutions):
    r = recipe.load(RECIPES / f"{name}.toml")
    assert r.model.image == image and r.model.decoder and r.loss.caption_weight == 2.0
    assert [s.resolution for s in r.stages] == resolutions
    batches, samples = [32768, 16384, 8192], [12_810_000_000, 1_025_000_000, 256_000_000]
    n = len(resolutions)
    assert [s.global_batch for s in r.stages] == batches[:n]
    assert [s.samples for s in r.stages] == samples[:n]
    assert [s.peak_lr for s in r.stages] == [1.024e-3, 2.56e-5, 3.2e-6][:n]
    assert [s.warmup_steps for s in r.stages] == [1563, 1563, 0][:n]
    assert [s.eval_every for s in r.stages] == [1000, 2000, 4000][:n]
    assert (r.optimizer.b1, r.optimizer.b2, r.optimizer.weight_decay, r.optimizer.mu_dtype) == (
        0.9,
        0.95,
        0.2,
        "bfloat16",
    )
    assert (r.text.context_length, r.text.caption_length, r.data.shuffle_buffer) == (80, 128, 250_000)
    assert r.stage_steps(r.stages[0]) == 390_931  # 12.81 B / 32,768, rounded up


def test_overrides_reach_any_key():
    r = recipe.load(
        RECIPES / "b16.toml",
        [
            "stages.0.global_batch=256",
            "model.image=S/16",
            "data.source=synthetic",
            "mesh.fsdp=2",
            "loss.caption_weight=0",
        ],
    )
    assert r.stages[0].global_batch == 256 and r.model.image == "S/16" and r.data.source == "synthetic"
    assert r.mesh.fsdp == 2 and r.loss.caption_weight == 0.0
    assert r.stages[1].global_batch == 16384  # the others untouched


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["stages.0.global_batch=256", "stages.0.global_batch=512"], "--set stages.0.global_batch is given twice"),
        (["stages.5.name=x"], "--set stages.5: there are 3 entries (0-2)"),
        (["model"], "--set 'model' is not key=value"),
        (["model.imag=B/16"], "unknown key model.imag (known here: image, text, image_depth, text_depth,"),
        (
            ["stages.1.resolution=10"],
            'stages[1].resolution = 10 is smaller than the patch size 16 of model.image = "B/16": at least 16 px',
        ),
        (["stages.0.global_batch=many"], 'stages[0].global_batch = "many" must be an integer'),
        (["model.pooling=max"], 'model.pooling = "max" is not one of "mean", "cls"'),
        (["model.image=B/15"], 'model.image = "B/15" is not VARIANT/PATCH'),
        (["model.text=XL"], 'model.text = "XL" is not one of Mu, Ti, S, B, L, So400m, H'),
        (["model.text_depth=-1"], "model.text_depth = -1 must be at least 0"),
        (
            ["stages.0.epochs=10"],
            "stages[0] sets both samples = 12810000000 and epochs = 10: keep one (--set"
            " stages.0.samples=0 clears the samples)",
        ),
        (["stages.0.samples=0"], "stages[0] needs one of samples or epochs (> 0)"),
        (["stages.0.warmup_epochs=40"], "stages[0] sets both warmup_steps = 1563 and warmup_epochs = 40: keep one"),
        (["stages.0.grad_accum=3"], "stages[0].global_batch = 32768 is not divisible by stages[0].grad_accum = 3"),
        (["stages.2.name=ft224"], 'stages[2].name = "ft224" is used by an earlier stage'),
        (["stages.0.patch_keep=0"], "stages[0].patch_keep = 0.0 must be in (0, 1]"),
        (["mesh.data=-1", "mesh.fsdp=-1"], "only one of mesh.data, mesh.fsdp, mesh.tensor may be -1"),
        (
            ["data.source=tfrecord", "data.train=''"],
            'data.train is empty: data.source = "tfrecord" needs the training files',
        ),
        (["stages.1.warmup_steps=100000"], "stages[1].warmup_steps = 100000 is longer than the stage (62562 steps)"),
    ],
)
def test_mistakes_are_one_line_naming_the_key(overrides, message):
    with pytest.raises(RecipeError) as e:
        recipe.load(RECIPES / "b16.toml", overrides)
    text = str(e.value)
    blamed = [item for item in overrides if text.startswith(f"--set {item}: ")]  # a --set's value: named by it
    assert text.removeprefix(f"--set {blamed[0]}: " if blamed else "").startswith(message), text
    assert "\n" not in text


def test_a_mistake_a_set_made_is_named_by_the_set_not_the_file():
    with pytest.raises(RecipeError) as e:
        recipe.load(RECIPES / "b16.toml", ["stages.0.global_batch=256", "stages.1.resolution=10"])
    assert str(e.value) == (
        "--set stages.1.resolution=10: stages[1].resolution = 10 is smaller than the patch size 16 of"
        ' model.image = "B/16": at least 16 px'
    )
    with pytest.raises(RecipeError) as e:  # the file's own value, not the --set's: named as before
        recipe.load(RECIPES / "b16.toml", ["stages.0.global_batch=256", "stages.1.grad_accum=3"])
    assert str(e.value).startswith("stages[1].global_batch = 16384 is not divisible by stages[1].grad_accum = 3")


def test_file_level_mistakes(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[model]\nimage = "B/16"\nimage = "L/14"\n')
    with pytest.raises(RecipeError, match=r"bad\.toml: "):
        recipe.load(bad)
    bad.write_text('[model]\nimage = "B/16"\n')
    with pytest.raises(RecipeError, match=r"^stages is missing$"):
        recipe.load(bad)
    bad.write_text('[[stages]]\nname = "a"\nresolution = 32\nglobal_batch = 8\n')
    with pytest.raises(RecipeError, match=r"^stages\[0\]\.peak_lr is missing$"):
        recipe.load(bad)
    bad.write_text("stages = 3\n")
    with pytest.raises(RecipeError, match=r"^stages must be an array"):
        recipe.load(bad)
    with pytest.raises(RecipeError, match="does not exist"):
        recipe.load(tmp_path / "none.toml")


def test_batches_must_split_over_the_devices_and_hosts():
    r = recipe.load(RECIPES.parent / "tests" / "tiny_synthetic.toml")
    recipe.check_devices(r, device_count=8, process_count=2)
    with pytest.raises(
        RecipeError, match=r"^stages\[0\]\.global_batch = 64 \(/ grad_accum 1 = 64\) is not divisible by 6 devices$"
    ):
        recipe.check_devices(r, device_count=6)
    r = recipe.load(RECIPES.parent / "tests" / "tiny_synthetic.toml", ["stages.1.grad_accum=4"])
    with pytest.raises(
        RecipeError, match=r"^stages\[1\]\.global_batch = 64 \(/ grad_accum 4 = 16\) is not divisible by 32"
    ):
        recipe.check_devices(r, device_count=32)


def test_the_workdir_comes_from_the_flag_else_the_recipe_else_one_line(tmp_path):
    import subprocess
    import sys

    source = (RECIPES.parent / "tests" / "tiny_synthetic.toml").read_text()
    assert recipe.load(RECIPES.parent / "tests" / "tiny_synthetic.toml").workdir == ""
    own = tmp_path / "own.toml"
    own.write_text('workdir = "gs://team-bucket/runs/own"\n' + source)
    assert recipe.load(own).workdir == "gs://team-bucket/runs/own"
    r = subprocess.run(
        [sys.executable, "-m", "trainer", str(RECIPES.parent / "tests" / "tiny_synthetic.toml")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.returncode == 2 and "no workdir (pass --workdir DIR, or set workdir" in r.stderr
    assert r.stderr.count("\n") == 1


def test_the_recipe_reference_is_what_the_schema_says():
    """recipes/REFERENCE.md is made from trainer/recipe.py: every key, its type, default and comment. Changing the
    schema without `python -m trainer.reference > recipes/REFERENCE.md` fails here."""
    from trainer import reference

    written = (RECIPES / "REFERENCE.md").read_text()
    assert written == reference.markdown(), "run: python -m trainer.reference > recipes/REFERENCE.md"
    for key in ("`workdir`", "`global_batch`", "`remat`", "`contrast_recaption`", "`wandb_project`", "`init_from`"):
        assert key in written
    assert '| `remat` | one of `"none"`, `"block"`, `"dots"`, `"auto"` | `"none"` |' in written
    assert "| `peak_lr` | number | required |" in written


def test_warmup_in_epochs_is_counted_as_openvision_counts_it():
    """OpenVision's PRE_WARMUP_EPOCH=40 at batch 32,768: int(40 x 1,281,167 // 32,768) = 1,563 warm-up steps."""
    r = recipe.load(RECIPES / "b16.toml", ["stages.0.warmup_steps=0", "stages.0.warmup_epochs=40"])
    assert r.stages[0].warmup_steps == 1563 == recipe.load(RECIPES / "b16.toml").stages[0].warmup_steps
    again = recipe.from_dict(json.loads(json.dumps(dataclasses.asdict(r))))  # a workdir's recipe.json, read back
    assert again.stages[0].warmup_steps == 1563


def test_auto_remat_tries_the_least_recomputation_first_for_each_stage():
    """remat "auto"'s candidates for a stage go by the FLOPs they recompute (the forward of each tower "block" runs
    twice): for B/16 at 160 px the decoder's blocks cost less than the towers', so "towers dots, decoder block" comes
    before the towers "block"; for So400m/14 at 84 px (36 patches, its text tower on two texts) the towers' blocks
    cost what they cost, and the order follows them."""
    from trainer import fitting

    def order(name: str) -> list[tuple[str, ...]]:
        r = recipe.load(RECIPES / f"{name}.toml")
        towers = ("image", "text", "decoder")
        return [tuple(c.model.tower_remat(t) for t in towers) for c in fitting.candidates(r, r.stages[0])]

    b16, so400m = order("b16"), order("so400m")
    assert b16[:2] == [("none", "none", "none"), ("dots", "dots", "dots")]  # nothing recomputed: CANDIDATES' order
    assert b16.index(("dots", "dots", "block")) < b16.index(("block", "block", "none"))
    r = recipe.load(RECIPES / "so400m.toml")
    costs = {c: fitting.recomputed_flops(r, r.stages[0], c) for c in so400m}
    assert [costs[c] for c in so400m] == sorted(costs[c] for c in so400m)
    assert so400m[-1] == ("block", "block", "block")
