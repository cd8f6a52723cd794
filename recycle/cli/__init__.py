"""The ``recycle`` command line. Each command's docstring is its help."""

from __future__ import annotations

import sys

from recycle.cli.root import app  # each room (recycle.cli.experts, ...) adds its commands when loaded


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
