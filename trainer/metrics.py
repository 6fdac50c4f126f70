"""Where training numbers go: `metrics.jsonl` (one JSON object per logged step, for scripts) and TensorBoard event
files under `tensorboard/` (for people), both in the workdir (local or gs://), written by host 0 only.

Steps are global (counted over all stages), so the curves of a multi-stage run join up. A resumed run appends; its
TensorBoard file starts with a restart marker at the resume step, so TensorBoard drops the orphaned points the
preempted run logged after its last checkpoint.

With `[log] wandb_project` set, host 0 also logs the same numbers and each eval's table to Weights & Biases
(trainer/wandb_log.py). Both files are `storage.GrowingFile`s: on a bucket, what was added is uploaded every
`upload_every` seconds (from a background thread, composed onto the object: the cost does not grow with the run),
at each checkpoint and at close. The event records are framed by tensorboard's own RecordWriter (not its
EventFileWriter, which writes through TensorFlow's GCS client: see trainer/storage.py for why the workdir goes through
one client).
"""

from __future__ import annotations

import json
import os
import socket
import time
from typing import Any

from etils import epath
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.record_writer import RecordWriter

from trainer import storage
from trainer.wandb_log import WandbRun

UPLOAD_EVERY_S = 30.0  # a bucket's copy of the logs lags by at most this much (and nothing at a clean exit)


class MetricsLog:
    def __init__(
        self,
        workdir: epath.Path,
        enabled: bool,
        start_step: int | None,
        upload_every: float = UPLOAD_EVERY_S,
        wandb: WandbRun | None = None,
    ):
        """start_step: where a (resumed) training run starts; None for a writer that only adds (evaluations).
        wandb: where the same numbers (and the eval tables) go as well."""
        self.enabled = enabled
        self.wandb = wandb
        if not enabled:
            return
        self.jsonl = storage.GrowingFile(workdir / "metrics.jsonl", append=True, upload_every=upload_every)
        name = f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}"
        self.events_file = storage.GrowingFile(workdir / "tensorboard" / name, False, upload_every)
        self.events = RecordWriter(self.events_file)
        self.add_event(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))
        if start_step is not None:
            restart = event_pb2.SessionLog(status=event_pb2.SessionLog.START)
            self.add_event(event_pb2.Event(wall_time=time.time(), step=start_step, session_log=restart))

    def add_event(self, event: event_pb2.Event) -> None:
        self.events.write(event.SerializeToString())

    def write(self, step: int, record: dict[str, Any]) -> None:
        """One logged step: numbers go to both; strings (the stage name, an eval's error) only to the JSONL."""
        if not self.enabled:
            return
        now = time.time()
        self.jsonl.write((json.dumps({"time": round(now, 3), "step": step, **record}) + "\n").encode())
        values = [
            summary_pb2.Summary.Value(tag=k, simple_value=float(v))
            for k, v in record.items()
            if isinstance(v, int | float) and not isinstance(v, bool)
        ]
        self.add_event(event_pb2.Event(wall_time=now, step=step, summary=summary_pb2.Summary(value=values)))
        self.jsonl.flush()
        self.events.flush()
        if self.wandb is not None:
            self.wandb.log(step, record)

    def sync(self) -> None:
        """Both files written through to where they live now (a bucket's copies otherwise lag by `upload_every`)."""
        if self.enabled:
            self.jsonl.flush(force=True)
            self.events.flush()
            self.events_file.flush(force=True)

    def table(self, title: str, step: int, results: dict[str, float]) -> None:
        """An evaluation's results as a table, where one is kept (W&B; the JSONL and TensorBoard have the numbers)."""
        if self.enabled and self.wandb is not None:
            self.wandb.table(title, step, results)

    def close(self, exit_code: int = 0) -> None:
        if self.enabled:
            self.jsonl.close()
            self.events.close()
        if self.wandb is not None:
            self.wandb.close(exit_code)


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The log as one record per step: later lines update earlier ones (a resumed run rewrites the steps after its
    checkpoint; `python -m trainer.eval` adds results to a step)."""
    by_step: dict[int, dict[str, Any]] = {}
    for line in storage.at(path).read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            by_step.setdefault(record["step"], {}).update(record)
    return [by_step[s] for s in sorted(by_step)]
