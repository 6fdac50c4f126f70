"""The training loop: every stage of the recipe in order, resumable. The only module that knows the order of things.

Where a run starts (`find_start`), in this order of precedence:
1. the latest checkpoint of the last stage that has one: mid-stage, it restores everything (params, optimizer,
   step, RNG, data position) and takes exactly the next batch; at the stage's end, the next stage starts from it;
2. otherwise stage 0 from a fresh initialisation.
Each stage starts from the previous stage's final params with a fresh optimizer, schedule and step 0; a stage with
`init_from` starts from that converted checkpoint instead (trainer/pretrained.py).

At a step that evaluates, the checkpoint is saved and committed first, then the evals run: an eval that fails (a
bucket hiccup, a damaged image) is reported in the log and the metrics (`eval_error`) and training goes on, so
nothing trained is ever lost to an eval.
"""

from __future__ import annotations

import functools
import json
import os
import time
from dataclasses import asdict, dataclass
from typing import Any

import jax
import jax.numpy as jnp
from etils import epath

from trainer import checkpoint, compile_cache, contract, data, evals, fitting, optimizer, pretrained, sharding
from trainer.data.prefetch import Prefetched
from trainer.hardware import peak_flops
from trainer.metrics import MetricsLog
from trainer.models import flops
from trainer.models.clip import Clip, build
from trainer.preemption import Preemption
from trainer.program import abstract_params, compile_stage, fit_positions
from trainer.recipe import Recipe, Stage
from trainer.report import Report
from trainer.wandb_log import WandbRun


@dataclass(frozen=True)
class Start:
    stage: int  # the stage to run now (== len(stages) when all are done)
    resume_step: int | None  # a checkpoint of that stage to resume from
    init_from: int | None  # else the final step of the previous stage to take params from


@dataclass
class Outcome:
    finished: bool  # every stage done
    preempted: bool
    stage: str
    step: int  # within the stage


def find_start(recipe: Recipe, workdir: epath.Path) -> Start:
    found = checkpoint.newest(recipe, workdir)
    if found is None:
        return Start(0, None, None)
    index, latest = found
    if latest < recipe.stage_steps(recipe.stages[index]):
        return Start(index, latest, None)
    return Start(index + 1, None, latest)  # stage done: the next starts from its final params


def run(recipe: Recipe, workdir: epath.Path, evaluators: list[evals.Evaluator]) -> Outcome:
    """Train what is left of the recipe in `workdir` (local or gs://), evaluating with `evaluators` (built once, by
    trainer.preflight)."""
    mesh = sharding.checked_mesh(recipe)
    workdir.mkdir(parents=True, exist_ok=True)
    host = data.Host(jax.process_index(), jax.process_count())
    start = find_start(recipe, workdir)
    if host.index == 0:
        (workdir / "recipe.json").write_text(json.dumps(asdict(recipe), indent=1) + "\n")
        record_code(workdir, recipe, start)
    model = build(recipe)
    preemption = Preemption()
    first_global = recipe.global_step(start.stage, start.resume_step or 0)
    wandb = WandbRun(recipe, workdir, host0=host.index == 0)  # the same W&B run again when resumed
    metrics = MetricsLog(workdir, enabled=host.index == 0, start_step=first_global, wandb=wandb)
    report = Report(enabled=True)  # every host logs (its own file on a pod): `tpuctl status` reads each one's step
    params = None
    if start.init_from is not None and start.stage < len(recipe.stages) and not recipe.stages[start.stage].init_from:
        previous = start.stage - 1
        target = abstract_params(model, recipe, recipe.stages[previous], mesh)
        params = checkpoint.for_stage(recipe, workdir, previous).restore_params(start.init_from, target)
    outcome = Outcome(finished=True, preempted=False, stage="", step=0)
    failed = True  # until the loop ends normally: W&B marks the run failed otherwise
    try:
        for index in range(start.stage, len(recipe.stages)):
            resume = start.resume_step if index == start.stage else None
            outcome, params = run_stage(
                recipe, index, model, mesh, host, workdir, params, resume, preemption, metrics, report, evaluators
            )
            if outcome.preempted:
                break
        failed = False
    finally:
        metrics.close(exit_code=1 if failed else 0)
        report.close()
    return outcome


def record_code(workdir: epath.Path, recipe: Recipe, start: Start) -> None:
    """Append the code's identity tpuctl checked (contract.CODE_ENV) to WORKDIR/code.json with where this start
    trains from: every (re)start of a run says which code it ran, a resume after a code change included."""
    given = os.environ.get(contract.CODE_ENV)
    if not given:
        return
    path = workdir / contract.CODE_FILE
    starts = json.loads(path.read_text()) if path.exists() else []
    stage = recipe.stages[start.stage].name if start.stage < len(recipe.stages) else None
    starts.append({"stage": stage, "step": start.resume_step or 0, "time": time.time(), **json.loads(given)})
    path.write_text(json.dumps(starts, indent=1) + "\n")


