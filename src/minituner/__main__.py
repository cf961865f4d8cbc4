"""``python -m minituner`` (and ``torchrun -m minituner``) runs the CLI."""

import sys

from minituner.cli import main

if __name__ == "__main__":
    sys.exit(main())
