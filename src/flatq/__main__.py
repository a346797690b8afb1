"""`python -m flatq` is the `flatq` command (also what torchrun runs)."""

import sys

from .cli import main

sys.exit(main())
