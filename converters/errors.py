"""Errors the converter raises for problems in the user's input.

:class:`UserInputError` marks a problem the user can fix (a missing file, a
corrupted archive, NaN statistics, an unknown layer). The CLI prints its message
as one line on stderr and exits with status 2; any other exception is an internal
bug and keeps its traceback.
"""

from __future__ import annotations

import re

__all__ = ["UserInputError", "one_line", "strip_escape_codes"]

# Terminal control sequences: CSI (colours, bold: ``\x1b[1m``), OSC (titles,
# hyperlinks) and two-character escapes. Keras's error messages carry them.
_ESCAPE_CODES = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)|[@-Z\\-_])")


def strip_escape_codes(text: str) -> str:
    """``text`` without terminal escape sequences (and no stray ESC characters)."""
    return _ESCAPE_CODES.sub("", text).replace("\x1b", "")


def one_line(text: str) -> str:
    """``text`` as one line: escape codes removed, whitespace runs made single spaces."""
    return " ".join(strip_escape_codes(text).split())


class UserInputError(ValueError):
    """A problem with the user's input, reported as one line without traceback.

    The message is stored without terminal escape codes (an error from Keras
    quoted in it may carry them).
    """

    def __init__(self, *args: object) -> None:
        super().__init__(*(strip_escape_codes(a) if isinstance(a, str) else a for a in args))
