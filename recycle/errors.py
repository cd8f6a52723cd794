"""The one exception type users see.

Anything raised as :class:`RecycleError` is bad input or a refused operation: the CLI
prints its message as one line on stderr and exits with ``exit_code`` (2 by default),
without a traceback unless ``--debug`` is given.
"""


class RecycleError(Exception):
    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code

    def __str__(self) -> str:  # one line, always
        return " ".join(str(self.message).split())
