"""Errors the user can fix: the CLI turns them into one line on stderr and exit status 2."""


class UserError(Exception):
    """Bad usage or bad input. The message says what is wrong and how to fix it."""