def run_stage(
    recipe: Recipe,
    index: int,
    model: Clip,
    mesh: jax.sharding.Mesh,
    host: data.Host,
    workdir: epath.Path,
    params: Any,
    resume_step: int | None,
    preemption: Preemption,
    metrics: MetricsLog,
    report: Report,
    evaluators: list[evals.Evaluator],
) -> tuple[Outcome, Any]:
    began = time.monotonic()
    stage = recipe.stages[index]
    steps = recipe.stage_steps(stage)
    chosen = fitting.for_devices(recipe, stage, mesh)  # remat "auto": what fits these devices
    if chosen is not recipe:
        model = build(chosen)
        report.say(f"stage {stage.name}: remat {fitting.describe(chosen)} (auto: the least that fits)")
    program = compile_stage(model, chosen, stage, mesh)
    ckpt = checkpoint.for_stage(recipe, workdir, index)
    position = None if resume_step is None else data.my_position(ckpt.meta(resume_step)["data"], host, report.say)
    schedule = optimizer.schedule(stage, steps)
    flops_per_step = flops.train_per_sample(recipe, stage) * stage.global_batch
    speed = Speed(recipe, index, flops_per_step)
    every_ckpt = stage.checkpoint_every or recipe.checkpoint.every_steps
    # the input opens first: its shuffle buffer fills while the state is restored or initialised and the step compiles
    with Prefetched(data.open_stage(recipe, index, host, position), program.global_batch) as batches:
        if resume_step is not None:
            state, _ = ckpt.restore(resume_step, program.abstract_state)
            report.say(f"stage {stage.name}: resuming at step {resume_step}/{steps}")
        else:
            if stage.init_from:
                params = pretrained.restore(stage.init_from, recipe, stage, model, mesh)
                report.say(f"stage {stage.name}: parameters from {stage.init_from}")
            state = program.init_state(None if params is None else fit_positions(recipe, stage, params))
            report.say(f"stage {stage.name}: {steps} steps at {stage.resolution} px, batch {stage.global_batch}")
        report.start_stage(stage, steps, int(state.step))
        window: dict[str, Any] | None = None  # metrics summed on the device since the last log
        window_steps = timed_steps = 0
        save_held_s = 0.0  # the time checkpoint saves held the loop since the last log
        step = int(state.step)
        pending: PendingLog | None = None  # a log whose numbers are fetched once the next step is queued
        while step < steps:
            batch, position = next(batches)
            state, step_metrics = program.step(state, batch)
            step += 1
            if pending is not None:  # the previous step's log: the chips have this step queued meanwhile
                pending.write(metrics, report, pending.finish(speed))
                pending = None
            window = step_metrics if window is None else add_metrics(window, step_metrics)
            window_steps += 1
            if speed.started is None:  # the first step compiles: time from the end of it
                jax.block_until_ready(state.step)
                speed.restart()
                counts = compile_cache.COUNTS
                report.say(
                    f"stage {stage.name}: first step after {time.monotonic() - began:.1f} s"
                    f" ({counts.hits} of {counts.requests} programs so far read from the compilation cache)"
                )
            else:
                timed_steps += 1
            preempted = preemption.reached(recipe.global_step(index, step))
            # a preempted host has seconds to save: the evals wait for the resumed run
            evaluate = bool(evaluators) and not preempted and due(step, stage.eval_every, steps)
            if due(step, recipe.log.every_steps, steps) or preempted or evaluate:
                head = {"stage": stage.name, "stage_step": step}
                tail: dict[str, Any] = {"lr": float(schedule(step - 1))}
                tail.update({f"data_{k}": v for k, v in position.items() if k in ("epoch", "bad")})
                if save_held_s:
                    tail["checkpoint_held_s"] = save_held_s  # since the last log
                pending = PendingLog(
                    recipe.global_step(index, step), head, tail, window, window_steps, timed_steps, steps - step
                )
                window, window_steps, timed_steps, save_held_s = None, 0, 0, 0.0
            report.advance(step)
            saving = due(step, every_ckpt, steps) or preempted or evaluate
            if saving:
                jax.block_until_ready(state)  # the save copies the step's results: the chips are busy until then
                held = time.perf_counter()
                positions = data.gather_positions(position, host)  # every host's: each resumes its own stream
                ckpt.save(state, {"stage": index, "stage_name": stage.name, "step": step, "data": positions})
                save_held_s += time.perf_counter() - held  # the chips' wait; orbax writes in the background
            if pending is not None and (saving or step == steps):  # these write their log now
                record = pending.finish(speed)
                if evaluate:
                    ckpt.wait()  # committed before the evals run: nothing trained is lost to an eval
                    results = run_evals(evaluators, model, state.params, mesh, stage, step, report)
                    record.update(results)
                    numbers = {k: v for k, v in results.items() if k != "eval_error"}
                    metrics.table(f"evals/{stage.name}", recipe.global_step(index, step), numbers)
                    speed.restart()  # the eval's time is not the step's
                pending.write(metrics, report, record)
                pending = None
            if saving:  # the logs in a bucket reach every checkpoint: a resumed run re-logs only what it re-trains
                metrics.sync()
            if preempted:
                ckpt.wait()
                report.say(f"preempted: saved stage {stage.name} step {step}/{steps}; run the same command to resume")
                return Outcome(finished=False, preempted=True, stage=stage.name, step=step), None
    ckpt.wait()
    ckpt.close()
    report.say(f"stage {stage.name}: done ({steps} steps)")
    return Outcome(finished=index == len(recipe.stages) - 1, preempted=False, stage=stage.name, step=step), state.params


