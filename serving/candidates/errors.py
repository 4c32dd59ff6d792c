"""The error of a candidate job that is the user's to fix: its options or its output directory."""

from recsys.errors import UserError


class CandidatesError(UserError, ValueError):
    """Bad options or an output directory the job cannot use (bad input files raise
    :class:`recsys.data.errors.DataValidationError`; a bad export, :class:`serving.ExportError`)."""
