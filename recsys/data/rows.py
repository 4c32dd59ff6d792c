"""Row numbers of user tables: the column every reader adds, and the first row a check fails on.

Below both the table readers (:mod:`recsys.data.readers`) and the column parsers
(:mod:`recsys.data.time_order`), which report a bad value by its 1-based row.
"""

from __future__ import annotations

import polars as pl

__all__ = ["ROW", "first_row_where"]

#: name of the 0-based row-number column added to every table read here (rows are reported 1-based)
ROW = "__row"


def first_row_where(table: pl.DataFrame, condition: pl.Expr) -> dict | None:
    """The first row (as a dict, with its 0-based :data:`ROW`) where ``condition`` holds, or None."""
    hit = table.filter(condition).head(1)
    return None if hit.height == 0 else hit.row(0, named=True)
