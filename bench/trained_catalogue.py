"""A large item matrix from a trained tower, and user vectors from real histories (bench/README.md §3).

A trained checkpoint knows only its dataset's few thousand items. To search 10^6 items the way the
trained model would, new items get features *drawn like the real ones* and go through the trained
item tower:

- each dense feature (text embedding, ...): a Gaussian with the mean and covariance of the real
  items' vectors, each draw then rescaled to the norm of a randomly chosen real vector (sentence
  encoders output unit vectors; the Gaussian alone would spread the norms); an item lacks the
  feature with the real items' missing rate;
- each categorical bag: the bag length of a randomly chosen real item, its categories drawn
  independently with the real category frequencies;
- no item-ID vector: new items have none (cold start), so the tower sees their features alone.
  A tower trained with ID embeddings is accepted, and its real items keep their ID vectors.

The catalogue is the real items followed by synthetic ones, ``(num_items, D)`` without the padding
row. Queries are user vectors of real users: each user's whole history (its last ``max_len``
items, left-padded) through the trained encoder.

A model whose sizes are networks of their own (``--model.separate_item_vectors``, ``--model.nesting
slices``; docs/method.md §6, "Own-network funnel") scores each size against its own item vectors:
:func:`item_matrices` embeds the same catalogue (the same synthetic features) through each size's
own item tower (:func:`output_tower`), and :func:`recsys.model.size_network` is the network whose user vectors
size ``s`` serves (:func:`encode_users`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from recsys.data.prepared import load_prepared
from recsys.item_features import CategoricalBag, ItemFeatures
from recsys.model import MatryoshkaRecommender
from recsys.nn.item_tower import ItemTower
from recsys.nn.nested import cut_to_size
from recsys.nn.recommender import SequentialRecommender

__all__ = ["FeatureSampler", "load_model", "item_matrix", "item_matrices", "output_tower", "output_tower_name",
           "query_histories", "encode_users", "user_vectors"]

# Synthetic items pushed through the tower at once (their features are 384 floats each).
TOWER_BLOCK = 100_000


def load_model(checkpoint: str | Path) -> MatryoshkaRecommender:
    model = MatryoshkaRecommender.from_checkpoint(checkpoint)
    model.eval()
    return model


@dataclass
class _DenseFit:
    mean: np.ndarray  # (F,)
    factor: np.ndarray  # (F, F): covariance = factor @ factor.T
    norms: np.ndarray  # norms of the real vectors
    present_rate: float


@dataclass
class _BagFit:
    lengths: np.ndarray  # bag length of every real item
    frequencies: np.ndarray  # (vocab,) category probabilities
    vocab_size: int


class FeatureSampler:
    """Features of new items drawn like the real items' (see the module docstring)."""

    def __init__(self, real: ItemFeatures) -> None:
        self.dense: dict[str, _DenseFit] = {}
        for name, x in real.dense.items():
            present = real.dense_mask[name][1:].numpy()
            rows = x[1:].numpy().astype(np.float64)[present]
            mean = rows.mean(axis=0)
            cov = np.cov(rows, rowvar=False)
            # a symmetric square root: works for a singular covariance (fewer items than dims) too
            eigvals, eigvecs = np.linalg.eigh(cov)
            factor = eigvecs * np.sqrt(np.clip(eigvals, 0.0, None))
            self.dense[name] = _DenseFit(mean, factor, np.linalg.norm(rows, axis=1), float(present.mean()))
        self.bags: dict[str, _BagFit] = {}
        for name, bag in real.bags.items():
            offsets = bag.offsets.numpy()
            lengths = np.diff(offsets)[1:]  # real items only (row 0 is padding)
            counts = np.bincount(bag.values.numpy(), minlength=bag.vocab_size).astype(np.float64)
            self.bags[name] = _BagFit(lengths, counts / max(counts.sum(), 1.0), bag.vocab_size)

    def describe(self) -> dict:
        return {
            "dense": {
                name: {
                    "dim": len(fit.mean),
                    "method": "Gaussian with the real vectors' mean and covariance, each draw rescaled to a random real vector's norm",
                    "present_rate": fit.present_rate,
                    "real_norm_mean": float(fit.norms.mean()),
                }
                for name, fit in self.dense.items()
            },
            "bags": {
                name: {
                    "vocab_size": fit.vocab_size,
                    "method": "length of a random real item's bag, categories drawn i.i.d. with the real frequencies",
                    "mean_length": float(fit.lengths.mean()),
                }
                for name, fit in self.bags.items()
            },
            "id_embedding": "none for synthetic items (cold start: features alone)",
        }

    def sample(self, n: int, rng: np.random.Generator) -> ItemFeatures:
        """Features of ``n`` new items (rows 1..n; row 0 is padding)."""
        dense, masks = {}, {}
        for name, fit in self.dense.items():
            x = np.zeros((n + 1, len(fit.mean)), dtype=np.float32)
            draws = fit.mean + rng.standard_normal((n, len(fit.mean))) @ fit.factor.T
            draws *= (rng.choice(fit.norms, n) / np.maximum(np.linalg.norm(draws, axis=1), 1e-12))[:, None]
            x[1:] = draws
            mask = np.zeros(n + 1, dtype=bool)
            mask[1:] = rng.random(n) < fit.present_rate
            x[~mask] = 0.0
            dense[name], masks[name] = torch.from_numpy(x), torch.from_numpy(mask)
        bags = {}
        for name, fit in self.bags.items():
            lengths = np.concatenate([[0], rng.choice(fit.lengths, n)])
            offsets = np.concatenate([[0], np.cumsum(lengths)])
            values = rng.choice(fit.vocab_size, int(offsets[-1]), p=fit.frequencies)
            bags[name] = CategoricalBag(torch.from_numpy(values.astype(np.int64)), torch.from_numpy(offsets), fit.vocab_size)
        in_training = torch.zeros(n + 1, dtype=torch.bool)
        return ItemFeatures(num_items=n, dense=dense, dense_mask=masks, bags=bags, in_training=in_training)


