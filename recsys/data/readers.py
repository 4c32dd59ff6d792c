"""Reading user tables (CSV, TSV, parquet) lazily, with the checks every table needs.

CSV and TSV files are read with every column as a string: ids keep their exact spelling (``"007"``
stays ``"007"``), and the columns that carry numbers (times, weights) are parsed afterwards by code
that can say which row failed. TSV is read with quoting off, because names in real TSV dumps (Last.fm
artists) contain bare quote characters. Parquet files keep their own types.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from recsys.data.errors import DataValidationError

__all__ = [
    "ROW", "ROW_HASH", "TABLE_EXTENSIONS", "scan_table", "check_columns", "column_list", "read_columns", "check_id_column",
    "unify_id_dtype",
]

#: name of the 0-based row-number column added to every table read here (rows are reported 1-based)
ROW = "__row"
#: name of the hash-of-all-columns column (see :func:`read_columns`)
ROW_HASH = "__row_hash"
TABLE_EXTENSIONS = (".csv", ".tsv", ".parquet")


def existing_file(path: str | Path, extensions: tuple[str, ...], what: str = "file") -> tuple[Path, str]:
    """``(path, lower-case suffix)`` of an existing file with one of ``extensions``, else a clear error."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in extensions:
        raise DataValidationError(path, f"unknown {what} extension {suffix!r}; expected one of {', '.join(extensions)}")
    if not path.is_file():
        raise DataValidationError(path, "file not found")
    return path, suffix


def scan_table(path: str | Path) -> pl.LazyFrame:
    """A lazy scan of a CSV/TSV/parquet file, chosen by its extension."""
    path, suffix = existing_file(path, TABLE_EXTENSIONS)
    if suffix == ".parquet":
        return pl.scan_parquet(path)
    separator = "\t" if suffix == ".tsv" else ","
    quote = None if suffix == ".tsv" else '"'
    return pl.scan_csv(path, separator=separator, quote_char=quote, infer_schema=False)


def available_columns(path: str | Path, frame: pl.LazyFrame) -> list[str]:
    """The table's column names; a file polars cannot parse becomes a :class:`DataValidationError`."""
    try:
        return frame.collect_schema().names()
    except (pl.exceptions.PolarsError, OSError) as exc:
        raise DataValidationError(path, f"cannot read the file: {_first_line(exc)}") from None


def check_columns(path: str | Path, frame: pl.LazyFrame, columns: list[tuple[str, str | None]], what: str) -> None:
    """Every named column exists; ``columns`` pairs the option that named a column with the name."""
    names = available_columns(path, frame)
    for option, column in columns:
        if column is not None and column not in names:
            raise DataValidationError(
                path, f"{what} has no column {column!r} (given by {option}); available columns: {column_list(names)}"
            )


def column_list(names: list[str], limit: int = 20) -> str:
    """Column names for a message: quoted when they hold spaces at the ends or unprintable characters
    (``'user_id '``, a binary file's "header"), at most ``limit`` of them."""
    shown = [n if n.isprintable() and n == n.strip() and n else repr(n) for n in names[:limit]]
    more = f", ... ({len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(shown) + more


def read_columns(path: str | Path, columns: list[tuple[str, str | None]], what: str, row_hash: bool = False) -> pl.DataFrame:
    """Read the named columns (plus a row-number column :data:`ROW`) of a table, eagerly.

    ``columns`` pairs the option that named a column (for the error message, e.g. ``"--user-col"``)
    with the column name; ``None`` names are skipped. With ``row_hash``, a column :data:`ROW_HASH`
    holds a hash of *all* the file's columns, so exact duplicate rows can be found without keeping
    the columns the pipeline does not use. Raises when the file is missing, has an unknown
    extension, lacks a column (listing the ones it has) or has no rows.
    """
    frame = scan_table(path)
    check_columns(path, frame, columns, what)
    wanted: list[pl.Expr] = [pl.col(c) for c in dict.fromkeys(column for _, column in columns if column is not None)]
    if row_hash:
        wanted.append(pl.struct(pl.all()).hash(seed=0).alias(ROW_HASH))
    try:
        table = frame.select(wanted).with_row_index(ROW).collect()
    except (pl.exceptions.PolarsError, OSError) as exc:
        raise DataValidationError(path, f"cannot read the file: {_first_line(exc)}") from None
    if table.height == 0:
        raise DataValidationError(path, f"{what} has no rows")
    if Path(path).suffix.lower() != ".parquet":
        _reject_repeated_header(path, table, [c for c in table.columns if c not in (ROW, ROW_HASH)])
    return table


def _reject_repeated_header(path: str | Path, table: pl.DataFrame, columns: list[str]) -> None:
    """A text row that spells the column names again (files concatenated with their headers) is an error,
    not data: in an item table it would otherwise become an item called like the id column."""
    bad = first_row_where(table, pl.all_horizontal(pl.col(c) == c for c in columns))
    if bad is not None:
        raise DataValidationError(path, f"row {bad[ROW] + 1} repeats the header line ({', '.join(columns)}); were files concatenated?")


def first_row_where(table: pl.DataFrame, condition: pl.Expr) -> dict | None:
    """The first row (as a dict, with its 0-based :data:`ROW`) where ``condition`` holds, or None."""
    hit = table.filter(condition).head(1)
    return None if hit.height == 0 else hit.row(0, named=True)


def check_id_column(path: str | Path, table: pl.DataFrame, column: str) -> None:
    """Ids must be integers or strings and never null."""
    dtype = table.schema[column]
    if not (dtype.is_integer() or dtype == pl.String):
        raise DataValidationError(path, f"id column {column!r} has type {dtype}; ids must be integers or strings")
    bad = first_row_where(table, pl.col(column).is_null())
    if bad is not None:
        raise DataValidationError(path, f"column {column!r} is empty (null id) at row {bad[ROW] + 1}")
    if dtype == pl.String:
        bad = first_row_where(table, pl.col(column).str.strip_chars() == "")
        if bad is not None:
            raise DataValidationError(path, f"column {column!r} has an empty id {bad[column]!r} at row {bad[ROW] + 1}")


def unify_id_dtype(id_columns: list[pl.Series]) -> pl.DataType:
    """One id type for tables that must be matched on ids (interaction log, item table, vectors).

    One type everywhere: that type. Integers everywhere: Int64. A mix is compared as strings; the
    integer type is kept only when every string id is the canonical spelling of an integer (so
    ``"7"`` matches ``7``, while ``"007"`` forces string ids, because as a string it is not ``"7"``)
    and every integer fits Int64 (unsigned ids above 2**63 - 1 are compared as strings too).
    """
    dtypes = [ids.dtype for ids in id_columns]
    if all(d == dtypes[0] for d in dtypes):
        return dtypes[0]
    for ids in id_columns:
        as_int = ids.cast(pl.Int64, strict=False)
        if as_int.null_count() > ids.null_count():  # text, or unsigned integers beyond Int64
            return pl.String
        if ids.dtype == pl.String and not (as_int.cast(pl.String) == ids).all():
            return pl.String
    return pl.Int64


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
