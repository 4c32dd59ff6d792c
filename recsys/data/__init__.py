"""The data pipeline: interaction logs and item tables in, training-ready tensors out.

- :func:`prepare` (``python -m recsys.data prepare``) cleans a log and writes a prepared directory;
- :func:`load_prepared` reads it back as a :class:`PreparedDataset`;
- :class:`SequenceDataModule` serves it to Lightning;
- :mod:`recsys.data.synthetic` generates a learnable synthetic log of any size.

``data/README.md`` documents the input formats and the prepared-directory layout.

The names below are imported on first use (module ``__getattr__``), so that importing one
submodule (``recsys.data.readers``, ``recsys.data.errors``) does not import Lightning, the pipeline
or the synthetic generator. ``from recsys.data import prepare`` works as before.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

#: public name -> the submodule that defines it
_SOURCES = {
    "CategoricalBag": "recsys.item_features",
    "DataValidationError": "recsys.data.errors",
    "ItemFeatures": "recsys.item_features",
    "PreparedDataset": "recsys.data.prepared",
    "SequenceDataModule": "recsys.data.datamodule",
    "SyntheticConfig": "recsys.data.synthetic",
    "load_prepared": "recsys.data.prepared",
    "prepare": "recsys.data.pipeline",
    "prepared_synthetic": "recsys.data.synthetic",
    "write_synthetic": "recsys.data.synthetic",
}

__all__ = sorted(_SOURCES)

if TYPE_CHECKING:  # for type checkers and IDEs; at run time the names come from __getattr__
    from recsys.data.datamodule import SequenceDataModule
    from recsys.data.errors import DataValidationError
    from recsys.data.pipeline import prepare
    from recsys.data.prepared import PreparedDataset, load_prepared
    from recsys.data.synthetic import SyntheticConfig, prepared_synthetic, write_synthetic
    from recsys.item_features import CategoricalBag, ItemFeatures


def __getattr__(name: str) -> Any:
    source = _SOURCES.get(name)
    if source is None:
        raise AttributeError(f"module 'recsys.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(source), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
