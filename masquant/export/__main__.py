"""``python -m masquant.export <run folder> | <overrides>``: the entry point of :mod:`masquant.app.export_cli`."""

import sys

from masquant.app.export_cli import main

if __name__ == "__main__":
    main(sys.argv[1:])
