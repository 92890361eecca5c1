"""The one exception type that reaches users as a single line (the CLI prints it and exits non-zero)."""


class CkvError(Exception):
    """A problem with the user's input or environment, explained in one line."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code
