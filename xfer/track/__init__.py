"""Tracking out: the MLflow store and its safety (``store``), stage runs (``runs``), the pipeline's parent run and
its summary (``summary``), figures (``figures``), classification metrics (``metrics``) and the leaderboard
(``compare``, the ``xfer compare`` command). It may import ``xfer.core`` and ``xfer.data``, never ``xfer.nets``
or a stage."""
