"""Item features for the item tower: text vectors, precomputed vectors and categorical bags.

Rows follow the item vocabulary (row 0 = padding, rows 1..N = the catalogue). An item with no value
for a feature (no text, no vector in the file, not in the item table at all) gets zeros and ``False``
in the feature's mask, or an empty bag.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import polars as pl
import torch

from recsys.data.text_encoding import encode_texts
from recsys.data.vectors import ItemVectors
from recsys.item_features import CategoricalBag, ItemFeatures

__all__ = ["build_item_features", "item_texts", "category_bag", "vector_feature"]

log = logging.getLogger(__name__)

TEXT_SEPARATOR = ", "


def build_item_features(
    catalogue: pl.DataFrame,
    in_training: np.ndarray,
    *,
    text_cols: list[str] | None = None,
    text_model: str | None = None,
    cache_dir: str | Path | None = None,
    category_cols: list[str] | None = None,
    category_sep: str = "|",
    vectors: dict[str, ItemVectors] | None = None,
) -> tuple[ItemFeatures, dict, dict[str, list[str]]]:
    """``(features, summary for stats.json, category vocabularies)`` for a catalogue in index order.

    ``catalogue`` has one row per item index 1..N, in order, with ``item_id`` and the item-table
    columns (null where an item is missing from the item table).
    """
    num_items = catalogue.height
    dense: dict[str, torch.Tensor] = {}
    masks: dict[str, torch.Tensor] = {}
    summary: dict = {"dense": {}, "bags": {}}
    if text_cols:
        texts = item_texts(catalogue, text_cols)
        has_text = texts.is_not_null().to_numpy()
        encoded, from_cache = encode_texts(texts.drop_nulls().to_list(), text_model, cache_dir)
        matrix = np.zeros((num_items + 1, encoded.shape[1]), dtype=np.float32)
        matrix[1:][has_text] = encoded
        dense["text"], masks["text"] = torch.from_numpy(matrix), torch.from_numpy(np.concatenate([[False], has_text]))
        summary["dense"]["text"] = {
            "dim": int(encoded.shape[1]), "items_with_value": int(has_text.sum()), "columns": text_cols, "from_cache": from_cache,
        }
    for name, item_vectors in (vectors or {}).items():
        matrix, mask, unmatched = vector_feature(catalogue["item_id"], item_vectors)
        dense[name], masks[name] = torch.from_numpy(matrix), torch.from_numpy(mask)
        summary["dense"][name] = {
            "dim": int(matrix.shape[1]), "items_with_value": int(mask.sum()), "ids_not_in_catalogue": unmatched,
            "file": item_vectors.path.name,
        }
        if unmatched:
            log.warning("%s: %d vector ids are not in the catalogue and were ignored", item_vectors.path, unmatched)
    bags: dict[str, CategoricalBag] = {}
    vocabularies: dict[str, list[str]] = {}
    for column in category_cols or []:
        bags[column], vocabularies[column] = category_bag(catalogue[column], category_sep)
        summary["bags"][column] = {
            "vocab_size": bags[column].vocab_size,
            "items_with_value": int((bags[column].offsets.diff() > 0).sum()),
        }
    features = ItemFeatures(
        num_items=num_items, dense=dense, dense_mask=masks, bags=bags, in_training=torch.from_numpy(in_training)
    )
    return features, summary, vocabularies


def item_texts(catalogue: pl.DataFrame, text_cols: list[str]) -> pl.Series:
    """One string per item: the non-empty text columns joined by ", " (null when all are empty)."""
    parts = [pl.col(c).cast(pl.String).str.strip_chars().replace("", None) for c in text_cols]
    return catalogue.select(pl.concat_str(parts, separator=TEXT_SEPARATOR, ignore_nulls=True).replace("", None).alias("text"))["text"]


def vector_feature(catalogue_ids: pl.Series, item_vectors: ItemVectors) -> tuple[np.ndarray, np.ndarray, int]:
    """``(matrix (N+1, dim), mask (N+1,), number of file ids not in the catalogue)``."""
    rows = pl.DataFrame({"item_id": item_vectors.ids, "__k": np.arange(len(item_vectors.ids))}).join(
        pl.DataFrame({"item_id": catalogue_ids, "__index": np.arange(1, len(catalogue_ids) + 1)}), on="item_id", how="left"
    )
    matched = rows.filter(pl.col("__index").is_not_null())
    matrix = np.zeros((len(catalogue_ids) + 1, item_vectors.vectors.shape[1]), dtype=np.float32)
    mask = np.zeros(len(catalogue_ids) + 1, dtype=bool)
    index = matched["__index"].to_numpy()
    matrix[index] = item_vectors.vectors[matched["__k"].to_numpy()]
    mask[index] = True
    return matrix, mask, rows.height - matched.height


def category_bag(values: pl.Series, separator: str) -> tuple[CategoricalBag, list[str]]:
    """A multi-valued column (``"a|b|c"`` strings, or lists) as a bag over a sorted vocabulary.

    Values are stripped of surrounding spaces; empty values and repeats within one item are dropped.
    """
    lists = values.cast(pl.List(pl.String)) if isinstance(values.dtype, (pl.List, pl.Array)) else values.cast(pl.String).str.split(separator)
    exploded = (
        pl.DataFrame({"__index": np.arange(1, len(values) + 1), "value": lists})
        .explode("value")
        .with_columns(pl.col("value").str.strip_chars())
        .filter(pl.col("value").is_not_null() & (pl.col("value") != ""))
        .unique(subset=["__index", "value"], keep="first", maintain_order=True)
    )
    vocabulary = exploded["value"].unique().sort().to_list()
    codes = exploded["value"].replace_strict(vocabulary, list(range(len(vocabulary))), return_dtype=pl.Int64)
    counts = np.bincount(exploded["__index"].to_numpy(), minlength=len(values) + 1)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    bag = CategoricalBag(torch.from_numpy(codes.to_numpy().copy()), torch.from_numpy(offsets.astype(np.int64)), max(len(vocabulary), 1))
    return bag, vocabulary
