"""The retriever interface: top-``k`` rows of an item matrix by inner product, with exclusion.

Every retriever indexes rows ``0..N-1`` of one matrix and answers
``search(queries, k, exclude=None) -> (scores, rows)`` under the contract in :mod:`recsys.retrieval`.
It also says what it is, as a JSON-able manifest entry (:meth:`Retriever.to_dict`, whose
``"kind"`` names the implementation), and writes whatever files it needs into an export directory
(:meth:`Retriever.save`); :func:`recsys.retrieval.load_retriever` reads both back.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np

__all__ = ["Retriever"]


class Retriever(ABC):
    """Maximum inner product search over the rows of one item matrix."""

    #: the ``"kind"`` of this retriever's manifest entry
    kind: ClassVar[str]

    @property
    @abstractmethod
    def num_rows(self) -> int:
        """``N``: rows ``0..N-1`` can be returned."""

    @property
    @abstractmethod
    def dim(self) -> int:
        """Columns a query needs (a retriever that re-ranks at a prefix may accept wider ones)."""

    @abstractmethod
    def search(
        self, queries: Any, k: int, exclude: Sequence[np.ndarray] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` rows per query: float32 ``(B, k)`` scores, descending, and int64 ``(B, k)`` rows.

        ``queries``: float ``(B, dim)`` numpy array or torch tensor. ``exclude``: ``None`` or one
        array of rows per query that must not be returned. Entries that cannot be filled are
        ``-1`` / ``-inf``.
        """

    @abstractmethod
    def to_dict(self) -> dict[str, Any]:
        """The JSON-able manifest entry: ``{"kind": self.kind, ...settings}``."""

    def save(self, directory: str | os.PathLike) -> list[str]:
        """Write this retriever's files into ``directory``; returns their names (none by default)."""
        return []
