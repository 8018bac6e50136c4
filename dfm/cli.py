"""The `dfm` command line (grows with the pipeline)."""

import sys


def main(argv=None) -> int:
    print("dfm: no commands yet", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
