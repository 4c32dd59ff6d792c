"""The one base class of the errors a user can fix: bad input, bad settings, a bad file or place.

Every command catches :class:`UserError` (and nothing broader), prints its message as one line and
exits with status 2; any other exception is a defect of ours and keeps its traceback. A run stopped
by a signal (:class:`Interrupted`: SIGTERM, Ctrl-C) prints its one line too, and exits with the
shell's status for that signal, 128 + its number (143 for SIGTERM, 130 for SIGINT). This module
imports nothing, so the lowest layers (``recsys.nn``, ``serving``) can raise its subclasses.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

__all__ = ["Interrupted", "UserError", "exit_code_of"]


class UserError(Exception):
    """An error the user can fix; its message names the file, column, row, option or value at fault."""


class Interrupted(BaseException):
    """A command stopped by the signal ``signum``; the message says what was kept and how to go on.

    A ``BaseException``, as ``KeyboardInterrupt`` is, so that no ``except Exception`` swallows it
    on its way out.
    """

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum = int(signum)


def exit_code_of(command: Callable[[], object]) -> int:
    """Run ``command``: 0 when it returns, 2 (after one ``error: ...`` line on stderr) on a
    :class:`UserError`, 128 + the signal's number (after its one line) when :class:`Interrupted`."""
    try:
        command()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Interrupted as exc:
        print(exc, file=sys.stderr)
        return 128 + exc.signum
    return 0
