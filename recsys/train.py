"""``python -m recsys.train``: train every size at once and record them in MLflow.

    python -m recsys.train                                   # built-in synthetic log, a few minutes on CPU
    python -m recsys.train --config configs/ml-1m.yaml --trainer.max_epochs 50
    python -m recsys.train --config configs/lastfm.yaml --model.encoder mamba
    python -m recsys.train --print_config                    # every option with its default

At the end it tests the best checkpoint (by ``val/monitor``: NDCG@10 of ``--model.monitor_size``, or its mean),
prints one line per size, and logs everything a person needs to pick a size to MLflow (see
``recsys/tracking.py``). ``--ckpt_path`` resumes an interrupted run, in the same MLflow run.
"""

from __future__ import annotations

import logging
import sys
import tempfile
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

from recsys.data import SequenceDataModule
from recsys.data.errors import DataValidationError
from recsys.model import (
    CHECKPOINT_DEFAULTS,
    EARLY_STOPPING_DEFAULTS,
    TRAINER_DEFAULTS,
    CheckpointError,
    MatryoshkaRecommender,
    read_checkpoint,
)
from recsys.nn.encoders import ENCODERS
from recsys.nn.nested import check_sizes, cut_sizes
from recsys.tracking import (
    MLflowSettings,
    TrackingUnavailableError,
    log_config,
    log_results,
    log_size_models,
    make_logger,
    results_table,
    summarise,
)

log = logging.getLogger("recsys.train")

class ConfigError(ValueError):
    """An invalid setting, found before any data is read or any step is trained."""


def validate_config(config) -> None:
    model, data = config.model, config.data
    try:
        check_sizes(model.sizes)
    except ValueError as exc:
        raise ConfigError(f"--model.sizes: {exc}") from None
    if model.encoder not in ENCODERS:
        raise ConfigError(f"--model.encoder: unknown encoder {model.encoder!r}; choose one of {', '.join(ENCODERS)}")
    if model.monitor_size not in (None, "mean", *model.sizes):
        raise ConfigError(f"--model.monitor_size {model.monitor_size} is neither one of --model.sizes {list(model.sizes)} nor 'mean'")
    if model.loss_weights is not None and len(model.loss_weights) != len(model.sizes):
        raise ConfigError(
            f"--model.loss_weights has {len(model.loss_weights)} entries for {len(model.sizes)} sizes {list(model.sizes)}"
        )
    if data.data_dir is not None and not Path(data.data_dir).is_dir():
        raise ConfigError(
            f"--data.data_dir {data.data_dir}: no such directory; prepare one with "
            "`python -m recsys.data prepare --interactions FILE --items FILE --out DIR`"
        )


class TrainCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.item_features", "model.item_features", apply_on="instantiate")
        parser.link_arguments("data.max_len", "model.max_len")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({**{f"checkpoint.{k}": v for k, v in CHECKPOINT_DEFAULTS.items()}, "checkpoint.save_last": True})
        parser.add_lightning_class_args(EarlyStopping, "early_stopping")
        parser.set_defaults({f"early_stopping.{k}": v for k, v in EARLY_STOPPING_DEFAULTS.items()})
        parser.add_class_arguments(MLflowSettings, "mlflow")
        parser.add_argument("--ckpt_path", type=str | None, default=None, help="resume training from this checkpoint")

    def before_instantiate_classes(self) -> None:
        validate_config(self.config)
        if self.config.ckpt_path and not Path(self.config.ckpt_path).is_file():
            raise ConfigError(f"--ckpt_path {self.config.ckpt_path}: no such checkpoint file")

    def instantiate_trainer(self, **kwargs: Any):
        settings: MLflowSettings = self.config_init.mlflow
        run_id = None
        if self.config.ckpt_path:  # resume in the same MLflow run
            run_id = read_checkpoint(self.config.ckpt_path).get("mlflow_run_id")
        logger = make_logger(settings, run_id=run_id)
        checkpoint: ModelCheckpoint = self.config_init.checkpoint
        if checkpoint.dirpath is None:
            checkpoint.dirpath = str(Path("checkpoints") / logger.run_id)
        return super().instantiate_trainer(logger=logger, **kwargs)


def run(args: list[str] | None = None) -> dict[str, Any]:
    """Train, test the best checkpoint, log everything; returns what was recorded (for tests)."""
    cli = TrainCLI(
        MatryoshkaRecommender,
        SequenceDataModule,
        run=False,
        args=args,
        trainer_defaults=TRAINER_DEFAULTS,
        save_config_callback=None,
        seed_everything_default=0,
        auto_configure_optimizers=False,
    )
    trainer, model, datamodule = cli.trainer, cli.model, cli.datamodule
    logger = trainer.logger
    resuming = bool(cli.config.ckpt_path)
    if trainer.is_global_zero and not resuming:
        config = cli.parser.dump(cli.config, skip_none=False)
        import yaml

        log_config(logger.experiment, logger.run_id, yaml.safe_load(config), config, datamodule.dataset.stats)

    trainer.fit(model, datamodule=datamodule, ckpt_path=cli.config.ckpt_path, weights_only=True)
    best = trainer.checkpoint_callback.best_model_path or None
    trainer.test(model, datamodule=datamodule, ckpt_path=best, verbose=False, weights_only=True)
    best_score = trainer.checkpoint_callback.best_model_score
    result: dict[str, Any] = {
        "run_id": logger.run_id, "tracking_uri": cli.config_init.mlflow.resolved_uri(), "best": best,
        "best_val": None if best_score is None else float(best_score), "epochs": trainer.current_epoch,
    }
    if not trainer.is_global_zero:
        return result

    rows = summarise(model, datamodule, model.last_test_metrics)
    client = logger.experiment
    title = f"{model.hparams.encoder} on {Path(cli.config.data.data_dir or 'synthetic').name}"
    log_results(client, logger.run_id, rows, title)
    if best:
        client.log_artifact(logger.run_id, best, "checkpoints")
    settings: MLflowSettings = cli.config_init.mlflow
    if settings.log_models and best:
        from serving.export import export_sizes

        sizes = list(cut_sizes(model.net))
        with tempfile.TemporaryDirectory() as tmp:
            dirs = export_sizes(best, sizes, tmp, source={"mlflow_run_id": logger.run_id})
            result["model_uris"] = log_size_models(logger.run_id, dict(zip(sizes, dirs)), rows, settings.register_as)
    print("\n" + results_table(rows))
    print(f"\nMLflow run {logger.run_id} in {result['tracking_uri']}  (open it with `make ui`)")
    if best:
        print(f"best checkpoint: {best}\nexport a size: python -m serving.export --run-id {logger.run_id} --dims {model.sizes[-1]} --out exports/")
    result["rows"] = rows
    return result


def main(args: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", force=True)
    try:
        run(args)
    except (ConfigError, DataValidationError, TrackingUnavailableError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
