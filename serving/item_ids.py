"""Which input ids name which items of an export's catalogue: one rule for ``serving.load``'s
``recommend``, the batch job ``serving.candidates`` and the REST endpoint ``serving.rest``.

An id names an item when it *is* one of the catalogue's ids:

- only integers and text are ids. Floats (``2.0``, ``2.5``), booleans, null and anything else name
  no item, although Python says ``True == 1`` and ``2.0 == 2``: no cast turns them into an item;
- an integer and its usual decimal spelling are the same id, in both directions: the text ``"7"``
  names item ``7`` of an integer catalogue, and the integer ``7`` names item ``"7"`` of a text
  catalogue. ``"007"``, ``"+7"``, ``" 7"``, ``"7.0"`` and ``"-0"`` are not usual spellings and
  name nothing in an integer catalogue. This one conversion exists because CSV and TSV files carry
  no types (every id arrives as text) and JSON clients often send ids as strings;
- nothing else: no trimming, no case folding, no rounding.

Ids that name no item are *unknown*; each caller says what happens to them (an error, skipped and
counted, reported in the response).

The other way, from items to ids: answers (``recommend``, the REST responses, the ``item_id``
column of candidate files) give each item its catalogue id, of the catalogue's type, whatever type
the request used: integers for a catalogue of integer ids, text for one of text ids. The catalogue
is the export's ``items.parquet``, whose ``item_id`` column has the type ``prepare`` gave the ids:
the type of the user's parquet files, and for CSV and TSV files (which have no types) integers
when every id is the usual spelling of an integer, text otherwise (one ``"007"`` keeps them all
text). Exports made before ``prepare`` read CSV and TSV ids so hold text ids, and answer with text.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import polars as pl

__all__ = ["ItemLookup", "id_column"]


def id_column(values: Iterable[Any]) -> pl.Series:
    """Python values (a history, a request's ids) as one text column for :meth:`ItemLookup.rows`:
    text as it is, an integer (not a boolean) as its decimal spelling, anything else null."""
    return pl.Series(
        [
            value if isinstance(value, str)
            else str(value) if isinstance(value, (int, np.integer)) and not isinstance(value, bool)
            else None
            for value in values
        ],
        dtype=pl.String,
    )


class ItemLookup:
    """Item rows (1..N, in catalogue order) of ids, by the rule of this module.

    The catalogue's ids are kept sorted, and ids are found by binary search, so a lookup costs
    ``O(m log N)`` for ``m`` ids, with nothing built per call.
    """

    def __init__(self, item_ids: pl.Series):
        # integer catalogues compare as Int64 where every id fits; otherwise (text, or unsigned ids
        # beyond Int64) as text, where an integer's key is its decimal spelling
        keys = item_ids.cast(pl.Int64, strict=False) if item_ids.dtype.is_integer() else item_ids.cast(pl.String)
        if keys.null_count() > item_ids.null_count():
            keys = item_ids.cast(pl.String)
        order = keys.arg_sort()
        self._sorted = keys.gather(order)
        self._rows = (order.cast(pl.Int64) + 1).rename("row")

    def _keys(self, ids: pl.Series) -> pl.Series:
        """``ids`` in the catalogue's key type; null where an id cannot be one of the catalogue's."""
        key_type = self._sorted.dtype
        if not (ids.dtype.is_integer() or ids.dtype == pl.String):
            return pl.Series(ids.name, [None] * len(ids), dtype=key_type)
        if key_type == pl.String or ids.dtype.is_integer():
            return ids.cast(key_type, strict=False)  # integers beyond Int64 become null: no such item
        as_int = ids.cast(pl.Int64, strict=False)
        return as_int.set((as_int.cast(pl.String) != ids).fill_null(False), None)  # only the usual spelling of an integer

    def rows(self, ids: pl.Series) -> pl.Series:
        """The item row of each id (Int64), null where the id names no item."""
        keys = self._keys(ids)
        at = self._sorted.search_sorted(keys).clip(upper_bound=len(self._sorted) - 1)
        found = (self._sorted.gather(at) == keys).fill_null(False)
        return self._rows.gather(at).set(~found, None)
