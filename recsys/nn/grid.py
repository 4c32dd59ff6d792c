"""Elastic sub-models: which (depth, width, size) triples a model trains, and how it computes them.

A triple ``(d, w, s)`` is the sub-model that keeps encoder blocks ``1..d``, every nested module cut
to width ``w`` (:func:`~recsys.nn.nested.cut_to_size`), and serves ``s``-dim user vectors
(``s <= w``) against the item matrix cut to ``Z[:, :s]``:

- ``s == w``: the vector is the ``w``-wide state itself, today's fully nested cut. By nesting it
  is the first ``w`` dimensions of the full-width state at depth ``d``, so every such size of one
  depth comes out of one full-width state (one Matryoshka loss over its prefixes);
- ``s < w``: a *head* of width ``w`` (one per trained ``(d, w)``, a dense ``Linear(w, m)`` with
  ``m`` the largest such ``s``) maps the ``w``-wide state to a vector whose prefixes are that
  width's sizes (Matryoshka within the head). With ``w`` = the model width this is the MRL-only
  end (SASRec's kind of model: a full encoder, a short vector); a prefix of a wider nested state
  would be no better than the narrower state itself, hence the head.

The state at depth ``d`` is the output after block ``d`` passed through the encoder's final norm;
the cut model keeps blocks ``1..d`` and that norm, so it computes exactly that state.

:func:`build_grid` turns the options (``depths``, ``pairs``, ``grid``, ``triples``) into the
trained list; :func:`vector_groups` groups it by where the vectors come from, which is what the
loss and the evaluation iterate over. No options: no grid, and the model is today's.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "GRIDS",
    "SubModels",
    "Triple",
    "VectorGroup",
    "VectorHeads",
    "StackedBlocks",
    "build_grid",
    "vector_groups",
    "head_key",
]

#: how ``depths`` combine with the (width, size) pairs: Starbucks' diagonal, or every combination
GRIDS = ("diagonal", "full")


@dataclass(frozen=True, order=True)
class Triple:
    """One trained sub-model: encoder depth, encoder width, vector size."""

    depth: int
    width: int
    size: int

    @property
    def label(self) -> str:
        """``L2_w128_d64``: the name of its metrics (``test/ndcg_10/L2_w128_d64``) and of its model."""
        return f"L{self.depth}_w{self.width}_d{self.size}"

    @classmethod
    def from_label(cls, label: str) -> Triple:
        """The triple a label names (``L2_w128_d64``): the inverse of :attr:`label`."""
        match = re.fullmatch(r"L(\d+)_w(\d+)_d(\d+)", label)
        if match is None:
            raise ValueError(f"{label!r} is not a triple label such as L2_w128_d64")
        return cls(*(int(g) for g in match.groups()))

    @property
    def uses_head(self) -> bool:
        return self.size < self.width


def head_key(depth: int, width: int) -> str:
    return f"L{depth}_w{width}"


def _positive_ints(name: str, values) -> list[int]:
    values = list(values)
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must hold positive integers, got {v!r} in {values}")
    return values


def _spread(k: int, n: int, m: int) -> int:
    """Index among ``m`` depths of the ``k``-th of ``n`` pairs, small to large, ends matched
    (halves round up)."""
    return m - 1 if n == 1 else int(k * (m - 1) / (n - 1) + 0.5)


def build_grid(
    sizes: Sequence[int],
    n_blocks: int,
    depths: Sequence[int] | None = None,
    pairs: Sequence[Sequence[int]] | None = None,
    grid: str = "diagonal",
    triples: Sequence[Sequence[int]] | None = None,
) -> tuple[Triple, ...] | None:
    """The trained triples, sorted; ``None`` when no option asks for a grid (today's model).

    ``pairs`` are ``[width, size]`` (default ``[s, s]`` for every size, the nested cut); ``depths``
    (default ``[n_blocks]``, with ``triples`` ``1..n_blocks``) must end at ``n_blocks``. ``grid="full"`` trains every depth with every
    pair; ``"diagonal"`` (Starbucks) sorts the pairs small to large (by size, then width) and
    gives the ``k``-th of ``n`` the depth at index ``floor(k (m-1) / (n-1) + 1/2)`` of the ``m`` depths,
    so the smallest pair gets the shallowest depth and the largest the deepest. ``triples``
    (``[depth, width, size]``) lists them outright instead. Raises ``ValueError`` naming the option.
    """
    if depths is None and pairs is None and triples is None:
        return None
    sizes = tuple(sizes)
    if grid not in GRIDS:
        raise ValueError(f"grid: unknown grid {grid!r}; choose one of {', '.join(GRIDS)}")
    if depths is None:  # every block count for triples given outright, else the full depth only
        depths = list(range(1, n_blocks + 1)) if triples is not None else [n_blocks]
    depths = _positive_ints("depths", depths)
    if sorted(set(depths)) != depths:
        raise ValueError(f"depths must be strictly increasing, got {depths}")
    if depths[-1] != n_blocks:
        raise ValueError(f"the largest of depths {depths} must equal n_blocks {n_blocks}")
    if triples is not None:
        if pairs is not None:
            raise ValueError("give pairs or triples, not both")
        found = []
        for t in triples:
            t = _positive_ints("triples", t)
            if len(t) != 3:
                raise ValueError(f"triples must be [depth, width, size] lists, got {t}")
            found.append(Triple(*t))
    else:
        if pairs is None:
            pairs = [[s, s] for s in sizes]
        checked = []
        for p in pairs:
            p = _positive_ints("pairs", p)
            if len(p) != 2:
                raise ValueError(f"pairs must be [width, size] lists, got {p}")
            checked.append((p[1], p[0]))  # (size, width): small to large
        checked = sorted(set(checked))
        if grid == "full":
            found = [Triple(d, w, s) for d in depths for s, w in checked]
        else:
            found = [Triple(depths[_spread(k, len(checked), len(depths))], w, s) for k, (s, w) in enumerate(checked)]
    for t in found:
        if t.width not in sizes or t.size not in sizes:
            raise ValueError(f"triple {t.label}: width {t.width} and size {t.size} must be among sizes {list(sizes)}")
        if t.size > t.width:
            raise ValueError(f"triple {t.label}: the size {t.size} may not exceed the width {t.width}")
        if t.depth not in depths:
            raise ValueError(f"triple {t.label}: depth {t.depth} is not among depths {depths}")
    if len(set(found)) != len(found):
        raise ValueError(f"triples repeat: {[t.label for t in found]}")
    return tuple(sorted(found))


@dataclass(frozen=True)
class SubModels:
    """What one training run trains: its triples, and the names that its metrics, checkpoints and
    models go by. A run over sizes alone trains ``(n_blocks, s, s)`` for every size ``s`` (the
    nested cut), each named ``d<s>`` as users know it; an elastic run (``elastic``: the options asked
    for a grid) names every triple by its label."""

    triples: tuple[Triple, ...]
    elastic: bool

    @classmethod
    def of(cls, sizes: Sequence[int], n_blocks: int, grid: Sequence[Triple] | None) -> SubModels:
        """``grid`` (:func:`build_grid`) when the options asked for one, else every size at full depth."""
        if grid is not None:
            return cls(tuple(grid), True)
        return cls(tuple(Triple(n_blocks, s, s) for s in sizes), False)

    def name(self, triple: Triple) -> str:
        return triple.label if self.elastic else f"d{triple.size}"

    @cached_property
    def names(self) -> tuple[str, ...]:
        return tuple(self.name(t) for t in self.triples)

    @cached_property
    def depths(self) -> list[int]:
        """The encoder depths the triples read the state at, increasing."""
        return sorted({t.depth for t in self.triples})

    @cached_property
    def groups(self) -> list[VectorGroup]:
        return vector_groups(self.triples)

    def rows(self, group: VectorGroup) -> list[int]:
        """Where ``group``'s triples stand among :attr:`triples` (their metrics rows)."""
        return [self.triples.index(t) for t in group.triples]


@dataclass(frozen=True)
class VectorGroup:
    """Triples whose vectors are prefixes of one tensor: the state at ``depth`` (``head`` None) or
    the output of head ``head`` over the first ``width`` state dimensions. ``sizes`` increase."""

    depth: int
    width: int
    head: str | None
    triples: tuple[Triple, ...]

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(t.size for t in self.triples)


def vector_groups(triples: Sequence[Triple]) -> list[VectorGroup]:
    """The triples grouped by the tensor their vectors are prefixes of (depth, then head)."""
    groups: dict[tuple[int, str | None], list[Triple]] = {}
    for t in sorted(triples):
        key = (t.depth, head_key(t.depth, t.width) if t.uses_head else None)
        groups.setdefault(key, []).append(t)
    out = []
    for (depth, head), members in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1] or "")):
        members = sorted(members, key=lambda t: t.size)
        out.append(VectorGroup(depth, members[0].width if head else members[-1].size, head, tuple(members)))
    return out


