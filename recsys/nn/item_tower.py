"""The Matryoshka item tower: every item modality projected into one nested space (docs/method.md §2).

``Z = NestedLN( sum over modalities of (that modality's vector for the item) )`` with

- dense features (text embedding, image embedding, any vector): ``PrefixProjection`` (``R^F -> R^D``),
  items without that feature contribute zero;
- multi-valued categorical bags: a torchrec ``EmbeddingBagCollection`` (mean pooling) over a
  ``KeyedJaggedTensor`` of all items, one ``D``-wide table per bag feature;
- optionally a learned item-ID embedding (torchrec ``EmbeddingCollection``), used only for items
  seen in training: cold-start items are represented by their features alone. With
  ``id_dropout`` p, training leaves each item's ID vector out with probability p per step, so
  that a row of features alone must rank well too (DropoutNet's idea, for the cold start).

(``recsys/nn/embedding_tables.py`` holds the tables; plain torch tables with the same parameters
stand in where torchrec cannot be imported.)

A sum of per-modality projections equals one projection of the concatenated features, and it
handles missing modalities without special cases. All parts are nested: cutting to size ``s`` keeps
the first ``s`` output dimensions of every projection and embedding table.

Row 0 of ``Z`` is the padding item and is always zero.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from recsys.item_features import CategoricalBag, ItemFeatures
from recsys.nn.embedding_tables import (
    ID_TABLE,
    all_id_vectors,
    bag_table_name,
    bag_tables,
    bags_of_rows,
    id_table,
    id_vectors,
    pool_bags,
)
from recsys.nn.nested import NestedLayerNorm, NestedModule, PrefixProjection, check_sizes, shrink_parameter_

__all__ = ["ItemTower", "FixedItemMatrix"]


class ItemTower(NestedModule):
    """Item matrix ``Z in R^{(N+1) x D}`` computed from the item features held as buffers.

    The features are buffers (saved in checkpoints), so a checkpoint alone reproduces ``Z``.
    ``modalities`` picks which dense and bag features to use (default: all of them).
    ``normalise=False`` leaves out the final LayerNorm (output item vectors whose norms are free).
    """

    def __init__(
        self,
        sizes: Sequence[int],
        features: ItemFeatures,
        use_id_embedding: bool = False,
        modalities: Sequence[str] | None = None,
        id_dropout: float = 0.0,
        nesting: str = "blocks",
        normalise: bool = True,
    ):
        super().__init__()
        self.sizes = check_sizes(sizes)
        d = self.sizes[-1]
        available = [*features.dense, *features.bags]
        chosen = list(available) if modalities is None else list(modalities)
        unknown = [m for m in chosen if m not in available]
        if unknown:
            raise ValueError(f"unknown item modalities {unknown}; the dataset has {available}")
        self.dense_names = [m for m in chosen if m in features.dense]
        self.bag_names = [m for m in chosen if m in features.bags]
        if not self.dense_names and not self.bag_names and not use_id_embedding:
            raise ValueError("the item tower needs at least one modality or use_id_embedding=True")
        self.num_items = features.num_items

        self.projections = nn.ModuleDict()
        for name in self.dense_names:
            self.register_buffer(f"dense_{name}", features.dense[name].float())
            self.register_buffer(f"dense_mask_{name}", features.dense_mask[name].float())
            self.projections[name] = PrefixProjection(features.dense[name].shape[1], self.sizes)

        self.bag_vocab = {name: features.bags[name].vocab_size for name in self.bag_names}
        for name in self.bag_names:
            self.register_buffer(f"bag_values_{name}", features.bags[name].values.long())
            self.register_buffer(f"bag_offsets_{name}", features.bags[name].offsets.long())
        if self.bag_names:
            self.bags = bag_tables(self.bag_vocab, d)
        if not 0 <= id_dropout < 1 or (id_dropout > 0 and not use_id_embedding):
            raise ValueError(f"id_dropout must lie in [0, 1) and needs use_id_embedding; got {id_dropout}")
        self.use_id_embedding, self.id_dropout = use_id_embedding, id_dropout
        if use_id_embedding:
            self.register_buffer("in_training", features.in_training.float())
            self.ids = id_table(self.num_items + 1, d)
        # slices: the size-s tower normalises its s dims; without the norm, each item vector's norm is its own
        self.norm = NestedLayerNorm(self.sizes, nesting=nesting) if normalise else nn.Identity()
        self.register_buffer("num_rows", torch.tensor(self.num_items + 1))
        row_is_item = torch.ones(self.num_items + 1)
        row_is_item[0] = 0.0
        self.register_buffer("row_is_item", row_is_item, persistent=False)

    def forward(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """``Z``, or with ``rows`` (item indices) only those rows of it, in that order: each row is
        computed from its item's features alone, so ``tower(rows)`` equals ``tower()[rows]``, at the
        cost of those rows (a sampled loss needs a few thousand of a large catalogue's)."""
        count = self.num_items + 1 if rows is None else len(rows)
        pick = (lambda t: t) if rows is None else (lambda t: t[rows])
        z = torch.zeros(count, self.width, device=self.row_is_item.device)
        for name, projection in self.projections.items():
            x = pick(getattr(self, f"dense_{name}"))
            z = z + projection(x) * pick(getattr(self, f"dense_mask_{name}")).unsqueeze(-1)
        if self.bag_names:
            bags = {n: (getattr(self, f"bag_values_{n}"), getattr(self, f"bag_offsets_{n}")) for n in self.bag_names}
            if rows is not None:
                bags = {n: bags_of_rows(values, offsets, rows) for n, (values, offsets) in bags.items()}
            for pooled in pool_bags(self.bags, bags).values():
                z = z + pooled
        if self.use_id_embedding:
            keep = pick(self.in_training)
            if self.training and self.id_dropout > 0:
                keep = keep * (torch.rand_like(keep) >= self.id_dropout)
            ids = all_id_vectors(self.ids, count, z.device) if rows is None else id_vectors(self.ids, rows)
            z = z + ids * keep.unsqueeze(-1)
        return self.norm(z) * pick(self.row_is_item).unsqueeze(-1)

    @staticmethod
    def features_from_state_dict(state: dict[str, torch.Tensor], prefix: str = "") -> ItemFeatures:
        """The :class:`ItemFeatures` a tower was built from, recovered from its saved buffers."""
        own = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        dense = {k[len("dense_"):]: v for k, v in own.items() if k.startswith("dense_") and not k.startswith("dense_mask_")}
        bags = {}
        for key, values in own.items():
            if key.startswith("bag_values_"):
                name = key[len("bag_values_"):]
                vocab = own[f"bags.embedding_bags.{bag_table_name(name)}.weight"].shape[0]
                bags[name] = CategoricalBag(values, own[f"bag_offsets_{name}"], vocab)
        return ItemFeatures(
            num_items=int(own["num_rows"].item()) - 1,
            dense=dense,
            dense_mask={k: own[f"dense_mask_{k}"].bool() for k in dense},
            bags=bags,
            in_training=own["in_training"].bool() if "in_training" in own else None,
        )

    def _shrink_(self, size: int) -> None:
        # embedding tables fix their width at construction: rebuild them and copy the prefix.
        if self.bag_names:
            old = self.bags
            self.bags = bag_tables(self.bag_vocab, size)
            for name in self.bag_names:
                table = bag_table_name(name)
                self.bags.embedding_bags[table].weight.data.copy_(old.embedding_bags[table].weight.data[:, :size])
        if self.use_id_embedding:
            old = self.ids
            self.ids = id_table(self.num_items + 1, size)
            self.ids.embeddings[ID_TABLE].weight.data.copy_(old.embeddings[ID_TABLE].weight.data[:, :size])


class FixedItemMatrix(NestedModule):
    """A precomputed item matrix standing in for the tower (exported and served models).

    Cutting keeps the first ``size`` columns, so an export at size ``s`` stores exactly ``Z[:, :s]``.
    """

    def __init__(self, matrix: torch.Tensor, sizes: Sequence[int]):
        super().__init__()
        self.sizes = check_sizes(sizes, width=matrix.shape[1])
        self.register_buffer("matrix", matrix.detach().float().contiguous())

    @property
    def num_items(self) -> int:
        return self.matrix.shape[0] - 1

    def forward(self) -> torch.Tensor:
        return self.matrix

    def _shrink_(self, size: int) -> None:
        shrink_parameter_(self, "matrix", slice(None), slice(0, size))
