"""`python -m moshi_eval ...`: the `moshi-eval` command line."""
import sys

from .cli import main

sys.exit(main())
