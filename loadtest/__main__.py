"""`python -m intentflow.loadtest`: the same as `replay-duplicates`."""

import sys

from intentflow.loadtest.replay import main

if __name__ == "__main__":
    sys.exit(main())
