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

Stopping and resuming: SIGTERM (a scheduler, ``kill``) ends the step in progress, saves
``last.ckpt`` and exits with status 143, its one line saying how to resume (``--ckpt_path``);
Ctrl-C exits with 130 and one line naming the last checkpoint. A resumed run logs every step once.
Checkpoints are written under a hidden name beside their own and renamed in place, so a kill or a
full disk never leaves a partial one. One training at a time writes in a run directory (``--run_dir``)
or checkpoint directory (``--checkpoint.dirpath``): a second one is refused in one line.

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

from recsys.console import ctrl_c_interrupts, epoch_description, help_asked, quiet_console

if __name__ == "__main__" and help_asked(sys.argv[1:]):  # answered before Lightning is imported (seconds)
    print(__doc__.replace("``", "`"))
    sys.exit(0)

# the imports below take seconds (Lightning, torch, transformers), so the help comes first
import importlib
import io
import logging
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from jsonargparse import Namespace
from lightning.pytorch.callbacks import (
    Callback,
    EarlyStopping,
    ModelCheckpoint,
    ProgressBar,
    RichProgressBar,
    TQDMProgressBar,
    WeightAveraging,
)
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.plugins.io import CheckpointIO, TorchCheckpointIO
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from recsys.atomic import reported_write_failures, write_bytes_atomically
from recsys.data import SequenceDataModule
from recsys.errors import Interrupted, UserError, exit_code_of
from recsys.model import (
    CHECKPOINT_DEFAULTS,
    EARLY_STOPPING_DEFAULTS,
    TRAINER_DEFAULTS,
    MatryoshkaRecommender,
)
from recsys.checkpoint import read_checkpoint
from recsys.model_options import check_options, recipe_of
from recsys.compat import nest_flat_args
from recsys.nn.encoders import OptionError
from recsys.runtime import default_precision, reuse_freed_memory
from recsys.reporting import dataset_name, results_table, summarise, test_ranks_table
from recsys.tracking import MLflowSettings, default_run_name
from recsys.training_runs import CSVRun, MLflowRun, lock_checkpoint_directory

log = logging.getLogger("recsys.train")


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
    """The model's own checks (:func:`recsys.model_options.check_options`) and the data directory's, named
    as flags, before anything is read or trained."""
    model, data = config.model, config.data
    try:
        check_options(**vars(model))
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
    for callback in config.trainer.get("callbacks") or []:
        check_weight_averaging(callback)


def check_weight_averaging(callback) -> None:
    """A weight-averaging callback (Lightning's ``EMAWeightAveraging``, any ``WeightAveraging``) must
    leave the buffers alone (``use_buffers false``): the model's buffers are its item features,
    integer indices among them, which an average of integers rounds down step by step."""
    path = callback.get("class_path") if isinstance(callback, (dict, Namespace)) else None
    if not isinstance(path, str) or "." not in path:
        return
    module, _, name = path.rpartition(".")
    try:
        kind = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return  # the parser names a class it cannot import
    arguments = callback.get("init_args") or {}
    if isinstance(kind, type) and issubclass(kind, WeightAveraging) and arguments.get("use_buffers", True) is not False:
        raise ConfigError(f"--trainer.callbacks {name}: set --trainer.callbacks.use_buffers false; the model's buffers are "
                          "its item features, integer indices among them, which averaging would round down step by step")


# -- checkpoints written whole, one training per directory, stopping on a signal ------------------------


class AtomicCheckpointIO(TorchCheckpointIO):
    """Every checkpoint written whole or not at all, on any file system: serialised in memory, then
    :func:`recsys.atomic.write_bytes_atomically` (a hidden temporary file beside it, fsync, rename).

    Lightning's own writer keeps its temporary file in the system's temporary directory; from another
    file system (a tmpfs ``--run_dir``) its rename becomes a copy into the checkpoint itself, which a
    kill left empty and a full disk left truncated. Here a disk that cannot take a checkpoint (full,
    read-only) is one :class:`~recsys.atomic.NotWritable` line and the previous checkpoint stays.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any = None) -> None:
        if storage_options is not None or "://" in str(path):  # a remote store (s3://...): Lightning's writer
            return super().save_checkpoint(checkpoint, path, storage_options)
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        with reported_write_failures(path, "checkpoint"):
            write_bytes_atomically(path, buffer.getbuffer())


def with_atomic_checkpoints(plugins: Any) -> list:
    """The Trainer's ``plugins`` with an :class:`AtomicCheckpointIO`, unless they hold a CheckpointIO already."""
    plugins = [] if plugins is None else list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
    if not any(isinstance(plugin, CheckpointIO) for plugin in plugins):
        plugins.append(AtomicCheckpointIO())
    return plugins


