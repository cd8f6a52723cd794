"""One rule for the names users give experts, tasks and compositions.

A name is 1 to 100 characters from ``A-Z a-z 0-9 . _ -``, starting with a letter or a
digit. So it is a safe file name (no ``/``, no ``..``, nothing hidden), a safe command-line
value (never an option: no leading ``-``), unambiguous in comma-separated lists, and prints
as itself (no spaces, newlines or terminal escapes).
"""

from __future__ import annotations

import re

from recycle.errors import RecycleError

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def check_name(kind: str, name) -> str:
    """``name`` if it follows the rule, else one line saying why not."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        shown = repr(name) if not isinstance(name, str) or len(name) <= 60 else repr(name[:60]) + "..."
        raise RecycleError(
            f"{kind} name {shown} is not usable: use 1-100 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit")
    return name
