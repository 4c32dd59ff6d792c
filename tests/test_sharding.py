"""Sharded item tables (recsys/sharding.py) on two CPU processes over gloo.

One step of the sharded model (torchrec DMP: tables row-wise or table-wise, dense parameters in
DDP) on two halves of a batch equals one step of the unsharded model on the whole batch: the same
losses, the same dense gradients, the same table-row gradients (read from an exact-SGD update of
the fused optimizer, lr 1). A training run with ``--trainer.strategy sharded`` writes a plain
checkpoint (whole tables, the planner's choice recorded) that loads in one process and scores as
the run did.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from recsys.item_features import CategoricalBag, ItemFeatures
from recsys.nn import embedding_tables

pytestmark = pytest.mark.skipif(not embedding_tables.TORCHREC, reason="torchrec does not import here")

from synthetic_runs import SIZES, small_run_args  # tests/ is on the path
N = 60  # items
WORLD = 2
ROWS_PER_RANK = 6  # sequences per process
LEN = 7
TOL = dict(rtol=1e-5, atol=1e-6)  # float32 sums in another order (reduced over processes)


def _features() -> ItemFeatures:
    g = torch.Generator().manual_seed(0)
    text = torch.randn(N + 1, 12, generator=g)
    lengths = torch.randint(0, 4, (N + 1,), generator=g)
    lengths[0] = 0
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    genres = torch.randint(0, 9, (int(offsets[-1]),), generator=g)
    lengths = torch.randint(1, 3, (N + 1,), generator=g)
    lengths[0] = 0
    tag_offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    tags = torch.randint(0, 40, (int(tag_offsets[-1]),), generator=g)
    in_training = torch.ones(N + 1, dtype=torch.bool)
    in_training[0] = False
    in_training[-4:] = False
    return ItemFeatures(
        num_items=N,
        dense={"text": text},
        dense_mask={"text": torch.arange(N + 1) > 0},
        bags={"genres": CategoricalBag(genres, offsets, 9), "tags": CategoricalBag(tags, tag_offsets, 40)},
        in_training=in_training,
    )


def _model():
    from recsys.model import MatryoshkaRecommender

    torch.manual_seed(0)
    return MatryoshkaRecommender(item_features=_features(), sizes=SIZES, use_id_embedding=True, dropout=0.0, input_dropout=0.0, max_len=LEN)


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    inputs = torch.randint(1, N + 1 - 4, (WORLD * ROWS_PER_RANK, LEN), generator=g)
    inputs[:3, :2] = 0  # some left padding
    targets = torch.randint(1, N + 1 - 4, (WORLD * ROWS_PER_RANK, LEN), generator=g)
    targets[:3, :2] = 0
    return inputs, targets


class _Loss(torch.nn.Module):
    """The full Matryoshka loss of a batch (what training_step computes), as a module forward: DMP
    and its DDP see the step as a forward call."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        from recsys.nn.loss import matryoshka_cross_entropy

        net = self.model.net
        items = net.item_matrix()
        states = net.sequence_states(inputs, items)
        valid = targets > 0
        return matryoshka_cross_entropy(states[valid], items, targets[valid], SIZES).total


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sharded_step(rank: int, port: int, out: str, sharding_types: list[str] | None) -> None:
    from recsys import sharding

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        model = _model()
        loss_module = _Loss(model)
        dmp, plan = sharding.shard_tables(loss_module, torch.device("cpu"), lr=1.0, optimizer="sgd", sharding_types=sharding_types)
        before = sharding.full_state_dict(model)
        inputs, targets = _batch()
        mine = slice(rank * ROWS_PER_RANK, (rank + 1) * ROWS_PER_RANK)
        loss = dmp(inputs[mine], targets[mine])
        loss.backward()  # the fused SGD updates the table rows here: w <- w - 1.0 * grad
        after = sharding.full_state_dict(model)
        dense = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None and not sharding.is_table_parameter(p)}
        items = model.net.item_matrix().detach()  # by the sharded model after the step (a collective: every rank)
        scores = model.net.user_vectors(inputs, items).detach()
        if rank == 0:
            torch.save({"plan": sharding.plan_summary(plan), "loss": [loss.detach()], "before": before, "after": after,
                        "dense": dense, "scores": scores, "items": items}, f"{out}/rank0.pt")
        else:
            torch.save({"loss": [loss.detach()], "dense": dense}, f"{out}/rank1.pt")
    finally:
        dist.destroy_process_group()


TABLES = ["model.net.items.ids.table_item_ids", "model.net.items.bags.table_genres", "model.net.items.bags.table_tags"]


