"""What tpuctl and the trainer agree on, in one place both import: the trainer's environment variables, the TPU
device files, and the log lines and checkpoint layout tpuctl reads. Standard library only: tpuctl imports it, and
tpuctl never imports jax or TensorFlow; its worker-side status script gets the log rules as data (LOG_RULES)."""

from __future__ import annotations

# jax.distributed's wiring, which tpuctl sets for pods of several workers; on a Cloud TPU VM JAX finds the other
# workers itself, so a worker with TPU device files leaves these three out (and only these)
COORDINATOR_ENV = "TRAINER_COORDINATOR"
NUM_PROCESSES_ENV = "TRAINER_NUM_PROCESSES"
PROCESS_ID_ENV = "TRAINER_PROCESS_ID"
DISTRIBUTED_ENV = (COORDINATOR_ENV, NUM_PROCESSES_ENV, PROCESS_ID_ENV)
HEARTBEAT_TIMEOUT_ENV = "TRAINER_HEARTBEAT_TIMEOUT"
COMPILE_CACHE_ENV = "TRAINER_COMPILE_CACHE"
# the code's identity as tpuctl checked it at the start, JSON {"tree", "commit", "dirty", ...}; the trainer appends it
# to WORKDIR/code.json (CODE_FILE) with the stage and step it starts at
CODE_ENV = "TRAINER_CODE"
CODE_FILE = "code.json"

# a machine with any of these has TPU chips: the accel driver (v4 and later) or VFIO (v5e, v6e)
TPU_DEVICE_GLOBS = ("/dev/accel*", "/dev/vfio/[0-9]*")

# --- the trainer's log, as tpuctl status reads it from each worker's log file ------------------------------------
# A progress line (trainer/report.py describe): "STAGE STEP  loss 3.07  contrastive 2.98 ... img_per_s 435  eta 0m00s"
PROGRESS_PATTERN = r"^(?P<stage>\S+) (?P<step>\d+)  loss (?P<loss>\S+)\s"
SPEED_PATTERN = r"\bimg_per_s (?P<img_per_s>\S+)"
EVAL_FAILED = "eval failed: "  # then "NAME at stage S step N: ERROR"
EVAL_TABLE_PATTERN = r"\bevals: stage \S+ step \d+"  # the title of the table of an eval that ran
FINISHED = "done: every stage"  # the trainer's last line when every stage is trained (exit 0 otherwise: preempted)
# a workdir's checkpoints: WORKDIR/<stage>/checkpoints/<step>/ (orbax; commit_success.txt inside on a bucket)
CHECKPOINT_GLOB = ("*", "checkpoints", "*")

# what a worker's status script is sent, so that it reads the log by these same rules without importing the trainer
LOG_RULES = {
    "progress": PROGRESS_PATTERN,
    "speed": SPEED_PATTERN,
    "eval_failed": EVAL_FAILED,
    "eval_table": EVAL_TABLE_PATTERN,
    "finished": FINISHED,
    "checkpoint_glob": list(CHECKPOINT_GLOB),
}


def finished_line(recipe: str, workdir: str) -> str:
    return f"{FINISHED} of {recipe} is trained; checkpoints in {workdir}"


def eval_failed_line(name: str, stage: str, step: int, error: str) -> str:
    return f"{EVAL_FAILED}{name} at stage {stage} step {step}: {error}"


def eval_table_title(stage: str, step: int) -> str:
    return f"evals: stage {stage} step {step}"


def parse_progress(line: str) -> dict[str, str | int | float | None] | None:
    """A progress line's stage, step, loss and img/s (None where it has none); None for any other line."""
    import re

    match = re.match(PROGRESS_PATTERN, line)
    if not match:
        return None
    speed = re.search(SPEED_PATTERN, line)
    return {
        "stage": match["stage"],
        "step": int(match["step"]),
        "loss": float(match["loss"]),
        "img_per_s": float(speed["img_per_s"]) if speed else None,
    }
