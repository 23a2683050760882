"""``python -m masquant.reporting``: tables from finished runs (see :mod:`masquant.reporting.cli`)."""

import sys

from masquant.reporting.cli import main

sys.exit(main())
