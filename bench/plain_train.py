"""Train and test from a recsys.train config with a plain Lightning Trainer: no MLflow, no LightningCLI.

    python bench/plain_train.py --config configs/ml-1m.yaml --trainer.max_epochs 3 --model.sizes '[64]'

For borrowed accelerator machines that cannot install the tracking stack (MLflow, jsonargparse):
the same model, data module, trainer defaults, early stopping and best-checkpoint testing as
``python -m recsys.train``, reading the same config file and the same ``--section.key value``
overrides (values parsed as YAML). ``--mlflow.*`` settings are accepted and ignored; metrics go
to ``metrics.csv`` beside the checkpoint. Prints the per-size rows as ``recsys.train.run`` returns
them, and returns them from :func:`run`.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from recsys.data import SequenceDataModule, SyntheticConfig  # noqa: E402
from recsys.model import CHECKPOINT_DEFAULTS, EARLY_STOPPING_DEFAULTS, TRAINER_DEFAULTS, MatryoshkaRecommender  # noqa: E402
from recsys.tracking import results_table, summarise  # noqa: E402

SECTIONS = ("model", "data", "trainer", "early_stopping", "checkpoint", "mlflow", "seed_everything")


def parse(args: list[str]) -> dict[str, Any]:
    """The config file named by ``--config`` with every ``--section.key value`` override applied."""
    config: dict[str, Any] = {}
    overrides = list(args)
    if "--config" in overrides:
        i = overrides.index("--config")
        config = yaml.safe_load(Path(overrides[i + 1]).read_text()) or {}
        del overrides[i : i + 2]
    if len(overrides) % 2:
        raise SystemExit(f"overrides come in --key value pairs, got {overrides}")
    for flag, value in zip(overrides[::2], overrides[1::2]):
        if not flag.startswith("--"):
            raise SystemExit(f"expected --section.key, got {flag!r}")
        *parents, key = flag[2:].split(".")
        if (parents or [key])[0] not in SECTIONS:
            raise SystemExit(f"unknown setting {flag}; sections are {', '.join(SECTIONS)}")
        node = config
        for parent in parents:
            node = node.setdefault(parent, {})
        node[key] = yaml.safe_load(value)
    return config


def run(args: list[str]) -> dict[str, Any]:
    config = parse(args)
    L.seed_everything(config.get("seed_everything", 0), workers=True)
    if torch.cuda.is_available():
        torch.set_float32_matmul_precision("high")  # TF32 matrix products, as a GPU user would train
    data = dict(config.get("data", {}))
    if isinstance(data.get("synthetic"), dict):
        data["synthetic"] = SyntheticConfig(**data["synthetic"])
    datamodule = SequenceDataModule(**data)
    model = MatryoshkaRecommender(
        item_features=datamodule.item_features, max_len=datamodule.max_len, **config.get("model", {})
    )
    workdir = config.get("checkpoint", {}).get("dirpath") or tempfile.mkdtemp(prefix="plain-train-")
    checkpoint = ModelCheckpoint(dirpath=workdir, **CHECKPOINT_DEFAULTS)
    stopping = EarlyStopping(**{**EARLY_STOPPING_DEFAULTS, **config.get("early_stopping", {})})
    trainer = L.Trainer(
        **{**TRAINER_DEFAULTS, **config.get("trainer", {})}, callbacks=[checkpoint, stopping],
        logger=CSVLogger(workdir, name="", version=""),  # metrics.csv: the learning curves
    )
    trainer.fit(model, datamodule=datamodule)
    best = checkpoint.best_model_path or None
    trainer.test(model, datamodule=datamodule, ckpt_path=best, verbose=False, weights_only=True)
    rows = summarise(model, datamodule, model.last_test_metrics)
    print("\n" + results_table(rows), flush=True)
    return {
        "rows": rows,
        "run_id": None,
        "best_val": float(checkpoint.best_model_score) if checkpoint.best_model_score is not None else None,
        "epochs": trainer.current_epoch,
    }


if __name__ == "__main__":
    print(json.dumps(run(sys.argv[1:])["rows"], indent=2))
