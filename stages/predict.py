"""The old spelling ``python -m stages.predict``: runs ``xfer predict``."""

if __name__ == "__main__":
    from xfer.cli import forward

    forward("stages.predict", "predict")
