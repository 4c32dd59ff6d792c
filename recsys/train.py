"""``python -m recsys.train``: train every size at once, test the best checkpoint, record the run.

    python -m recsys.train                                   # built-in synthetic log, a few minutes on CPU
    python -m recsys.train --config configs/ml-1m.yaml --trainer.max_epochs 50
    python -m recsys.train --config configs/lastfm.yaml --model.encoder mamba
    python -m recsys.train --tracking csv                    # no MLflow: files in lightning_logs/version_<n>
    python -m recsys.train --print_config                    # every option with its default
    python -m recsys.train --help-all                        # every option with its help (a few seconds)

The options most runs set:

    --config FILE                   a YAML file of options (configs/*.yaml); later flags override it
    --data.data_dir DIR             a prepared dataset (python -m recsys.data prepare); default: synthetic
    --model.sizes [16,32,64,128]    the nested sizes, all trained at once; the last is the model width
    --model.encoder lru             lru, mamba or sasrec (the baseline: not nested)
    --model.monitor_size mean       the size whose validation NDCG@10 picks the best checkpoint
    --trainer.max_epochs 8          and --trainer.devices, --trainer.accelerator (Lightning's Trainer)
    --trainer.strategy sharded      DDP with the item tables sharded by torchrec (docs/distributed.md)
    --trainer.num_nodes N           machines in a multi-node run (docs/distributed.md)
    --tracking mlflow               or csv: a run directory, no MLflow needed (below)
    --mlflow.experiment NAME        the MLflow experiment; --mlflow.run_name NAME (default: what it trained)
    --mlflow.register_as NAME       also register each size's model as NAME-d<size>
    --ckpt_path FILE                resume an interrupted run

This is the one way a model is trained. At the end it tests the best checkpoint (by
``val/monitor``: NDCG@10 of ``--model.monitor_size``, or its mean), prints one line per size, and
records the run. ``--ckpt_path`` resumes an interrupted run, in the same MLflow run or run directory.

Tracking (``--tracking``), the same metric names either way (``train/loss``, ``val/ndcg_10/d64``,
``test/ndcg_10/d64``, ``val/monitor``, ...):

* ``mlflow`` (default): params, tags, metrics, the config, the best checkpoint, the per-size
  results and one logged model per size go to MLflow (``--mlflow.*``; see ``recsys/tracking.py``).
* ``csv``: for machines where MLflow cannot be installed; ``mlflow`` is never imported. The run
  directory (``--run_dir``, default ``lightning_logs/version_<n>``, the next free one) gets ``metrics.csv``
  (Lightning's CSVLogger), ``config.yaml``, ``run.json`` (data stats, git commit), ``results.md``,
  ``results.json``, ``accuracy_vs_size.png`` and, unless ``--checkpoint.dirpath`` says otherwise,
  ``checkpoints/``. ``--mlflow.*`` settings are accepted and ignored; no models are logged.

``--float32_matmul_precision highest|high|medium`` (default ``high``) is passed to
``torch.set_float32_matmul_precision``: ``high`` lets CUDA GPUs multiply float32 matrices in TF32,
as the MovieLens-1M results were trained; it changes nothing on CPU. ``highest`` is exact float32.

Encoder options are grouped per encoder: ``--model.lru.r_min``, ``--model.lru.r_max``,
``--model.mamba.d_state``, ``--model.mamba.expand``, ``--model.sasrec.n_heads``. The older flat
spellings (``--model.r_min 0.8``, and ``r_min:`` directly under ``model:`` in a config file) are
still accepted and mean the same.
"""

from __future__ import annotations

import sys

from recsys.console import help_asked, quiet_console

if __name__ == "__main__" and help_asked(sys.argv[1:]):  # answered before Lightning is imported (seconds)
    print(__doc__.replace("``", "`"))
    sys.exit(0)

# the imports below take seconds (Lightning, torch, transformers), so the help comes first
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from jsonargparse import Namespace
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

