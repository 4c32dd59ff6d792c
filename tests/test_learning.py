"""Learning: a short run on the synthetic log beats popularity on NDCG@10 at every size."""

import lightning as L
import pytest
import torch

from recsys.data import SequenceDataModule, SyntheticConfig
from recsys.metrics import RankingMetrics, popularity_scores_ranks
from recsys.model import MatryoshkaRecommender

SIZES = [8, 16, 32]


@pytest.fixture(scope="module")
def datamodule(tmp_path_factory):
    config = SyntheticConfig(num_users=400, num_items=200, seed=3)
    return SequenceDataModule(
        synthetic=config, synthetic_cache_dir=str(tmp_path_factory.mktemp("syn")), max_len=30, batch_size=64
    )


def _popularity_ndcg(datamodule) -> float:
    popularity = torch.from_numpy(datamodule.dataset.train_counts).float()
    metrics = RankingMetrics([SIZES[0]])
    for batch in datamodule.test_dataloader():
        metrics.update(popularity_scores_ranks(popularity, batch["target"], batch["seen_ids"], 1))
    return metrics.compute()[f"ndcg_10/d{SIZES[0]}"]


@pytest.mark.parametrize(
    "encoder,options",
    [("lru", {}), ("mamba", {}), ("sasrec", {}), ("lru", {"distill": 1.0, "distill_teacher": "next"}),
     ("lru", {"distill": 1.0, "distill_teacher": "average", "teacher_decay": 0.9})],
)
def test_every_size_beats_popularity(datamodule, encoder, options):
    L.seed_everything(0)
    model = MatryoshkaRecommender(
        item_features=datamodule.item_features, sizes=SIZES, encoder=encoder, max_len=datamodule.max_len,
        lr=3e-3, warmup_steps=10, **options,
    )
    _assert_training_beats_popularity(model, datamodule, encoder)


def _assert_training_beats_popularity(model, datamodule, label: str) -> None:
    """Six epochs, then NDCG@10 at every size above 1.5x the popularity baseline."""
    trainer = L.Trainer(
        max_epochs=6, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
    )
    trainer.fit(model, datamodule=datamodule)
    trainer.test(model, datamodule=datamodule, verbose=False)
    baseline = _popularity_ndcg(datamodule)
    for s in SIZES:
        ndcg = model.last_test_metrics[f"ndcg_10/d{s}"]
        assert ndcg > 1.5 * baseline, f"{label} d{s}: NDCG@10 {ndcg:.4f} vs popularity {baseline:.4f}"


def test_cold_start_items_are_no_candidates_in_training(datamodule):
    """With cold-start items the training loss is the loss over the catalogue without their rows
    (they are no negatives, and a window targeting one is ignored there), unlike the plain loss."""
    from recsys.nn.loss import matryoshka_cross_entropy

    cold = [3, 5, 7, 11]
    batch = datamodule.train_windows.__getitems__(list(range(32)))
    keep = [i for i in range(datamodule.num_items + 1) if i not in cold]
    targets = batch["target_ids"]
    L.seed_everything(0)
    model = MatryoshkaRecommender(item_features=datamodule.item_features, sizes=SIZES, dropout=0.0, input_dropout=0.0,
                                  cold_start_items=cold, max_len=datamodule.max_len, nesting="blocks")
    loss = model.training_step(batch, 0)
    items = model.net.item_matrix()
    states = model.net.sequence_states(batch["input_ids"], items)
    remap = torch.zeros(datamodule.num_items + 1, dtype=torch.long)
    remap[keep] = torch.arange(len(keep))
    t = remap[targets]
    valid = t > 0
    expected = matryoshka_cross_entropy(states[valid], items[keep], t[valid], SIZES).total
    torch.testing.assert_close(loss, expected)
    plain = MatryoshkaRecommender(item_features=datamodule.item_features, sizes=SIZES, dropout=0.0, input_dropout=0.0,
                                  max_len=datamodule.max_len, nesting="blocks")
    plain.load_state_dict(model.state_dict())  # the cold-start rows are no state: same weights
    assert not torch.allclose(plain.training_step(batch, 0), loss)
    with pytest.raises(ValueError, match="cold_start_items"):
        MatryoshkaRecommender(item_features=datamodule.item_features, sizes=SIZES, cold_start_items=[0])


