"""Data in: fetching and unpacking a source (``fetch``), validating, normalising and generating images
(``images``), and the pipeline's file paths and manifests (``paths``). It may import ``xfer.core`` only."""
