"""What a host shows a person: a rich progress bar per stage when stdout is a terminal, otherwise one plain line per
logged step (log files, `tpuctl logs`, `tpuctl status`). Every host reports (the values are global); on a pod each
writes its own log, so a worker that lags or stops shows in its own."""

from __future__ import annotations

import sys
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from trainer.recipe import Stage

SHOWN = ("loss", "contrastive", "caption", "temperature", "lr", "img_per_s", "mfu")


def describe(record: dict[str, Any]) -> str:
    parts = [f"{record['stage']} {record['stage_step']}"]
    for key in SHOWN:
        if key in record:
            value = record[key]
            parts.append(f"{key} {value:.3g}" if key != "mfu" else f"mfu {100 * value:.1f}%")
    if "eta_s" in record:
        parts.append(f"eta {format_seconds(record['eta_s'])}")
    return "  ".join(parts)


def _number(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.0f}" if value == int(value) and value > 1 else f"{value:.4f}"


def format_seconds(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


class Report:
    def __init__(self, enabled: bool, console: Console | None = None):
        self.enabled = enabled
        self.console = console or Console(file=sys.stdout, soft_wrap=True)  # log lines stay whole in files
        self.progress: Progress | None = None
        self.task: Any = None
        if enabled and self.console.is_terminal:
            self.progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("{task.fields[last]}"),
                console=self.console,
            )
            self.progress.start()

    def say(self, line: str) -> None:
        if self.enabled:
            self.console.print(line, markup=False, highlight=False)

    def table(self, title: str, results: dict[str, float]) -> None:
        """Evaluation results, a row per metric (narrow enough for any terminal or log file)."""
        if not self.enabled or not results:
            return
        from rich.table import Table

        table = Table(title=title)
        for column, justify in (("eval", "left"), ("metric", "left"), ("value", "right")):
            table.add_column(column, justify=justify, no_wrap=True)  # type: ignore[arg-type]
        for key, value in results.items():
            name, _, metric = key.rpartition("/")
            table.add_row(name, metric, _number(value))
        self.console.print(table)

    def start_stage(self, stage: Stage, steps: int, done: int) -> None:
        if self.progress is not None:
            self.task = self.progress.add_task(stage.name, total=steps, completed=done, last="")

    def log(self, record: dict[str, Any]) -> None:
        if self.progress is not None:
            self.progress.update(self.task, last=f"loss {record['loss']:.3g}")
        self.say(describe(record))

    def advance(self, step: int) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=step)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
