"""Core machinery every other group builds on: composing and reading the config (``config``, ``params``), the
TensorFlow runtime (precision, threads, XLA, seeds, quiet start-up: ``runtime``), several devices
(``distribute``), signal handling (``signals``), atomic files (``files``) and retrying a busy tracking store
(``retry``). It imports no other group of ``xfer``."""
