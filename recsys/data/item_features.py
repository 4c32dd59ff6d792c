"""Re-export of the item-feature containers, which live in the leaf module :mod:`recsys.item_features`.

They moved there so that the models (``recsys.nn``, ``serving``) use them without importing the data
pipeline; ``from recsys.data.item_features import ItemFeatures`` keeps working.
"""

from recsys.item_features import CategoricalBag, ItemFeatures

__all__ = ["CategoricalBag", "ItemFeatures"]
