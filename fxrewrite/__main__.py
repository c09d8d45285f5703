"""`python -m fxrewrite ...`: see `fxrewrite.cli`."""
import sys

from .cli import main

sys.exit(main())
