"""Where training numbers go: `metrics.jsonl` (one JSON object per logged step, for scripts) and TensorBoard event
files under `tensorboard/` (for people), both in the workdir, written by host 0 only.

Steps are global (counted over all stages), so the curves of a multi-stage run join up. A resumed run appends; its
TensorBoard file starts with a restart marker at the resume step, so TensorBoard drops the orphaned points the
preempted run logged after its last checkpoint.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.event_file_writer import EventFileWriter


class MetricsLog:
    def __init__(self, workdir: Path, enabled: bool, start_step: int | None):
        """start_step: where a (resumed) training run starts; None for a writer that only adds (evaluations)."""
        self.enabled = enabled
        if not enabled:
            return
        self.jsonl = (workdir / "metrics.jsonl").open("a", buffering=1)
        # tensorboard's writer imports TensorFlow where it is installed: through tfsetup, it comes configured and quiet
        import trainer.data.tfsetup  # noqa: F401

        self.events = EventFileWriter(str(workdir / "tensorboard"))
        if start_step is not None:
            restart = event_pb2.SessionLog(status=event_pb2.SessionLog.START)
            self.events.add_event(event_pb2.Event(wall_time=time.time(), step=start_step, session_log=restart))

    def write(self, step: int, record: dict[str, Any]) -> None:
        """One logged step: numbers go to both; strings (the stage name) only to the JSONL."""
        if not self.enabled:
            return
        now = time.time()
        self.jsonl.write(json.dumps({"time": round(now, 3), "step": step, **record}) + "\n")
        values = [
            summary_pb2.Summary.Value(tag=k, simple_value=float(v))
            for k, v in record.items()
            if isinstance(v, int | float) and not isinstance(v, bool)
        ]
        self.events.add_event(event_pb2.Event(wall_time=now, step=step, summary=summary_pb2.Summary(value=values)))

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            self.events.close()


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The log as one record per step: later lines update earlier ones (a resumed run rewrites the steps after its
    checkpoint; `python -m trainer.eval` adds results to a step)."""
    by_step: dict[int, dict[str, Any]] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            by_step.setdefault(record["step"], {}).update(record)
    return [by_step[s] for s in sorted(by_step)]
