"""The LightningModule: one training run that learns every size at once.

Training minimises the Matryoshka cross-entropy (every size's full softmax over the catalogue);
validation and test rank every catalogue item for every size (docs/method.md §4-5).
"""

from __future__ import annotations

import itertools
import math
from copy import deepcopy
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal, NamedTuple

import lightning as L
from lightning.pytorch.utilities.enums import GradClipAlgorithmType
import numpy as np
import torch

from recsys.errors import UserError
from recsys.item_features import ItemFeatures
from recsys.metrics import RankingMetrics, target_ranks
from recsys.checkpoint import catalogue_of, read_checkpoint
from recsys.model_options import check_options, recipe_of
from recsys.compat import nest_flat_options
from recsys.nn.encoders import LRUOptions, MambaOptions, SASRecOptions, build_encoder
from recsys.nn.loss import (
    MatryoshkaLoss,
    matryoshka_cross_entropy,
    sampled_matryoshka_cross_entropy,
)
from recsys.nn.grid import SubModels, Triple
from recsys.nn.item_bias import with_bias_column, with_ones_column
from recsys.nn.weight_average import WeightAverage
from recsys.nn.nested import (
    SizeSlices,
    cut_sizes,
    cut_to_size,
    nested_parameter_count,
    scale_prefix_gradient,
    set_prefix_gradient,
    truncated_normal_init_,
)
from recsys.nn.recommender import SequentialRecommender

# The Trainer settings this module and SequenceDataModule are built for (the CLI's defaults).
TRAINER_DEFAULTS: dict[str, Any] = {
    "max_epochs": 8,
    "gradient_clip_val": 1.0,
    "log_every_n_steps": 10,
    "use_distributed_sampler": False,  # the data module shards itself, without duplicating users
    "num_sanity_val_steps": 0,
}
# The best checkpoint and early stopping follow ``val/monitor`` (see ``monitor_size``).
CHECKPOINT_DEFAULTS: dict[str, Any] = {"monitor": "val/monitor", "mode": "max", "filename": "best"}
EARLY_STOPPING_DEFAULTS: dict[str, Any] = {"monitor": "val/monitor", "mode": "max", "patience": 3}

__all__ = ["DivergedError", "MatryoshkaRecommender", "size_network"]


class DivergedError(UserError, FloatingPointError):
    """A training loss, a gradient or a user or item vector is not finite: training stops at once,
    before a step or a checkpoint is taken from it, instead of training (or ranking) on NaN."""


#: what a DivergedError says may have caused it
DIVERGED_CAUSES = "NaN or infinite values in the item features, or a learning rate too high (--model.lr)"


def _differences(there: dict[str, Any], here: dict[str, Any], prefix: str = "") -> list[tuple[str, Any, Any]]:
    """``(name, there, here)`` of each setting both mappings have and set differently; nested
    mappings (the encoder options) by dotted name."""
    out = []
    for key in sorted(there.keys() & here.keys()):
        a, b = there[key], here[key]
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif (list(a) if isinstance(a, tuple) else a) != (list(b) if isinstance(b, tuple) else b):
            out.append((f"{prefix}{key}", a, b))
    return out


#: encoder options added after the export format, with the defaults at which exports leave them out
LATER_ENCODER_DEFAULTS = {"nesting": "blocks", **{k: getattr(LRUOptions(), k) for k in ("post_norm", "ffn", "ffn_mult")}}


class StepInputs(NamedTuple):
    """What one training step's loss reads (:meth:`MatryoshkaRecommender.step_inputs`): item
    vectors, the histories and targets as indices into them, the candidates of the softmax, and for
    the sampled softmax the shared negatives (indices into ``candidates``), their log sampling
    probabilities (None: no correction) and the item ids of the rows computed (``rows``)."""

    items: torch.Tensor | None  # None: each size computes its own (step_inputs(with_items=False))
    input_ids: torch.Tensor
    candidates: torch.Tensor | None
    targets: torch.Tensor
    negatives: torch.Tensor | None = None
    log_q: torch.Tensor | None = None
    rows: torch.Tensor | None = None


def _kl_entries(loss) -> list:
    """A loss's per-size KL values, None for its largest size (which learns from no teacher) or all None."""
    if loss.distill is None:
        return [None] * len(loss.per_size)
    return [*loss.distill[:-1], None]


def _in_loss_teacher(teacher: str) -> str:
    """The loss's own teacher for a model's ``distill_teacher``: ``average`` passes the loss an
    outside teacher's vectors, which replace the loss's own teacher."""
    return "largest" if teacher == "average" else teacher


def size_network(net: SequentialRecommender, size: int) -> SequentialRecommender:
    """The network whose user vectors size ``size`` serves (their first ``size`` columns): ``net``
    cut to the size where it can be (with ``nesting slices`` it must be), else ``net`` itself."""
    return net if size == net.sizes[-1] or size not in cut_sizes(net) else cut_to_size(net, size)


