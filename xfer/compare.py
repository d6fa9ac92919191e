"""The old spelling ``python -m xfer.compare``: runs ``xfer compare``."""

if __name__ == "__main__":
    from xfer.cli import forward

    forward("xfer.compare", "compare")
