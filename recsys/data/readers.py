"""Reading user tables (CSV, TSV, parquet) lazily, with the checks every table needs.

CSV and TSV files are read with every column as a string: ids keep their exact spelling (``"007"``
stays ``"007"``), and the columns that carry numbers (times, weights) are parsed afterwards by code
that can say which row failed. An id column whose every value is the usual spelling of an integer
holds integer ids the file could not type (:func:`integer_spellings`): ``prepare`` and
``serving.candidates`` make it Int64. TSV is read with quoting off, because names in real TSV dumps (Last.fm
artists) contain bare quote characters. Parquet files keep their own types.

Both commands that read user tables use this module, so that one fault gets one message:
``python -m recsys.data prepare`` reads whole tables (:func:`read_columns`), ``python -m
serving.candidates`` streams an interaction log or a history table of any size in chunks
(:func:`scan_input`, :func:`check_input_schema`, :func:`checked_chunks`). Rows are reported 1-based,
counted over the whole input. A CSV or TSV file polars cannot parse is reported with the line at
fault, found by a second pass made only after the read failed (:mod:`recsys.data.bad_lines`).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import polars as pl

from recsys.data.bad_lines import find_bad_line
from recsys.data.errors import DataValidationError
from recsys.data.rows import ROW, first_row_where
from recsys.data.time_order import parse_order_key

__all__ = [
    "ROW", "ROW_HASH", "TABLE_EXTENSIONS", "scan_table", "scan_input", "input_files", "check_columns", "column_list",
    "read_columns", "check_id_column", "check_id_type", "check_input_schema", "checked_chunks", "reject_repeated_users",
    "unify_id_dtype", "is_text_table", "integer_spellings",
]

#: name of the hash-of-all-columns column (see :func:`read_columns`)
ROW_HASH = "__row_hash"
TABLE_EXTENSIONS = (".csv", ".tsv", ".parquet")


def existing_file(path: str | Path, extensions: tuple[str, ...], what: str = "file") -> tuple[Path, str]:
    """``(path, lower-case suffix)`` of an existing file with one of ``extensions``, else a clear error."""
    path = Path(path)
    suffix = path.suffix.lower()
    if not path.exists():  # first: a mistyped name is the likelier fault than a wrong format
        raise DataValidationError(path, "file not found")
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
    separator, quote = _text_dialect(path)
    return pl.scan_csv(path, separator=separator, quote_char=quote, infer_schema=False)


def _text_dialect(path: str | Path) -> tuple[str, str | None]:
    """``(separator, quote character)`` of a CSV or TSV file: TSV is read with quoting off."""
    return ("\t", None) if Path(path).suffix.lower() == ".tsv" else (",", '"')


def input_files(path: str | Path) -> list[Path]:
    """The ``.parquet`` files of a directory given as one input, in file-name order (the reading order)."""
    files = sorted(Path(path).glob("*.parquet"))
    if not files:
        raise DataValidationError(path, "directory holds no .parquet files")
    return files


def scan_input(path: str | Path) -> pl.LazyFrame:
    """:func:`scan_table`, or one lazy scan over a directory of ``.parquet`` files (:func:`input_files`)."""
    if Path(path).is_dir():
        return pl.scan_parquet(input_files(path))
    return scan_table(path)


def table_schema(path: str | Path, frame: pl.LazyFrame) -> pl.Schema:
    """The table's schema; an empty file or one polars cannot parse becomes a :class:`DataValidationError`."""
    try:
        return frame.collect_schema()
    except pl.exceptions.NoDataError:
        raise DataValidationError(path, "the file is empty") from None
    except (pl.exceptions.PolarsError, OSError) as exc:
        raise unreadable(path, exc) from None


def unreadable(path: str | Path, exc: BaseException) -> DataValidationError:
    """The error for a file polars could not read: for a CSV or TSV file, the line at fault (found by a
    second pass over the file, made only now that the read has failed), else polars' first line."""
    problem = None
    if is_text_table(path):
        separator, quote = _text_dialect(path)
        problem = find_bad_line(path, separator, quoting=quote is not None)
    return DataValidationError(path, f"cannot read the file: {problem or _first_line(exc)}")


def available_columns(path: str | Path, frame: pl.LazyFrame) -> list[str]:
    """The table's column names (see :func:`table_schema`)."""
    return table_schema(path, frame).names()


def check_columns(path: str | Path, frame: pl.LazyFrame, columns: list[tuple[str, str | None]], what: str) -> pl.Schema:
    """Every named column exists; ``columns`` pairs the option that named a column with the name.

    Returns the table's schema."""
    schema = table_schema(path, frame)
    names = schema.names()
    for option, column in columns:
        if column is not None and column not in names:
            raise DataValidationError(
                path, f"{what} has no column {column!r} (given by {option}); available columns: {column_list(names)}"
            )
    return schema


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
        raise unreadable(path, exc) from None
    if table.height == 0:
        raise DataValidationError(path, f"{what} has no rows")
    if is_text_table(path):
        reject_repeated_header(path, table, [c for c in table.columns if c not in (ROW, ROW_HASH)])
    return table


def is_text_table(path: str | Path) -> bool:
    """Whether the file is CSV or TSV: a table without types, whose columns are all read as text."""
    return Path(path).suffix.lower() in (".csv", ".tsv")


