"""The item tower's embedding tables: torchrec collections, or plain torch where torchrec cannot load.

torchrec needs an fbgemm build made for the exact torch release, and there is none for many
machines (another torch, another CUDA, macOS). Unsharded torchrec collections are ``nn.EmbeddingBag``
and ``nn.Embedding`` tables initialised uniformly in ``±sqrt(1/rows)``; where torchrec does not
import, plain modules with the same tables, the same initialisation and the same state-dict keys
(``embedding_bags.<table>.weight``, ``embeddings.<table>.weight``) stand in, so checkpoints move
between the two and give the same numbers (tests/test_item_tower.py compares them).

``pool_bags`` mean-pools every item's bag for each bag feature; ``all_id_vectors`` returns every
row of the ID table, in row order.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

try:
    from torchrec import (
        EmbeddingBagCollection,
        EmbeddingBagConfig,
        EmbeddingCollection,
        EmbeddingConfig,
        KeyedJaggedTensor,
        PoolingType,
    )

    TORCHREC = True
except (ImportError, OSError) as exc:  # no fbgemm build for this torch: fbgemm raises OSError on a bad .so
    logging.getLogger(__name__).info("torchrec unavailable (%s); plain torch embedding tables are used", exc)
    TORCHREC = False

__all__ = ["TORCHREC", "ID_FEATURE", "ID_TABLE", "bag_table_name", "bag_tables", "id_table", "pool_bags", "all_id_vectors"]

ID_FEATURE = "item_id"
ID_TABLE = "table_item_ids"

# torchrec asks torch.fx whether it is tracing on every KeyedJaggedTensor, and torch answers once
# per process with a deprecation notice that means nothing to our users: keep it out of their logs.
logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)


def bag_table_name(feature: str) -> str:
    # torchrec table names must not collide with module attributes, hence the prefix.
    return f"table_{feature}"


def _uniform_(weight: torch.Tensor) -> None:
    bound = math.sqrt(1 / weight.shape[0])
    nn.init.uniform_(weight, -bound, bound)


class PlainBagTables(nn.Module):
    """Mean-pooled bag tables laid out like a torchrec ``EmbeddingBagCollection``."""

    def __init__(self, bags: dict[str, int], dim: int):
        super().__init__()
        self.embedding_bags = nn.ModuleDict(
            {bag_table_name(name): nn.EmbeddingBag(vocab, dim, mode="mean", include_last_offset=True) for name, vocab in bags.items()}
        )
        for table in self.embedding_bags.values():
            _uniform_(table.weight)


class PlainIdTable(nn.Module):
    """One ID table laid out like a torchrec ``EmbeddingCollection``."""

    def __init__(self, rows: int, dim: int):
        super().__init__()
        self.embeddings = nn.ModuleDict({ID_TABLE: nn.Embedding(rows, dim)})
        _uniform_(self.embeddings[ID_TABLE].weight)


def bag_tables(bags: dict[str, int], dim: int) -> nn.Module:
    """One ``dim``-wide mean-pooled table per bag feature (``{feature: vocabulary size}``)."""
    if not TORCHREC:
        return PlainBagTables(bags, dim)
    return EmbeddingBagCollection(
        tables=[
            EmbeddingBagConfig(
                name=bag_table_name(name), embedding_dim=dim, num_embeddings=vocab, feature_names=[name], pooling=PoolingType.MEAN
            )
            for name, vocab in bags.items()
        ]
    )


def id_table(rows: int, dim: int) -> nn.Module:
    if not TORCHREC:
        return PlainIdTable(rows, dim)
    return EmbeddingCollection(tables=[EmbeddingConfig(name=ID_TABLE, embedding_dim=dim, num_embeddings=rows, feature_names=[ID_FEATURE])])


def pool_bags(tables: nn.Module, bags: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """``{feature: (values, offsets)}`` in CSR form, one bag per item -> ``{feature: (items, dim)}`` means."""
    if isinstance(tables, PlainBagTables):
        return {name: tables.embedding_bags[bag_table_name(name)](values, offsets) for name, (values, offsets) in bags.items()}
    names = list(bags)
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=names,
        values=torch.cat([bags[n][0] for n in names]),
        lengths=torch.cat([bags[n][1].diff() for n in names]),
    )
    pooled = tables(kjt)
    return {name: pooled[name] for name in names}


def all_id_vectors(table: nn.Module) -> torch.Tensor:
    """Every row of the ID table, looked up through the collection (so gradients flow as in training)."""
    if isinstance(table, PlainIdTable):
        return table.embeddings[ID_TABLE].weight
    weight = table.embeddings[ID_TABLE].weight
    ids = torch.arange(weight.shape[0], device=weight.device)
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=[ID_FEATURE], values=ids, lengths=torch.ones_like(ids))
    return table(kjt)[ID_FEATURE].values()
