"""Training and evaluation batches built from the flat histories with vectorised numpy, no per-row Python.

Both datasets here are indexed by *lists* of indices (``__getitems__``): a ``BatchSampler`` hands one
list per batch, and the whole batch is gathered at once from the flat ``seq_items`` array.

Training windows. For next-item prediction every position of a user's training part (everything
but the last two events) is a target, except the first. A training part longer than ``max_len + 1``
is cut into windows from its end backwards in steps of ``max_len``, so each training target appears
in exactly one window per epoch and the most recent context is always a full window.

Sequence length. A batch is as long as its longest input (at most ``max_len``) unless
``pad_to_max_len``, which always gives ``max_len`` columns (fixed shapes, e.g. for compiled models).
Inputs are left-padded with 0, so the last column is always the most recent item.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch

__all__ = ["TrainWindows", "HeldOutTargets", "pass_through"]


def pass_through(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The DataLoader ``collate_fn``: batches are already complete (a module-level function, so picklable)."""
    return batch


def _gather_left_padded(seq_items: np.ndarray, starts: np.ndarray, ends: np.ndarray, width: int) -> np.ndarray:
    """Rows ``seq_items[starts[i]:ends[i]]``, right-aligned in ``width`` columns, 0 on the left.

    Rows longer than ``width`` keep their last ``width`` items.
    """
    positions = ends[:, None] - width + np.arange(width)[None, :]
    valid = positions >= starts[:, None]
    return np.where(valid, seq_items[np.maximum(positions, 0)], 0).astype(np.int64)


class TrainWindows:
    """Next-item training windows over every user's training part.

    A window is described by its user's history start and its end (both absolute offsets into
    ``seq_items``); a batch is ``input_ids``/``target_ids`` LongTensors ``(B, L)``, left-padded,
    ``target_ids[:, t]`` the item after ``input_ids[:, t]`` and 0 where there is no target.
    """

    def __init__(self, seq_items: np.ndarray, seq_offsets: np.ndarray, max_len: int, pad_to_max_len: bool = False) -> None:
        if max_len < 1:
            raise ValueError(f"max_len must be at least 1, got {max_len}")
        self.seq_items = seq_items
        self.max_len = max_len
        self.pad_to_max_len = pad_to_max_len
        starts = seq_offsets[:-1]
        train_lengths = np.maximum(np.diff(seq_offsets) - 2, 0)
        # a training part of m items has m - 1 targets, ceil((m - 1) / max_len) windows
        windows = np.where(train_lengths >= 2, -(-(train_lengths - 1) // max_len), 0)
        users = np.repeat(np.arange(len(train_lengths)), windows)
        back = np.arange(len(users)) - np.repeat(np.cumsum(windows) - windows, windows)
        self.user = users.astype(np.int64)
        self.start = starts[users].astype(np.int64)
        self.end = (starts[users] + train_lengths[users] - back * max_len).astype(np.int64)

    def __len__(self) -> int:
        return len(self.end)

    @property
    def lengths(self) -> np.ndarray:
        """Input positions of each window (its batch is as wide as its longest window)."""
        return np.minimum(self.end - self.start, self.max_len + 1) - 1

    def __getitems__(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        index = np.asarray(indices, dtype=np.int64)
        ends = self.end[index]
        starts = np.maximum(self.start[index], ends - self.max_len - 1)
        width = self.max_len + 1 if self.pad_to_max_len else int((ends - starts).max())
        items = _gather_left_padded(self.seq_items, starts, ends, width)
        inputs, targets = items[:, :-1], items[:, 1:]
        targets = np.where(inputs > 0, targets, 0)
        return {"input_ids": torch.from_numpy(inputs), "target_ids": torch.from_numpy(targets)}

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {k: v[0] for k, v in self.__getitems__([index]).items()}


class HeldOutTargets:
    """Leave-one-out evaluation for a set of users: ``validation`` or ``test``.

    The validation target is a user's second-to-last item, its input the training part; the test
    target is the last item, its input everything before it (training part + validation item).
    A batch holds ``user`` (B,), ``input_ids`` (B, L) left-padded (the last ``max_len`` items),
    ``target`` (B,), and ``seen_ids`` (B, H): the whole history before the target, 0-padded on the
    right, for excluding seen items from a full ranking.
    """

    def __init__(
        self,
        seq_items: np.ndarray,
        seq_offsets: np.ndarray,
        users: np.ndarray,
        holdout: Literal["validation", "test"],
        max_len: int,
        pad_to_max_len: bool = False,
    ) -> None:
        if holdout not in ("validation", "test"):
            raise ValueError(f"holdout must be 'validation' or 'test', got {holdout!r}")
        self.seq_items = seq_items
        self.max_len = max_len
        self.pad_to_max_len = pad_to_max_len
        self.users = np.asarray(users, dtype=np.int64)
        self.start = seq_offsets[self.users].astype(np.int64)
        self.end = seq_offsets[self.users + 1].astype(np.int64) - (2 if holdout == "validation" else 1)
        if len(self.users) and (self.end - self.start < 1).any():
            raise ValueError("every evaluated user needs at least 3 events")

    def __len__(self) -> int:
        return len(self.users)

    @property
    def lengths(self) -> np.ndarray:
        """Each user's history before the target (a batch's ``seen_ids`` are as wide as its longest)."""
        return self.end - self.start

    def __getitems__(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        index = np.asarray(indices, dtype=np.int64)
        starts, ends = self.start[index], self.end[index]
        lengths = ends - starts
        width = self.max_len if self.pad_to_max_len else int(np.minimum(lengths, self.max_len).max())
        inputs = _gather_left_padded(self.seq_items, starts, ends, width)
        seen_width = int(lengths.max())
        seen_positions = starts[:, None] + np.arange(seen_width)[None, :]
        seen = np.where(seen_positions < ends[:, None], self.seq_items[np.minimum(seen_positions, len(self.seq_items) - 1)], 0)
        return {
            "user": torch.from_numpy(self.users[index].copy()),
            "input_ids": torch.from_numpy(inputs),
            "target": torch.from_numpy(self.seq_items[ends].astype(np.int64)),
            "seen_ids": torch.from_numpy(seen.astype(np.int64)),
        }

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {k: v[0] for k, v in self.__getitems__([index]).items()}
