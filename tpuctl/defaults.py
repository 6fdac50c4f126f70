"""Every default of tpuctl's commands that is not a setting (settings: tpuctl/config.py), in one place: the click
options show these, and the library functions take them as their defaults. Standard library only (read at start)."""

from __future__ import annotations

# create: tries while the API has no capacity or quota, the first wait between them (then x2, to the cap), and how
# long one try may wait for READY
CREATE_ATTEMPTS = 10
CREATE_BACKOFF_S = 30.0
CREATE_BACKOFF_MAX_S = 600.0
READY_TIMEOUT_S = 3600.0

# babysit: rounds after the first before it gives up, seconds between looks, the first wait before a restart (then
# x2, to the cap), how long a READY TPU may stay unhealthy, and its create's tries per round
BABYSIT_MAX_RESTARTS = 10
BABYSIT_POLL_S = 60.0
BABYSIT_BACKOFF_S = 30.0
BABYSIT_BACKOFF_MAX_S = 900.0
UNHEALTHY_GRACE_S = 600.0
BABYSIT_CREATE_ATTEMPTS = 20

KILL_GRACE_S = 10.0  # seconds between a chip holder's TERM and its KILL (kill, and a forced run's takeover)
STOP_GRACE_S = 180.0  # seconds a stopped trainer has to checkpoint and exit before it is killed
# launch: the seconds the trainers of a launch that failed on some worker get to exit, and those an earlier round's
# trainers (babysit replacing them) get to save what they have
ABORTED_LAUNCH_GRACE_S = 5.0
REPLACED_RUN_GRACE_S = 30.0
