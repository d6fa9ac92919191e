"""The team stack: PostgreSQL, SeaweedFS (S3) and an MLflow server on 127.0.0.1 (``services`` starts and stops
each one; ``control`` is the ``xfer stack up|down|status|env`` command). It may import ``xfer.core`` only."""
