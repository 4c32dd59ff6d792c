"""Reading precomputed item vectors (image embeddings, ...) keyed by item id.

Two formats: a parquet file with an id column and one list/array column holding the vector, or an
``.npz`` file with the arrays ``ids`` (integers or strings) and ``vectors`` (2-D floats). Every vector
must have the same length (at least 1) and real, finite values that float32 can hold (what training
reads), and every id must occur once; a failure names the id.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from recsys.data.errors import DataValidationError
from recsys.data.readers import available_columns, check_id_column, column_list, existing_file, scan_table
from recsys.data.rows import ROW, first_row_where

__all__ = ["ItemVectors", "read_item_vectors"]

VECTOR_EXTENSIONS = (".parquet", ".npz")


@dataclass
class ItemVectors:
    """One vector per item id: ``vectors[k]`` belongs to ``ids[k]``."""

    path: Path
    ids: pl.Series
    vectors: np.ndarray  # float32 (n, dim)


def read_item_vectors(path: str | Path, id_columns: list[str]) -> ItemVectors:
    """Read and check a vector file; ``id_columns`` are the names tried, in order, for the id column."""
    path, suffix = existing_file(path, VECTOR_EXTENSIONS, what="vector file")
    ids, vectors = _read_npz(path) if suffix == ".npz" else _read_parquet(path, id_columns)
    if len(ids) == 0:
        raise DataValidationError(path, "has no vectors")
    finite = np.isfinite(vectors).all(axis=1)
    if not finite.all():
        raise DataValidationError(path, f"the vector of id {ids[int(np.argmin(finite))]!r} contains NaN or infinite values")
    duplicated = ids.is_duplicated()
    if duplicated.any():
        raise DataValidationError(path, f"id {ids.filter(duplicated)[0]!r} has more than one vector")
    return ItemVectors(path, ids, _as_float32(path, ids, vectors))


def _as_float32(path: Path, ids: pl.Series, vectors: np.ndarray) -> np.ndarray:
    """The finite vectors as float32, which training reads; a value beyond float32's range (it would
    become infinite, and training would refuse the prepared feature) is refused here, naming its id and row."""
    with np.errstate(over="ignore"):
        narrow = vectors.astype(np.float32, copy=False)
    fits = np.isfinite(narrow).all(axis=1)
    if not fits.all():
        k = int(np.argmin(fits))
        value = vectors[k][~np.isfinite(narrow[k])][0]
        raise DataValidationError(
            path, f"the vector of id {ids[k]!r} (row {k + 1}) holds {value:g}, beyond the float32 range "
            f"(±{float(np.finfo(np.float32).max):.4g}) that training reads; it would become infinite"
        )
    return narrow


def _read_npz(path: Path) -> tuple[pl.Series, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as arrays:
            missing = [k for k in ("ids", "vectors") if k not in arrays.files]
            if missing:
                raise DataValidationError(path, f"has no array {missing[0]!r}; arrays found: {', '.join(arrays.files)}")
            ids, vectors = _npz_array(path, arrays, "ids"), _npz_array(path, arrays, "vectors")
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        if isinstance(exc, DataValidationError):
            raise
        raise DataValidationError(path, f"cannot read the file: {exc}") from None
    if ids.ndim != 1 or vectors.ndim != 2 or len(ids) != len(vectors):
        raise DataValidationError(path, f"expected 'ids' of shape (n,) and 'vectors' of shape (n, dim), got {ids.shape} and {vectors.shape}")
    if not (np.issubdtype(ids.dtype, np.integer) or ids.dtype.kind == "U"):
        raise DataValidationError(path, f"'ids' has dtype {ids.dtype}; ids must be integers or strings")
    if not np.issubdtype(vectors.dtype, np.number):
        raise DataValidationError(path, f"'vectors' has dtype {vectors.dtype}; expected numbers")
    if np.issubdtype(vectors.dtype, np.complexfloating):
        raise DataValidationError(path, f"'vectors' has dtype {vectors.dtype}; expected real numbers (the imaginary parts would be lost)")
    if len(ids) and vectors.shape[1] == 0:
        raise DataValidationError(path, f"'vectors' has shape {vectors.shape}: every vector is empty (width 0)")
    series = pl.Series("item_id", ids) if ids.dtype.kind in "iu" else pl.Series("item_id", ids.tolist(), dtype=pl.String)
    return series, vectors.astype(np.float64)


def _npz_array(path: Path, arrays, name: str) -> np.ndarray:
    try:
        return arrays[name]
    except ValueError as exc:
        if "allow_pickle" not in str(exc):
            raise
        raise DataValidationError(
            path, f"array {name!r} is an object array, which is stored pickled and is not loaded; "
            "save ids as integers or plain strings and vectors as one 2-D float array"
        ) from None


def _read_parquet(path: Path, id_columns: list[str]) -> tuple[pl.Series, np.ndarray]:
    frame = scan_table(path)
    available_columns(path, frame)  # a file polars cannot parse fails here, with its name
    schema = frame.collect_schema()
    vector_columns = [c for c, t in schema.items() if isinstance(t, (pl.List, pl.Array))]
    if len(vector_columns) != 1:
        raise DataValidationError(
            path, f"expected exactly one list/array column holding the vectors, found {len(vector_columns)} among: {column_list(schema.names())}"
        )
    vector_column = vector_columns[0]
    others = [c for c in schema if c != vector_column]
    id_column = next((c for c in id_columns if c in others), others[0] if len(others) == 1 else None)
    if id_column is None:
        raise DataValidationError(
            path, f"no id column: expected one of {', '.join(dict.fromkeys(id_columns))}; available columns: {column_list(schema.names())}"
        )
    table = frame.select(id_column, vector_column).with_row_index(ROW).collect()
    if table.height == 0:
        raise DataValidationError(path, "has no vectors")
    check_id_column(path, table, id_column)
    vector_values = table[vector_column]
    if isinstance(vector_values.dtype, pl.Array):
        vector_values = vector_values.arr.to_list()
    if not vector_values.dtype.inner.is_numeric():
        raise DataValidationError(path, f"vector column {vector_column!r} holds {vector_values.dtype.inner}, not numbers")
    lengths = vector_values.list.len()
    checked = table.with_columns(lengths.alias("__len"), vector_values.list.eval(pl.element().is_null()).list.any().alias("__null"))
    bad = first_row_where(checked, pl.col("__len").is_null())
    if bad is not None:
        raise DataValidationError(path, f"id {bad[id_column]!r} (row {bad[ROW] + 1}) has no vector (null)")
    dim = int(lengths[0])
    if dim == 0:
        raise DataValidationError(path, f"id {table[id_column][0]!r} (row 1) has an empty vector")
    bad = first_row_where(checked, pl.col("__len") != dim)
    if bad is not None:
        raise DataValidationError(
            path, f"id {bad[id_column]!r} (row {bad[ROW] + 1}) has a vector of length {bad['__len']}, the first one has {dim}"
        )
    bad = first_row_where(checked, pl.col("__null"))
    if bad is not None:
        raise DataValidationError(path, f"the vector of id {bad[id_column]!r} contains NaN or missing values")
    matrix = vector_values.explode().cast(pl.Float64).to_numpy().reshape(len(table), dim)
    return table[id_column].alias("item_id"), matrix
