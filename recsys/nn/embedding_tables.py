"""The item tower's embedding tables: torchrec collections, or plain torch where torchrec cannot load.

torchrec needs an fbgemm build made for the exact torch release, and there is none for many
machines (another torch, another CUDA, macOS). Unsharded torchrec collections are ``nn.EmbeddingBag``
and ``nn.Embedding`` tables initialised uniformly in ``±sqrt(1/rows)``; where torchrec does not
import, plain modules with the same tables, the same initialisation and the same state-dict keys
(``embedding_bags.<table>.weight``, ``embeddings.<table>.weight``) stand in, so checkpoints move
between the two and give the same numbers (tests/test_item_tower.py compares them).

``pool_bags`` mean-pools every item's bag for each bag feature; ``all_id_vectors`` returns every
row of the ID table, in row order.

torchrec is imported when the first table is built (it takes seconds): a served model, whose item
matrix is fixed, never imports it. ``TORCHREC`` says whether it imports (computed on first access).
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

_torchrec = None  # the torchrec module once imported (see _load_torchrec); importing it takes seconds


def _load_torchrec() -> bool:
    """Import torchrec on first need: serving a model with a fixed item matrix never builds a table."""
    global _torchrec
    try:
        import torchrec

        _torchrec = torchrec
        return True
    except (ImportError, OSError) as exc:  # no fbgemm build for this torch: fbgemm raises OSError on a bad .so
        logging.getLogger(__name__).info("torchrec unavailable (%s); plain torch embedding tables are used", exc)
        return False


def __getattr__(name: str):
    # ``TORCHREC`` (whether torchrec imports) is computed on first access and then kept as a global,
    # which tests may set to False to force the plain tables.
    if name == "TORCHREC":
        globals()["TORCHREC"] = available = _load_torchrec()
        return available
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _use_torchrec() -> bool:
    return globals()["TORCHREC"] if "TORCHREC" in globals() else __getattr__("TORCHREC")


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
    if not _use_torchrec():
        return PlainBagTables(bags, dim)
    tr = _torchrec
    return tr.EmbeddingBagCollection(
        tables=[
            tr.EmbeddingBagConfig(
                name=bag_table_name(name), embedding_dim=dim, num_embeddings=vocab, feature_names=[name], pooling=tr.PoolingType.MEAN
            )
            for name, vocab in bags.items()
        ]
    )


def id_table(rows: int, dim: int) -> nn.Module:
    if not _use_torchrec():
        return PlainIdTable(rows, dim)
    tr = _torchrec
    return tr.EmbeddingCollection(tables=[tr.EmbeddingConfig(name=ID_TABLE, embedding_dim=dim, num_embeddings=rows, feature_names=[ID_FEATURE])])


def pool_bags(tables: nn.Module, bags: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """``{feature: (values, offsets)}`` in CSR form, one bag per item -> ``{feature: (items, dim)}`` means."""
    if isinstance(tables, PlainBagTables):
        return {name: tables.embedding_bags[bag_table_name(name)](values, offsets) for name, (values, offsets) in bags.items()}
    names = list(bags)
    kjt = _torchrec.KeyedJaggedTensor.from_lengths_sync(
        keys=names,
        values=torch.cat([bags[n][0] for n in names]),
        lengths=torch.cat([bags[n][1].diff() for n in names]),
    )
    pooled = tables(kjt)
    return {name: pooled[name] for name in names}


def bags_of_rows(values: torch.Tensor, offsets: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The bags of items ``rows`` (in that order) of bags in CSR form ``(values, offsets)``, in CSR form."""
    lengths = (offsets[1:] - offsets[:-1])[rows]
    new_offsets = torch.zeros(len(rows) + 1, dtype=offsets.dtype, device=offsets.device)
    torch.cumsum(lengths, 0, out=new_offsets[1:])
    # each kept value's position: its bag's start in the old values plus its place in the bag
    within = torch.arange(int(new_offsets[-1]), device=values.device) - new_offsets[:-1].repeat_interleave(lengths)
    return values[offsets[rows].repeat_interleave(lengths) + within], new_offsets


def all_id_vectors(table: nn.Module, rows: int, device: torch.device) -> torch.Tensor:
    """Every one of the ``rows`` rows of the ID table, looked up through the collection (so gradients
    flow as in training, and a collection whose rows are spread over processes answers too)."""
    if isinstance(table, PlainIdTable):
        return table.embeddings[ID_TABLE].weight
    return id_vectors(table, torch.arange(rows, device=device))


def id_vectors(table: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The rows ``ids`` of the ID table, looked up as :func:`all_id_vectors` looks up all of them."""
    if isinstance(table, PlainIdTable):
        return table.embeddings[ID_TABLE](ids)
    kjt = _torchrec.KeyedJaggedTensor.from_lengths_sync(keys=[ID_FEATURE], values=ids, lengths=torch.ones_like(ids))
    return table(kjt)[ID_FEATURE].values()
