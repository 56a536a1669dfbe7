"""``python -m fxcompress ...``: see :mod:`fxcompress.cli` (or ``python -m fxcompress --help``)."""

import sys

from fxcompress.cli import main

if __name__ == "__main__":
    sys.exit(main())
