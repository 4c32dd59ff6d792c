"""The one base class of the errors a user can fix: bad input, bad settings, a bad file or place.

Every command catches :class:`UserError` (and nothing broader), prints its message as one line and
exits with status 2; any other exception is a defect of ours and keeps its traceback. This module
imports nothing, so the lowest layers (``recsys.nn``, ``serving``) can raise its subclasses.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

__all__ = ["UserError", "exit_code_of"]


class UserError(Exception):
    """An error the user can fix; its message names the file, column, row, option or value at fault."""


def exit_code_of(command: Callable[[], object]) -> int:
    """Run ``command``: 0 when it returns, 2 (after one ``error: ...`` line on stderr) on a :class:`UserError`."""
    try:
        command()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
