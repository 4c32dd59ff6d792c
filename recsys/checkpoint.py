"""Reading a checkpoint safely: tensors and plain values only, never a pickled object's code.

``recsys.train`` (resume), ``MatryoshkaRecommender.from_checkpoint`` and ``recsys.export`` read
checkpoints through :func:`read_checkpoint`. Lightning is not imported here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from recsys.errors import UserError

__all__ = ["CheckpointError", "catalogue_of", "read_checkpoint"]


class CheckpointError(UserError, ValueError):
    """A checkpoint file that is missing, unreadable, or holds pickled objects (refused, never run)."""


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """A checkpoint's contents, loaded with ``weights_only=True``: tensors and plain values only.

    A file holding any other pickled object is refused before any of its code can run.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises several types for a file that is not a plain checkpoint
        detail = _load_failure(exc)
        if "Unsupported global" in detail:
            raise CheckpointError(
                f"{path}: refused: the checkpoint holds a pickled Python object ({detail}), and unpickling it "
                "could run code; only checkpoints of tensors and plain values are loaded"
            ) from None
        raise CheckpointError(f"{path}: not a readable checkpoint ({detail})") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint or "hyper_parameters" not in checkpoint:
        raise CheckpointError(f"{path}: not a checkpoint of this project (no state_dict and hyper_parameters)")
    return checkpoint


def _load_failure(exc: Exception) -> str:
    """The informative line of a ``torch.load`` error (its weights-only explanation is long)."""
    text = str(exc)
    marker = "WeightsUnpickler error:"
    if marker in text:
        rest = [line.strip() for line in text.split(marker, 1)[1].splitlines() if line.strip()]
        if rest:
            return rest[0].split(" was not an allowed global")[0].split(". Please")[0]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def catalogue_of(dataset) -> dict[str, Any]:
    """Original item ids (row order), training popularity and data stats of a prepared dataset."""
    return {
        "item_ids": [v.item() if hasattr(v, "item") else v for v in list(dataset.item_ids)[1:]],
        "popularity": [int(c) for c in list(dataset.train_counts)[1:]],
        "stats": json.loads(json.dumps(dataset.stats, default=str)),
    }
