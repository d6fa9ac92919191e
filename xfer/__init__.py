"""Shared helpers for the pipeline stages: config, files, images, models, MLflow tracking."""

import os

# Quiet TensorFlow's C++ start-up chatter before any stage imports it.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


class XferError(Exception):
    """An expected problem (bad config, missing file, no network): reported as one line, no traceback."""


# Every first import of TensorFlow or Keras, by whatever module, goes through one stderr filter.
from xfer.core import quiet as _quiet  # noqa: E402

_quiet.install()
