"""Turning a time-or-order column into a sortable key, with a clear error for a bad value.

Accepted: integers (a Unix timestamp, or an order such as MovieLens' ``seq``), floats, dates and
datetimes, and strings holding any of those (CSV/TSV columns arrive as strings). A string column is
numeric when its first value parses as a number, otherwise a date/datetime in the format of its first
value; every other row must then parse the same way, or the first one that does not is reported.

Integers are kept exactly (Int64). Times that can only be read as 64-bit floats (text with a decimal
point or an exponent, integers beyond Int64) keep their order as long as no two different times
become the same float; two that do (``10**25 + 1`` and ``10**25 + 2``) are refused, naming both rows.
"""

from __future__ import annotations

from decimal import Decimal, InvalidOperation
from pathlib import Path

import polars as pl

from recsys.data.errors import DataValidationError
from recsys.data.rows import ROW, first_row_where

__all__ = ["parse_order_key", "parse_weight"]

INT64_MAX = 2**63 - 1
#: float64 keeps every decimal number of this many significant digits apart (C's DBL_DIG)
DIGITS_FLOAT64_KEEPS = 15


def parse_order_key(path: str | Path, table: pl.DataFrame, column: str) -> pl.Series:
    """The column as an Int64 (integers, dates, datetimes) or Float64 key; ascending = later."""
    values = table[column]
    _reject_nulls(path, table, column, "time")
    dtype = values.dtype
    if dtype.is_integer():
        key = _integer_key(values)
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
        if not dtype.is_float():  # read from text or from integers beyond Int64: reading may have merged values
            _reject_merged_values(path, table, column, key)
    return key.alias("__time")


def _integer_key(values: pl.Series) -> pl.Series:
    """Integers as Int64, exactly; unsigned ones beyond Int64 as Float64 (see :func:`_reject_merged_values`)."""
    if values.dtype == pl.UInt64 and values.max() > INT64_MAX:
        return values.cast(pl.Float64)
    return values.cast(pl.Int64)


def _reject_merged_values(path: str | Path, table: pl.DataFrame, column: str, key: pl.Series) -> None:
    """Refuse two different times that read as one 64-bit float (such as 10**25 + 1 and 10**25 + 2):
    their events would tie, and their order would be lost. Rounding to float keeps every other order."""
    if not _may_merge(table[column]) or key.n_unique() == len(key):
        return  # no two rows share a float
    frame = pl.DataFrame([table[column].alias("value"), key.alias("key"), table[ROW]]).filter(pl.col("key").is_duplicated())
    if frame["value"].n_unique() == frame["key"].n_unique():
        return  # no two spellings share a float
    spellings = (
        frame.group_by("value").agg(pl.col("key").first(), pl.col(ROW).min())
        .filter(pl.col("key").is_duplicated()).sort(ROW)
    )
    first_of_key: dict[float, tuple] = {}
    for value, key_value, row in spellings.iter_rows():
        exact = _exact_number(value)
        seen = first_of_key.setdefault(key_value, (exact, value, row))
        if seen[0] != exact:
            raise DataValidationError(
                path, f"time column {column!r} has the values {seen[1]!r} (row {seen[2] + 1}) and {value!r} (row {row + 1}), "
                "which differ but read as the same 64-bit float, so their order would be lost; give times with fewer digits"
            )


def _may_merge(values: pl.Series) -> bool:
    """Whether two of the values could read as one float64: float64 tells apart any two numbers of at
    most 15 significant digits, so text of at most 15 characters never merges (a cheap first test)."""
    return values.dtype != pl.String or values.str.len_bytes().max() > DIGITS_FLOAT64_KEEPS


def _exact_number(value: int | str) -> int | Decimal | str:
    """The exact number a time spells (so that "5" and "5.0" are one time); text Decimal cannot read stays text."""
    if isinstance(value, int):
        return value
    try:
        return Decimal(value)
    except InvalidOperation:
        return value


def parse_weight(path: str | Path, table: pl.DataFrame, column: str) -> pl.Series:
    """The weight column as Float64; nulls, NaN, text that is not a number, infinities and negative
    weights are reported."""
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
    bad = first_row_where(checked, pl.col("__weight").is_infinite() | (pl.col("__weight") < 0))
    if bad is not None:
        raise DataValidationError(
            path, f"weight column {column!r} has the value {bad[column]!r} at row {bad[ROW] + 1}; weights must be finite and 0 or more"
        )
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
