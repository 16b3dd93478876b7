"""`python -m loadtest`: the same as `replay-duplicates`."""

import sys

from loadtest.replay import main

if __name__ == "__main__":
    sys.exit(main())
