"""Sharded embedding tables: torchrec's ``DistributedModelParallel`` inside Lightning training.

``--trainer.strategy sharded`` (the ``sharded`` name is registered here) trains as DDP does, except
that the item tower's ID and bag tables are not replicated: torchrec's planner places each table,
row-wise (its rows spread over every process) or table-wise (whole on one process), by its size and
the processes' memory, and torchrec's fused optimizer updates each process's rows during the
backward pass. The dense parameters (encoder, projections, norms) stay replicated and are averaged
by DDP, which DMP wraps around them.

torchrec publishes no Lightning integration; :class:`ShardedTablesStrategy` is a ``DDPStrategy``
whose model is DMP around the LightningModule instead of DDP. It also

* records the planner's choice (:attr:`ShardedTablesStrategy.plan`: table -> sharding type and
  ranks): printed and logged by the training CLI, and stored in every checkpoint as
  ``sharding_plan``;
* writes checkpoints with whole tables (gathered from the shards to rank zero), so a checkpoint
  of a sharded run is a plain one: ``MatryoshkaRecommender.from_checkpoint`` and
  ``recsys.export`` load it in one process, without torchrec's distributed parts;
* gives the LightningModule whole tables back when fitting ends (on every process), so testing
  the best checkpoint, the per-size report and export run on a plain model (the test stage holds
  the tables whole in every process, as DDP does);
* moves the tables out of the LightningModule's optimizer: their optimizer is torchrec's fused one
  (fbgemm's Adam on CUDA, its exact Adagrad on CPU, where fbgemm has no Adam; the model's learning
  rate, following the model's learning-rate schedule step by step).

Gradient semantics equal DDP's: torchrec divides the table gradients by the number of processes on
their way back (``torchrec.distributed.comm_ops`` gradient division), as DDP averages the dense
ones, so one step on N processes equals one step on their N batches together (tests/test_sharding.py).
Gradient clipping (``gradient_clip_val``) applies to the dense parameters only; the table optimizer
state (Adam moments) is not kept in checkpoints, so resuming a sharded run is refused.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry
from torch import nn

log = logging.getLogger(__name__)

STRATEGY_NAME = "sharded"
#: the sharding types the planner chooses between, per table
SHARDING_TYPES = ("row_wise", "table_wise")

__all__ = ["STRATEGY_NAME", "ShardedTablesStrategy", "plan_tables", "shard_tables", "full_state_dict", "load_full_state_dict"]


def _torchrec():
    from recsys.nn import embedding_tables

    if not embedding_tables.TORCHREC:
        from recsys.errors import UserError

        raise UserError("--trainer.strategy sharded needs torchrec (and its fbgemm build for this torch), which does not import here")
    import torchrec

    return torchrec


def table_modules(module: nn.Module) -> dict[str, nn.Module]:
    """``{module path: collection}`` of the torchrec collections in ``module`` (the item tower's tables)."""
    tr = _torchrec()
    return {name: m for name, m in module.named_modules() if isinstance(m, (tr.EmbeddingCollection, tr.EmbeddingBagCollection))}


#: the fused table optimizers: Adam (CUDA only in fbgemm), exact Adagrad, exact SGD; ``auto``:
#: Adam on CUDA, Adagrad on CPU (fbgemm's CPU kernels have no Adam)
TABLE_OPTIMIZERS = ("auto", "adam", "adagrad", "sgd")


def _sharders(lr: float, optimizer: str, device: torch.device) -> list:
    from fbgemm_gpu.split_embedding_configs import EmbOptimType
    from torchrec.distributed.embedding import EmbeddingCollectionSharder
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder

    if optimizer == "auto":
        optimizer = "adam" if device.type == "cuda" else "adagrad"
    if optimizer == "adagrad":
        fused = {"optimizer": EmbOptimType.EXACT_ADAGRAD, "learning_rate": lr, "eps": 1e-8}
    elif optimizer == "adam":
        fused = {"optimizer": EmbOptimType.ADAM, "learning_rate": lr, "eps": 1e-8, "beta1": 0.9, "beta2": 0.999}
    elif optimizer == "sgd":  # exact SGD: the update is -lr * gradient (the tests read gradients from it)
        fused = {"optimizer": EmbOptimType.EXACT_SGD, "learning_rate": lr}
    else:
        raise ValueError(f"unknown table optimizer {optimizer!r}; choose one of {', '.join(TABLE_OPTIMIZERS)}")
    return [EmbeddingCollectionSharder(fused_params=fused), EmbeddingBagCollectionSharder(fused_params=fused)]


def plan_tables(module: nn.Module, sharders: list, device: torch.device, group=None, sharding_types=SHARDING_TYPES,
                local_world_size: int | None = None):
    """torchrec's planner's plan for every table in ``module``: row-wise or table-wise by size (one
    plan, made on rank zero and sent to the others). ``sharding_types`` narrows the choice (tests)."""
    _torchrec()
    from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology

    group = group or dist.GroupMember.WORLD
    constraints = {}
    for collection in table_modules(module).values():
        sharder = next(s for s in sharders if isinstance(collection, s.module_type))
        # what torchrec can run here: on CPU, pooled (bag) tables are not sharded row-wise (that
        # takes a reduce-scatter); they are then placed table-wise
        possible = [t for t in SHARDING_TYPES if t in sharder.sharding_types(device.type)]
        allowed = [t for t in possible if t in sharding_types] or possible
        configs = collection.embedding_bag_configs() if hasattr(collection, "embedding_bag_configs") else collection.embedding_configs()
        for config in configs:
            constraints[config.name] = ParameterConstraints(sharding_types=allowed, compute_kernels=["fused"])
    world = dist.get_world_size(group)
    # processes per machine (the planner's bandwidth model): given by the strategy, or torchrun's
    local = local_world_size or int(os.environ.get("LOCAL_WORLD_SIZE", world))
    topology = Topology(world_size=world, compute_device=device.type, local_world_size=local)
    planner = EmbeddingShardingPlanner(topology=topology, constraints=constraints)
    return planner.collective_plan(module, sharders, group)


def plan_summary(plan) -> dict[str, dict[str, Any]]:
    """``{"<module>.<table>": {"sharding_type", "ranks", "rows_per_rank"}}``: what the planner chose."""
    out = {}
    for module_path, params in plan.plan.items():
        for table, spec in params.items():
            shards = spec.sharding_spec.shards if spec.sharding_spec is not None else []
            out[f"{module_path}.{table}"] = {
                "sharding_type": spec.sharding_type,
                "ranks": [int(r) for r in (spec.ranks or [])],
                "rows_per_rank": [int(s.shard_sizes[0]) for s in shards],
            }
    return out


def shard_tables(module: nn.Module, device: torch.device, lr: float, optimizer: str = "auto", group=None, sharding_types=None,
                 local_world_size: int | None = None):
    """``module`` in torchrec's DMP: its tables sharded by the planner's plan (returned too), the rest
    wrapped in DDP. The tables' torchrec modules are replaced in place in ``module``."""
    _torchrec()
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.types import ShardingEnv

    group = group or dist.GroupMember.WORLD
    sharders = _sharders(lr, optimizer, device)
    plan = plan_tables(module, sharders, device, group, sharding_types or SHARDING_TYPES, local_world_size)
    # torchrec's sharded tables start from weights of their own: keep the module's (rank zero's, as
    # DDP does for the dense parameters)
    prefixes = tuple(f"{name}." for name in table_modules(module))
    tables = {k: v.detach().clone() for k, v in module.state_dict().items() if k.startswith(prefixes)}
    for key in sorted(tables):
        dist.broadcast(tables[key], src=0, group=group)
    dmp = DistributedModelParallel(module, env=ShardingEnv.from_process_group(group), device=device, plan=plan, sharders=sharders)
    _copy_into_shards(module, tables)
    return dmp, plan


def _is_sharded(value) -> bool:
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    return isinstance(value, ShardedTensor)


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """``module.state_dict()`` with every sharded table gathered whole on rank zero (a collective:
    every rank calls it; ranks other than zero get their local shards' placeholders)."""
    state = module.state_dict()
    rank = dist.get_rank()
    for key in sorted(state):
        value = state[key]
        if not _is_sharded(value):
            continue
        full = torch.empty(value.size(), dtype=value.dtype) if rank == 0 else None
        value.gather(dst=0, out=full)
        state[key] = full if rank == 0 else torch.empty(0)
    return state


def _copy_into_shards(module: nn.Module, state: dict[str, torch.Tensor]) -> set[str]:
    """Copy each process's rows of the whole tables in ``state`` into ``module``'s shards; returns
    the keys of the sharded tables."""
    own = module.state_dict()
    sharded = {k for k, v in own.items() if _is_sharded(v)}
    with torch.no_grad():
        for key in sharded:
            full = state[key]
            for shard in own[key].local_shards():
                (r0, c0), (rows, cols) = shard.metadata.shard_offsets, shard.metadata.shard_sizes
                shard.tensor.copy_(full[r0:r0 + rows, c0:c0 + cols])
    return sharded


def load_full_state_dict(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a state dict of whole tables (a plain checkpoint) into ``module``, whose tables are sharded:
    each process copies its own rows of each table; the rest loads as usual (strictly)."""
    sharded = _copy_into_shards(module, state)
    missing, unexpected = module.load_state_dict({k: v for k, v in state.items() if k not in sharded}, strict=False)
    missing = [k for k in missing if k not in sharded]
    if missing or unexpected:
        raise RuntimeError(f"state dict does not fit the sharded model: missing {missing}, unexpected {unexpected}")


def table_specs(module: nn.Module) -> dict[str, tuple[type, list]]:
    """``{module path: (collection class, table configs)}``: enough to build the tables unsharded again."""
    return {
        name: (type(m), m.embedding_bag_configs() if hasattr(m, "embedding_bag_configs") else m.embedding_configs())
        for name, m in table_modules(module).items()
    }


def unshard_(module: nn.Module, specs: dict[str, tuple[type, list]], group=None) -> None:
    """Replace ``module``'s sharded tables by whole, unsharded ones holding the same weights, on every
    process (a collective: every rank calls it)."""
    state = full_state_dict(module)
    prefixes = tuple(f"{path}." for path in specs)
    for key in sorted(k for k in state if k.startswith(prefixes)):
        shape = module.state_dict()[key].size()
        if dist.get_rank(group) != 0:
            state[key] = torch.empty(shape, dtype=state[key].dtype)
        dist.broadcast(state[key], src=0, group=group)
    for path, (cls, configs) in specs.items():
        parent, _, child = path.rpartition(".")
        whole = cls(tables=configs, device=torch.device("meta")).to_empty(device=torch.device("cpu"))
        setattr(module.get_submodule(parent) if parent else module, child, whole)
    module.load_state_dict(state)


def is_table_parameter(p: torch.Tensor) -> bool:
    """A parameter that torchrec's fused optimizer updates in the backward pass."""
    return hasattr(p, "_in_backward_optimizers")


class ShardedTablesStrategy(DDPStrategy):
    """DDP for the dense parameters, torchrec DMP for the item tower's tables (see the module docstring)."""

    strategy_name = STRATEGY_NAME

    def __init__(self, table_optimizer: str = "auto", **kwargs: Any) -> None:
        kwargs.setdefault("process_group_backend", None)
        super().__init__(**kwargs)
        self.table_optimizer = table_optimizer
        self.plan: dict[str, dict[str, Any]] | None = None
        self._dmp = None

    def configure_ddp(self) -> None:
        module = self.lightning_module
        if self._dmp is None:
            self._specs = table_specs(module)
            lr = float(getattr(module.hparams, "lr", 1e-3))
            self._dmp, plan = shard_tables(module, self.root_device, lr, self.table_optimizer, local_world_size=self.num_processes)
            self.plan = plan_summary(plan)
            if self.global_rank == 0:
                for table, choice in self.plan.items():
                    log.info("sharded %s: %s over ranks %s (rows %s)", table, choice["sharding_type"], choice["ranks"], choice["rows_per_rank"])
        self.model = self._dmp

    def setup_optimizers(self, trainer) -> None:
        super().setup_optimizers(trainer)
        # the tables are updated by torchrec's fused optimizer in the backward pass: not by these
        for optimizer in self.optimizers:
            for group in optimizer.param_groups:
                group["params"] = [p for p in group["params"] if not is_table_parameter(p)]

    def optimizer_step(self, optimizer, closure, model=None, **kwargs: Any) -> Any:
        out = super().optimizer_step(optimizer, closure, model, **kwargs)
        if self._dmp is not None:  # the tables follow the model's learning-rate schedule (for the next step)
            fused = self._dmp.fused_optimizer
            for group in fused.param_groups:
                group["lr"] = optimizer.param_groups[0]["lr"]
            fused.step()  # sets the learning rate in the fused kernels; the update itself ran in backward
        return out

    def lightning_module_state_dict(self) -> dict[str, Any]:
        return full_state_dict(self.lightning_module)

    def load_model_state_dict(self, checkpoint, strict: bool = True) -> None:
        if self._dmp is None:
            return super().load_model_state_dict(checkpoint, strict=strict)
        load_full_state_dict(self.lightning_module, checkpoint["state_dict"])

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath, storage_options=None) -> None:
        if self.plan is not None:
            checkpoint["sharding_plan"] = self.plan
        super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)

    def teardown(self) -> None:
        # after fitting, the LightningModule gets whole tables back (on every process): testing, the
        # per-size report and export then work on a plain model
        module = self.lightning_module
        if self._dmp is not None and module is not None:
            self.model = module
            unshard_(module, self._specs)
            module.to(self.root_device)
            self._dmp = None
        super().teardown()

    @classmethod
    def register_strategies(cls, strategy_registry) -> None:
        strategy_registry.register(STRATEGY_NAME, cls, description="DDP with torchrec-sharded embedding tables")


if STRATEGY_NAME not in StrategyRegistry:
    ShardedTablesStrategy.register_strategies(StrategyRegistry)
