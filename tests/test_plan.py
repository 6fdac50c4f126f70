"""`python -m trainer.plan`: a recipe's stages compiled by the real TPU compiler (libtpu, which compiles for a TPU
topology on this CPU machine) for a small TPU slice, and the figures it reports held to what they must be.

libtpu lies outside the venv's import path (.ci/setup puts it in .libtpu), found through TPU_LIBRARY_PATH, so that no
other test's JAX process tries to start a TPU."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from standins import image

from trainer import tpu_types

ROOT = Path(__file__).resolve().parents[1]
LIBTPU = ROOT / ".libtpu" / "libtpu" / "libtpu.so"
RECIPE = ROOT / "recipes" / "tiny.toml"  # Mu/7 at 21 px, 64 images a step, a zero-shot eval of batch 500


@pytest.fixture
def plan_env(tmp_path):
    if not LIBTPU.is_file():
        image.unusable(f"no libtpu at {LIBTPU} (bash .ci/setup installs it)")
    return {
        **os.environ,
        "JAX_PLATFORMS": "cpu",  # the plan compiles for the topology's devices; nothing runs on them
        "TPU_LIBRARY_PATH": str(LIBTPU),
        "TPUCTL_PLAN_CACHE": str(tmp_path / "plans"),
    }


def plan(env, *args: str) -> subprocess.CompletedProcess[str]:
    """A cold process: one forked from the tests' warm JAX server would load libtpu into a JAX already started."""
    args = [sys.executable, "-m", "trainer.plan", str(RECIPE), *args]
    return subprocess.run(args, env=env, cwd=ROOT, capture_output=True, text=True, timeout=240)


@pytest.mark.slow
def test_a_plan_compiles_each_stage_for_the_slice_and_says_what_a_chip_holds(plan_env, tmp_path):
    import jax
    import numpy as np

    from trainer import optimizer
    from trainer.models import flops
    from trainer.models.clip import build
    from trainer.program import init_variables
    from trainer.recipe import load
    from trainer.step import init_state

    # a second plan at the same time (another cache): libtpu's lock on the chips must not refuse either
    beside = {**plan_env, "TPUCTL_PLAN_CACHE": str(tmp_path / "other")}
    args = [sys.executable, "-m", "trainer.plan", str(RECIPE), "--type", "v5litepod-4", "--json"]
    other = subprocess.Popen(args, env=beside, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        r = plan(plan_env, "--type", "v5litepod-4", "--json")
        _, other_err = other.communicate(timeout=240)
    finally:
        other.kill()
        other.wait()
    assert r.returncode == 0, r.stderr[-3000:]
    assert other.returncode == 0, other_err[-3000:]
    result = json.loads(r.stdout)
    assert (result["type"], result["topology"], result["chips"], result["hosts"]) == ("v5litepod-4", "v5e:2x2", 4, 1)
    assert result["device_kind"] == "TPU v5 lite"  # libtpu's own device, not a CPU's
    [stage] = result["stages"]
    recipe = load(RECIPE)
    assert (stage["stage"], stage["resolution"], stage["global_batch"]) == ("fmnist21", 21, 64)
    assert stage["per_chip_batch"] == 16 and stage["hbm_bytes"] == 16 * 1024**3 and stage["fits"]
    # every chip holds the whole train state (data parallel) and its rows of the batch: the compiler's arguments
    state = jax.eval_shape(
        lambda: init_state(
            init_variables(build(recipe), recipe, recipe.stages[0])["params"],
            optimizer.make(recipe, recipe.stages[0]),
            recipe.data.seed,
        )
    )
    state_bytes = sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(state))
    batch_bytes = 16 * 21 * 21 * 3 + 16 * 12 * 4  # images and token rows
    # (a TPU pads small arrays to its tiles: this small model's ~150 tensors take ~17% more)
    assert state_bytes <= stage["arguments_bytes"] <= 1.25 * state_bytes + batch_bytes
    assert stage["temporaries_bytes"] > 0
    assert stage["total_bytes"] >= stage["arguments_bytes"] + stage["temporaries_bytes"]
    assert stage["eval_fits"] and 0 < stage["eval_total_bytes"] < stage["hbm_bytes"]
    model_flops = flops.train_per_sample(recipe, recipe.stages[0]) * 64 / 4
    assert stage["model_flops_per_chip"] == pytest.approx(model_flops)
    assert stage["step_time_bound_s"] == pytest.approx(model_flops / 197e12)
    # the traced step: the model's matmuls (remat "none": nothing recomputed) within what the model count leaves out
    assert stage["remat"] == "none" and stage["step_flops_per_chip"] == pytest.approx(model_flops, rel=0.02)

    # the same recipe and type again: the cached plan, not a second compile
    [cached] = (tmp_path / "plans").glob("*.json")
    cached.write_text(cached.read_text().replace("TPU v5 lite", "from the cache"))
    again = plan(plan_env, "--type", "v5litepod-4", "--json")
    assert json.loads(again.stdout)["device_kind"] == "from the cache"
    # `tpuctl plan` runs the same (tpuctl itself never imports jax): here it reads the same cached plan
    tpuctl = [str(Path(sys.executable).with_name("tpuctl")), "plan", str(RECIPE)]
    r = subprocess.run([*tpuctl, "--type", "v5litepod-4", "--json"], env=plan_env, capture_output=True, text=True)
    assert r.returncode == 0 and json.loads(r.stdout)["device_kind"] == "from the cache", r.stderr[-2000:]
    r = subprocess.run(tpuctl, env=plan_env, capture_output=True, text=True)
    assert r.returncode == 2 and "plan needs the pod's accelerator type (--type v4-256" in r.stderr, r.stderr
    r = plan(plan_env, "--type", "v5litepod-4")  # the table, for people
    assert r.returncode == 0 and "fmnist21" in r.stdout and "16 GiB" in r.stdout


