"""User-facing errors: the command line prints them as one line, without a traceback."""


class UserError(Exception):
    """A mistake the user can fix; the message names the problem and the fix."""


class Stopped(Exception):
    """A run stopped by a signal after saving its work; the command exits with `code` (128 + the signal)."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code
