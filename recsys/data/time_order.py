"""Turning a time-or-order column into a sortable key, with a clear error for a bad value.

Accepted: integers (a Unix timestamp, or an order such as MovieLens' ``seq``), floats, dates and
datetimes, and strings holding any of those (CSV/TSV columns arrive as strings). A string column is
numeric when its first value parses as a number, otherwise a date/datetime in the format of its first
value; every other row must then parse the same way, or the first one that does not is reported.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from recsys.data.errors import DataValidationError
from recsys.data.readers import ROW, first_row_where

__all__ = ["parse_order_key", "parse_weight"]


def parse_order_key(path: str | Path, table: pl.DataFrame, column: str) -> pl.Series:
    """The column as an Int64 (integers, dates, datetimes) or Float64 key; ascending = later."""
    values = table[column]
    _reject_nulls(path, table, column, "time")
    dtype = values.dtype
    if dtype.is_integer():
        key = values.cast(pl.Int64)
    elif dtype.is_float():
        key = values.cast(pl.Float64)
    elif dtype in (pl.Date, pl.Datetime) or isinstance(dtype, pl.Datetime):
        key = values.cast(pl.Datetime("us")).cast(pl.Int64) if dtype == pl.Date else values.cast(pl.Int64)
    elif dtype == pl.String:
        key = _parse_strings(path, table, column)
    else:
        raise DataValidationError(path, f"time column {column!r} has type {dtype}; expected numbers, dates or datetimes")
    if key.dtype.is_float():
        bad = first_row_where(table.with_columns(key.alias("__key")), pl.col("__key").is_nan() | pl.col("__key").is_infinite())
        if bad is not None:
            raise DataValidationError(path, f"time column {column!r} has the value {bad[column]!r} at row {bad[ROW] + 1}")
    return key.alias("__time")


def parse_weight(path: str | Path, table: pl.DataFrame, column: str) -> pl.Series:
    """The weight column as Float64; nulls, NaN and text that is not a number are reported."""
    _reject_nulls(path, table, column, "weight")
    values = table[column]
    if values.dtype.is_numeric():
        weight = values.cast(pl.Float64)
    elif values.dtype == pl.String:
        weight = values.str.strip_chars().cast(pl.Float64, strict=False)
    else:
        raise DataValidationError(path, f"weight column {column!r} has type {values.dtype}; expected numbers")
    checked = table.with_columns(weight.alias("__weight"))
    bad = first_row_where(checked, pl.col("__weight").is_null() | pl.col("__weight").is_nan())
    if bad is not None:
        raise DataValidationError(path, f"weight column {column!r} has the value {bad[column]!r} at row {bad[ROW] + 1}; expected a number")
    return weight.alias("__weight")


def _reject_nulls(path: str | Path, table: pl.DataFrame, column: str, role: str) -> None:
    bad = first_row_where(table, pl.col(column).is_null())
    if bad is not None:
        raise DataValidationError(path, f"{role} column {column!r} is empty (null) at row {bad[ROW] + 1}")


def _parse_strings(path: str | Path, table: pl.DataFrame, column: str) -> pl.Series:
    text = table[column].str.strip_chars()
    first = text[0]
    if pl.Series([first]).cast(pl.Float64, strict=False)[0] is not None:
        parsed = text.cast(pl.Int64, strict=False)
        if parsed.null_count():
            parsed = text.cast(pl.Float64, strict=False)
        what = "a number"
    else:
        try:
            parsed = text.str.to_datetime(strict=False, time_unit="us")
        except pl.exceptions.PolarsError:
            parsed = pl.Series([None] * len(text), dtype=pl.Datetime("us"))
        if parsed[0] is None:
            row = table[ROW][0] + 1 if ROW in table.columns else 1  # a chunk of a streamed input starts past row 1
            raise DataValidationError(
                path, f"time column {column!r} has the value {table[column][0]!r} at row {row}, which is neither a number nor a date/time"
            )
        what = f"a date/time like {first!r}"
    checked = table.with_columns(parsed.alias("__parsed"))
    bad = first_row_where(checked, pl.col("__parsed").is_null())
    if bad is not None:
        raise DataValidationError(
            path, f"time column {column!r} has the value {bad[column]!r} at row {bad[ROW] + 1}, which is not {what}"
        )
    if parsed.dtype == pl.Float64 or parsed.dtype == pl.Int64:
        return parsed
    if isinstance(parsed.dtype, pl.Datetime) and parsed.dtype.time_zone is not None:
        parsed = parsed.dt.convert_time_zone("UTC")
    return parsed.cast(pl.Int64)