@pytest.mark.slow
def test_a_stage_that_cannot_fit_is_refused_with_what_it_needs(plan_env):
    # 262,144 images a chip at 21 px: the contrastive logits alone (this chip's rows against the whole batch) are
    # 256 GiB; the compiler refuses it, saying what it needed
    stage_keys = ("--set", "stages.0.warmup_steps=0", "--set", "stages.0.samples=8388608")
    huge = ("--set", "stages.0.global_batch=1048576")
    r = plan(plan_env, "--type", "v5litepod-4", "--json", *stage_keys, *huge)
    assert r.returncode == 1, r.stderr[-3000:]
    [stage] = json.loads(r.stdout)["stages"]
    assert not stage["fits"] and stage["total_bytes"] > 256 * 1024**3 and stage["step_flops_per_chip"] > 0
    line = r.stderr.strip().splitlines()[-1]
    assert re.fullmatch(
        r"stage fmnist21 does not fit a v5litepod-4 chip: its train step needs \d+\.\d\d GiB of the 1[56]\.\d\d GiB"
        r' of HBM per chip; try model.remat = "block", mesh.fsdp > 1, a smaller global_batch',
        line,
    ), line

    # --hbm-gib: a plan against less HBM than the chip's (room kept free); the same program, now over it
    r = plan(plan_env, "--type", "v5litepod-4", "--json", "--hbm-gib", "0.001")
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1].startswith("stage fmnist21 does not fit")
    [stage] = json.loads(r.stdout)["stages"]
    assert stage["hbm_bytes"] == int(0.001 * 1024**3) and not stage["fits"]


@pytest.mark.slow
def test_mistakes_are_one_line(plan_env):
    r = plan(plan_env, "--type", "v4-7")
    assert r.returncode == 2 and "--type v4-7: no standard v4 slice of that size; known: 8, 16, 32" in r.stderr
    r = plan({**plan_env, "TPU_LIBRARY_PATH": ""}, "--type", "v5litepod-4")  # this venv has no libtpu package
    assert r.returncode == 2 and r.stderr.strip().endswith("not installed here: pip install -e '.[tpu]'"), r.stderr
    r = plan(plan_env, "--type", "v5litepod-4", "--set", "stages.0.global_batch=66")
    assert r.returncode == 2 and "stages[0].global_batch = 66" in r.stderr and "4" in r.stderr


