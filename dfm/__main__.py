"""`python -m dfm ...` and `torchrun -m dfm ...`: the command line of dfm.cli."""

import sys

from dfm.cli import main

if __name__ == "__main__":
    sys.exit(main())