from recsys.atomic import write_json_atomically, write_text_atomically
from recsys.data import SequenceDataModule
from recsys.errors import UserError, exit_code_of
from recsys.model import (
    CHECKPOINT_DEFAULTS,
    EARLY_STOPPING_DEFAULTS,
    TRAINER_DEFAULTS,
    MatryoshkaRecommender,
    check_options,
    read_checkpoint,
)
from recsys.nn.encoders import FLAT_OPTION_GROUPS, OptionError, nest_flat_options
from recsys.runtime import default_precision, reuse_freed_memory
from recsys.reporting import (
    GRID_PLOT_FILE,
    PLOT_FILE,
    dataset_name,
    git_commit,
    results_table,
    summarise,
    test_ranks_table,
    write_results,
)
from recsys.tracking import MLflowSettings, default_run_name

log = logging.getLogger("recsys.train")

DEFAULT_RUNS_DIR = "lightning_logs"  # already ignored by git; Lightning's own default


class ConfigError(UserError, ValueError):
    """An invalid setting, found before any data is read or any step is trained."""


class ResumeError(UserError):
    """``--ckpt_path`` holds a model trained on other data or with other settings than this run's:
    refused before the run it belongs to is opened, so that run and its checkpoints stay as they were."""


def check_resume(ckpt_path: str, model: MatryoshkaRecommender, datamodule: SequenceDataModule) -> None:
    """Refuse to resume from a checkpoint of other data (its recorded fingerprint), other settings
    or other weight shapes, naming both sides."""
    checkpoint = read_checkpoint(ckpt_path)
    problems = datamodule.resume_problems(checkpoint.get("data_fingerprint")) + model.resume_problems(checkpoint)
    if not problems:  # also for a checkpoint that predates data fingerprints: its weights must fit
        problems = model.weight_problems(checkpoint)
    if problems:
        raise ResumeError(
            f"--ckpt_path {ckpt_path}: cannot resume from it: {'; '.join(problems)}. Resume with the data and settings "
            "it was trained with, or start a new run without --ckpt_path"
        )


def validate_config(config) -> None:
    """The model's own checks (:func:`recsys.model.check_options`) and the data directory's, named
    as flags, before anything is read or trained."""
    model, data = config.model, config.data
    try:
        check_options(model.sizes, model.encoder, model.monitor_size, model.loss_weights,
                      model.lru, model.mamba, model.sasrec, model.loss, model.negatives, model.negative_sampling,
                      model.distill, model.distill_teacher,
                      model.n_blocks, model.depths, model.pairs, model.grid, model.triples,
                      model.use_id_embedding, model.id_dropout, model.learned_temperature,
                      model.separate_item_vectors, model.prefix_gradient)
    except OptionError as exc:
        raise ConfigError(exc.render("--model.")) from None
    if data.data_dir is None and data.synthetic is not None:
        from recsys.data.synthetic import SyntheticConfig

        SyntheticConfig(**data.synthetic.as_dict())  # its own checks, before the parser would wrap their error in its own
    if data.data_dir is not None and not Path(data.data_dir).is_dir():
        raise ConfigError(
            f"--data.data_dir {data.data_dir}: no such directory; prepare one with "
            "`python -m recsys.data prepare --interactions FILE --items FILE --out DIR`"
        )
    epochs = config.trainer.get("max_epochs")
    if isinstance(epochs, int) and not isinstance(epochs, bool) and (epochs == 0 or epochs < -1):
        raise ConfigError(f"--trainer.max_epochs {epochs}: trains nothing; give at least 1 (or -1: until early stopping ends the run)")
    if config.run_dir is not None and config.tracking != "csv":
        raise ConfigError(f"--run_dir {config.run_dir}: only used with --tracking csv")


# -- the older flat encoder options ------------------------------------------------------------------


