"""Pipeline stages, one module each, runnable as ``python -m stages.<name>``.

Run that way, the stage goes to a warm process that has TensorFlow & co. imported already, when one is up
(``xfer.core.warm``; ``XFER_WARM=0`` turns it off): this process then only waits for it and exits with its code."""

import sys

if sys.argv[:1] == ["-m"]:  # still locating the module of `python -m stages.<name>`: nothing imported yet
    from xfer.core.warm import delegate

    delegate()
