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
    [("lru", {}), ("mamba", {}), ("sasrec", {})],
)
def test_every_size_beats_popularity(datamodule, encoder, options):
    L.seed_everything(0)
    model = MatryoshkaRecommender(
        item_features=datamodule.item_features, sizes=SIZES, encoder=encoder, max_len=datamodule.max_len,
        lr=3e-3, warmup_steps=10, **options,
    )
    trainer = L.Trainer(
        max_epochs=6, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
    )
    trainer.fit(model, datamodule=datamodule)
    trainer.test(model, datamodule=datamodule, verbose=False)
    baseline = _popularity_ndcg(datamodule)
    for s in SIZES:
        ndcg = model.last_test_metrics[f"ndcg_10/d{s}"]
        assert ndcg > 1.5 * baseline, f"{encoder} d{s}: NDCG@10 {ndcg:.4f} vs popularity {baseline:.4f}"
