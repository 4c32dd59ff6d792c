"""The item features a prepared dataset hands to the item tower.

Rows are item indices: row 0 is padding (all zeros, masked), rows ``1..num_items`` are the catalogue
in vocabulary order, cold-start items (features but no interactions) included.

A leaf module shared by the data pipeline (which builds and writes the features) and the models
(which read the tensors): it imports only torch, numpy and the standard library, so that
``recsys.nn`` and ``serving`` use it without importing ``recsys.data`` (polars, Lightning).
The ``.npy`` persistence is the containers' own format (plain arrays and a JSON index, no polars);
only the data side calls it. ``recsys.data`` re-exports both classes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch


@dataclass
class CategoricalBag:
    """A multi-valued categorical feature in CSR form, ready for a torchrec ``KeyedJaggedTensor``.

    ``values[offsets[i]:offsets[i + 1]]`` are the category ids of item row ``i`` (``offsets`` has
    ``num_items + 2`` entries: one row per item plus padding row 0). Category ids run over
    ``0..vocab_size-1``.
    """

    values: torch.Tensor  # int64 (nnz,)
    offsets: torch.Tensor  # int64 (num_items + 2,)
    vocab_size: int

    def __post_init__(self) -> None:
        if self.offsets.ndim != 1 or self.offsets[0] != 0 or self.offsets[-1] != self.values.numel():
            raise ValueError("bag offsets must start at 0 and end at the number of values")
        if self.values.numel() and (self.values.min() < 0 or self.values.max() >= self.vocab_size):
            raise ValueError(f"bag values must lie in [0, {self.vocab_size})")


@dataclass
class ItemFeatures:
    """Everything the item tower reads, as tensors indexed by item row.

    - ``dense``: name -> float32 ``(num_items + 1, dim)`` (text embedding, image embedding, ...);
      items without a vector have zeros there and ``False`` in ``dense_mask[name]``.
    - ``bags``: name -> :class:`CategoricalBag` (genres, tags, ...).
    - ``in_training``: bool ``(num_items + 1,)``, True for items that occur in some user's training
      part; a learned item-ID embedding is only used for those (cold-start items have none).
    """

    num_items: int
    dense: dict[str, torch.Tensor] = field(default_factory=dict)
    dense_mask: dict[str, torch.Tensor] = field(default_factory=dict)
    bags: dict[str, CategoricalBag] = field(default_factory=dict)
    in_training: torch.Tensor | None = None

    def __post_init__(self) -> None:
        rows = self.num_items + 1
        for name, x in self.dense.items():
            if x.ndim != 2 or x.shape[0] != rows:
                raise ValueError(f"dense feature {name!r} must have shape ({rows}, dim), got {tuple(x.shape)}")
            if name not in self.dense_mask:
                self.dense_mask[name] = torch.ones(rows, dtype=torch.bool)
                self.dense_mask[name][0] = False
        for name, bag in self.bags.items():
            if bag.offsets.numel() != rows + 1:
                raise ValueError(f"bag {name!r} must have {rows + 1} offsets, got {bag.offsets.numel()}")
        if self.in_training is None:
            self.in_training = torch.ones(rows, dtype=torch.bool)
            self.in_training[0] = False

    @property
    def dense_dims(self) -> dict[str, int]:
        return {name: int(x.shape[1]) for name, x in self.dense.items()}

    @property
    def bag_vocab_sizes(self) -> dict[str, int]:
        return {name: bag.vocab_size for name, bag in self.bags.items()}

    # -- persistence: plain .npy arrays + a JSON index, no pickle ---------------------------------

    def save(self, directory: str | Path) -> None:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        index = {"num_items": self.num_items, "dense": sorted(self.dense), "bags": {}}
        for name, x in self.dense.items():
            np.save(d / f"dense_{name}.npy", x.numpy())
            np.save(d / f"dense_{name}_mask.npy", self.dense_mask[name].numpy())
        for name, bag in self.bags.items():
            np.save(d / f"bag_{name}_values.npy", bag.values.numpy())
            np.save(d / f"bag_{name}_offsets.npy", bag.offsets.numpy())
            index["bags"][name] = bag.vocab_size
        np.save(d / "in_training.npy", self.in_training.numpy())
        (d / "features.json").write_text(json.dumps(index, indent=2))

    @classmethod
    def load(cls, directory: str | Path) -> "ItemFeatures":
        d = Path(directory)
        index = json.loads((d / "features.json").read_text())

        def arr(name: str) -> torch.Tensor:
            return torch.from_numpy(np.load(d / name, allow_pickle=False))

        return cls(
            num_items=index["num_items"],
            dense={n: arr(f"dense_{n}.npy").float() for n in index["dense"]},
            dense_mask={n: arr(f"dense_{n}_mask.npy").bool() for n in index["dense"]},
            bags={
                n: CategoricalBag(arr(f"bag_{n}_values.npy").long(), arr(f"bag_{n}_offsets.npy").long(), v)
                for n, v in index["bags"].items()
            },
            in_training=arr("in_training.npy").bool(),
        )
