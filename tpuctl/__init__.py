"""tpuctl: the fleet tool for training CLIP models on Cloud TPU pods. Never imports jax or tensorflow."""

__version__ = "0.1.0"