def _flat_flag(arg: str) -> str:
    name, eq, value = arg.partition("=")
    key = name[len("--model."):] if name.startswith("--model.") else None
    if key in FLAT_OPTION_GROUPS:
        return f"--model.{FLAT_OPTION_GROUPS[key]}.{key}{eq}{value}"
    return arg


def _config_with_groups(path: str) -> str:
    """A config file whose ``model:`` has flat encoder options, as YAML text with them grouped
    (jsonargparse's ``--config`` takes a file or its text); any other config: the path itself."""
    import yaml

    try:
        config = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return path  # let the parser report it
    model = config.get("model") if isinstance(config, dict) else None
    if not isinstance(model, dict) or not set(model) & set(FLAT_OPTION_GROUPS):
        return path
    return yaml.safe_dump({**config, "model": nest_flat_options(model)}, sort_keys=False)


def nest_flat_args(args: list[str]) -> list[str]:
    """Command-line arguments with the flat encoder options (``--model.r_min 0.8``, also inside a
    ``--config`` file) rewritten to their groups (``--model.lru.r_min 0.8``)."""
    out: list[str] = []
    for i, arg in enumerate(args):
        if i > 0 and args[i - 1] == "--config":
            out.append(_config_with_groups(arg))
        elif arg.startswith("--config="):
            out.append("--config=" + _config_with_groups(arg[len("--config="):]))
        else:
            out.append(_flat_flag(arg))
    return out


# -- tracking ----------------------------------------------------------------------------------------


class MLflowRun:
    """One MLflow run: the logger, and what is logged beside the metrics."""

    def __init__(self, settings: MLflowSettings, resume_from: str | None, run_name: str) -> None:
        from recsys.tracking import make_logger

        run_id = read_checkpoint(resume_from).get("mlflow_run_id") if resume_from else None  # same run
        self.settings = settings
        self.logger = make_logger(settings, run_id=run_id, run_name=run_name)
        self.run_id = self.logger.run_id  # None on the other ranks of a distributed run

    @property
    def checkpoint_dir(self) -> Path:
        return Path("checkpoints") / str(self.run_id)

    def record(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "tracking_uri": self.settings.resolved_uri(), "run_dir": None}

    def log_config(self, config: dict[str, Any], config_yaml: str, stats: dict[str, Any]) -> None:
        from recsys.tracking import log_config

        log_config(self.logger.experiment, self.run_id, config, config_yaml, stats)

    def log_results(self, rows: list[dict[str, Any]], title: str, best: str | None, ranks=None) -> None:
        from recsys.tracking import log_results

        log_results(self.logger.experiment, self.run_id, rows, title, ranks)
        if best:
            self.logger.experiment.log_artifact(self.run_id, best, "checkpoints")

    def log_models(self, best: str | None, model: MatryoshkaRecommender, rows: list[dict[str, Any]]) -> dict[int, str] | None:
        from recsys.nn.nested import cut_sizes
        from recsys.tracking import log_size_metrics, log_size_models

        if not (self.settings.log_models and best):
            if model.trained_triples is not None:
                from recsys.tracking import log_grid_metrics

                log_grid_metrics(self.logger.experiment, self.run_id, rows, {})
            else:
                log_size_metrics(self.logger.experiment, self.run_id, rows, {})
            return None
        from serving.export import export_sizes

        if model.trained_triples is not None:  # an elastic run: one model per trained triple
            return self._log_grid_models(best, model, rows)
        sizes = list(cut_sizes(model.net))
        export_log = logging.getLogger("serving.export")
        level = export_log.level
        export_log.setLevel(logging.WARNING)  # it exports to temporary directories here: no news for the user
        try:
            with tempfile.TemporaryDirectory() as tmp:
                dirs = export_sizes(best, sizes, tmp, source={"mlflow_run_id": self.run_id})
                return log_size_models(self.run_id, dict(zip(sizes, dirs)), rows, self.settings.register_as)
        finally:
            export_log.setLevel(level)

    def _log_grid_models(self, best: str, model: MatryoshkaRecommender, rows: list[dict[str, Any]]) -> dict[str, str]:
        from recsys.tracking import log_grid_models
        from serving.export import export_sizes

        export_log = logging.getLogger("serving.export")
        level = export_log.level
        export_log.setLevel(logging.WARNING)
        try:
            with tempfile.TemporaryDirectory() as tmp:
                dirs = {t.label: export_sizes(best, [t.size], Path(tmp), source={"mlflow_run_id": self.run_id},
                                              width=t.width, depth=t.depth)[0] for t in model.trained_triples}
                return log_grid_models(self.run_id, dirs, rows, self.settings.register_as)
        finally:
            export_log.setLevel(level)

    def where(self) -> str:
        from recsys.tracking import DEFAULT_TRACKING_URI, run_url

        uri = self.settings.resolved_uri()
        run = self.logger.experiment.get_run(self.run_id)
        url = run_url(uri, run.info.experiment_id, self.run_id)
        if uri.startswith(("http://", "https://")):
            see = f"open {url}"
        else:
            see = f"`make ui{'' if uri == DEFAULT_TRACKING_URI else f' STORE={uri}'}`, then open {url}"
        return f"MLflow run '{run.info.run_name}' ({self.run_id}) in {uri}\nsee every size: {see}"

    def export_hint(self, best: str, dims: int) -> str:
        return f"python -m serving.export --run-id {self.run_id} --dims {dims} --out exports/"


