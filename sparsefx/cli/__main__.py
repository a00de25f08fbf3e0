"""`python -m sparsefx.cli`: the `sparsefx` console script."""

import sys

from sparsefx.cli import console

sys.exit(console())
