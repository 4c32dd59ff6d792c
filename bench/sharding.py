"""Training-step time with the item tables sharded by torchrec against replicated (DDP), two gloo processes.

    flock /tmp/bench.lock .venv/bin/python bench/sharding.py            # writes bench/results/sharding.json
    flock /tmp/bench.lock .venv/bin/python bench/sharding.py --items 5000 --steps 30 --out other.json
    flock /tmp/bench.lock .venv/bin/python bench/sharding.py --sharding-types row_wise --out bench/results/sharding_row_wise.json

Two CPU processes on 127.0.0.1 (gloo) train :class:`~recsys.model.MatryoshkaRecommender` (LRU,
item ID embedding on, the synthetic log's tags as a bag table) on the synthetic log's own training
batches (each process its half, from the data module), one way after the other in the same
processes:

- ``replicated``: the whole model in DDP, AdamW over every parameter (what ``--trainer.strategy ddp`` does);
- ``sharded``: ``recsys.sharding.shard_tables`` (torchrec DMP, the planner's plan: the tables
  row-wise or table-wise, fused exact Adagrad for them on CPU), the dense parameters in DDP with AdamW.

A step is the whole training step: the item matrix (every table row looked up), the encoder, the
full Matryoshka loss, backward (the fused table update inside it), the dense AdamW step. The first
``--warmup`` steps are not timed; the report has the median and mean over ``--steps`` steps (rank
zero's clock; every step ends in collectives, so the ranks move together), the plan, the table
sizes, the load average before and after, and the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]


def _loss(model, batch) -> torch.Tensor:
    from recsys.nn.loss import matryoshka_cross_entropy

    net = model.net
    items = net.item_matrix()
    states = net.sequence_states(batch["input_ids"], items)
    targets = batch["target_ids"]
    valid = targets > 0
    return matryoshka_cross_entropy(states[valid], items, targets[valid], model.sizes).total


class _Step(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, target_ids):
        return _loss(self.model, {"input_ids": input_ids, "target_ids": target_ids})


def _time(step_module, optimizer, batches, warmup: int) -> list[float]:
    times = []
    for i, batch in enumerate(batches):
        dist.barrier()
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = step_module(batch["input_ids"], batch["target_ids"])
        loss.backward()
        optimizer.step()
        dist.barrier()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


def _worker(rank: int, port: int, args, data_dir: str, out: str) -> None:
    from torch.nn.parallel import DistributedDataParallel

    from recsys import sharding
    from recsys.data import SequenceDataModule
    from recsys.model import MatryoshkaRecommender

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        data = SequenceDataModule(data_dir=data_dir, max_len=args.max_len, batch_size=args.batch_size)
        data.setup("fit")
        batches = []
        while len(batches) < args.warmup + args.steps:  # the epoch's batches, again if it has too few
            batches += list(data.train_dataloader())
        batches = batches[:args.warmup + args.steps]

        def model():
            torch.manual_seed(0)
            return MatryoshkaRecommender(item_features=data.item_features, sizes=args.sizes, use_id_embedding=True, max_len=args.max_len)

        report = {}
        replicated = model()
        ddp = DistributedDataParallel(_Step(replicated))
        optimizer = torch.optim.AdamW(replicated.parameters(), lr=1e-3)
        report["replicated"] = _time(ddp, optimizer, batches, args.warmup)

        sharded = model()
        step = _Step(sharded)
        dmp, plan = sharding.shard_tables(step, torch.device("cpu"), lr=1e-3, sharding_types=args.sharding_types)
        dense = [p for p in sharded.parameters() if not sharding.is_table_parameter(p)]
        optimizer = torch.optim.AdamW(dense, lr=1e-3)
        report["sharded"] = _time(dmp, optimizer, batches, args.warmup)
        if rank == 0:
            report["plan"] = sharding.plan_summary(plan)
            report["tables"] = {k: list(v.shape) for k, v in replicated.state_dict().items() if ".ids.embeddings." in k or ".bags.embedding_bags." in k}
            report["train_batches_per_rank"] = len(data.train_dataloader())
            Path(out).write_text(json.dumps(report))
    finally:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=2000)
    parser.add_argument("--items", type=int, default=2000)
    parser.add_argument("--sizes", type=int, nargs="+", default=[16, 32, 64, 128])
    parser.add_argument("--max-len", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--sharding-types", nargs="+", choices=["row_wise", "table_wise"], default=None,
                        help="narrow the planner's choice (default: row-wise or table-wise, the planner picks)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "sharding.json"))
    args = parser.parse_args()

    import torchrec

    from bench.machine import cpu_model
    from recsys.data.synthetic import SyntheticConfig, prepared_synthetic

    with tempfile.TemporaryDirectory() as tmp:
        data_dir = prepared_synthetic(SyntheticConfig(num_users=args.users, num_items=args.items, seed=0), tmp)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        load_before = os.getloadavg()
        out = Path(tmp) / "report.json"
        mp.start_processes(_worker, args=(port, args, str(data_dir), str(out)), nprocs=2, start_method="spawn")
        load_after = os.getloadavg()
        raw = json.loads(out.read_text())

    def stats(times):
        return {"median_ms": 1e3 * statistics.median(times), "mean_ms": 1e3 * statistics.mean(times), "steps": len(times)}

    result = {
        "what": "training-step time, 2 gloo CPU processes, item tables sharded by torchrec vs replicated (DDP)",
        "command": "flock /tmp/bench.lock .venv/bin/python bench/sharding.py " + " ".join(sys.argv[1:]),
        "settings": {**vars(args), "out": None, "threads_per_process": 1},
        "replicated": stats(raw["replicated"]),
        "sharded": stats(raw["sharded"]),
        "sharded_over_replicated": statistics.median(raw["sharded"]) / statistics.median(raw["replicated"]),
        "plan": raw["plan"],
        "tables": raw["tables"],
        "train_batches_per_rank": raw["train_batches_per_rank"],
        "load_average_before": load_before,
        "load_average_after": load_after,
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(),
                    "torch": torch.__version__, "torchrec": torchrec.__version__},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("replicated", "sharded", "sharded_over_replicated", "plan")}, indent=2))


if __name__ == "__main__":
    main()