class CSVRun:
    """A run directory: Lightning's ``metrics.csv`` and the same reports as files. No MLflow."""

    def __init__(self, run_dir: str | None, resume_from: str | None) -> None:
        from lightning.pytorch.loggers import CSVLogger

        if run_dir is None and resume_from:
            run_dir = read_checkpoint(resume_from).get("run_dir")  # the same directory
        if run_dir is None:  # lightning_logs/version_<n>, the next free one
            self.logger = CSVLogger(DEFAULT_RUNS_DIR, name="")
        else:
            self.logger = CSVLogger(run_dir, name="", version="")
        self.run_dir = Path(self.logger.log_dir)
        self.checkpoint_dir = self.run_dir / "checkpoints"
        self._start(keep_curves=bool(resume_from))

    def _start(self, keep_curves: bool) -> None:
        """Open ``metrics.csv`` before anything else is written to the directory. Lightning's writer
        drops an existing one; a resumed run keeps its earlier curves, written back first."""
        import csv
        import warnings

        path = self.run_dir / "metrics.csv"
        earlier = list(csv.DictReader(path.open(newline=""))) if keep_curves and path.is_file() else []
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Experiment logs directory .* exists and is not empty")
            writer = self.logger.experiment  # on rank zero; a no-op stand-in elsewhere
        for row in earlier:
            values = {k: float(v) for k, v in row.items() if k != "step" and v not in ("", None)}
            writer.log_metrics(values, step=int(row["step"]))

    def record(self) -> dict[str, Any]:
        return {"run_id": None, "tracking_uri": None, "run_dir": str(self.run_dir)}

    def log_config(self, config: dict[str, Any], config_yaml: str, stats: dict[str, Any]) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomically(self.run_dir / "config.yaml", config_yaml)
        info = {"git_commit": git_commit(), "data": stats}
        write_json_atomically(self.run_dir / "run.json", info, indent=2, default=str)

    def log_results(self, rows: list[dict[str, Any]], title: str, best: str | None, ranks=None) -> None:
        write_results(self.run_dir, rows, title, ranks)

    def log_models(self, best, model, rows) -> None:
        return None  # logged models are MLflow's; export a size with serving.export --checkpoint

    def where(self) -> str:
        return (f"run directory {self.run_dir} (metrics.csv, results.md, results.json, test_ranks.parquet, "
                f"{PLOT_FILE} or, for a grid of sub-models, {GRID_PLOT_FILE})")

    def export_hint(self, best: str, dims: int) -> str:
        return f"python -m serving.export --checkpoint {best} --dims {dims} --out exports/"