def last_checkpoint(trainer) -> Path | None:
    """Where ModelCheckpoint keeps the last checkpoint (``DIR/last.ckpt``); None when it keeps none."""
    callback = trainer.checkpoint_callback
    if callback is None or callback.dirpath is None:
        return None
    return Path(callback.dirpath) / f"{callback.CHECKPOINT_NAME_LAST}{callback.FILE_EXTENSION}"


class BestCheckpointPerSize(Callback):
    """Each size's best checkpoint by its own validation NDCG@10 (``--model.monitor_size each``):
    ``<dirpath>/<filename>-d<size>.ckpt``, weights only (tested and exported, never resumed from;
    with a weight-averaging callback, the averaged weights it was validated with),
    written after every validation that improved the size's best (the model's ``best_val_by_size``,
    which checkpoints keep). A plain callback, so it runs before the ModelCheckpoint that saves
    ``last.ckpt``: that checkpoint never holds a best score whose file is not written yet."""

    def __init__(self, sizes: tuple[int, ...], dirpath: str, filename: str) -> None:
        self.paths = {s: Path(dirpath) / f"{filename}-d{s}.ckpt" for s in sizes}
        self._before: dict[str, tuple[float, int]] = {}

    def on_validation_start(self, trainer, pl_module) -> None:
        self._before = dict(pl_module.best_val_by_size)

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        averaging = [c for c in trainer.callbacks if isinstance(c, WeightAveraging)]
        for size, path in self.paths.items():
            label = f"d{size}"
            if pl_module.best_val_by_size.get(label) != self._before.get(label):
                trainer.save_checkpoint(path, weights_only=True)
                if averaging and trainer.is_global_zero:  # (the process that wrote it)
                    self._with_averaged_weights(trainer, pl_module, path, averaging)

    @staticmethod
    def _with_averaged_weights(trainer, pl_module, path: Path, averaging: list[WeightAveraging]) -> None:
        """A weight-averaging callback (``--trainer.callbacks+=EMAWeightAveraging``) validates the
        averaged weights and puts them into each checkpoint it is called for (its
        ``on_save_checkpoint``, the training weights beside them), which a weights-only save does not
        call: the size's checkpoint is given them the same way. (A whole save would call it, but would
        also hold the callbacks' states, which testing from the checkpoint restores: ModelCheckpoint's
        best score as it was before this validation.)"""
        checkpoint = read_checkpoint(path)
        for callback in averaging:
            callback.on_save_checkpoint(trainer, pl_module, checkpoint)
        trainer.strategy.save_checkpoint(checkpoint, path)

    def best(self) -> dict[int, str] | None:
        """Each size's best checkpoint; None before every size has one."""
        return {s: str(p) for s, p in self.paths.items()} if all(p.is_file() for p in self.paths.values()) else None


class SaveOnSigterm(Callback):
    """On SIGTERM Lightning ends the step it is in and stops (``SIGTERMException``); this callback
    saves ``last.ckpt`` there, through the atomic writer, so ``--ckpt_path`` goes on at the next step.

    Not when the signal cut a validation short: Lightning would resume from such a checkpoint
    without that validation, so ``last.ckpt`` stays the last one ModelCheckpoint saved.
    """

    def __init__(self) -> None:
        self.saved: Path | None = None
        self._validated_at: int | None = None  # the step after which validation last ran
        self._epoch_ended_at: int | None = None

    def on_validation_end(self, trainer, pl_module) -> None:
        self._validated_at = trainer.global_step

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._epoch_ended_at = trainer.global_step

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        path = last_checkpoint(trainer)
        if isinstance(exception, SIGTERMException) and trainer.training and path is not None:
            validated_in_epoch = self._validated_at == trainer.global_step != self._epoch_ended_at
            save_after_the_step(trainer, path, validated_in_epoch)
            self.saved = path