class VectorHeads(nn.Module):
    """One dense ``Linear(w, m)`` per trained ``(depth, width)`` with a size below the width."""

    def __init__(self, triples: Sequence[Triple]) -> None:
        super().__init__()
        outs: dict[str, tuple[int, int]] = {}
        for t in triples:
            if t.uses_head:
                key = head_key(t.depth, t.width)
                outs[key] = (t.width, max(t.size, outs.get(key, (0, 0))[1]))
        self.heads = nn.ModuleDict({key: nn.Linear(w, m) for key, (w, m) in sorted(outs.items())})
        with torch.no_grad():  # each head starts as the nested cut: its output prefix s is the state's
            for head in self.heads.values():
                head.weight.copy_(torch.eye(head.out_features, head.in_features))
                head.bias.zero_()

    def forward(self, key: str, state: torch.Tensor) -> torch.Tensor:
        head = self.heads[key]
        return F.linear(state[..., : head.in_features], head.weight, head.bias)

    def keep_(self, key: str | None, size: int) -> None:
        """Keep only head ``key`` (none when ``key`` is None), its outputs cut to ``size``."""
        kept = {}
        if key is not None:
            if key not in self.heads:
                raise ValueError(f"no head {key} was trained; trained: {sorted(self.heads) or 'none'}")
            old = self.heads[key]
            new = nn.Linear(old.in_features, size)
            with torch.no_grad():
                new.weight.copy_(old.weight[:size])
                new.bias.copy_(old.bias[:size])
            kept[key] = new.to(old.weight.device, old.weight.dtype)
        self.heads = nn.ModuleDict(kept)


