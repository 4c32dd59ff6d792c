"""Two "nodes" of one process each on this machine, launched as docs/distributed.md says for N nodes:
``python -m recsys.train --trainer.num_nodes 2 --trainer.devices 1`` once per node, with
``NODE_RANK`` 0/1 and ``MASTER_ADDR``/``MASTER_PORT`` of node 0 (here 127.0.0.1). The test metrics
cover every user exactly once and equal a single-process evaluation of the same checkpoint."""

from __future__ import annotations

import json
import os
import socket
import subprocess

import lightning as L
import polars as pl
import pytest

from recsys.data import SequenceDataModule
from recsys.model import MatryoshkaRecommender

from synthetic_runs import SIZES, small_run_args  # tests/ is on the path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _args(tmp_path, cache, run: str, *extra: str) -> list[str]:
    return small_run_args(
        cache,
        "--tracking", "csv",
        "--run_dir", str(tmp_path / run),
        "--checkpoint.dirpath", str(tmp_path / run / "ckpt"),
        *extra,
    )


@pytest.mark.slow  # about 110 s on a loaded 2-core machine (a single-process run, then the two nodes)
def test_two_nodes_cover_every_user_once(tmp_path):
    cache = tmp_path / "synthetic"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # one process first: it prepares the synthetic data both nodes then read
    single = subprocess.run(_args(tmp_path, cache, "single"), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]

    port = str(_free_port())
    nodes = [
        subprocess.Popen(
            _args(tmp_path, cache, "nodes", "--trainer.num_nodes", "2", "--trainer.devices", "1", "--trainer.strategy", "ddp"),
            cwd=tmp_path, env={**env, "NODE_RANK": str(rank), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for rank in (0, 1)
    ]
    outputs = [node.communicate(timeout=600) for node in nodes]
    for node, (_, err) in zip(nodes, outputs):
        assert node.returncode == 0, err[-3000:]
    assert "best checkpoint" in outputs[0][0] and "best checkpoint" not in outputs[1][0]  # node 0 reports

    (prepared,) = [p.parent for p in cache.rglob("stats.json")]
    data = SequenceDataModule(data_dir=str(prepared), max_len=16, eval_batch_size=16)
    data.setup("test")
    # every test user ranked exactly once over the two nodes
    ranks = pl.read_parquet(tmp_path / "nodes" / "test_ranks.parquet")
    assert ranks.height == data.num_users
    assert ranks["user"].n_unique() == data.num_users
    assert sorted(ranks["user"].to_list()) == list(range(1, data.num_users + 1))

    # the same checkpoint evaluated in one process gives the two nodes' metrics
    model = MatryoshkaRecommender.from_checkpoint(tmp_path / "nodes" / "ckpt" / "best.ckpt")
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    trainer.test(model, datamodule=data, verbose=False)
    one = model.last_test_metrics
    assert one["count"] == data.num_users
    two = {row["size"]: row for row in json.loads((tmp_path / "nodes" / "results.json").read_text())}
    for s in SIZES:
        for key in ("ndcg_10", "recall_10", "mrr"):
            assert two[s][key] == pytest.approx(one[f"{key}/d{s}"], abs=1e-6), (s, key)

    # and the single-process run saw the same users (its own training, so its own metrics)
    alone = pl.read_parquet(tmp_path / "single" / "test_ranks.parquet")
    assert alone["user"].to_list() == ranks["user"].to_list()