def save_after_the_step(trainer, path: Path, validated_in_epoch: bool) -> None:
    """Save a checkpoint where Lightning stops on SIGTERM: after a step, once it has counted the step
    for its loggers (``_batches_that_stepped``).

    Resuming from a checkpoint taken right after a validation inside an epoch, Lightning (2.6) takes it
    for one that ModelCheckpoint saved during that validation, before the count, and counts the step
    again: every later metric would be logged one step too far. Such a checkpoint is saved with the
    count taken back, as ModelCheckpoint would have saved it (Lightning's epoch-end logging takes the
    count back the same way). A step inside gradient accumulation is not counted in the first place.
    """
    loop = trainer.fit_loop.epoch_loop
    back = int(validated_in_epoch and not loop._should_accumulate())
    loop._batches_that_stepped -= back
    try:
        trainer.save_checkpoint(path)
    finally:
        loop._batches_that_stepped += back


def stopped(trainer, signum: int, saved: Path | None) -> Interrupted:
    """The one line of a run stopped by ``signum``: where it stopped and how to go on."""
    name = "SIGINT (Ctrl-C)" if signum == signal.SIGINT else signal.Signals(signum).name
    if trainer.state.fn == TrainerFn.FITTING:
        where = f"at epoch {trainer.current_epoch}, step {trainer.global_step}"
    else:
        where = "while testing"
    last = last_checkpoint(trainer)
    if saved is not None:
        how = f"saved {saved}; resume with the same options and --ckpt_path {saved}"
    elif last is not None and last.is_file():
        how = f"resume from the last checkpoint with the same options and --ckpt_path {last}"
    else:
        how = "no checkpoint was saved yet"
    return Interrupted(signum, f"stopped by {name} {where}: {how}")


# -- tracking ----------------------------------------------------------------------------------------


# -- the progress bar ---------------------------------------------------------------------------------


class EpochRichProgressBar(RichProgressBar):
    """Lightning's rich bar, with epochs counted from 1 (:func:`recsys.console.epoch_description`):
    ``Epoch 8/8`` for the last of 8 epochs, where Lightning's says ``Epoch 7/7``."""

    def _get_train_description(self, current_epoch: int) -> str:
        text = epoch_description(current_epoch, self.trainer.max_epochs)
        return f"{text:{len(self.validation_description)}}"  # padded as Lightning pads it (no flicker)


class EpochTQDMProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar (where rich is not installed), with epochs counted from 1 of
    ``max_epochs``: ``Epoch 8/8``, where Lightning's says ``Epoch 7``."""

    def on_train_epoch_start(self, trainer, *args: Any) -> None:
        super().on_train_epoch_start(trainer, *args)
        self.train_progress_bar.set_description(epoch_description(trainer.current_epoch, trainer.max_epochs))


def epoch_progress_bar() -> ProgressBar:
    """The bar Lightning would choose (rich where it is installed, else tqdm), counting epochs from 1."""
    try:
        return EpochRichProgressBar()
    except ModuleNotFoundError:  # rich is not installed
        return EpochTQDMProgressBar()


