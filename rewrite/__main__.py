"""`python -m rewrite ...`: see `rewrite.cli`."""
import sys

from .cli import main

sys.exit(main())