@dataclass
class PendingLog:
    """A due log whose numbers stay on the device until the next step is dispatched (their copy to the host
    started at once): fetching them at once would leave the chips idle while the host queues the next step."""

    global_step: int
    head: dict[str, Any]  # the record's fields before the numbers
    tail: dict[str, Any]  # and after them
    window: dict[str, jax.Array]  # the metrics summed over the window's steps
    window_steps: int
    timed_steps: int  # of them, those the speed counts (not the first, compiling, step)
    steps_left: int

    def __post_init__(self) -> None:
        for value in jax.tree.leaves(self.window):
            value.copy_to_host_async()

    def finish(self, speed: Speed) -> dict[str, Any]:
        """The record: the window's means, and the speed up to now (the logged step is done by the time they are)."""
        values = {k: float(v) / self.window_steps for k, v in jax.device_get(self.window).items()}
        timing = speed.measure(self.timed_steps, self.steps_left) if self.timed_steps else {}
        return {**self.head, **values, **self.tail, **timing}

    def write(self, metrics: MetricsLog, report: Report, record: dict[str, Any]) -> None:
        metrics.write(self.global_step, record)
        report.log(record)


@functools.partial(jax.jit, donate_argnums=0)
def add_metrics(window: dict[str, jax.Array], step_metrics: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """The window's sums and this step's metrics, on the device in one dispatch (an eager add per metric costs the
    loop a dispatch each, every step); fetched only when a log is due."""
    return jax.tree.map(jnp.add, window, step_metrics)


def due(step: int, every: int, total: int) -> bool:
    """Whether a cadence of `every` steps (0: none) falls on `step` of `total`; the last step always has it (a stage
    ends logged, evaluated and saved whatever its length)."""
    return step == total or (every > 0 and step % every == 0)


def run_evals(
    evaluators: list[evals.Evaluator], model: Clip, params: Any, mesh: Any, stage: Stage, step: int, report: Report
) -> dict[str, Any]:
    """The evals' results for the metrics, plus `eval_error` where some failed: reported, never fatal to training."""
    errors: dict[str, str] = {}
    results: dict[str, Any] = evals.run_all(evaluators, model, params, mesh, stage.resolution, errors)
    report.table(contract.eval_table_title(stage.name, step), results)
    for name, error in errors.items():
        report.say(contract.eval_failed_line(name, stage.name, step, str(error)))  # tpuctl status shows the latest
    if errors:
        results["eval_error"] = "; ".join(f"{name}: {error}" for name, error in errors.items())
    return results


class Speed:
    """Throughput, MFU and the time left, from the wall time of the steps since the last measurement."""

    def __init__(self, recipe: Recipe, index: int, flops_per_step: float):
        self.recipe, self.index = recipe, index
        self.flops_per_step = flops_per_step
        self.chips = jax.device_count()
        self.peak = peak_flops(jax.devices()[0].device_kind)
        self.started: float | None = None
        later = recipe.stages[index + 1 :]
        self.later_flops = sum(
            flops.train_per_sample(recipe, s) * s.global_batch * recipe.stage_steps(s) for s in later
        )

    def restart(self) -> None:
        self.started = time.perf_counter()

    def measure(self, steps: int, steps_left: int) -> dict[str, float]:
        now = time.perf_counter()
        seconds = (now - (self.started or now)) / max(steps, 1)
        self.started = now
        batch = self.recipe.stages[self.index].global_batch
        flops_per_s = self.flops_per_step / seconds if seconds > 0 else 0.0
        left = steps_left * seconds + (self.later_flops / flops_per_s if flops_per_s else 0.0)
        out = {
            "step_time_s": seconds,
            "img_per_s": batch / seconds if seconds else 0.0,
            "img_per_s_per_chip": batch / seconds / self.chips if seconds else 0.0,
            "eta_s": left,
        }
        if self.peak:
            out["mfu"] = flops_per_s / (self.peak * self.chips)
        return out