def integer_spellings(ids: pl.Series) -> bool:
    """True when ``ids`` is a non-empty text column whose every value is the usual decimal spelling
    of a 64-bit integer: ``"7"`` and ``"-3"``, never ``"007"``, ``"+7"``, ``" 7"``, ``"7.0"`` or ``"-0"``.

    Such a column read from CSV or TSV holds integer ids (the file could not say so): the readers of
    ``prepare`` and ``serving.candidates`` turn it into Int64, so that ids come back as integers.
    """
    if ids.dtype != pl.String or len(ids) == 0 or ids.null_count():
        return False
    as_int = ids.cast(pl.Int64, strict=False)
    return as_int.null_count() == 0 and bool((as_int.cast(pl.String) == ids).all())


def reject_repeated_header(path: str | Path, table: pl.DataFrame, columns: list[str]) -> None:
    """A text row that spells the column names again (files concatenated with their headers) is an error,
    not data: in an item table it would otherwise become an item called like the id column."""
    bad = first_row_where(table, pl.all_horizontal(pl.col(c) == c for c in columns))
    if bad is not None:
        raise DataValidationError(path, f"row {bad[ROW] + 1} repeats the header line ({', '.join(columns)}); were files concatenated?")


def check_id_type(path: str | Path, dtype: pl.DataType, column: str, role: str | None = None) -> None:
    """Ids must be integers or strings; ``role`` ("user", "item") names the column in the message."""
    if not (dtype.is_integer() or dtype == pl.String):
        raise DataValidationError(path, f"{role or 'id'} column {column!r} has type {dtype}; ids must be integers or strings")


def check_id_column(path: str | Path, table: pl.DataFrame, column: str, role: str | None = None) -> None:
    """Ids must be integers or strings and never null (nor blank text); ``role`` as in :func:`check_id_type`."""
    dtype = table.schema[column]
    check_id_type(path, dtype, column, role)
    named = f"{role} column" if role else "column"
    bad = first_row_where(table, pl.col(column).is_null())
    if bad is not None:
        raise DataValidationError(path, f"{named} {column!r} is empty (null id) at row {bad[ROW] + 1}")
    if dtype == pl.String:
        bad = first_row_where(table, pl.col(column).str.strip_chars() == "")
        if bad is not None:
            raise DataValidationError(path, f"{named} {column!r} has an empty id {bad[column]!r} at row {bad[ROW] + 1}")


# -- streaming an interaction log or a history table (serving.candidates) ---------------------------


def check_input_schema(
    path: str | Path,
    frame: pl.LazyFrame,
    columns: list[tuple[str, str | None]],
    what: str,
    ids: dict[str, str],
    lists: dict[str, str] | None = None,
) -> pl.Schema:
    """The checks a table's schema allows before any row is read; returns the schema.

    ``columns`` as in :func:`check_columns`; ``ids`` maps id columns to their role (``{"user_id":
    "user"}``), ``lists`` list columns of item ids to theirs (``{"history": "history"}``).
    """
    schema = check_columns(path, frame, columns, what)
    for column, role in ids.items():
        check_id_type(path, schema[column], column, role)
    for column, role in (lists or {}).items():
        dtype = schema[column]
        if not isinstance(dtype, pl.List) or not (dtype.inner.is_integer() or dtype.inner == pl.String):
            # floats, booleans or nested lists are never ids: no cast may turn 2.5 into item 2
            raise DataValidationError(
                path, f"{role} column {column!r} has type {dtype}; it must be a list of item ids (integers or strings)"
            )
    return schema


def checked_chunks(
    path: str | Path,
    frame: pl.LazyFrame,
    columns: list[str],
    what: str,
    ids: dict[str, str],
    lists: dict[str, str] | None = None,
    time_col: str | None = None,
    chunk_rows: int = 1_000_000,
) -> Iterator[pl.DataFrame]:
    """The named columns plus :data:`ROW` (0-based over the whole input), in validated chunks.

    Every row is checked as :func:`read_columns` and the interaction-log reader of ``prepare`` check
    it: a repeated header line (text files), null or blank ids (``ids``, as in
    :func:`check_id_column`), null item ids inside list columns (``lists``), an unparsable time; an
    input without rows is an error. Only one chunk is in memory at a time.
    """
    rows = 0
    try:
        for chunk in frame.select(columns).with_row_index(ROW).collect_batches(chunk_size=chunk_rows):
            if is_text_table(path):
                reject_repeated_header(path, chunk, columns)
            for column, role in ids.items():
                check_id_column(path, chunk, column, role)
            for column, role in (lists or {}).items():
                bad = first_row_where(chunk, pl.col(column).list.eval(pl.element().is_null()).list.any())
                if bad is not None:
                    raise DataValidationError(path, f"{role} column {column!r} holds a null item id at row {bad[ROW] + 1}")
            if time_col is not None:
                parse_order_key(path, chunk, time_col)  # raises on the first bad value
            rows += chunk.height
            yield chunk
    except DataValidationError:
        raise
    except (pl.exceptions.PolarsError, OSError) as exc:
        raise unreadable(path, exc) from None
    if rows == 0:
        raise DataValidationError(path, f"{what} has no rows")


def reject_repeated_users(path: str | Path, frame: pl.LazyFrame, user_col: str) -> None:
    """A history table gives each user one row: report the first user with two, and both rows."""
    repeated = frame.select(user_col).with_row_index(ROW).filter(pl.col(user_col).is_duplicated())
    first = repeated.sort(ROW).head(1).collect()
    if first.height:
        user = first[user_col][0]
        rows = repeated.filter(pl.col(user_col) == user).sort(ROW).head(2).collect()[ROW]
        raise DataValidationError(
            path,
            f"user {user!r} has more than one row in the history table "
            f"(rows {rows[0] + 1} and {rows[1] + 1}); give each user one history",
        )


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