# -- the CLI -----------------------------------------------------------------------------------------


class TrainCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.item_features", "model.item_features", apply_on="instantiate")
        parser.link_arguments("data.cold_start_items", "model.cold_start_items", apply_on="instantiate")
        parser.link_arguments("data.item_counts", "model.item_counts", apply_on="instantiate")
        parser.link_arguments("data.max_len", "model.max_len")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({**{f"checkpoint.{k}": v for k, v in CHECKPOINT_DEFAULTS.items()}, "checkpoint.save_last": True})
        parser.add_lightning_class_args(EarlyStopping, "early_stopping")
        parser.set_defaults({f"early_stopping.{k}": v for k, v in EARLY_STOPPING_DEFAULTS.items()})
        parser.add_argument("--tracking", type=Literal["mlflow", "csv"], default="mlflow",
                            help="where the run is recorded: mlflow, or csv (a run directory; no MLflow needed)")
        parser.add_argument("--run_dir", type=str | None, default=None,
                            help="--tracking csv: the run directory (default: lightning_logs/version_<n>, the next free one)")
        parser.add_class_arguments(MLflowSettings, "mlflow")
        parser.add_argument("--float32_matmul_precision", type=Literal["highest", "high", "medium"], default="high",
                            help="torch.set_float32_matmul_precision: high = TF32 matrix products on CUDA GPUs "
                                 "(no change on CPU); highest = exact float32")
        parser.add_argument("--ckpt_path", type=str | None, default=None, help="resume training from this checkpoint")

    def parse_arguments(self, parser, args) -> None:
        if isinstance(args, (dict, Namespace)):
            self.config = parser.parse_object(args)
        else:
            argv = ["--help" if a == "--help-all" else a for a in (sys.argv[1:] if args is None else args)]
            self.config = parser.parse_args(nest_flat_args(argv))  # --help itself is answered at the top

    def before_instantiate_classes(self) -> None:
        validate_config(self.config)
        if self.config.ckpt_path and not Path(self.config.ckpt_path).is_file():
            raise ConfigError(f"--ckpt_path {self.config.ckpt_path}: no such checkpoint file")
        import torch

        torch.set_float32_matmul_precision(self.config.float32_matmul_precision)
        if self.config.trainer.strategy == "sharded":  # torchrec-sharded tables (recsys/sharding.py)
            if self.config.ckpt_path:
                raise ConfigError(f"--ckpt_path {self.config.ckpt_path}: resuming is not supported with --trainer.strategy sharded "
                                  "(the tables' optimizer state is not kept in checkpoints)")
            import recsys.sharding  # noqa: F401 - registers the strategy name

    def instantiate_trainer(self, **kwargs: Any):
        if self.config.ckpt_path:  # before the run is opened: a refused resume leaves it, and its checkpoints, as they were
            check_resume(self.config.ckpt_path, self.model, self.datamodule)
        if self.config.tracking == "csv":
            self.run = CSVRun(self.config.run_dir, self.config.ckpt_path)
        else:
            model, data = self.config.model, self.config.data
            name = default_run_name(model.encoder, model.sizes, dataset_name(data.data_dir))
            self.run = MLflowRun(self.config_init.mlflow, self.config.ckpt_path, name)
        checkpoint: ModelCheckpoint = self.config_init.checkpoint
        if checkpoint.dirpath is None:
            checkpoint.dirpath = str(self.run.checkpoint_dir)
        return super().instantiate_trainer(logger=self.run.logger, **kwargs)


