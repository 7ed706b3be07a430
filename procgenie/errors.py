"""User-facing errors: the command line prints them as one line, without a traceback."""


class UserError(Exception):
    """A mistake the user can fix; the message names the problem and the fix."""
