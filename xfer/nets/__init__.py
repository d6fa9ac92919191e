"""The networks: backbones and their weights (``backbones``), heads and training helpers (``models``), feature
caching (``features``, ``views``), the frozen-trunk boundary (``boundary``), from-scratch models (``scratch``),
Grad-CAM (``gradcam``), and the serving predictor with the ``xfer predict`` command (``serving``, ``predict``).
It may import ``xfer.core``, ``xfer.data`` and ``xfer.track`` (figures for Grad-CAM grids, the model card and
registration), never a stage."""