def with_epoch_progress_bar(trainer_defaults: dict[str, Any], trainer_config: dict[str, Any]) -> dict[str, Any]:
    """``trainer_defaults`` with :func:`epoch_progress_bar` among its callbacks where Lightning would
    add its own bar: the bar is on (``--trainer.enable_progress_bar``) and no callback given is a bar."""
    def as_list(value: Any) -> list:
        return [] if value is None else value if isinstance(value, list) else [value]

    given, ours = as_list(trainer_config.get("callbacks")), as_list(trainer_defaults.get("callbacks"))
    if trainer_config.get("enable_progress_bar") is False or any(isinstance(c, ProgressBar) for c in given + ours):
        return trainer_defaults
    return {**trainer_defaults, "callbacks": [*ours, epoch_progress_bar()]}


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
            model = self.config.model
            if model.nesting == "slices":
                raise ConfigError("--model.nesting slices is not supported with --trainer.strategy sharded "
                                  "(the slices of sharded item tables are not built); use --model.nesting blocks")
            if model.nesting is None:  # the recipe's slices are not built for sharded tables: the plain nested model
                model.nesting = "blocks"
            if recipe_of(**vars(model))["distill"] > 0 and model.distill_teacher == "average":
                raise ConfigError("--model.distill_teacher average is not supported with --trainer.strategy sharded "
                                  "(the averaged copy of the sharded item tables is not built)")
            import recsys.sharding  # noqa: F401 - registers the strategy name

    def instantiate_trainer(self, **kwargs: Any):
        if self.config.ckpt_path:  # before the run is opened: a refused resume leaves it, and its checkpoints, as they were
            check_resume(self.config.ckpt_path, self.model, self.datamodule)
        self.run = None
        self.checkpoint_lock = None
        try:
            self._open_run()
            trainer_config = self._get(self.config_init, "trainer", default={})
            plugins = with_atomic_checkpoints(trainer_config.get("plugins"))
            self.trainer_defaults = with_epoch_progress_bar(self.trainer_defaults, trainer_config)  # "Epoch 8/8", not 7/7
            if self.model.monitor_size == "each":
                checkpoint = self.config_init.checkpoint
                per_size = BestCheckpointPerSize(self.model.sizes, checkpoint.dirpath, checkpoint.filename or "best")
                self.trainer_defaults = {**self.trainer_defaults, "callbacks": [*self.trainer_defaults["callbacks"], per_size]}
            return super().instantiate_trainer(logger=self.run.logger, plugins=plugins, **kwargs)
        except BaseException:
            self.release()
            raise

    def _open_run(self) -> None:
        """Open the run (MLflow or a run directory) and lock the directories it writes in, each
        before anything is written there: one training at a time per directory."""
        checkpoint: ModelCheckpoint = self.config_init.checkpoint
        if checkpoint.dirpath is not None:  # before the run is opened: a refused run opens none
            # as the user wrote it (Lightning has made checkpoint.dirpath absolute); the same place
            self.checkpoint_lock = lock_checkpoint_directory(self.config.checkpoint.dirpath, "--checkpoint.dirpath",
                                                             "--checkpoint.dirpath")
        if self.config.tracking == "csv":
            self.run = CSVRun(self.config.run_dir, self.config.ckpt_path)  # locks its run directory
        else:
            model, data = self.config.model, self.config.data
            name = default_run_name(model.encoder, model.sizes, dataset_name(data.data_dir))
            self.run = MLflowRun(self.config_init.mlflow, self.config.ckpt_path, name)
        if checkpoint.dirpath is None:
            checkpoint.dirpath = str(self.run.checkpoint_dir)
            if self.config.tracking != "csv":  # csv: inside the run directory, locked already
                self.checkpoint_lock = lock_checkpoint_directory(checkpoint.dirpath, "checkpoint directory", None)

    def release(self) -> None:
        """Give up the locks of the run's directories."""
        if self.checkpoint_lock is not None:
            self.checkpoint_lock.release()
        if self.run is not None:
            self.run.release()


@dataclass
class FitResult:
    """What :func:`fit_and_test` found: the best checkpoint and its validation score, the epochs
    trained, the test metrics of the best checkpoint and its per-size rows (rank zero only); with
    ``--model.monitor_size each`` every size's own best checkpoint (``best`` is the largest's)."""

    best: str | None
    best_val: float | None
    epochs: int
    test_metrics: dict[str, float]
    rows: list[dict[str, Any]] | None
    test_ranks: tuple[np.ndarray, np.ndarray] | None = None  # (users, ranks (M, users)), rank zero only
    best_by_size: dict[int, str] | None = None


def fit_and_test(trainer, model: MatryoshkaRecommender, datamodule, ckpt_path: str | None = None) -> FitResult:
    """Fit (resuming from ``ckpt_path``), then test the best checkpoint by ``val/monitor``, or each
    size from its own best checkpoint (``--model.monitor_size each``)."""
    trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    best = trainer.checkpoint_callback.best_model_path or None
    per_size = next((c for c in trainer.callbacks if isinstance(c, BestCheckpointPerSize)), None)
    sized = per_size.best() if per_size is not None else None
    if sized:
        best = sized[model.sizes[-1]]  # the model holds the largest size's; each size ranks with its own
        model.test_checkpoints = sized
    trainer.test(model, datamodule=datamodule, ckpt_path=best, verbose=False, weights_only=True)
    score = trainer.checkpoint_callback.best_model_score
    metrics = dict(model.last_test_metrics)
    rows = summarise(model, datamodule, metrics) if trainer.is_global_zero else None
    ranks = model.last_test_ranks if trainer.is_global_zero else None
    return FitResult(best, None if score is None else float(score), trainer.current_epoch, metrics, rows, ranks, sized)