def test_accelerator_types_lay_out_as_googles_tables_say():
    v4 = tpu_types.parse("v4-256")  # 256 TensorCores: 128 chips in a 4x4x8 torus of 4-chip hosts
    assert (v4.chips, v4.topology, v4.hosts, v4.host_bounds, v4.generation.hbm_gib) == (
        128,
        "v4:4x4x8",
        32,
        (2, 2, 1),
        32,
    )
    v5p = tpu_types.parse("v5p-8")
    assert (v5p.chips, v5p.topology, v5p.hosts, v5p.host_bounds) == (4, "v5:2x2x1", 1, (2, 2, 1))
    v5e = tpu_types.parse("v5litepod-16")  # chips, not cores
    assert (v5e.chips, v5e.topology, v5e.hosts, v5e.generation.hbm_gib) == (16, "v5e:4x4", 4, 16)
    v6e = tpu_types.parse("v6e-8")  # one host of 8 chips
    assert (v6e.chips, v6e.topology, v6e.hosts, v6e.host_bounds) == (8, "v6e:2x4", 1, (2, 4, 1))
    for bad, message in (("v4-7", "no standard v4 slice"), ("v9-8", "is not an accelerator type"), ("v4", "e.g.")):
        with pytest.raises(tpu_types.UnknownType, match=message):
            tpu_types.parse(bad)


MESH_SCRIPT = """
import json
from jax.experimental import topologies
from trainer import sharding
from trainer.recipe import Mesh
desc = topologies.get_topology_desc(topology_name="v4:2x2x2", platform="tpu", chip_config_name="megacore",
                                    chips_per_host_bounds=(2, 2, 1), num_slices=2)
mesh = sharding.make_mesh(Mesh(data=-1, fsdp=4), list(desc.devices))
print(json.dumps({
    "shape": dict(mesh.shape),
    "slices": [sorted({d.slice_index for d in mesh.devices[i].flat}) for i in range(mesh.shape["dcn"])],
    "fsdp_groups": [[list(d.coords) for d in mesh.devices[s, i, :, 0]] for s in range(2) for i in range(2)],
}))
"""


