"""TensorFlow as the input pipeline uses it: quiet, and off the accelerators (they belong to JAX).

Import `tf` (and `tf_text`) from here, not `tensorflow` directly, so these settings come first.
"""

import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before the import: TF reads it once


@contextlib.contextmanager
def quiet_stderr() -> Iterator[None]:
    """Hold back what C++ writes to fd 2 meanwhile (TF 2.2x's absl pre-init lines: oneDNN notes, no CUDA driver,
    which TF_CPP_MIN_LOG_LEVEL no longer silences); shown after all if the block fails."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            held.seek(0)
            sys.stderr.write(held.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


with quiet_stderr():
    import tensorflow as tf
    import tensorflow_text as tf_text  # imports (and would announce) TensorFlow too

    tf.config.set_visible_devices([], "GPU")

__all__ = ["tf", "tf_text"]