@pytest.mark.parametrize("sampling", ["uniform", "popularity"])
def test_sampled_loss_trains_and_beats_popularity(datamodule, sampling):
    """--model.loss sampled: shared negatives per step (log-Q corrected when drawn by popularity);
    a short run still beats popularity at every size."""
    L.seed_everything(0)
    model = MatryoshkaRecommender(
        item_features=datamodule.item_features, item_counts=datamodule.item_counts, sizes=SIZES,
        max_len=datamodule.max_len, lr=3e-3, warmup_steps=10, loss="sampled", negatives=64, negative_sampling=sampling,
    )
    q = model._log_q.exp()
    assert q.sum().item() == pytest.approx(1.0) and q[0] == 0
    if sampling == "uniform":
        in_training = datamodule.item_features.in_training
        assert torch.allclose(q[in_training], q[in_training][0].expand(int(in_training.sum())))
    _assert_training_beats_popularity(model, datamodule, f"sampled ({sampling})")


def test_sampled_loss_options_are_checked(datamodule):
    from recsys.nn.encoders import OptionError

    with pytest.raises(OptionError, match="negatives must be a positive integer"):
        MatryoshkaRecommender(item_features=datamodule.item_features, sizes=SIZES, loss="sampled", negatives=0)
    with pytest.raises(OptionError, match="unknown loss 'bpr'"):
        MatryoshkaRecommender(item_features=datamodule.item_features, sizes=SIZES, loss="bpr")
    # without the counts (a checkpoint loaded for export) it builds, and refuses only to train
    model = MatryoshkaRecommender(item_features=datamodule.item_features, sizes=SIZES, loss="sampled")
    with pytest.raises(ValueError, match="needs item_counts"):
        model.training_step(datamodule.train_windows.__getitems__([0, 1]), 0)


@pytest.mark.parametrize("cold", [False, True])
def test_sampled_loss_on_the_step_rows_equals_the_loss_on_the_whole_item_matrix(datamodule, cold):
    """The sampled softmax computes only the item rows a step uses (histories, targets, negatives);
    its loss and gradients equal those of the same negatives over the whole item matrix."""
    from recsys.nn.loss import sampled_matryoshka_cross_entropy

    items_n = datamodule.item_features.num_items
    model = MatryoshkaRecommender(
        item_features=datamodule.item_features, item_counts=datamodule.item_counts, sizes=SIZES,
        max_len=datamodule.max_len, loss="sampled", negatives=32, dropout=0.0, input_dropout=0.0, nesting="blocks",
        cold_start_items=list(range(items_n - 4, items_n + 1)) if cold else None,
    )
    batch = next(iter(datamodule.train_dataloader()))
    torch.manual_seed(7)
    total, *_ = model.training_loss(batch)
    grads = torch.autograd.grad(total, list(model.parameters()), allow_unused=True)

    torch.manual_seed(7)  # the same negatives, drawn as step_inputs draws them
    drawn = torch.multinomial(model._log_q.exp(), 32, replacement=True)
    items = model.net.item_matrix()
    targets = batch["target_ids"]
    candidates, log_q = items, model._log_q
    if cold:
        candidates, targets = items[model._train_rows], model._train_row_of[targets]
    states = model.net.sequence_states(batch["input_ids"], items)
    valid = targets > 0
    reference = sampled_matryoshka_cross_entropy(states[valid], candidates, targets[valid], SIZES, drawn, log_q=log_q).total
    wanted = torch.autograd.grad(reference, list(model.parameters()), allow_unused=True)
    torch.testing.assert_close(total, reference, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, wanted):
        if want is None:
            assert got is None or not got.any()
        else:
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_fused_adamw_still_clips_gradients_by_norm_and_by_value(datamodule):
    """The model's optimizer is the fused AdamW, which Lightning will not clip under mixed
    precision; the model clips its parameters itself, as Lightning would."""
    model = MatryoshkaRecommender(item_features=datamodule.item_features, sizes=SIZES, max_len=datamodule.max_len)
    optimizer = model.optimizer()
    assert optimizer.defaults["fused"] is True
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for algorithm, check in (("norm", lambda: torch.nn.utils.get_total_norm([p.grad for p in params]) <= 1.0 + 1e-4),
                             ("value", lambda: max(p.grad.abs().max() for p in params) <= 0.5)):
        for p in params:
            p.grad = torch.full_like(p, 3.0)
        model.configure_gradient_clipping(optimizer, 1.0 if algorithm == "norm" else 0.5, algorithm)
        assert check(), algorithm
    model.configure_gradient_clipping(optimizer, None, None)  # no clipping asked: nothing happens
