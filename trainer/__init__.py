"""trainer: the sharded JAX/Flax CLIP trainer that runs on each worker (installed with the `train` extra)."""