@pytest.mark.parametrize(
    "sharding_types",
    [pytest.param(None, marks=pytest.mark.slow), ["row_wise"], pytest.param(["table_wise"], marks=pytest.mark.slow)],
    ids=["planner", "row_wise", "table_wise"],
)  # each about 45 s on a loaded 2-core machine
def test_sharded_step_equals_unsharded_step(tmp_path, sharding_types):
    mp.start_processes(_sharded_step, args=(_free_port(), str(tmp_path), sharding_types), nprocs=WORLD, start_method="spawn")
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")

    assert set(r0["plan"]) == set(TABLES)
    for table, choice in r0["plan"].items():
        # on CPU torchrec places pooled (bag) tables table-wise only; the ID table as asked
        wanted = ["table_wise"] if ".bags." in table else sharding_types or ["row_wise", "table_wise"]
        assert choice["sharding_type"] in wanted, (table, choice)
        if choice["sharding_type"] == "row_wise":
            assert len(choice["rows_per_rank"]) == WORLD and choice["ranks"] == [0, 1]

    # the unsharded model, same initial weights, on the whole batch: the mean of the two halves' losses
    model = _model()
    model.load_state_dict(r0["before"])
    for key, value in _model().state_dict().items():  # the sharded model started from the same weights
        torch.testing.assert_close(r0["before"][key], value, rtol=0, atol=0)
    inputs, targets = _batch()
    loss_module = _Loss(model)
    halves = [loss_module(inputs[r * ROWS_PER_RANK:(r + 1) * ROWS_PER_RANK], targets[r * ROWS_PER_RANK:(r + 1) * ROWS_PER_RANK]) for r in range(WORLD)]
    torch.testing.assert_close(r0["loss"][0], halves[0].detach(), **TOL)
    torch.testing.assert_close(r1["loss"][0], halves[1].detach(), **TOL)
    (sum(halves) / WORLD).backward()

    params = dict(model.named_parameters())
    tables = {k for k in r0["before"] if ".ids.embeddings." in k or ".bags.embedding_bags." in k}
    assert len(tables) == 3
    for name, p in params.items():
        if name in tables:
            # exact SGD with lr 1: the update of each row is its gradient
            torch.testing.assert_close(r0["before"][name] - r0["after"][name], p.grad, **TOL)
            assert p.grad.abs().sum() > 0
        else:
            assert name in r0["dense"], name
            torch.testing.assert_close(r0["dense"][name], p.grad, **TOL)
            torch.testing.assert_close(r1["dense"][name], p.grad, **TOL)  # DDP averaged them alike

    # the gathered tables load unsharded and score as the sharded model did
    stepped = _model()
    stepped.load_state_dict({k: (r0["after"][k] if k in tables else v) for k, v in r0["before"].items()})
    with torch.no_grad():
        for name, p in stepped.named_parameters():
            if name not in tables:
                p.sub_(0)  # the dense parameters were not stepped (no dense optimizer in this test)
        items = stepped.net.item_matrix()
        torch.testing.assert_close(items, r0["items"], **TOL)
        torch.testing.assert_close(stepped.net.user_vectors(inputs, items), r0["scores"], **TOL)


def test_sharded_training_run_checkpoint_loads_unsharded(tmp_path):
    """``--trainer.strategy sharded`` end to end: the best checkpoint holds whole tables and the plan,
    loads with from_checkpoint and exports; its test metrics in one process equal the run's."""
    import lightning as L

    from recsys.data import SequenceDataModule
    from recsys.checkpoint import read_checkpoint
    from recsys.model import MatryoshkaRecommender

    cache = tmp_path / "synthetic"
    args = small_run_args(
        cache,
        "--model.use_id_embedding", "true",
        "--trainer.devices", "2",
        "--trainer.strategy", "sharded",
        "--tracking", "csv",
        "--run_dir", str(tmp_path / "run"),
        "--checkpoint.dirpath", str(tmp_path / "ckpt"),
    )
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    done = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "sharding/net.items.ids.table_item_ids: " in done.stdout

    best = tmp_path / "ckpt" / "best.ckpt"
    checkpoint = read_checkpoint(best)
    plan = checkpoint["sharding_plan"]
    assert {"net.items.ids.table_item_ids", "net.items.bags.table_tags"} <= set(plan)
    assert all(p["sharding_type"] in ("row_wise", "table_wise") for p in plan.values())
    assert checkpoint["state_dict"]["net.items.ids.embeddings.table_item_ids.weight"].shape == (81, SIZES[-1])

    model = MatryoshkaRecommender.from_checkpoint(best)
    (prepared,) = [p.parent for p in cache.rglob("stats.json")]
    data = SequenceDataModule(data_dir=str(prepared), max_len=16, eval_batch_size=16)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    trainer.test(model, datamodule=data, verbose=False)
    single = model.last_test_metrics
    logged = json.loads((tmp_path / "run" / "results.json").read_text())
    assert single["count"] == data.num_users
    rows = {row["size"]: row for row in logged}
    for s in SIZES:
        for key in ("ndcg_10", "recall_10", "mrr"):
            assert rows[s][key] == pytest.approx(single[f"{key}/d{s}"], abs=1e-6), (s, key)

    from recsys.export import export_sizes

    (out,) = export_sizes(str(best), [SIZES[-1]], str(tmp_path / "export"))
    assert os.path.isdir(out)
