"""Checks of the inputs every retriever takes: integers, ``k``, float matrices, spec dicts."""

from __future__ import annotations

from dataclasses import fields
from typing import Any

import numpy as np
import torch

__all__ = ["check_int", "check_k", "as_matrix", "check_spec_keys"]


def check_int(name: str, value: Any, minimum: int = 1) -> int:
    """``value`` as a plain int; a bool, a float or anything below ``minimum`` is an error."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_k(k: Any) -> int:
    return check_int("k", k)


def as_matrix(name: str, array: Any, dim: int | None = None) -> np.ndarray:
    """A C-contiguous float32 (rows, dim) copy-or-view of ``array``, checked (finite values too)."""
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu().numpy()
    if not isinstance(array, np.ndarray):
        raise TypeError(f"{name} must be a numpy array or torch tensor, got {type(array).__name__}")
    if array.ndim != 2:
        raise ValueError(f"{name} must be 2-D (rows, dim), got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"{name} must hold floats, got dtype {array.dtype}")
    if dim is not None and array.shape[1] != dim:
        raise ValueError(f"{name} must have {dim} columns, got shape {array.shape}")
    array = np.ascontiguousarray(array, dtype=np.float32)
    bad = ~np.isfinite(array).all(axis=1)
    if bad.any():
        raise ValueError(f"{name} row {int(np.flatnonzero(bad)[0])} holds a NaN or infinite value")
    return array


def check_spec_keys(cls: type, data: Any, what: str) -> None:
    """A spec read back from a manifest: a JSON object with no keys the dataclass does not know."""
    if not isinstance(data, dict):
        raise ValueError(f"the {what} spec must be a JSON object, got {data!r}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown {what} spec keys {unknown}; known keys: {sorted(known)}")
