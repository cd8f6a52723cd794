"""The ``recycle`` command line. Each command's docstring is its help."""

from __future__ import annotations

import sys

from recycle.cli.root import app

# Each room adds its commands to ``app`` when imported.
from recycle.cli import experts  # noqa: F401, I001  (the order of --help)
from recycle.cli import tasks  # noqa: F401
from recycle.cli import gates  # noqa: F401
from recycle.cli import compose  # noqa: F401
from recycle.cli import evaluate  # noqa: F401
from recycle.cli import run  # noqa: F401
from recycle.cli import routers  # noqa: F401
from recycle.cli import serve  # noqa: F401
from recycle.cli import lmeval  # noqa: F401


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
