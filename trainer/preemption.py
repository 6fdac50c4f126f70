"""SIGTERM is how a Cloud TPU VM is told it is being preempted: finish the step, checkpoint, exit cleanly.

With one process, a Python handler raises a flag. With several, every host must save at the same step, and hosts
see the signal at different steps: JAX's preemption sync service (started by jax.distributed.initialize, listening for
SIGTERM itself) agrees on the first step all hosts can still reach; `reached(step)` turns True there, on every host.
"""

from __future__ import annotations

import signal
from types import FrameType

import jax
from jax.experimental import multihost_utils


class Preemption:
    def __init__(self) -> None:
        self.requested = False
        self.multi_host = jax.process_count() > 1
        if not self.multi_host:  # in multi-host runs the sync service owns SIGTERM: a Python handler would hide it
            signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True

    def reached(self, global_step: int) -> bool:
        """Call once per step, on every host, with increasing steps; True = save now and stop."""
        if self.multi_host:
            self.requested = multihost_utils.reached_preemption_sync_point(global_step)
        return self.requested
