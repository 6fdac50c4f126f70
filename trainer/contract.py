"""What tpuctl and the trainer agree on, in one place both import: the trainer's environment variables and the TPU
device files. Standard library only: tpuctl imports it, and tpuctl never imports jax or TensorFlow."""

from __future__ import annotations

# jax.distributed's wiring, which tpuctl sets for pods of several workers; on a Cloud TPU VM JAX finds the other
# workers itself, so a worker with TPU device files leaves these three out (and only these)
COORDINATOR_ENV = "TRAINER_COORDINATOR"
NUM_PROCESSES_ENV = "TRAINER_NUM_PROCESSES"
PROCESS_ID_ENV = "TRAINER_PROCESS_ID"
DISTRIBUTED_ENV = (COORDINATOR_ENV, NUM_PROCESSES_ENV, PROCESS_ID_ENV)
HEARTBEAT_TIMEOUT_ENV = "TRAINER_HEARTBEAT_TIMEOUT"
COMPILE_CACHE_ENV = "TRAINER_COMPILE_CACHE"

# a machine with any of these has TPU chips: the accel driver (v4 and later) or VFIO (v5e, v6e)
TPU_DEVICE_GLOBS = ("/dev/accel*", "/dev/vfio/[0-9]*")
