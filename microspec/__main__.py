"""`python -m microspec ...` is the `microspec` command."""
import sys

from .cli import main

sys.exit(main())