class StackedBlocks:
    """Mixin of the encoders: ``blocks`` (an ``nn.ModuleList``) then ``final_norm``.

    :meth:`depth_states` gives the state after each asked depth from one pass;
    :meth:`keep_blocks_` is the depth cut that :func:`~recsys.nn.nested.cut_to_size` makes.
    ``_embed`` (the identity unless an encoder says otherwise) prepares the input.
    """

    blocks: nn.ModuleList
    final_norm: nn.Module

    @property
    def depth(self) -> int:
        return len(self.blocks)

    def _embed(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return x

    def depth_states(self, x: torch.Tensor, mask: torch.Tensor, depths: Sequence[int]) -> dict[int, torch.Tensor]:
        """``{d: final_norm(output after block d)}`` for every ``d`` in ``depths`` (1-based)."""
        wanted = set(depths)
        if not wanted or min(wanted) < 1 or max(wanted) > self.depth:
            raise ValueError(f"depths {sorted(wanted)} must lie in 1..{self.depth}")
        x = self._embed(x, mask)
        out = {}
        for d, block in enumerate(self.blocks, start=1):
            x = block(x, mask)
            if d in wanted:
                out[d] = self.final_norm(x)
            if d == max(wanted):
                break
        return out

    def keep_blocks_(self, depth: int) -> None:
        if not 1 <= depth <= self.depth:
            raise ValueError(f"depth {depth} must lie in 1..{self.depth} (the encoder's blocks)")
        self.blocks = nn.ModuleList(list(self.blocks)[:depth])
