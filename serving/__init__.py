"""Serving: size-specific exports, retrieval indexes and batch candidate generation."""

from serving.sized_model import ExportError, SizedRecommender, UnknownItemsError, load

__all__ = ["load", "SizedRecommender", "ExportError", "UnknownItemsError"]
