"""TensorFlow as the input pipeline uses it: quiet, and off the accelerators (they belong to JAX).

Import `tf` from here, not `tensorflow` directly, so these settings come first.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before the import: TF reads it once

import tensorflow as tf

tf.config.set_visible_devices([], "GPU")

__all__ = ["tf"]
