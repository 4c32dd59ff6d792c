"""Where a training run is recorded, and one training at a time per directory.

Two kinds of run, one interface (``--tracking``): :class:`MLflowRun` (the default: an MLflow run,
its size runs and logged models, ``recsys/tracking.py`` and ``recsys/logged_models.py``) and
:class:`CSVRun` (a run directory of files: Lightning's ``metrics.csv`` and the same reports,
without MLflow). Each says where its checkpoints go, logs the config, results and models, and
prints where to look and how to export a size.

A run directory and a checkpoint directory are held by a lock (``recsys.atomic.FileLock``) for the
whole training, so that a second training started there stops at once with one line
(:class:`DirectoryBusy`) instead of writing over the first one's files.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from lightning.pytorch.utilities.rank_zero import rank_zero_only

from recsys.atomic import FileLock, check_writable, write_json_atomically, write_text_atomically
from recsys.checkpoint import read_checkpoint
from recsys.console import command_of
from recsys.errors import UserError
from recsys.reporting import GRID_PLOT_FILE, PLOT_FILE, git_commit, write_results
from recsys.tracking import MLflowSettings

if TYPE_CHECKING:
    from recsys.model import MatryoshkaRecommender

__all__ = ["CSVRun", "DEFAULT_RUNS_DIR", "DirectoryBusy", "MLflowRun", "lock_checkpoint_directory", "lock_directory"]

DEFAULT_RUNS_DIR = "lightning_logs"  # already ignored by git; Lightning's own default
RUN_LOCK = ".training.lock"  # inside a run directory: held by the training that writes there
#: how often a run without --run_dir takes the next free version_<n> when another run took it at the same moment
NEXT_FREE_ATTEMPTS = 10


class DirectoryBusy(UserError):
    """Another training is writing in a directory this run would write in."""


def lock_directory(lock_file: Path, directory: Path, named: str, option: str | None) -> FileLock | None:
    """Hold ``lock_file`` for the rest of the run, so that one training at a time writes in
    ``directory``; :class:`DirectoryBusy` (calling it ``named``; ``option`` names the setting to
    change) when another training holds it. Only the process of global rank zero locks (the one that
    writes; the other processes of a distributed run share its directories): None elsewhere."""
    if rank_zero_only.rank != 0:
        return None
    check_writable(directory, named)  # a file in the way, or a place this process cannot write into: one line
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(lock_file)
    if lock.acquire():
        return lock
    pid = lock.holder()
    who = "another training" if pid is None else f"another training (pid {pid})"
    instead = "" if option is None else f" or use another {option}"
    raise DirectoryBusy(f"{named} {directory}: {who} is writing there; wait for it to end{instead}")


def lock_checkpoint_directory(dirpath: str, named: str, option: str | None) -> FileLock | None:
    """:func:`lock_directory` for a checkpoint directory. Its lock file lies beside it
    (``.NAME.lock``), so the directory holds checkpoints only: Lightning warns about any other file there."""
    directory = Path(dirpath)
    place = directory.resolve()
    return lock_directory(place.parent / f".{place.name}.lock", directory, named, option)


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

    def release(self) -> None:
        """Nothing to give up: an MLflow run has no directory of its own (its checkpoint directory is locked apart)."""

    def record(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "tracking_uri": self.settings.resolved_uri(), "run_dir": None}

    def log_config(self, config: dict[str, Any], config_yaml: str, stats: dict[str, Any]) -> None:
        from recsys.tracking import log_config

        log_config(self.logger.experiment, self.run_id, config, config_yaml, stats)

    def log_results(self, rows: list[dict[str, Any]], title: str, checkpoints: list[str], ranks=None) -> None:
        from recsys.tracking import log_results

        log_results(self.logger.experiment, self.run_id, rows, title, ranks)
        for path in checkpoints:  # the best one, or each size's (recsys.export --run-id takes a size's own)
            self.logger.experiment.log_artifact(self.run_id, path, "checkpoints")

    def log_models(self, best: str | None, model: MatryoshkaRecommender, rows: list[dict[str, Any]],
                   best_by_size: dict[int, str] | None = None) -> dict | None:
        if self.settings.log_models and best:
            from recsys.logged_models import log_trained_models

            return log_trained_models(self.run_id, model, best, best_by_size, rows, self.settings.register_as)
        from recsys.tracking import log_size_metrics

        log_size_metrics(self.logger.experiment, self.run_id, rows, {})
        return None

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
        return f"{command_of('recsys.export')} --run-id {self.run_id} --dims {dims} --out exports/"


class CSVRun:
    """A run directory: Lightning's ``metrics.csv`` and the same reports as files. No MLflow."""

    def __init__(self, run_dir: str | None, resume_from: str | None) -> None:
        resumed = read_checkpoint(resume_from) if resume_from else None
        named = "run directory" if run_dir is None else "--run_dir"
        if run_dir is None and resumed is not None:
            run_dir = resumed.get("run_dir")  # the same directory
        self.logger, self.lock = self._open(run_dir, named)
        self.run_dir = Path(self.logger.log_dir)
        self.checkpoint_dir = self.run_dir / "checkpoints"
        try:
            self._start(None if resumed is None else resumed.get("global_step", float("inf")))
        except BaseException:
            self.release()
            raise

    @staticmethod
    def _open(run_dir: str | None, named: str):
        """Lightning's CSV logger of the run directory (``run_dir``, or else the next free
        ``lightning_logs/version_<n>``) and the lock held on that directory."""
        from lightning.pytorch.loggers import CSVLogger

        if run_dir is not None:
            logger = CSVLogger(run_dir, name="", version="")
            return logger, lock_directory(Path(logger.log_dir) / RUN_LOCK, Path(logger.log_dir), named, "--run_dir")
        for attempt in range(NEXT_FREE_ATTEMPTS):  # another run may have taken the same version_<n> just now
            logger = CSVLogger(DEFAULT_RUNS_DIR, name="")
            try:
                return logger, lock_directory(Path(logger.log_dir) / RUN_LOCK, Path(logger.log_dir), named, "--run_dir")
            except DirectoryBusy:
                if attempt == NEXT_FREE_ATTEMPTS - 1:
                    raise

    def _start(self, resumed_at: float | None) -> None:
        """Open ``metrics.csv`` before anything else is written to the directory. Lightning's writer
        drops an existing one; a run resumed from a checkpoint of step ``resumed_at`` keeps the rows
        logged before that step, written back first. The later rows go: the steps that logged them
        (after the checkpoint, before a kill or Ctrl-C) are trained and logged again."""
        import csv
        import warnings

        path = self.run_dir / "metrics.csv"
        earlier = list(csv.DictReader(path.open(newline=""))) if resumed_at is not None and path.is_file() else []
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Experiment logs directory .* exists and is not empty")
            writer = self.logger.experiment  # on rank zero; a no-op stand-in elsewhere
        for row in earlier:
            if int(row["step"]) >= resumed_at:
                continue
            values = {k: float(v) for k, v in row.items() if k != "step" and v not in ("", None)}
            writer.log_metrics(values, step=int(row["step"]))

    def release(self) -> None:
        """Give up the run directory's lock (the system does it anyway when the process ends)."""
        if self.lock is not None:
            self.lock.release()

    def record(self) -> dict[str, Any]:
        return {"run_id": None, "tracking_uri": None, "run_dir": str(self.run_dir)}

    def log_config(self, config: dict[str, Any], config_yaml: str, stats: dict[str, Any]) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomically(self.run_dir / "config.yaml", config_yaml)
        info = {"git_commit": git_commit(), "data": stats}
        write_json_atomically(self.run_dir / "run.json", info, indent=2, default=str)

    def log_results(self, rows: list[dict[str, Any]], title: str, checkpoints: list[str], ranks=None) -> None:
        write_results(self.run_dir, rows, title, ranks)

    def log_models(self, best, model, rows, best_by_size=None) -> None:
        return None  # logged models are MLflow's; export a size with recsys.export --checkpoint

    def where(self) -> str:
        return (f"run directory {self.run_dir} (metrics.csv, results.md, results.json, test_ranks.parquet, "
                f"{PLOT_FILE} or, for a grid of sub-models, {GRID_PLOT_FILE})")

    def export_hint(self, best: str, dims: int) -> str:
        return f"{command_of('recsys.export')} --checkpoint {best} --dims {dims} --out exports/"