class MatryoshkaRecommender(L.LightningModule):
    """Item tower + sequence encoder trained with the Matryoshka loss over ``sizes``.

    Args:
        item_features: the dataset's item features (linked from the data module by the CLI).
        cold_start_items: items the cold-start protocol holds out of training: no candidates in
            the training loss (linked from the data; none unless prepared so).
        item_counts: training events per item (linked from the data), for popularity sampling.
        sizes: nested sizes, strictly increasing; the last is the model width.
        encoder: ``lru`` (nested LRU, the fMRLRec encoder), ``mamba`` (nested Mamba) or ``sasrec``.
        n_blocks: encoder blocks.
        dropout: dropout inside the encoder.
        input_dropout: dropout on the item vectors fed to the encoder.
        lru: LRU's own options (``r_min``, ``r_max``); used when ``encoder`` is ``lru``.
        mamba: Mamba's own options (``d_state``, ``expand``); used when ``encoder`` is ``mamba``.
        sasrec: SASRec's own options (``n_heads``); used when ``encoder`` is ``sasrec``.
        max_len: the input length (the data module's ``max_len``, linked by the CLI); SASRec
            learns this many positions.
        use_id_embedding: add a learned item-ID embedding to the item features.
        id_dropout: in training, the probability that an item's ID vector is left out of its row
            of the item matrix for a step (each item drawn anew each step), so that the features
            alone must rank it too: what a cold-start item, which has no trained ID vector, gets.
        modalities: item features to use (default: all the dataset has).
        loss_weights: weight of each size in the loss (default: 1 each).
        learned_temperature: every size learns its own softmax temperature, a positive factor on
            its training logits (``logit_scale``, initially 1). The sizes share every other
            weight, the prefixes of the item and user vectors included, and so the scale of the
            first chunk's scores: without it, the smallest size cannot sharpen its softmax
            without changing every larger size's scores. Training only: a factor on all scores
            of a size changes no ranking, so metrics, exports and serving do not use it.
        separate_item_vectors: every size below the largest scores the items with item vectors of
            its own, from an item tower of its own (MRL's separate classifiers; the histories are
            still read through the shared tower's prefixes); ``"all"``: the largest too (for one
            size: output item vectors untied from the input ones). An export of such a size holds
            and searches its own item vectors (``recsys/export_dir.py``). The loss is one per
            size, each against its own matrix; no funnel over those vectors.
        prefix_gradient: with ``separate_item_vectors`` (or ``nesting="slices"``), the factor on the
            gradient that a size's loss sends to the weights of the smaller sizes' chunks (every
            layer's cross-chunk blocks and the loss's own read of the smaller chunks; with slices,
            the slice of every weight that the size below holds; forward values never change).
            1 is plain training; 0 trains each chunk by its own size's loss alone, so the
            smallest size learns exactly as if it were trained alone and each larger size adds
            its chunk on top of the smaller ones. Training only. Unset: 0 with the recipe (below).
        nesting: how the sizes share weights (``recsys/nn/nested.py``): ``blocks`` (block-lower-
            triangular layers, one LayerNorm per chunk; one forward computes every size) or
            ``slices`` (dense layers, the size-``s`` network is the top-left slice of every weight
            with LayerNorms over its whole width; the largest size is a dense network, and every
            size runs its own forward in training and evaluation). ``slices``: LRU encoder only.
            Unset: ``slices`` with the recipe (below), else ``blocks``.
        init_std: None keeps each layer's own initialisation (linear layers scaled by their
            fan-in, small uniform embedding tables); a number draws every weight matrix and
            embedding table from a normal of that standard deviation truncated at twice it, as
            LRURec does with 0.02 (``recsys.nn.nested.truncated_normal_init_``).
        output_item_norm: with ``separate_item_vectors``, whether the sizes' own output item
            vectors end in a LayerNorm like the input ones (the default). False: their norms are
            the items' own, so an item's score can carry a prior of its own (popularity), as
            LRURec's output layer (raw embeddings and a per-item bias) can.
        output_bias: with ``separate_item_vectors="all"``, every size adds a learned bias of its own
            per item to its scores, as LRURec's output layer does: a prior per item (popularity)
            beside the match of vectors. Scored as one more dimension (``recsys/nn/item_bias.py``):
            the size's own item vectors end in their biases, its user vectors in a one, and an
            export holds and searches them so (``s + 1`` floats per vector).
        lr: peak AdamW learning rate.
        weight_decay: AdamW weight decay (not applied to norms, biases and per-channel vectors).
        warmup_steps: linear warm-up steps before the cosine decay.
        mask_seen: exclude each user's earlier items from the ranking in validation and test.
        loss_block_rows: logit rows (over all sizes) held at once by the memory-flat loss.
        monitor_size: the size whose validation NDCG@10 is logged as ``val/monitor`` for early
            stopping and best-checkpoint selection; ``"mean"``: the mean
            over all sizes, so training goes on while any size still improves; ``"each"``: every
            size keeps its own best checkpoint (the training CLI saves ``best-d<size>.ckpt``; it is
            tested and exported from it), ``val/monitor`` is the mean of the sizes' best scores so
            far, so early stopping waits until no size has improved for its patience. Unset:
            ``"each"`` (a grid of triples: ``"mean"``, its only monitor).
        loss: ``full`` (softmax over the whole catalogue, memory flat in the number of sizes) or
            ``sampled`` (``negatives`` shared negatives per step, for catalogues too large for a
            full softmax per step).
        negatives: the sampled loss's negatives per step.
        negative_sampling: ``popularity`` (drawn by training count, logits corrected by
            ``-log q``) or ``uniform`` over the items that occur in training.
        distill: in-place self-distillation (full loss only): every size but the largest also
            learns the detached softmax of ``distill_teacher`` with this weight (0 = off); with a
            loss per size (``separate_item_vectors``, ``nesting="slices"``) the teacher's softmax
            is its own scores, against its own item vectors. Unset: 0.5 with the recipe (below)
            where the loss is full, the temperature not learned and there are several sizes, else 0.
        distill_teacher: ``largest`` (every smaller size learns from the largest), ``next``
            (each size from the next larger one, a cascade) or ``average`` (every smaller size learns
            from the largest size scored with a moving average of the weights, without dropout: a
            steadier teacher, for one more forward pass per step; a single size has no student).
        teacher_decay: with ``distill_teacher="average"``, the average's decay per training step.
        depths: elastic depths, e.g. ``[1, 2, 4]`` (the last must equal ``n_blocks``): the state at
            depth ``d`` is the output after block ``d`` (with the final norm). Default: none.
        pairs: elastic ``[width, size]`` pairs (``size <= width``, both among ``sizes``): served
            with the encoder cut to ``width`` and ``size``-dim vectors (default with ``depths``:
            ``[s, s]`` for every size, the nested cut).
        grid: how depths combine with pairs: ``diagonal`` (Starbucks: small pairs with shallow
            depths, small to large) or ``full`` (every depth with every pair).
        triples: the trained ``[depth, width, size]`` triples outright (instead of ``pairs``).
            With any of these the loss covers every trained triple and the metrics are named by
            triple (``test/ndcg_10/L2_w128_d64``); without them the model is the plain nested one.

    The recipe: ``nesting``, ``prefix_gradient``, ``distill`` and ``monitor_size`` left unset take
    the values that kept every size level with the same size trained alone on the three datasets
    measured (docs/results.md, "Where the promise stands"), with the LRU encoder and no grid
    (:func:`recsys.model_options.recipe_of`); ``hparams`` hold the values so taken.

    The encoder options may also be given as plain mappings of their fields; they are stored in
    ``hparams`` (and checkpoints) as such, so that a checkpoint loads with ``weights_only``.
    """

    def __init__(
        self,
        item_features: ItemFeatures | None = None,
        cold_start_items: list[int] | None = None,
        item_counts: list[int] | None = None,
        sizes: list[int] = [16, 32, 64, 128],
        encoder: str = "lru",
        n_blocks: int = 2,
        dropout: float = 0.1,
        input_dropout: float = 0.1,
        lru: LRUOptions = LRUOptions(),  # noqa: B008 - frozen, so a shared default is safe
        mamba: MambaOptions = MambaOptions(),  # noqa: B008
        sasrec: SASRecOptions = SASRecOptions(),  # noqa: B008
        max_len: int = 50,
        use_id_embedding: bool = False,
        id_dropout: float = 0.0,
        modalities: list[str] | None = None,
        loss_weights: list[float] | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.01,
        warmup_steps: int = 100,
        mask_seen: bool = True,
        loss_block_rows: int = 1024,
        monitor_size: int | Literal["mean", "each"] | None = None,
        loss: Literal["full", "sampled"] = "full",
        negatives: int = 1024,
        negative_sampling: Literal["uniform", "popularity"] = "popularity",
        distill: float | None = None,
        distill_teacher: Literal["largest", "next", "average"] = "largest",
        teacher_decay: float = 0.99,
        depths: list[int] | None = None,
        pairs: list[list[int]] | None = None,
        grid: Literal["diagonal", "full"] = "diagonal",
        triples: list[list[int]] | None = None,
        learned_temperature: bool = False,
        separate_item_vectors: bool | Literal["all"] = False,
        prefix_gradient: float | None = None,
        nesting: Literal["blocks", "slices"] | None = None,
        init_std: float | None = None,
        output_item_norm: bool = True,
        output_bias: bool = False,
    ) -> None:
        super().__init__()
        # the CLI logs the whole config; the item features and cold-start items come from the data
        self.save_hyperparameters(ignore=["item_features", "cold_start_items", "item_counts"], logger=False)
        recipe = recipe_of(**self.hparams)  # the options left unset, as trained (and logged, and checkpointed)
        self.hparams.update(recipe)
        nesting, prefix_gradient, distill = recipe["nesting"], recipe["prefix_gradient"], recipe["distill"]
        self.sizes, self.monitor_size, self.encoder_configs, grid = check_options(**self.hparams)
        #: what is trained: every size at full depth, or the grid's triples
        self.trained = SubModels.of(self.sizes, n_blocks, grid)
        # hparams hold plain dicts, never the option objects (weights_only loading)
        self.hparams.update({name: asdict(self.encoder_configs[name]) for name in ("lru", "mamba", "sasrec")})
        if item_features is None:
            raise ValueError("item_features is required (the training CLI links it from the data module)")
        self._set_training_candidates(item_features.num_items, cold_start_items)
        self._set_negative_sampling(item_features, item_counts)
        from recsys.nn.item_tower import (
            ItemTower,  # torchrec: not imported until a model is built
        )

        self.net = SequentialRecommender(
            ItemTower(self.sizes, item_features, use_id_embedding=use_id_embedding, modalities=modalities,
                      id_dropout=id_dropout, nesting=nesting),
            build_encoder(encoder, self.sizes, **self.encoder_options()),
            input_dropout=input_dropout,
            grid=grid,
        )
        # slices: every size its own network over the weights' slices (which carry the prefix gradient)
        self._slices = SizeSlices(self.net, self.sizes) if nesting == "slices" else None
        if self._slices is None:
            set_prefix_gradient(self.net, prefix_gradient)
        # the output item towers of the sizes below the largest (or of all), with separate_item_vectors
        head_sizes = self.sizes if separate_item_vectors == "all" else self.sizes[:-1] if separate_item_vectors else ()
        self.item_heads = torch.nn.ModuleList(
            ItemTower((size,), item_features, use_id_embedding=use_id_embedding, modalities=modalities, id_dropout=id_dropout,
                      normalise=output_item_norm)
            for size in head_sizes
        ) if head_sizes else None  # (true with one size: the plain model)
        # each own-vector size's bias per item (output_bias; one-dimensional: never weight-decayed)
        self.output_bias = torch.nn.ParameterList(
            torch.nn.Parameter(torch.zeros(item_features.num_items + 1)) for _ in head_sizes
        ) if output_bias else None
        if init_std is not None:
            truncated_normal_init_(self, init_std)
        self._eval_head_items: list[torch.Tensor] | None = None
        self._eval_nets: list | None = None  # per size: (network, item matrix, own item vectors); see _size_networks
        #: size -> checkpoint whose weights rank that size in test (``monitor_size="each"``; set by the training CLI)
        self.test_checkpoints: dict[int, str] | None = None
        self.best_val_by_size: dict[str, tuple[float, int]] = {}  # label -> (best val NDCG@10, its epoch)
        # log of each size's logit factor (outside ``net``: exports never see it)
        self.log_logit_scale = torch.nn.Parameter(torch.zeros(len(self.sizes))) if learned_temperature else None
        # metrics rows are the trained sub-models (numbered 1..T, named by metric_name)
        rows = tuple(range(1, len(self.trained.triples) + 1))
        self.val_metrics = RankingMetrics(rows)
        self.test_metrics = RankingMetrics(rows, keep_ranks=True)  # per-user ranks for significance tests
        self._eval_items: torch.Tensor | None = None
        # the teacher's weights (distill_teacher="average"; outside ``net``: exports never see them)
        averaged = distill > 0 and distill_teacher == "average" and len(self.sizes) > 1  # one size: no student
        self.teacher_average = WeightAverage(self, teacher_decay) if averaged else None

    def _set_training_candidates(self, num_items: int, cold_start_items) -> None:
        """The cold-start protocol: items held out of training are no candidates in the training
        loss, which runs over the other rows of the item matrix (``_train_rows``, row 0 first;
        ``_train_row_of`` maps an item to its row there). Validation and test rank every item."""
        cold = torch.as_tensor(np.asarray([] if cold_start_items is None else cold_start_items, dtype=np.int64))
        self.register_buffer("_train_rows", None, persistent=False)
        self.register_buffer("_train_row_of", None, persistent=False)
        if not len(cold):
            return
        if int(cold.min()) < 1 or int(cold.max()) > num_items:
            raise ValueError(f"cold_start_items must be item indices in [1, {num_items}]")
        keep = torch.ones(num_items + 1, dtype=torch.bool)
        keep[cold] = False
        rows = keep.nonzero().squeeze(1)
        row_of = torch.zeros(num_items + 1, dtype=torch.long)  # a cold item maps to 0: never a target
        row_of[rows] = torch.arange(len(rows))
        self._train_rows, self._train_row_of = rows, row_of

    def _set_negative_sampling(self, item_features: ItemFeatures, item_counts) -> None:
        """The sampled loss's log sampling probability of each training-candidate row (``_log_q``):
        uniform over the items that occur in training, or proportional to their training counts
        (``item_counts``, linked from the data). Rows never drawn have ``-inf``."""
        self.register_buffer("_log_q", None, persistent=False)
        if self.hparams.loss != "sampled":
            return
        if self.hparams.negative_sampling == "popularity":
            if item_counts is None:  # a model loaded for export or evaluation: no training steps
                return
            weight = torch.as_tensor(np.asarray(item_counts, dtype=np.float64))
        else:
            weight = item_features.in_training.to(torch.float64)
        weight = weight.clone()
        weight[0] = 0.0  # the padding row is never a candidate
        if self._train_rows is not None:
            weight = weight[self._train_rows]
        if not (weight > 0).any():
            raise ValueError("the sampled loss has no item to draw negatives from (no item occurs in training)")
        self._log_q = (weight / weight.sum()).log().float()

    def encoder_options(self) -> dict[str, Any]:
        """The constructor options of the chosen encoder (also written into exports)."""
        h = self.hparams
        specific = asdict(self.encoder_configs[h.encoder])
        if h.encoder == "sasrec":
            specific["max_len"] = h.max_len
        specific["nesting"] = h.get("nesting", "blocks")
        # options added after the export format, written only when set otherwise: an export at their
        # defaults reads as before (older servers)
        specific = {k: v for k, v in specific.items() if LATER_ENCODER_DEFAULTS.get(k, object()) != v}
        return {"n_blocks": h.n_blocks, "dropout": h.dropout, **specific}

    # -- checkpoints --------------------------------------------------------------------------

    @classmethod
    def from_checkpoint(cls, path: str | Path, map_location: str | torch.device = "cpu") -> "MatryoshkaRecommender":
        """Load a checkpoint without the data module: the item features come from its buffers.

        Loads with ``weights_only=True`` (no pickle code runs); see :func:`read_checkpoint`.
        Checkpoints written before the encoder options were grouped (flat ``r_min``, ``d_state``,
        ``n_heads``, ... in ``hyper_parameters``) load too.
        """
        from recsys.nn.item_tower import ItemTower

        ckpt = read_checkpoint(path, map_location)
        state = ckpt["state_dict"]
        features = ItemTower.features_from_state_dict(state, prefix="net.items.")
        options = {k: v for k, v in ckpt["hyper_parameters"].items() if not k.startswith("_")}  # CLI bookkeeping
        model = cls(item_features=features, **nest_flat_options(options))
        model.load_state_dict(state)
        model.catalogue = ckpt.get("catalogue")
        return model

    #: settings that change only speed or memory: a resumed run may change them
    SPEED_SETTINGS = ("loss_block_rows",)

    def resume_problems(self, checkpoint: dict[str, Any]) -> list[str]:
        """The settings ``checkpoint`` was trained with that are set otherwise now (as ``--model.``
        flags, with both values); empty when training can resume from it."""
        recorded = nest_flat_options({k: v for k, v in checkpoint["hyper_parameters"].items() if not k.startswith("_")})
        return [f"--model.{name} was {there!r}, now {here!r}"
                for name, there, here in _differences(recorded, dict(self.hparams)) if name not in self.SPEED_SETTINGS]

    def weight_problems(self, checkpoint: dict[str, Any]) -> list[str]:
        """The first weight of ``checkpoint`` of another shape than this model's, or else the first
        that only one of them has."""
        here = {k: tuple(v.shape) for k, v in self.state_dict().items()}
        there = {k: tuple(v.shape) for k, v in checkpoint["state_dict"].items()}
        for name in sorted(here.keys() & there.keys()):
            if here[name] != there[name]:
                return [f"its weight {name} has shape {there[name]}, this model's {here[name]}"]
        for name in sorted(here.keys() ^ there.keys()):
            return [f"it has no weight {name}, which this model has" if name in here else f"its weight {name} is not part of this model"]
        return []

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep the catalogue (original ids, popularity, data stats) with the weights, so that an
        export needs nothing but the checkpoint. Stored as plain lists: loadable with weights_only."""
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is not None and hasattr(datamodule, "dataset"):
            self.catalogue = catalogue_of(datamodule.dataset)
            checkpoint["data_fingerprint"] = datamodule.fingerprint()  # checked before a resume
        if getattr(self, "catalogue", None) is not None:
            checkpoint["catalogue"] = self.catalogue
        checkpoint["best_val_by_size"] = {k: list(v) for k, v in self.best_val_by_size.items()}  # kept on resume
        logger = self.logger if self._trainer is not None else None
        run_id = getattr(logger, "run_id", None)
        if run_id:
            checkpoint["mlflow_run_id"] = run_id  # so that a resumed training continues the same run
        elif type(logger).__name__ == "CSVLogger":
            checkpoint["run_dir"] = str(logger.log_dir)  # ... or the same run directory

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """A resumed run keeps its sizes' best validation scores; testing an earlier checkpoint
        keeps the later ones (the better of the two is kept)."""
        for label, (value, epoch) in checkpoint.get("best_val_by_size", {}).items():
            if label not in self.best_val_by_size or value > self.best_val_by_size[label][0]:
                self.best_val_by_size[label] = (float(value), int(epoch))

    # -- training -----------------------------------------------------------------------------

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        total, names, per_size, distill, n = self.training_loss(batch)
        if self._summed_over_processes(~torch.isfinite(total)):
            raise DivergedError(
                f"the training loss is {float(total.detach())} at {self._where()} "
                f"(per size: {[round(float(v), 4) for v in per_size]}): {DIVERGED_CAUSES}; training stopped"
            )
        self.log("train/loss", total, prog_bar=True, batch_size=n)
        if self.log_logit_scale is not None:
            for size, value in zip(self.sizes, self.log_logit_scale.detach().exp()):
                self.log(f"train/logit_scale/d{size}", value, batch_size=n)
        for name, value in zip(names, per_size):
            self.log(f"train/ce/{name}", value, batch_size=n)
        if self.hparams.distill > 0:  # every size but the largest of its group learns from a teacher
            for name, value in zip(names, distill):
                if value is not None:
                    self.log(f"train/distill/{name}", value, batch_size=n)
        return total

    def training_loss(self, batch: dict[str, torch.Tensor]):
        """``(total, names, per_size CE, per_size KL, valid positions)`` of one batch: the sum of
        one memory-flat loss per group of trained sub-models whose vectors are prefixes of one
        tensor (``recsys/nn/grid.py``; a run over sizes alone is one group), or with the per-size
        options one loss per size (``nesting="slices"``, ``separate_item_vectors``). The KL entry is
        None where there is none (the largest size of each loss, or no distillation)."""
        teacher = None if self.teacher_average is None else self._averaged_teacher(batch)
        step = self.step_inputs(batch, with_items=self._slices is None)  # slices: each size its own items
        valid = step.targets > 0
        scales = None if self.log_logit_scale is None else self.log_logit_scale.exp()
        if self._slices is not None:
            losses = [self._sliced_loss(step, valid, scales, teacher)]
        else:
            states = self._states(step.input_ids, step.items)
            if self.item_heads is not None:
                losses = [self._separate_items_loss(states[self.hparams.n_blocks][valid], step, scales, teacher)]
            else:  # (a grid has no loss weights, scales or averaged teacher: check_options)
                losses = [self._loss(self.net.group_vectors(group, states[group.depth][valid]), step, group.sizes,
                                     self.hparams.loss_weights, scales, teacher_vectors=teacher)
                          for group in self.trained.groups]
        total = sum(loss.total for loss in losses)
        per_size = [value for loss in losses for value in loss.per_size]
        distill = [entry for loss in losses for entry in _kl_entries(loss)]
        return total, [self.trained.name(t) for g in self.trained.groups for t in g.triples], per_size, distill, int(valid.sum())

    def _states(self, input_ids: torch.Tensor, items: torch.Tensor, last: bool = False) -> dict[int, torch.Tensor]:
        """``{depth: states}`` at every trained depth, from one encoder pass: ``(B, L, width)``, or
        with ``last`` the state after each history's last item ``(B, width)``. At the full depth
        alone (a run over sizes) the encoder runs whole, and in evaluation computes the last state only."""
        depths = self.trained.depths
        if depths == [self.hparams.n_blocks]:
            whole = self.net.user_vectors(input_ids, items) if last else self.net.sequence_states(input_ids, items)
            return {depths[0]: whole}
        states = self.net.depth_states(input_ids, items, depths)
        return {d: state[:, -1] for d, state in states.items()} if last else states

    def step_inputs(self, batch: dict[str, torch.Tensor], with_items: bool = True) -> StepInputs:
        """The item vectors of one training step and the batch's indices into them (``with_items``
        False: the indices alone, items and candidates None, for a loss whose sizes compute their
        own item vectors, ``nesting="slices"``).

        The full softmax needs every item: the item matrix, the histories as they are, and the
        targets as rows of the training candidates (cold-start items held out: ``_train_rows``).
        The sampled softmax needs only the items of the histories, the targets and the shared
        negatives (drawn here): the tower computes those rows alone (``ItemTower(rows)``, equal to
        its full matrix's rows), and every index is renumbered into them, the padding item first.
        On Sports that is about a sixth of the catalogue, and of the tower's work.
        """
        input_ids, targets = batch["input_ids"], batch["target_ids"]
        if self.hparams.loss == "full":
            items = self.net.item_matrix() if with_items else None
            if self._train_rows is None:
                return StepInputs(items, input_ids, items, targets)
            # cold-start items are no candidates in training
            return StepInputs(items, input_ids, None if items is None else items[self._train_rows], self._train_row_of[targets])
        if self._log_q is None:
            raise ValueError("negative_sampling 'popularity' needs item_counts (the training CLI links them from the data)")
        # shared negatives drawn from q, every logit corrected by -log q (unbiased as K grows); in item ids
        drawn = torch.multinomial(self._log_q.exp(), self.hparams.negatives, replacement=True)
        log_q = self._log_q
        if self._train_rows is not None:
            drawn = self._train_rows[drawn]
            targets = torch.where(self._train_row_of[targets] > 0, targets, 0)
            log_q = torch.full((self.net.items.num_items + 1,), -math.inf, device=log_q.device).index_put((self._train_rows,), log_q)
        rows = torch.unique(torch.cat([targets.new_zeros(1), input_ids.flatten(), targets.flatten(), drawn]))
        items = self.net.items(rows) if with_items else None
        log_q = log_q[rows] if self.hparams.negative_sampling == "popularity" else None
        input_ids, targets, drawn = (torch.searchsorted(rows, ids.contiguous()) for ids in (input_ids, targets, drawn))
        return StepInputs(items, input_ids, items, targets, drawn, log_q, rows)

    def _loss(self, user: torch.Tensor, step: StepInputs, sizes, weights, logit_scales=None, side_by_side=False,
              teacher_vectors=None):
        """The configured Matryoshka loss of ``user`` vectors over the prefixes ``sizes`` (with
        ``side_by_side``, the full loss of sizes whose vectors lie side by side, ``sizes`` their ends;
        with ``teacher_vectors``, every size but the largest distils from that outside teacher)."""
        candidates = step.candidates[:, : sizes[-1]]
        targets = step.targets[step.targets > 0]
        if self.hparams.loss == "full":
            return matryoshka_cross_entropy(
                user, candidates, targets, sizes,
                weights=weights, block_rows=self.hparams.loss_block_rows,
                distill=self.hparams.distill, teacher=_in_loss_teacher(self.hparams.distill_teacher),
                logit_scales=logit_scales, teacher_vectors=teacher_vectors, teach_largest=False, side_by_side=side_by_side,
            )
        return sampled_matryoshka_cross_entropy(user, candidates, targets, sizes, step.negatives, log_q=step.log_q,
                                                weights=weights, logit_scales=logit_scales)

    def _separate_items_loss(self, user: torch.Tensor, step: StepInputs, logit_scales=None, teacher=None) -> MatryoshkaLoss:
        """Every size's softmax against its own item vectors (``separate_item_vectors``), one loss
        per size against its own matrix (each full softmax memory-flat, each sampled one over the
        step's rows of that size's tower): ``M`` products of ``s_m`` columns instead of one of ``D``."""
        heads = self._training_head_items(step)
        factor = self.hparams.prefix_gradient
        starts = (0, *self.sizes[:-1])  # where each size's own chunk starts
        scored = []
        for m, (size, start, items) in enumerate(zip(self.sizes, starts, [*heads, step.candidates])):
            users = scale_prefix_gradient(user[:, :size], start, factor)
            if m < len(heads):  # its own item vectors (with output_bias, ending in the biases)
                users = self._own_scored(users)
            else:
                items = scale_prefix_gradient(items, start, factor)
            scored.append((users, step._replace(candidates=items)))
        return self._per_size_loss(scored, logit_scales, teacher)

    def _sliced_loss(self, step: StepInputs, valid: torch.Tensor, logit_scales=None, teacher=None) -> MatryoshkaLoss:
        """``nesting="slices"``: every size is its own network over the top-left slices of the
        weights (:class:`~recsys.nn.nested.SizeSlices`, which also applies ``prefix_gradient``): its
        own item matrix, its own states, its softmax against its own item vectors (or that matrix)."""
        heads = self._training_head_items(step)
        scored = [self._sliced_scored(step, valid, m, heads[m] if m < len(heads) else None) for m in range(len(self.sizes))]
        return self._per_size_loss(scored, logit_scales, teacher)

    def _sliced_scored(self, step: StepInputs, valid: torch.Tensor, m: int,
                       head_items: torch.Tensor | None) -> tuple[torch.Tensor, StepInputs]:
        """``nesting="slices"``: size ``m``'s own network's states at the ``valid`` positions and the
        step with its own item matrix and the candidates it scores: ``head_items``, its own output
        item vectors where it has them, else that matrix."""
        net = self._slices.network(self.net, self.sizes[m], self.hparams.prefix_gradient)
        items = net("item_matrix") if step.rows is None else net("items", step.rows)
        states = net("sequence_states", step.input_ids, items)[valid]
        if head_items is not None:  # its own item vectors (with output_bias, ending in the biases)
            candidates, states = head_items, self._own_scored(states)
        else:
            candidates = items if step.rows is not None or self._train_rows is None else items[self._train_rows]
        return states, step._replace(items=items, candidates=candidates)

    def _training_head_items(self, step: StepInputs) -> list[torch.Tensor]:
        """The item vectors of the sizes that have their own (``separate_item_vectors``), smallest
        first, as this step's loss reads them (the sampled rows, or the training candidates)."""
        return [] if self.item_heads is None else [self._training_head_item(step, m) for m in range(len(self.item_heads))]

    def _training_head_item(self, step: StepInputs, m: int) -> torch.Tensor:
        """The ``m``-th own item vectors as this step's loss reads them (see :meth:`_training_head_items`)."""
        sampled = self.hparams.loss == "sampled"
        rows = step.rows if sampled else self._train_rows  # None: every row
        head = self.item_heads[m]
        return self._with_own_bias(head(rows) if sampled else head() if rows is None else head()[rows], m, rows)

    def _with_own_bias(self, vectors: torch.Tensor, m: int, rows: torch.Tensor | None = None,
                       biases: torch.nn.ParameterList | None = None) -> torch.Tensor:
        """The ``m``-th own item vectors (of ``rows``, or all) ending in their biases with
        ``output_bias`` (of ``biases``, a copy of ``output_bias``, where given); as they are without."""
        biases = self.output_bias if biases is None else biases
        if biases is None:
            return vectors
        return with_bias_column(vectors, biases[m] if rows is None else biases[m][rows])

    def _own_scored(self, users: torch.Tensor) -> torch.Tensor:
        """User vectors as they score their size's own item vectors: ending in a one with ``output_bias``."""
        return users if self.output_bias is None else with_ones_column(users)

    def _per_size_loss(self, scored: list[tuple[torch.Tensor, StepInputs]], logit_scales=None, teacher=None) -> MatryoshkaLoss:
        """Every size's own loss, from each size's ``(user vectors, step)`` (its candidates the item
        vectors it scores), weighted by ``loss_weights``, as one :class:`MatryoshkaLoss`. The full
        softmax takes all sizes in one pass, their vectors side by side, so that with ``distill``
        (every size but the largest also learns the detached softmax of ``distill_teacher``, scored
        as the teacher scores) each teacher's softmax is computed once; the sampled one, one loss
        per size (it has no distillation)."""
        weights = self.hparams.loss_weights or [1.0] * len(self.sizes)
        widths = [users.shape[1] for users, _ in scored]
        if self.hparams.loss == "full":
            users = torch.cat([users for users, _ in scored], dim=1)
            candidates = torch.cat([step.candidates[:, :width] for (_, step), width in zip(scored, widths)], dim=1)
            ends = tuple(itertools.accumulate(widths))
            return self._loss(users, scored[0][1]._replace(candidates=candidates), ends, weights, logit_scales,
                              side_by_side=True, teacher_vectors=teacher)
        losses = [self._loss(users, step, (width,), (weights[m],), None if logit_scales is None else logit_scales[m : m + 1])
                  for m, ((users, step), width) in enumerate(zip(scored, widths))]
        return MatryoshkaLoss(sum(loss.total for loss in losses), torch.cat([loss.per_size for loss in losses]))

    @torch.no_grad()
    def _averaged_teacher(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """``distill_teacher="average"``: this batch's largest-size (user vectors, candidate item
        vectors) as the moving average of the weights scores them, without dropout; computed before
        the step's own forward pass, so that no graph of the weights is pending while they are swapped."""
        training = self.training
        self.train(False)
        try:
            with self.teacher_average.swapped_in(self):
                step = self.step_inputs(batch, with_items=self._slices is None)
                return self._largest_scored(step, step.targets > 0)
        finally:
            self.train(training)

    def _largest_scored(self, step: StepInputs, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The largest size's user vectors at the ``valid`` positions and the item vectors it scores
        them against in training (its own with ``separate_item_vectors="all"``); the other sizes' item
        vectors are not computed."""
        m = len(self.sizes) - 1
        own = self.item_heads is not None and len(self.item_heads) == len(self.sizes)
        head_items = self._training_head_item(step, m) if own else None
        if self._slices is not None:
            states, step = self._sliced_scored(step, valid, m, head_items)
            return states, step.candidates
        states = self._states(step.input_ids, step.items)[self.hparams.n_blocks][valid]
        return (self._own_scored(states), head_items) if own else (states, step.candidates)

    @torch.no_grad()
    def own_item_tower(self, size: int, heads: torch.nn.ModuleList | None = None) -> torch.nn.Module | None:
        """The item tower of size ``size``'s own output vectors (``separate_item_vectors``; of
        ``heads``, a copy of ``item_heads``, where given), or None where it scores the prefix of the
        item matrix that it also reads histories through."""
        heads = self.item_heads if heads is None else heads
        if heads is None:
            return None
        own = self.sizes[: len(heads)]  # the sizes below the largest, or with "all" every size
        return heads[own.index(size)] if size in own else None

    @torch.no_grad()
    def own_item_vectors(self, size: int, owner: torch.nn.Module | None = None) -> torch.Tensor | None:
        """``(N + 1, size)``: the item vectors size ``size`` scores against when it has its own
        (``separate_item_vectors``; ``(N + 1, size + 1)`` ending in the biases with ``output_bias``),
        or None (:meth:`own_item_tower`). Of ``owner``'s copies of the heads and biases where given."""
        owner = self if owner is None else owner
        tower = self.own_item_tower(size, owner.item_heads)
        if tower is None:
            return None
        return self._with_own_bias(tower(), self.sizes.index(size), biases=owner.output_bias)

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if self.teacher_average is not None:  # the teacher's weights follow the step just taken
            self.teacher_average.update(self)

    def on_before_optimizer_step(self, optimizer) -> None:
        """A finite loss can still have NaN or infinite gradients (one bad item row in a sampled
        loss): stop before the optimizer writes them into the weights."""
        grads = {name: p.grad for name, p in self.named_parameters() if p.grad is not None}
        if grads and not torch.isfinite(torch.nn.utils.get_total_norm(list(grads.values()))):
            bad = [name for name, g in grads.items() if not torch.isfinite(g).all()]
            raise DivergedError(
                f"the gradients are not finite at {self._where()} (in {', '.join(bad[:3])}"
                f"{f' and {len(bad) - 3} more' if len(bad) > 3 else ''}): {DIVERGED_CAUSES}; training stopped"
            )

    def _where(self) -> str:
        return f"epoch {self.current_epoch}, step {self.global_step}"

    def _summed_over_processes(self, count: torch.Tensor) -> int:
        """``count`` summed over the processes: a collective when distributed, so that a check on it
        stops every process together (one that stopped alone would leave the others waiting for it)."""
        count = count.detach().to(self.device, torch.float32)
        if self._trainer is not None and self.trainer.world_size > 1:
            count = self.trainer.strategy.reduce(count, reduce_op="sum")
        return int(count)

    def optimizer(self) -> torch.optim.AdamW:
        """AdamW over the trainable parameters; norms, biases and per-channel vectors (LRU decays,
        skips) are not decayed. The fused implementation (one kernel per parameter, 3x the default's
        speed on CPU over the ID table), unless float16 mixed precision scales the gradients: then
        clipping needs them unscaled first, which only the default one allows."""
        decay, no_decay = [], []
        for p in self.parameters():
            if p.requires_grad:
                (decay if p.ndim >= 2 else no_decay).append(p)
        scaled = self._trainer is not None and str(self.trainer.precision) == "16-mixed"
        fused = not scaled and all(p.device.type in ("cpu", "cuda") for p in decay + no_decay)
        return torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.hparams.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=self.hparams.lr, fused=fused or None,
        )

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Lightning's clipping of the optimizer's parameters, done here: Lightning refuses it for a
        fused optimizer under any mixed precision, although only float16's gradient scaler (which
        never gets the fused AdamW, see :meth:`optimizer`) needs the gradients unscaled first."""
        if getattr(optimizer, "defaults", {}).get("fused") is not True:
            return super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        if not gradient_clip_val:
            return
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if gradient_clip_algorithm is not None and GradClipAlgorithmType(gradient_clip_algorithm) == GradClipAlgorithmType.VALUE:
            torch.nn.utils.clip_grad_value_(params, gradient_clip_val)
        else:
            torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)

    def configure_optimizers(self):
        optimizer = self.optimizer()
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = min(self.hparams.warmup_steps, total // 2)

        def schedule(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = (step - warmup) / max(1, total - warmup)
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- evaluation ---------------------------------------------------------------------------

    def _eval_step(self, batch: dict[str, torch.Tensor], metrics: RankingMetrics) -> None:
        # float32 throughout, whatever the training precision: the metrics are those of the float32
        # weights that an export serves, and bfloat16 scores would tie or swap close items
        with torch.autocast(self.device.type, enabled=False):
            self._rank_batch(batch, metrics)

    def _rank_batch(self, batch: dict[str, torch.Tensor], metrics: RankingMetrics) -> None:
        stage = "validation" if metrics is self.val_metrics else "test"
        seen = batch["seen_ids"] if self.hparams.mask_seen else None
        if self._slices is not None or (stage == "test" and self.test_checkpoints):
            ranks = self._per_size_ranks(batch, seen, stage)
        else:
            if self._eval_items is None:  # the item matrix is fixed during evaluation: compute it once
                self._eval_items = self.net.item_matrix()
                self._check_finite("item vectors", self._eval_items, stage)
            ranks = self._group_ranks(batch, seen)
        metrics.update(ranks, batch["user"] if metrics.keep_ranks else None)

    def _group_ranks(self, batch: dict[str, torch.Tensor], seen: torch.Tensor | None) -> torch.Tensor:
        """``(T, B)`` target ranks of every trained sub-model, in their order, from one pass of the
        network: per group of sub-models whose vectors are prefixes of one tensor, each one's prefix
        of those vectors against its prefix of the item matrix, or against its own item vectors."""
        states = self._states(batch["input_ids"], self._eval_items, last=True)
        ranks = torch.empty(len(self.trained.triples), len(batch["target"]), dtype=torch.long, device=self.device)
        for group in self.trained.groups:
            users = self.net.group_vectors(group, states[group.depth])
            self._non_finite_users += (~torch.isfinite(users).all(dim=1)).sum()  # checked at the epoch's end, on every process
            rows = self.trained.rows(group)
            if self.item_heads is None:
                items = self._eval_items[:, : group.sizes[-1]]
                ranks[rows] = target_ranks(users, items, batch["target"], group.sizes, seen_ids=seen)
                continue
            if self._eval_head_items is None:
                self._eval_head_items = [self.own_item_vectors(size) for size in self.sizes[: len(self.item_heads)]]
            for m, (row, size) in enumerate(zip(rows, group.sizes)):
                if m < len(self._eval_head_items):
                    users_m, items = self._own_scored(users[:, :size]), self._eval_head_items[m]
                else:
                    users_m, items = users[:, :size], self._eval_items
                ranks[row] = target_ranks(users_m, items, batch["target"], (items.shape[1],), seen_ids=seen)[0]
        return ranks

    def _per_size_ranks(self, batch: dict[str, torch.Tensor], seen: torch.Tensor | None, stage: str) -> torch.Tensor:
        """``(M, B)`` target ranks, every size by its own network (:meth:`_size_networks`) against
        its own item vectors or item matrix (``target_ranks`` takes a size's prefix of both)."""
        if self._eval_nets is None:
            self._eval_nets = self._size_networks(stage)
        ranks = []
        for size, (net, items, own) in zip(self.sizes, self._eval_nets):
            # the size's prefix: the whole of a cut network's vectors, a prefix of an uncut one's (SASRec)
            users = net.user_vectors(batch["input_ids"], items)[:, :size]
            self._non_finite_users += (~torch.isfinite(users).all(dim=1)).sum()
            if own is None:
                ranks.append(target_ranks(users, items[:, :size], batch["target"], (size,), seen_ids=seen))
            else:  # its own item vectors (with output_bias, ending in the biases)
                ranks.append(target_ranks(self._own_scored(users), own, batch["target"], (own.shape[1],), seen_ids=seen))
        return torch.cat(ranks)

    @torch.no_grad()
    def _size_networks(self, stage: str) -> list[tuple[torch.nn.Module, torch.Tensor, torch.Tensor | None]]:
        """``(network, item matrix, own item vectors or None)`` per size, once per evaluation: the
        network cut to the size where it can be (``slices`` must be), and in test with
        ``test_checkpoints`` the weights of that size's own checkpoint."""
        owners = [self] * len(self.sizes)
        if stage == "test" and self.test_checkpoints:
            owners = [self._weights_of(self.test_checkpoints[size]) for size in self.sizes]
        networks = []
        for size, owner in zip(self.sizes, owners):
            net = size_network(owner.net, size)
            items = net.item_matrix()
            self._check_finite("item vectors", items, stage)
            networks.append((net, items, self.own_item_vectors(size, owner)))
        return networks

    def _weights_of(self, checkpoint: str) -> torch.nn.Module:
        """This model's network and item heads (``net``, ``item_heads``) holding a checkpoint's weights."""
        modules = torch.nn.Module()
        modules.net, modules.item_heads, modules.output_bias = self.net, self.item_heads, self.output_bias
        copy = deepcopy(modules)
        state = read_checkpoint(checkpoint, map_location=self.device)["state_dict"]
        copy.load_state_dict({k: v for k, v in state.items() if k.startswith(("net.", "item_heads.", "output_bias."))})
        return copy

    @property
    def trained_triples(self) -> tuple[Triple, ...] | None:
        """The grid's triples when the options asked for one, else None (a run over sizes)."""
        return self.trained.triples if self.trained.elastic else None

    def metric_name(self, key: str) -> str:
        """A metric of the ``RankingMetrics`` (``ndcg_10/d3``: the third trained sub-model) by that
        sub-model's name (``ndcg_10/d64``, or a triple's ``ndcg_10/L2_w128_d64``); other keys as they are."""
        if "/d" not in key:
            return key
        name, row = key.rsplit("/d", 1)
        return f"{name}/{self.trained.names[int(row) - 1]}"

    def _check_finite(self, what: str, vectors: torch.Tensor, stage: str) -> None:
        """Evaluation never ranks with non-finite vectors: the metrics would be meaningless, and the
        checkpoint taken after validation would keep the diverged weights. (The item matrix is the
        same on every process, so every process stops here together.)"""
        bad = ~torch.isfinite(vectors).all(dim=1)
        if bad.any():
            raise DivergedError(
                f"{int(bad.sum())} of {len(vectors)} {what} are not finite in {stage} at {self._where()}: {DIVERGED_CAUSES}; stopped"
            )

    def _start_evaluation(self, metrics: RankingMetrics) -> None:
        self._eval_items = self._eval_head_items = self._eval_nets = None
        self._non_finite_users = torch.zeros((), dtype=torch.long, device=self.device)
        metrics.reset()

    def _log_metrics(self, prefix: str, metrics: RankingMetrics) -> dict[str, float]:
        bad = self._summed_over_processes(self._non_finite_users)
        if bad:
            stage = "validation" if prefix == "val" else "test"
            raise DivergedError(f"{bad} user vectors are not finite in {stage} at {self._where()}: {DIVERGED_CAUSES}; stopped")
        values = metrics.compute()
        metrics.reset()
        self._eval_items = self._eval_head_items = self._eval_nets = None
        values = {self.metric_name(key): value for key, value in values.items()}
        for key, value in values.items():
            if key != "count":
                self.log(f"{prefix}/{key}", value)
        return values

    def on_validation_epoch_start(self) -> None:
        self._start_evaluation(self.val_metrics)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, self.val_metrics)

    def on_validation_epoch_end(self) -> None:
        values = self._log_metrics("val", self.val_metrics)
        self._note_best_validation(values)
        names = self.trained.names
        if self.monitor_size == "mean" or self.trained.elastic:  # (a grid's monitor is the mean: check_options)
            monitor = sum(values[f"ndcg_10/{name}"] for name in names) / len(names)
        elif self.monitor_size == "each":  # rises while any size improves on its own best
            monitor = sum(self.best_val_by_size[name][0] for name in names) / len(names)
        else:
            monitor = values[f"ndcg_10/d{self.monitor_size}"]
        self.log("val/monitor", monitor, prog_bar=True)

    def _note_best_validation(self, values: dict[str, float]) -> None:
        """Each size's (or triple's) best validation NDCG@10 so far and its epoch (``best_val_by_size``):
        the sizes of one run peak at different epochs, and one checkpoint serves them all."""
        for key, value in values.items():
            if key.startswith("ndcg_10/"):
                label = key[len("ndcg_10/"):]
                if label not in self.best_val_by_size or value > self.best_val_by_size[label][0]:
                    self.best_val_by_size[label] = (float(value), int(self.current_epoch))

    def on_test_epoch_start(self) -> None:
        self._start_evaluation(self.test_metrics)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, self.test_metrics)

    def on_test_epoch_end(self) -> None:
        # (users, ranks (M, users)): every test user's target rank at each size
        self.last_test_ranks = self.test_metrics.per_user_ranks()
        self.last_test_metrics = self._log_metrics("test", self.test_metrics)  # frees the copied networks

    # -- reporting ----------------------------------------------------------------------------

    def cut_triple(self, triple: Triple):
        """The network cut to ``triple``: blocks ``1..depth``, width ``width``, ``size``-dim vectors;
        the whole network for a width it cannot be cut to (any but the largest with SASRec, whose
        layers are not nested: its sizes are prefixes of the full-width vectors)."""
        if triple.width not in cut_sizes(self.net):
            return self.net
        return cut_to_size(self.net, triple.size, width=triple.width, depth=triple.depth)
