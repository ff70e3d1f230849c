"""`python -m bitserve_client.cli jobs list` (the same as `bitserve jobs list`)."""

import sys

from bitserve_client.cli.app import main

sys.exit(main(sys.argv[1:]))
