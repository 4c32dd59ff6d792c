"""MLflow: where a person compares the sizes of one training run and picks one to ship.

Only the MLflow side lives here (settings, the store lock, the logger, params and tags, logged
models); the tables, plot and per-size rows themselves are :mod:`recsys.reporting`. Nothing here
imports ``mlflow`` until a run starts.

One run per training holds: the flattened config as params; data stats and the git commit as
tags; validation metrics per epoch and test metrics for every size (``test/ndcg_10/d64``); the
resolved config, the best checkpoint, a per-size results table and a plot of accuracy against size;
and one logged model per size (the exported size-``s`` model as a pyfunc, with its size, parameter
count and test metrics linked), optionally registered as ``NAME-d<size>``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from recsys.errors import UserError
from recsys.reporting import git_commit, write_results

log = logging.getLogger(__name__)

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


@dataclass
class MLflowSettings:
    """Where and how a training run is recorded.

    Args:
        tracking_uri: MLflow tracking URI; default ``$MLFLOW_TRACKING_URI`` or ``sqlite:///mlflow.db``.
        experiment: experiment name.
        run_name: run name (default: MLflow picks one).
        artifact_location: artifact root for a new experiment (default: MLflow's).
        log_models: log one pyfunc model per size (the exported size-specific model).
        register_as: also register each size's model as ``<register_as>-d<size>``.
    """

    tracking_uri: str | None = None
    experiment: str = "recsys"
    run_name: str | None = None
    artifact_location: str | None = None
    log_models: bool = True
    register_as: str | None = None

    def resolved_uri(self) -> str:
        return self.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


class TrackingUnavailableError(UserError, RuntimeError):
    """The tracking server cannot be reached: training stops before spending compute."""


def check_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """Fail fast when an HTTP tracking server does not answer (local stores always work)."""
    if not uri.startswith(("http://", "https://")):
        return
    import urllib.request

    try:
        urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s)  # noqa: S310 - user-given URI
    except Exception as exc:
        raise TrackingUnavailableError(
            f"the MLflow tracking server {uri} does not answer ({exc}); start it, fix --mlflow.tracking_uri "
            "or MLFLOW_TRACKING_URI, or unset it to record locally in sqlite:///mlflow.db"
        ) from None


@contextlib.contextmanager
def _store_lock(uri: str) -> Iterator[None]:
    """An exclusive lock beside a local sqlite store (no-op elsewhere, and where fcntl is missing)."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    db = Path(uri[len("sqlite:///"):])
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{db}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def prepare_store(settings: MLflowSettings) -> None:
    """Create the store's tables and the experiment, one process at a time.

    Two runs started together on a new sqlite store would otherwise both migrate its schema, and
    both create the experiment, and one of them would fail.
    """
    from mlflow.tracking import MlflowClient

    uri = settings.resolved_uri()
    with _store_lock(uri):
        client = MlflowClient(uri)
        if client.get_experiment_by_name(settings.experiment) is None:
            client.create_experiment(settings.experiment, artifact_location=settings.artifact_location)


def make_logger(settings: MLflowSettings, run_id: str | None = None):
    """Lightning's MLflow logger for ``settings``; ``run_id`` continues an earlier run."""
    from lightning.pytorch.loggers import MLFlowLogger

    uri = settings.resolved_uri()
    check_reachable(uri)
    prepare_store(settings)
    return MLFlowLogger(
        experiment_name=settings.experiment,
        run_name=settings.run_name,
        tracking_uri=uri,
        artifact_location=settings.artifact_location,
        run_id=run_id,
        log_model=False,
    )


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"model": {"sizes": [..]}}`` -> ``{"model.sizes": "[..]"}`` (MLflow params are strings)."""
    flat: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            text = json.dumps(value, default=str) if not isinstance(value, str) else value
            flat[name] = text[:6000]
    return flat


def log_config(client, run_id: str, config: dict[str, Any], config_yaml: str, stats: dict[str, Any]) -> None:
    """Params (flattened config), tags (data stats, git commit) and the resolved config file."""
    from mlflow.entities import Param, RunTag

    params = [Param(k, v) for k, v in flatten(config).items()]
    for start in range(0, len(params), 100):
        client.log_batch(run_id, params=params[start : start + 100])
    tags = [RunTag(f"data.{k}", str(v)[:5000]) for k, v in stats.items() if not isinstance(v, (dict, list))]
    commit = git_commit()
    if commit:
        tags.append(RunTag("git_commit", commit))
    client.log_batch(run_id, tags=tags)
    client.log_text(run_id, config_yaml, "config.yaml")


def log_results(client, run_id: str, rows: list[dict[str, Any]], title: str, ranks=None) -> None:
    """The per-size table, rows, plot and per-user test ranks (:func:`recsys.reporting.write_results`)
    as run artifacts."""
    with tempfile.TemporaryDirectory() as tmp:
        for path in write_results(Path(tmp), rows, title, ranks):
            client.log_artifact(run_id, str(path))


def log_size_models(
    run_id: str, export_dirs: dict[int, Path], rows: list[dict[str, Any]], register_as: str | None
) -> dict[int, str]:
    """One pyfunc model per size in ``run_id`` (model from code: nothing pickled); returns model URIs."""
    import mlflow
    import pandas as pd
    from mlflow.entities import Metric

    import serving
    from serving import pyfunc

    code = str(Path(pyfunc.__file__))
    by_size = {r["size"]: r for r in rows}
    logged = {}
    with mlflow.start_run(run_id=run_id):
        for size, directory in export_dirs.items():
            wrapper = pyfunc.SizedRecommenderPyfunc()
            wrapper.model = serving.load(directory)
            example = pd.DataFrame({"history": [wrapper.model.item_ids[:3]]})
            signature = pyfunc.signature()
            logged[size] = mlflow.pyfunc.log_model(
                name=f"d{size}",
                python_model=code,
                artifacts={"export": str(directory)},
                signature=signature,
                input_example=example,
                params={"size": size, "parameters": by_size[size]["parameters"], "encoder": wrapper.model.manifest["encoder"]},
                pip_requirements=_requirements(),
                registered_model_name=f"{register_as}-d{size}" if register_as else None,
            )
    # Link each model's own test metrics only after all are logged: log_model links every
    # step-0 metric already in the run to the new model, which would mix the sizes up.
    client = mlflow.MlflowClient()
    now = int(time.time() * 1000)
    for size, info in logged.items():
        metrics = [
            Metric(f"test/{k}/d{size}", float(v), now, 0, model_id=info.model_id)
            for k, v in by_size[size].items()
            if k not in ("size", "parameters")
        ]
        client.log_batch(run_id, metrics=metrics)
    return {size: info.model_uri for size, info in logged.items()}


def _requirements() -> list[str]:
    from importlib.metadata import version

    names = ["torch", "polars", "safetensors", "numpy", "pandas", "mlflow"]
    return [f"{n}=={version(n)}" for n in names]