@dataclass
class FitResult:
    """What :func:`fit_and_test` found: the best checkpoint and its validation score, the epochs
    trained, the test metrics of the best checkpoint and its per-size rows (rank zero only)."""

    best: str | None
    best_val: float | None
    epochs: int
    test_metrics: dict[str, float]
    rows: list[dict[str, Any]] | None
    test_ranks: tuple[np.ndarray, np.ndarray] | None = None  # (users, ranks (M, users)), rank zero only


def fit_and_test(trainer, model: MatryoshkaRecommender, datamodule, ckpt_path: str | None = None) -> FitResult:
    """Fit (resuming from ``ckpt_path``), then test the best checkpoint by ``val/monitor``."""
    trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    best = trainer.checkpoint_callback.best_model_path or None
    trainer.test(model, datamodule=datamodule, ckpt_path=best, verbose=False, weights_only=True)
    score = trainer.checkpoint_callback.best_model_score
    metrics = dict(model.last_test_metrics)
    rows = summarise(model, datamodule, metrics) if trainer.is_global_zero else None
    ranks = model.last_test_ranks if trainer.is_global_zero else None
    return FitResult(best, None if score is None else float(score), trainer.current_epoch, metrics, rows, ranks)


def run(args: list[str] | None = None) -> dict[str, Any]:
    """Train, test the best checkpoint, record everything; returns what was recorded (for tests)."""
    reuse_freed_memory()
    cli = TrainCLI(
        MatryoshkaRecommender,
        SequenceDataModule,
        run=False,
        args=args,
        # bf16-mixed where this machine multiplies bfloat16 natively (recsys/runtime.py); the
        # per-size table says more than Lightning's model summary
        trainer_defaults={**TRAINER_DEFAULTS, "precision": default_precision(), "enable_model_summary": False},
        save_config_callback=None,
        seed_everything_default=0,
        auto_configure_optimizers=False,
    )
    trainer, model, datamodule, tracked = cli.trainer, cli.model, cli.datamodule, cli.run
    if trainer.is_global_zero and not cli.config.ckpt_path:
        import yaml

        config = cli.parser.dump(cli.config, skip_none=False)
        tracked.log_config(yaml.safe_load(config), config, datamodule.dataset.stats)

    fitted = fit_and_test(trainer, model, datamodule, ckpt_path=cli.config.ckpt_path)
    plan = getattr(trainer.strategy, "plan", None)  # --trainer.strategy sharded: what torchrec's planner chose
    if plan and trainer.is_global_zero:
        choices = {f"sharding/{table}": f"{p['sharding_type']} ranks {p['ranks']}" for table, p in plan.items()}
        trainer.logger.log_hyperparams(choices)
        print("\n".join(f"{k}: {v}" for k, v in choices.items()))
    result: dict[str, Any] = {**tracked.record(), "best": fitted.best, "best_val": fitted.best_val, "epochs": fitted.epochs}
    if not trainer.is_global_zero:
        return result

    title = f"{model.hparams.encoder} on {dataset_name(cli.config.data.data_dir)}"
    rank_names = model.sizes if model.trained_triples is None else [t.label for t in model.trained_triples]
    tracked.log_results(fitted.rows, title, fitted.best, test_ranks_table(fitted.test_ranks, rank_names))
    model_uris = tracked.log_models(fitted.best, model, fitted.rows)
    if model_uris is not None:
        result["model_uris"] = model_uris
    print("\n" + results_table(fitted.rows))
    print(f"\n{tracked.where()}")
    if model_uris:
        print("logged models: " + ", ".join(f"{k if isinstance(k, str) else f'd{k}'} {uri}" for k, uri in model_uris.items()))
    if fitted.best:
        print(f"best checkpoint: {fitted.best}\nexport a size: {tracked.export_hint(fitted.best, model.sizes[-1])}")
    result["rows"] = fitted.rows
    result["test_metrics"] = fitted.test_metrics
    result["test_ranks"] = fitted.test_ranks
    return result


def main(args: list[str] | None = None) -> int:
    quiet_console()
    return exit_code_of(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
