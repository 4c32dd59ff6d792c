"""Exports whose catalogue came from a CSV or TSV log through ``prepare`` (issue 32: ids keep the type
they had in the user's files), shared by tests/test_export.py, test_rest.py and test_candidates.py."""

from __future__ import annotations

from pathlib import Path

import torch

from recsys.data import load_prepared, prepare
from recsys.checkpoint import catalogue_of
from recsys.model import MatryoshkaRecommender
from recsys.export import export_sizes

#: integer item ids whose text order ("10" < "1000" < "105" < "2") is not their numeric order
INT_ITEMS = [2, 7, 10, 33, 105, 1000]
INT_USERS = [1, 2, 3, 4, 5, 6]


def write_log(path: Path, items: list | None = None) -> Path:
    """A log of six users with integer ids as CSV or TSV (by the suffix), every user with 4 items."""
    items = INT_ITEMS if items is None else items
    separator = "\t" if path.suffix == ".tsv" else ","
    lines = [separator.join(["user_id", "item_id", "timestamp"])]
    for n, user in enumerate(INT_USERS):
        for t in range(4):
            lines.append(separator.join([str(user), str(items[(n + 2 * t) % len(items)]), str(100 * n + t)]))
    path.write_text("\n".join(lines) + "\n")
    return path


def export_of_log(log: Path, directory: Path, **options) -> Path:
    """``prepare`` the log, build an untrained model on it with its catalogue, export it at size 16."""
    prepared = prepare(log, directory / "prepared", min_count=0, cache_dir=None, **options)
    data = load_prepared(prepared)
    torch.manual_seed(0)
    model = MatryoshkaRecommender(item_features=data.item_features, sizes=[8, 16], max_len=10, use_id_embedding=True).eval()
    checkpoint = directory / "model.ckpt"
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams), "catalogue": catalogue_of(data)},
               checkpoint)
    (path,) = export_sizes(checkpoint, [16], directory / "exports")
    return path
