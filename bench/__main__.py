"""`python -m bench` (what `make bench` runs)."""

import sys

from .benchmark import main

sys.exit(main())
