"""Serving: load a size-specific export (written by ``python -m recsys.export``), answer online
requests, and run batch candidate jobs.

``serving.load`` and friends are imported on first use, so that ``import serving.rest`` or
``serving.retrieval`` does not pull in the model code (torch, torchrec).
"""

__all__ = ["load", "SizedRecommender", "ExportError", "UnknownItemsError"]


def __getattr__(name: str):
    if name in __all__:
        from serving import sized_model

        return getattr(sized_model, name)
    raise AttributeError(f"module 'serving' has no attribute {name!r}")
