"""The one exception the data pipeline raises for bad user input.

Every message names the file and the column, row or value at fault, so that a user can fix the
input without reading a traceback; the CLI prints it as a single line and exits with status 2.
"""

from __future__ import annotations

from pathlib import Path

from recsys.errors import UserError


class DataValidationError(UserError, ValueError):
    """Bad input data or options: a missing column, a null id, an unparsable time, ...

    ``source`` is the file (or option) at fault; it is put in front of the message.
    """

    def __init__(self, source: str | Path | None, problem: str) -> None:
        self.source = None if source is None else str(source)
        self.problem = problem
        super().__init__(problem if source is None else f"{source}: {problem}")
