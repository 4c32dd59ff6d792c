"""Exports as MLflow models: the sizes of a training run logged as pyfunc models, and a logged
model's export fetched back.

Each size (or trained triple, ``recsys/nn/grid.py``) of a run is exported by ``recsys/export.py``
and logged as a pyfunc model of its own child run (``recsys/tracking.py``), optionally registered
as ``NAME-d<size>``. The pyfunc is ``serving/pyfunc.py``, logged as *model from code*: MLflow keeps a
copy of that file beside the export and runs it when the model is loaded, so nothing is pickled.
Training names the file without importing it: training never imports ``serving``, a served model does.

Nothing here imports MLflow, Lightning or the model until it is called. A logged model's export is
fetched back by ``recsys.export_dir.fetch_export``.
"""

from __future__ import annotations

import importlib.util
import logging
import tempfile
from pathlib import Path
from typing import Any

from recsys.export_dir import ITEMS, ExportError, read_manifest

__all__ = ["log_size_models", "log_trained_models", "signature"]


def signature():
    """What a logged size takes and gives: histories of any id type (text or integers: the
    catalogue's own, checked by ``serving/item_ids.py``), and per history the top items, their scores,
    the unknown ids and whether the most popular items stood in."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import AnyType, Array, ColSpec, DataType, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec(Array(AnyType()), "history")]),
        outputs=Schema(
            [
                ColSpec(Array(AnyType()), "item_ids"),
                ColSpec(Array(DataType.double), "scores"),
                ColSpec(Array(AnyType()), "unknown"),
                ColSpec(DataType.boolean, "fallback"),
            ]
        ),
        params=ParamSchema(
            [ParamSpec("k", DataType.long, 10), ParamSpec("exclude_seen", DataType.boolean, True),
             ParamSpec("strict", DataType.boolean, False)]
        ),
    )


def pyfunc_code() -> Path:
    """``serving/pyfunc.py``, found without importing ``serving``."""
    spec = importlib.util.find_spec("serving")
    if spec is None or not spec.submodule_search_locations:
        raise ExportError("the serving package is not installed: a size cannot be logged as an MLflow model")
    return Path(next(iter(spec.submodule_search_locations))) / "pyfunc.py"


def log_trained_models(run_id: str, model, best: str, best_by_size: dict[int, str] | None,
                       rows: list[dict[str, Any]], register_as: str | None) -> dict:
    """Export every trained sub-model of ``model`` (a size from its own checkpoint where
    ``best_by_size`` has one, else from ``best``; a trained triple of an elastic run from ``best``)
    into a temporary directory and log each as a model of ``run_id``; returns model URIs by size
    (by label for triples)."""
    from recsys.export import export_each_size, export_triples
    from recsys.nn.nested import cut_sizes

    export_log = logging.getLogger("recsys.export")
    level = export_log.level
    export_log.setLevel(logging.WARNING)  # it exports to temporary directories here: no news for the user
    source = {"mlflow_run_id": run_id}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            if model.trained.elastic:
                triples = model.trained.triples
                dirs = dict(zip(model.trained.names, export_triples(best, triples, tmp, source=source)))
            else:  # the sizes it can be cut to (SASRec: the full one), each from its own checkpoint if any
                sizes = list(cut_sizes(model.net))
                checkpoint_of = {s: (best_by_size or {}).get(s, best) for s in sizes}
                dirs = dict(zip(sizes, export_each_size(checkpoint_of, tmp, source=source)))
            return log_size_models(run_id, dirs, rows, register_as)
    finally:
        export_log.setLevel(level)


def log_size_models(
    run_id: str, export_dirs: dict, rows: list[dict[str, Any]], register_as: str | None
) -> dict:
    """One pyfunc model (model from code: nothing pickled) per row in ``run_id``: a size's, or a
    trained triple's, named by it (``d64``, ``L2_w128_d64``), with its size (a triple's depth and
    width too) and parameters as params; ``export_dirs`` and the returned model URIs are keyed by
    size (by label for triples, :func:`~recsys.tracking.row_key`); rows without an export get none."""
    import mlflow

    from recsys.tracking import ROW_PARAMS, log_size_metrics, row_key, size_label, start_size_runs

    client = mlflow.MlflowClient()
    size_runs = start_size_runs(client, run_id, rows)
    logged = {}
    for row in rows:
        key, label = row_key(row), size_label(row)
        if key not in export_dirs:
            continue
        params = {**{k: str(row[k]) for k in ROW_PARAMS if k in row}, "parameters": str(row["parameters"])}
        logged[key] = _log_pyfunc(size_runs[label], label, export_dirs[key], params,
                                  f"{register_as}-{label}" if register_as else None, training_run_id=run_id)
    # Link each model's own test metrics only after all are logged (log_model links every metric
    # already in its run at its step, 0, to the new model); the size runs get theirs after it too.
    log_size_metrics(client, run_id, rows, {key: info.model_id for key, info in logged.items()}, size_runs)
    return {key: info.model_uri for key, info in logged.items()}


def _log_pyfunc(run_id: str, name: str, directory: Path, params: dict[str, str], registered: str | None,
                training_run_id: str | None = None):
    """Log the export in ``directory`` as pyfunc model ``name`` of ``run_id`` (model from code); a
    size's run (``run_id``) lists it as its model, and ``training_run_id``, its parent, as an output too."""
    import mlflow
    import pandas as pd
    import polars as pl
    from mlflow.entities import LoggedModelOutput

    manifest = read_manifest(directory)  # the export was checked whole as it was written
    example = pd.DataFrame({"history": [pl.read_parquet(directory / ITEMS)["item_id"].head(3).to_list()]})
    with mlflow.start_run(run_id=run_id):
        # created first, so that it keeps these params only (log_model would copy in the run's params)
        entry = mlflow.initialize_logged_model(name=name, source_run_id=run_id,
                                               params={**params, "encoder": manifest["encoder"]})
        info = mlflow.pyfunc.log_model(
            name=entry.name,
            model_id=entry.model_id,
            python_model=str(pyfunc_code()),
            artifacts={"export": str(directory)},
            signature=signature(),
            input_example=example,
            pip_requirements=_requirements(),
            registered_model_name=registered,
        )
    if training_run_id is not None:
        mlflow.MlflowClient().log_outputs(training_run_id, [LoggedModelOutput(entry.model_id, step=0)])
    return info


def _requirements() -> list[str]:
    from importlib.metadata import version

    names = ["torch", "polars", "safetensors", "numpy", "pandas", "mlflow"]
    return [f"{n}=={version(n)}" for n in names]
