"""The data pipeline: interaction logs and item tables in, training-ready tensors out.

- :func:`prepare` (``python -m recsys.data prepare``) cleans a log and writes a prepared directory;
- :func:`load_prepared` reads it back as a :class:`PreparedDataset`;
- :class:`SequenceDataModule` serves it to Lightning;
- :mod:`recsys.data.synthetic` generates a learnable synthetic log of any size.

``data/README.md`` documents the input formats and the prepared-directory layout.
"""

from recsys.data.datamodule import SequenceDataModule
from recsys.data.errors import DataValidationError
from recsys.data.item_features import CategoricalBag, ItemFeatures
from recsys.data.pipeline import prepare
from recsys.data.prepared import PreparedDataset, load_prepared
from recsys.data.synthetic import SyntheticConfig, prepared_synthetic, write_synthetic

__all__ = [
    "CategoricalBag",
    "DataValidationError",
    "ItemFeatures",
    "PreparedDataset",
    "SequenceDataModule",
    "SyntheticConfig",
    "load_prepared",
    "prepare",
    "prepared_synthetic",
    "write_synthetic",
]
