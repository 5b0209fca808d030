"""Errors the converter raises for problems in the user's input.

:class:`UserInputError` marks a problem the user can fix (a missing file, a
corrupted archive, NaN statistics, an unknown layer). The CLI prints its message
as one line on stderr and exits with status 2; any other exception is an internal
bug and keeps its traceback.
"""


class UserInputError(ValueError):
    """A problem with the user's input, reported as one line without traceback."""
