"""The old spelling ``python -m xfer.params``: runs ``xfer params``."""

if __name__ == "__main__":
    from xfer.cli import forward

    forward("xfer.params", "params")
