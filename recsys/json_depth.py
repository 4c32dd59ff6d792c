"""How deep a decoded JSON value nests, checked without recursion: the bound shared by what the
endpoint reads from clients (``serving/rest.py``) and what the loader reads from a manifest
(``recsys/export_dir.py``). Python's own parser recurses once per bracket, so a value it did
decode may still be too deep for later code that walks it."""

from __future__ import annotations

from typing import Any

__all__ = ["nests_deeper_than"]


def nests_deeper_than(value: Any, limit: int) -> bool:
    """Whether ``value`` nests lists and objects more than ``limit`` deep (``[]`` is 1 deep, ``[[]]``
    2, a scalar 0), walked level by level and stopping at the first level past ``limit``."""
    level, depth = [value] if isinstance(value, (list, dict)) else [], 0
    while level:
        depth += 1
        if depth > limit:
            return True
        children = (c for node in level for c in (node.values() if isinstance(node, dict) else node))
        level = [c for c in children if isinstance(c, (list, dict))]
    return False