def _tower_over(trained: ItemTower, features: ItemFeatures) -> ItemTower:
    """A tower with the trained weights over other items' features (no ID table: new items have none)."""
    tower = ItemTower(trained.sizes, features, use_id_embedding=False, modalities=[*trained.dense_names, *trained.bag_names],
                      nesting=trained.norm.nesting)  # slices: one LayerNorm over the tower's width, as trained
    weights = {name: p for name, p in trained.state_dict().items()
               if not name.startswith("ids.") and name in dict(tower.named_parameters())}
    missing = set(dict(tower.named_parameters())) - set(weights)
    if missing:
        raise ValueError(f"the trained tower lacks the parameters {sorted(missing)}")
    tower.load_state_dict(weights, strict=False)
    return tower.eval()


def output_tower(model: MatryoshkaRecommender, size: int) -> ItemTower:
    """The item tower whose vectors size ``size`` scores against, as it serves alone
    (``recsys.export``): its own item vectors (``separate_item_vectors``), else with ``nesting
    slices`` its own cut of the tower, else the shared tower (whose first ``size`` columns it uses)."""
    return _output_tower(model, size)[0]


def output_tower_name(model: MatryoshkaRecommender, size: int) -> str:
    """Which tower :func:`output_tower` is, in words (for a benchmark's JSON)."""
    return _output_tower(model, size)[1]


def _output_tower(model: MatryoshkaRecommender, size: int) -> tuple[ItemTower, str]:
    if size not in model.sizes:
        raise ValueError(f"size {size} is not one of the model's sizes {list(model.sizes)}")
    own = model.own_item_tower(size)
    if own is not None:
        return own, f"item_heads[{list(model.item_heads).index(own)}] (its own item vectors)"
    if model.hparams.get("nesting", "blocks") == "slices" and size < model.sizes[-1]:
        return cut_to_size(model.net, size).items, f"the item tower cut to {size} (nesting slices)"
    if size < model.sizes[-1]:
        return model.net.items, f"the shared item tower's first {size} columns"
    return model.net.items, "the shared item tower"


