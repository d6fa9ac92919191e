"""The old spelling ``python -m xfer.stack``: runs ``xfer stack``."""

import sys

from xfer.stack.control import main

print("note: `python -m xfer.stack` is now `xfer stack`", file=sys.stderr)
raise SystemExit(main(sys.argv[1:]))
