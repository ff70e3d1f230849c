"""`python -m bitcore ...`: see bitcore.cli."""

import sys

from bitcore.cli import main

if __name__ == "__main__":
    sys.exit(main())
