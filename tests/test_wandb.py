"""W&B logging (trainer/wandb_log.py) with the real wandb in offline mode, read back from what it wrote: its
transaction log (`run-ID.wandb`) and its files. Nothing reaches the network: offline mode, and every URL wandb might
try points at a closed local port."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
from etils import epath
from standins.wandb_offline import offline_run

from trainer import recipe as recipes
from trainer.recipe import RecipeError
from trainer.wandb_log import ID_FILE, TABLE_COLUMNS, WandbRun, check_available

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "tests" / "tiny_synthetic.toml"
WANDB_SETS = ["log.wandb_project=clip-tests", "log.wandb_entity=lab"]


# --- the tests ------------------------------------------------------------------------------------------------


def test_scalars_tables_and_config_reach_wandb_and_a_resume_continues_the_run(offline, tmp_path, monkeypatch):
    recipe = recipes.load(RECIPE, WANDB_SETS)
    workdir = epath.Path(tmp_path / "runs" / "b16-tiny")  # as the trainer passes it (local here; gs:// alike)
    workdir.mkdir(parents=True)
    run = WandbRun(recipe, workdir, host0=True)
    records = {
        10: {"stage": "pretrain16", "stage_step": 10, "loss": 3.25, "lr": 5e-4, "img_per_s": 812.5},
        20: {"stage": "pretrain16", "stage_step": 20, "loss": 2.75, "lr": 1e-3, "img_per_s": 830.0},
        30: {"stage": "pretrain16", "stage_step": 30, "loss": 2.5, "lr": 9e-4, "fmnist/top1": 0.625},
    }
    for step, record in records.items():
        run.log(step, record)
    run.table("evals/pretrain16", 30, {"fmnist/top1": 0.625, "fmnist/top5": 0.875, "flickr/img2txt_r1": 0.25})
    run_id = run.run_id
    run.close()
    run.close()  # twice: harmless
    run.log(40, {"loss": 1.0})  # after close: nothing

    assert run_id and (workdir / ID_FILE).read_text().strip() == run_id
    written = offline_run(offline / "host-a", run_id)
    assert written.run.run_id == run_id
    assert (written.run.project, written.run.entity, written.run.display_name) == ("clip-tests", "lab", "b16-tiny")
    assert written.config() == json.loads(json.dumps(dataclasses.asdict(recipe)))  # the whole recipe
    assert written.config()["log"]["wandb_project"] == "clip-tests"
    history = written.history()
    assert sorted(history) == [10, 20, 30]  # at the global steps given; nothing after close
    for step, record in records.items():
        numbers = {k: v for k, v in record.items() if k != "stage"}  # strings are not logged
        assert {k: v for k, v in history[step].items() if k != "evals/pretrain16"} == numbers
    table = history[30]["evals/pretrain16"]
    assert table["_type"] == "table-file" and table["nrows"] == 3
    content = json.loads((written.directory / "files" / table["path"]).read_text())
    assert content == {
        "columns": TABLE_COLUMNS,
        "data": [["fmnist", "top1", 0.625], ["fmnist", "top5", 0.875], ["flickr", "img2txt_r1", 0.25]],
    }

    # the same workdir again (a resumed run, on another VM: its own local wandb dir): the same W&B run
    monkeypatch.setenv("WANDB_DIR", str(offline / "host-b"))
    again = WandbRun(recipes.load(RECIPE, WANDB_SETS), workdir, host0=True)
    assert again.run_id == run_id
    again.log(40, {"stage": "ft32", "loss": 2.0})
    again.close()
    resumed = offline_run(offline / "host-b", run_id)
    assert resumed.run.run_id == run_id and resumed.history() == {40: {"loss": 2.0}}
    assert (workdir / ID_FILE).read_text().strip() == run_id


def test_other_hosts_and_recipes_without_a_project_do_nothing(offline, tmp_path):
    workdir = epath.Path(tmp_path / "w")
    workdir.mkdir()
    for recipe, host0 in ((recipes.load(RECIPE, WANDB_SETS), False), (recipes.load(RECIPE), True)):
        run = WandbRun(recipe, workdir, host0=host0)
        assert not run.enabled and run.run_id is None
        run.log(1, {"loss": 1.0})
        run.table("evals/x", 1, {"a/b": 1.0})
        run.close()
    assert not (workdir / ID_FILE).exists() and not offline.exists()


def test_a_missing_wandb_is_one_line_at_start_up_and_an_unused_one_is_never_imported(tmp_path):
    # sys.modules["wandb"] = None makes `import wandb` fail for real (ImportError), as where it is not installed; so
    # a recipe without a project trains (and the class does nothing) without ever importing wandb
    script = f"""
import pathlib, sys
sys.modules["wandb"] = None
from trainer import recipe, wandb_log
plain = recipe.load({str(RECIPE)!r})
wandb_log.check_available(plain)
run = wandb_log.WandbRun(plain, pathlib.Path({str(tmp_path)!r}), host0=True)
run.log(1, {{"loss": 1.0}}); run.table("evals/x", 1, {{"a/b": 1.0}}); run.close()
try:
    wandb_log.check_available(recipe.load({str(RECIPE)!r}, ["log.wandb_project=clip-tests"]))
except recipe.RecipeError as e:
    print(e)
"""
    r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout == (
        "log.wandb_project = \"clip-tests\" needs wandb, which is not installed: pip install '.[wandb]'"
        " (on a pod: tpuctl prepare --extras train,wandb)\n"
    )
    assert check_available(recipes.load(RECIPE, WANDB_SETS)) is None  # installed here: fine


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (["log.wandb_name=x"], 'log.wandb_name = "x" is set but log.wandb_project is empty'),
        (["log.wandb_entity=lab"], 'log.wandb_entity = "lab" is set but log.wandb_project is empty'),
        (["log.wandb_project='a/b'"], 'log.wandb_project = "a/b" must not contain /'),
    ],
)
def test_recipe_mistakes_about_wandb_are_one_line(sets, message):
    with pytest.raises(RecipeError) as e:  # named by the --set that made it
        recipes.load(RECIPE, sets)
    assert str(e.value).startswith(f"--set {sets[0]}: {message}") and "\n" not in str(e.value)
