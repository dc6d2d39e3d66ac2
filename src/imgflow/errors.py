"""Errors the user can fix: the CLI turns them into one line on stderr and exit status 2."""


class UserError(Exception):
    """Bad usage or bad input. The message says what is wrong and how to fix it."""


class MalformedContent(UserError):
    """A file imgflow wrote holds a value of the wrong kind (damaged, hand-edited, another tool's).

    Raised by the checks in imgflow.fileio naming the field; the loader of the file re-raises it
    with the file's path and how to fix it. Unwrapped, it is still one line, not a traceback.
    """