def fit_or_stop(trainer, model: MatryoshkaRecommender, datamodule, ckpt_path: str | None, on_sigterm: SaveOnSigterm) -> FitResult:
    """:func:`fit_and_test`, or :class:`~recsys.errors.Interrupted` with where it stopped and how to
    resume when SIGTERM or Ctrl-C (see :func:`recsys.console.ctrl_c_interrupts`) stopped it."""
    try:
        return fit_and_test(trainer, model, datamodule, ckpt_path=ckpt_path)
    except SIGTERMException:  # a SystemExit(None): it would end the command with status 0
        raise stopped(trainer, signal.SIGTERM, on_sigterm.saved) from None
    except Interrupted as exc:
        raise stopped(trainer, exc.signum, None) from None


def run(args: list[str] | None = None) -> dict[str, Any]:
    """Train, test the best checkpoint, record everything; returns what was recorded (for tests)."""
    reuse_freed_memory()
    on_sigterm = SaveOnSigterm()
    cli = TrainCLI(
        MatryoshkaRecommender,
        SequenceDataModule,
        run=False,
        args=args,
        # bf16-mixed where this machine multiplies bfloat16 natively (recsys/runtime.py); the
        # per-size table says more than Lightning's model summary
        trainer_defaults={**TRAINER_DEFAULTS, "precision": default_precision(), "enable_model_summary": False,
                          "callbacks": [on_sigterm]},
        save_config_callback=None,
        seed_everything_default=0,
        auto_configure_optimizers=False,
    )
    try:
        return _train_and_record(cli, on_sigterm)
    finally:
        cli.release()


def _train_and_record(cli: TrainCLI, on_sigterm: SaveOnSigterm) -> dict[str, Any]:
    trainer, model, datamodule, tracked = cli.trainer, cli.model, cli.datamodule, cli.run
    if trainer.is_global_zero and not cli.config.ckpt_path:
        import yaml

        config = cli.parser.dump(cli.config, skip_none=False)
        tracked.log_config(yaml.safe_load(config), config, datamodule.dataset.stats)

    fitted = fit_or_stop(trainer, model, datamodule, cli.config.ckpt_path, on_sigterm)
    plan = getattr(trainer.strategy, "plan", None)  # --trainer.strategy sharded: what torchrec's planner chose
    if plan and trainer.is_global_zero:
        choices = {f"sharding/{table}": f"{p['sharding_type']} ranks {p['ranks']}" for table, p in plan.items()}
        trainer.logger.log_hyperparams(choices)
        print("\n".join(f"{k}: {v}" for k, v in choices.items()))
    result: dict[str, Any] = {**tracked.record(), "best": fitted.best, "best_val": fitted.best_val, "epochs": fitted.epochs,
                              "best_val_by_size": dict(model.best_val_by_size), "best_by_size": fitted.best_by_size}
    if not trainer.is_global_zero:
        return result

    title = f"{model.hparams.encoder} on {dataset_name(cli.config.data.data_dir)}"
    checkpoints = sorted(set(fitted.best_by_size.values())) if fitted.best_by_size else [fitted.best] if fitted.best else []
    tracked.log_results(fitted.rows, title, checkpoints, test_ranks_table(fitted.test_ranks, model.trained.names))
    model_uris = tracked.log_models(fitted.best, model, fitted.rows, fitted.best_by_size)
    if model_uris is not None:
        result["model_uris"] = model_uris
    print("\n" + results_table(fitted.rows))
    print(f"\n{tracked.where()}")
    if model_uris:
        print("logged models: " + ", ".join(f"{k if isinstance(k, str) else f'd{k}'} {uri}" for k, uri in model_uris.items()))
    if fitted.best_by_size:
        print("best checkpoint of each size: " + ", ".join(f"d{s} {path}" for s, path in fitted.best_by_size.items()))
    elif fitted.best:
        print(f"best checkpoint: {fitted.best}")
    if fitted.best:
        print(f"export a size: {tracked.export_hint(fitted.best, model.sizes[-1])}")
    result["rows"] = fitted.rows
    result["test_metrics"] = fitted.test_metrics
    result["test_ranks"] = fitted.test_ranks
    return result


def main(args: list[str] | None = None) -> int:
    quiet_console()
    with ctrl_c_interrupts():
        return exit_code_of(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