def item_matrices(model: MatryoshkaRecommender, num_items: int, towers: dict, seed: int = 0) -> tuple[dict, dict]:
    """``{key: (num_items, D_key)}``: the same catalogue through each of ``towers`` (``{key: ItemTower}``):
    each tower's real items' vectors, then the synthetic items', whose features are drawn once (like
    the real items of the model's shared tower) and go through every tower alike."""
    shared = model.net.items
    real = ItemTower.features_from_state_dict(shared.state_dict())
    num_real = shared.num_items
    if num_items < num_real:
        raise ValueError(f"num_items={num_items} is below the {num_real} real items")
    out = {}
    with torch.no_grad():
        for key, tower in towers.items():
            real_rows = tower()[1:].numpy()
            out[key] = np.empty((num_items, real_rows.shape[1]), dtype=np.float32)
            out[key][:num_real] = real_rows
    sampler = FeatureSampler(real)
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for start in range(num_real, num_items, TOWER_BLOCK):
            count = min(TOWER_BLOCK, num_items - start)
            features = sampler.sample(count, rng)
            for key, tower in towers.items():
                out[key][start : start + count] = _tower_over(tower, features)()[1:].numpy()
    about = {"real_items": num_real, "synthetic_items": num_items - num_real, "seed": seed,
             "features": sampler.describe()}
    return out, about


def item_matrix(model: MatryoshkaRecommender, num_items: int, seed: int = 0) -> tuple[np.ndarray, dict]:
    """``(num_items, D)``: the real items' vectors, then synthetic items' up to ``num_items`` rows
    (the shared tower's; for a size's own item vectors see :func:`item_matrices`)."""
    matrices, about = item_matrices(model, num_items, {"shared": model.net.items}, seed=seed)
    return matrices["shared"], about


def query_histories(model: MatryoshkaRecommender, data_dir: str | Path, num_users: int,
                    seed: int = 0) -> tuple[torch.Tensor, dict]:
    """``(num_users, max_len)`` left-padded item rows: the histories of real users (a seeded sample
    without replacement), each its last ``max_len`` items."""
    data = load_prepared(data_dir)
    if data.num_items != model.net.items.num_items:
        raise ValueError(f"{data_dir} has {data.num_items} items but the checkpoint's tower has {model.net.items.num_items}")
    if not 1 <= num_users <= data.num_users:
        raise ValueError(f"queries must be between 1 and the {data.num_users} users of {data_dir}, got {num_users}")
    max_len = int(model.hparams.max_len)
    users = np.sort(np.random.default_rng(seed).choice(np.arange(1, data.num_users + 1), num_users, replace=False))
    ids = np.zeros((num_users, max_len), dtype=np.int64)
    for row, user in enumerate(users):
        history = data.history(user)[-max_len:]
        ids[row, max_len - len(history):] = history
    return torch.from_numpy(ids), {
        "users": num_users, "of_users": data.num_users, "seed": seed, "history": f"whole history, last {max_len} items"}


def encode_users(net: SequentialRecommender, ids: torch.Tensor, items: torch.Tensor, size: int | None = None) -> np.ndarray:
    """User vectors ``(B, size)`` of histories ``ids`` through ``net``, reading them through its
    item matrix ``items`` (computed once, as an export holds it), in batches of 256."""
    out = []
    with torch.no_grad():
        for start in range(0, len(ids), 256):
            out.append(net.user_vectors(ids[start : start + 256], items).numpy())
    users = np.concatenate(out)
    return np.ascontiguousarray(users if size is None else users[:, :size], dtype=np.float32)


def user_vectors(model: MatryoshkaRecommender, data_dir: str | Path, num_users: int, seed: int = 0) -> tuple[np.ndarray, dict]:
    """User vectors ``(num_users, D)`` of real users (a seeded sample without replacement)."""
    ids, about = query_histories(model, data_dir, num_users, seed=seed)
    with torch.no_grad():
        z = model.net.item_matrix()
    return encode_users(model.net, ids, z), about
