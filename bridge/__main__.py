"""`python -m bridge ...`: the same as the `callbridge` script, for environments without it on PATH."""

import sys

from .cli import main

sys.exit(main())