def test_the_mesh_follows_the_slices_and_the_torus(plan_env):
    # two v4-16 slices (8 chips each) as libtpu describes them, no TPU needed: the mesh is built from the devices'
    # slice and physical coordinates, not from their order in a list
    r = subprocess.run(
        [sys.executable, "-c", MESH_SCRIPT], env=plan_env, cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["shape"] == {"dcn": 2, "data": 2, "fsdp": 4, "tensor": 1}  # data = -1 fills one slice
    assert got["slices"] == [[0], [1]]  # only the batch's dcn axis crosses between slices
    for group in got["fsdp_groups"]:  # each fsdp group of 4 chips is one 2 x 2 face of the 2 x 2 x 2 cube
        assert len({tuple(c) for c in group}) == 4 and len({c[2] for c in group}) == 1, group


@pytest.mark.slow
def test_a_run_on_a_pod_is_refused_when_the_plan_says_a_stage_cannot_fit(plan_env, pod, project):
    from standins.pod import RUN_RECIPE

    # the stand-in pod is a v4-32 to the API: 16 chips, each of 32 GiB; 65,536 images a chip at 16 px need far more
    keys = ("global_batch=1048576", "samples=8388608", "warmup_steps=0")
    huge = [word for key in keys for word in ("--set", f"stages.0.{key}")]
    env = {k: plan_env[k] for k in ("TPU_LIBRARY_PATH", "TPUCTL_PLAN_CACHE")}
    r = pod.tpuctl("run", RUN_RECIPE, *huge, "--workdir", "/tmp/w", env=env, cwd=project, timeout=240)
    assert r.returncode == 1, r.stdout + r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert re.fullmatch(
        r"tpuctl: error: stage pretrain16 does not fit a v4-32 chip: its train step needs \d+\.\d\d GiB of the"
        r' \d+\.\d\d GiB of HBM per chip; try model.remat = "block", mesh.fsdp > 1, a smaller global_batch'
        r" \(change the recipe \(tpuctl plan shows each stage\), or --force to start anyway\)",
        last,
    ), last
    assert not any(w.path("/root/tpuctl").exists() for w in pod.fleet.workers)  # refused before the sync
    assert json.loads(pod.tpuctl("runs", "--json").stdout) == []  # and before any run was recorded

    # --force goes past the plan (now cached: no second compile) to the workers, where the start stops at the
    # missing trainer (these stand-in VMs were never prepared)
    r = pod.tpuctl("run", RUN_RECIPE, *huge, "--workdir", "/tmp/w", "--force", env=env, cwd=project, timeout=120)
    assert "does not fit a v4-32 chip" in r.stderr and "; starting anyway (--force)." in r.stderr, r.stderr
    assert r.returncode == 2 and "run `tpuctl prepare` first" in r.stderr.strip().splitlines()[-1], r.stderr


@pytest.mark.slow
def test_remat_auto_takes_the_least_recomputation_that_fits(plan_env, tmp_path):
    # the tests' recipe (Ti/8 image and text towers, no decoder), one stage at 32 px, 32 images a chip: libtpu needs
    # 0.42 GiB a chip with no recomputation, 0.25 recomputing all but the matmuls ("dots"), 0.22 whole blocks
    tiny = (ROOT / "tests" / "tiny_synthetic.toml").read_text()
    recipe = tmp_path / "one_stage.toml"
    recipe.write_text("[[stages]]".join(tiny.split("[[stages]]")[:2]))
    keys = ["model.decoder=", "text.vocab_rows=4096", "stages.0.resolution=32", "stages.0.global_batch=128"]
    keys += ["stages.0.warmup_steps=0"]
    sets = [word for key in keys for word in ("--set", key)]
    args = [sys.executable, "-m", "trainer.plan", str(recipe), "--type", "v5litepod-4", "--hbm-gib", "0.3", "--json"]

    def planned(remat: str) -> tuple[int, dict]:
        r = subprocess.run(
            [*args, *sets, "--set", f"model.remat={remat}"], env=plan_env, capture_output=True, text=True
        )
        assert r.returncode in (0, 1), r.stderr[-3000:]
        return r.returncode, json.loads(r.stdout)["stages"][0]

    code, stage = planned("auto")  # no recomputation does not fit 0.3 GiB; "dots" is the next candidate, and fits
    assert code == 0 and stage["fits"] and (stage["remat"], stage["remat_auto"]) == ("dots", True)
    assert stage["total_bytes"] <= 0.3 * 1024**3
    none, dots = stage["remat_tried"]  # what auto compiled, in order: the one it passed over, then its choice
    assert none["remat"] == "none" and not none["fits"] and none["total_bytes"] > 0.3 * 1024**3
    assert dots == {"remat": "dots", "total_bytes": stage["total_bytes"], "fits": True}


def test_the_largest_batch_search_lands_within_a_sixteenth_below_the_limit():
    from trainer.plan import search_largest

    for limit in (1, 7, 100, 1000, 4097):
        for start in (1, 16, 300, 5000):
            asked: list[int] = []

            def fits(n: int, limit: int = limit, asked: list[int] = asked) -> bool:
                asked.append(n)
                return n <= limit

            found = search_largest(start, fits)
            if limit >= 64 * start:  # the search looks no further than 64 x the stage's batch
                assert found == 64 * start
            else:
                assert found <= limit and limit - found <= max(1, found // 16), (limit, start, found)
            assert len(asked) == len(set(asked)) and len(asked) <= 16  # one compile per batch tried, and few
    assert search_largest(8, lambda n: False) == 0  # not even one row a device
    assert search_largest(8, lambda n: True, most=4) == 32  # no limit found within 4x the stage's batch
