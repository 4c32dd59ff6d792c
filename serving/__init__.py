"""Serving: size-specific exports, retrieval indexes and batch candidate generation.

``serving.load`` and friends are imported on first use, so that ``import serving.retrieval`` does not
pull in the model code (torch, torchrec, Lightning).
"""

__all__ = ["load", "SizedRecommender", "ExportError", "UnknownItemsError"]


def __getattr__(name: str):
    if name in __all__:
        from serving import sized_model

        return getattr(sized_model, name)
    raise AttributeError(f"module 'serving' has no attribute {name!r}")
