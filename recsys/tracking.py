"""MLflow: where a person compares the sizes of one training run and picks one to ship.

Only the MLflow side lives here (settings, the store lock, the logger, params and tags, the size
runs); the tables, plot and per-size rows themselves are :mod:`recsys.reporting`, the logged models
:mod:`recsys.logged_models`. Nothing here
imports ``mlflow`` until a run starts.

One run per training, named after what it trained (``lru d16-128 ml-1m 12-02 07:06:38``), holds:
the flattened config as params; data stats and the git commit as tags; validation metrics per epoch
and test metrics for every size (``test/ndcg_10/d64``); the resolved config, the best checkpoint, a
per-size results table and a plot of accuracy against size; and one logged model per size (the
exported size-``s`` model as a pyfunc, with its size and parameter count as params), optionally
registered as ``NAME-d<size>``. An elastic run (``recsys/nn/grid.py``) has the same per trained
(depth, width, size) triple instead: ``test/ndcg_10/L2_w128_d64``, ``parameters/L2_w128_d64``,
``encode_ms_per_1k/...``, ``retrieval_flops_per_user/...``, a heat map of NDCG@10 over the grid,
and one logged model per triple (``NAME-L2_w128_d64`` when registered).

Choosing a size in the MLflow UI needs no setting there: the address the training prints opens the
run among the UI's model training pages (MLflow 3 otherwise opens its GenAI pages); the run's
description is the per-size table and the plot; and each size's results are logged once more under
size-free names at step = size (``test/ndcg_10``, ``parameters``), the test metrics linked to that
size's model, so that the run's chart of ``test/ndcg_10`` is NDCG@10 against size and the
experiment's model list has one column per metric.

Each size is also a child run of the training run, named by it (``d64``; ``L2_w128_d64`` for a
triple), so that the experiment's runs table, with the training run unfolded, lists the sizes as rows
(each with its model) and its chart view draws them side by side, one bar per size, in its first
section: the size (and a triple's depth and width) as params; its costs and test metrics as
``sizes/parameters``, ``sizes/encode_ms_per_1k``, ``sizes/test_ndcg_10``, ... (the same names in
every size run, none of the training run's: see :func:`child_metric_name`); and its logged model
(the model's source run; the training run keeps it as an output). ``python -m recsys.register``
registers one size's model and points an alias at it.
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
from recsys.reporting import GRID_PLOT_FILE, PLOT_FILE, git_commit, is_grid, results_table, write_results

log = logging.getLogger(__name__)

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
LOCAL_UI = "http://127.0.0.1:5000"  # where `make ui` shows a local store
# MLflow 3's UI opens on its GenAI pages (traces, sessions); this query parameter opens its model
# training pages instead (the switch at its top left does the same, and the browser remembers it)
TRAINING_PAGES = "workflowType=machine_learning"
RUN_NOTE_TAG = "mlflow.note.content"  # the run's description, shown as markdown on the run page


@dataclass
class MLflowSettings:
    """Where and how a training run is recorded.

    Args:
        tracking_uri: MLflow tracking URI; default ``$MLFLOW_TRACKING_URI`` or ``sqlite:///mlflow.db``.
        experiment: experiment name.
        run_name: run name (default: what it trained and when, e.g. ``lru d16-128 ml-1m 12-02 07:06:38``).
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

    from sqlalchemy.exc import SQLAlchemyError

    from recsys.atomic import reported_write_failures

    uri = settings.resolved_uri()
    try:
        with reported_write_failures(uri, "--mlflow.tracking_uri"), _store_lock(uri):
            client = MlflowClient(uri)
            if client.get_experiment_by_name(settings.experiment) is None:
                client.create_experiment(settings.experiment, artifact_location=settings.artifact_location)
    except SQLAlchemyError as exc:  # not a database, read-only, a full disk: the database's own words
        reason = str(getattr(exc, "orig", None) or exc).splitlines()[0]
        raise TrackingUnavailableError(
            f"the MLflow store {uri} cannot be used ({reason}); fix it, or give another --mlflow.tracking_uri"
        ) from None


def default_run_name(encoder: str, sizes: list[int], dataset: str, started: float | None = None) -> str:
    """``lru d16-128 ml-1m 12-02 07:06:38``: the encoder, the sizes, the dataset and the start time.

    Without it every run would be called the same: MLflow draws its random names from Python's
    ``random``, which the training seeds first.
    """
    dims = f"d{sizes[0]}" if len(sizes) == 1 else f"d{sizes[0]}-{sizes[-1]}"
    return f"{encoder} {dims} {dataset} {time.strftime('%m-%d %H:%M:%S', time.localtime(started))}"


def run_url(uri: str, experiment_id: str, run_id: str) -> str:
    """The run's page among the MLflow UI's model training pages: on the tracking server itself, or
    on `make ui` for a local store."""
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else LOCAL_UI
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}?{TRAINING_PAGES}"


def make_logger(settings: MLflowSettings, run_id: str | None = None, run_name: str | None = None):
    """Lightning's MLflow logger for ``settings``; ``run_id`` continues an earlier run, otherwise a
    new one is called ``settings.run_name`` or else ``run_name``."""
    from lightning.pytorch.loggers import MLFlowLogger

    uri = settings.resolved_uri()
    check_reachable(uri)
    prepare_store(settings)
    return MLFlowLogger(
        experiment_name=settings.experiment,
        run_name=settings.run_name or run_name,
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
    as run artifacts, and the table and the plot as the run's description."""
    with tempfile.TemporaryDirectory() as tmp:
        for path in write_results(Path(tmp), rows, title, ranks):
            client.log_artifact(run_id, str(path))
    client.set_tag(run_id, RUN_NOTE_TAG, run_description(run_id, rows))


def run_description(run_id: str, rows: list[dict[str, Any]]) -> str:
    """Markdown for the run page: the per-size table, the plot (served by the MLflow UI from the
    run's artifacts) and where the rest is; an elastic run's per-triple table and heat map."""
    if is_grid(rows):
        best = max(rows, key=lambda r: r["ndcg_10"])
        return "\n\n".join([
            f"Test NDCG@10 per trained (depth, width, size) triple (the best checkpoint); best {best['triple']} "
            f"**{best['ndcg_10']:.4f}**",
            results_table(rows),
            f"![NDCG@10 over the grid](get-artifact?path={GRID_PLOT_FILE}&run_uuid={run_id})",
            "Per triple as metrics: `test/ndcg_10/L2_w128_d64`, `parameters/...`, `encode_ms_per_1k/...`, "
            "`retrieval_flops_per_user/...`; one logged model per triple, named by it. Side by side: one child run "
            "per triple (*Child runs*; unfold this run among the experiment's runs, whose chart view draws a bar "
            "per triple under `sizes`).",
        ])
    glance = " · ".join(f"d{r['size']} **{r['ndcg_10']:.4f}** ({r['parameters']:,} parameters)" for r in rows)
    return "\n\n".join([
        f"Test NDCG@10 by size (the best checkpoint): {glance}",
        results_table(rows),
        f"![NDCG@10 and Recall@10 against size](get-artifact?path={PLOT_FILE}&run_uuid={run_id})",
        "Against size as charts: *Model metrics* (`test/ndcg_10`, `parameters`, ...; step = size). "
        "The sizes side by side: one child run per size (*Child runs*; unfold this run among the "
        "experiment's runs, whose chart view draws a bar per size under `sizes`), and the experiment's "
        "*Models*, as a table or a chart (one logged model per size, with its size, parameters and test "
        "metrics). `python -m recsys.register` registers a size's model and gives it an alias.",
    ])


GRID_COSTS = ("parameters", "encode_ms_per_1k", "retrieval_flops_per_user")


def result_metric(row: dict[str, Any], key: str) -> tuple[str, int, bool]:
    """Where a row's result goes in the training run: ``(name, step, whether it is a cost)``.
    A size's under a size-free name at step = size (``test/ndcg_10``, ``parameters``), so that the
    run's chart of it is drawn against size; a trained triple's under its label at step 0
    (``test/ndcg_10/L2_w128_d64``, ``parameters/...``, ``encode_ms_per_1k/...``). Costs are
    not linked to the logged model (its parameter count is already the model's param)."""
    if "triple" in row:
        cost = key in GRID_COSTS
        return (f"{key}/{row['triple']}" if cost else f"test/{key}/{row['triple']}"), 0, cost
    cost = key == "parameters"
    return (key if cost else f"test/{key}"), row["size"], cost


def row_key(row: dict[str, Any]) -> int | str:
    """What a row's model and results are keyed by: its size, or a trained triple's label."""
    return row.get("triple", row["size"])


def log_size_metrics(
    client, run_id: str, rows: list[dict[str, Any]], model_ids: dict, size_runs: dict[str, str] | None = None
) -> None:
    """Each row's results (a size's, or a trained triple's) in the training run
    (:func:`result_metric`), the test metrics linked to its model if any (``model_ids`` by
    :func:`row_key`). Then each row's child run (:func:`start_size_runs`, made here unless given)
    gets its results."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    metrics = []
    for row in rows:
        for key, value in row.items():
            if key in ("triple", *ROW_PARAMS):
                continue
            name, step, cost = result_metric(row, key)
            metrics.append(Metric(name, float(value), now, step, model_id=None if cost else model_ids.get(row_key(row))))
    for start in range(0, len(metrics), 500):
        client.log_batch(run_id, metrics=metrics[start : start + 500])
    finish_size_runs(client, start_size_runs(client, run_id, rows) if size_runs is None else size_runs, rows)


# -- one child run per size --------------------------------------------------------------------------

PARENT_RUN_TAG = "mlflow.parentRunId"  # MLflow's own: the runs table nests the run under its parent
SIZE_RUN_TAG = "recsys.size"  # a size's run: its label (d64, or a triple's L2_w128_d64)
#: tags of the training run its size runs carry too (the runs table's user and source columns)
SHARED_TAGS = ("mlflow.user", "mlflow.source.name", "mlflow.source.type", "mlflow.source.git.commit", "git_commit")
ROW_PARAMS = ("depth", "width", "size")  # a row's keys that say what was trained: params of its run
RUN_COLOR_TAG = "mlflow.runColor"  # the UI's colour of a run (its colour picker sets the same tag)
#: one colour per size run, in order, so that no two sizes share one in a chart (the UI's own are
#: drawn at random); again from the first after the tenth
SIZE_RUN_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
                   "#bcbd22", "#17becf")


def size_label(row: dict[str, Any]) -> str:
    """``d64`` for a size's row, ``L2_w128_d64`` for a trained triple's."""
    return row["triple"] if "triple" in row else f"d{row['size']}"


SIZE_RUN_METRICS = "sizes"  # the size runs' metrics: sizes/test_ndcg_10, sizes/parameters, ...


def child_metric_name(key: str) -> str:
    """A size run's name for a result: ``sizes/test_ndcg_10``, ``sizes/parameters``,
    ``sizes/encode_ms_per_1k``. The same names in every size run and none of the training run's,
    so that a chart of one holds the sizes only; and the UI's chart view draws the section named
    before the last ``/`` first of all (its sections are in alphabetical order: ``sizes`` comes
    before the training run's ``test``, ``train`` and ``val``; names without a ``/`` come last)."""
    return f"{SIZE_RUN_METRICS}/{key if key in GRID_COSTS else f'test_{key}'}"


def start_size_runs(client, run_id: str, rows: list[dict[str, Any]]) -> dict[str, str]:
    """One child run of the training run ``run_id`` per row (size or triple), named by its label and
    holding its size (a triple's depth and width too) as params; the ones it has already (a resumed
    run records its results again) are used again. Returns run ids by label."""
    from mlflow.entities import Param

    parent = client.get_run(run_id)
    experiment_id = parent.info.experiment_id
    existing = client.search_runs([experiment_id], filter_string=f"tags.{PARENT_RUN_TAG} = '{run_id}'")
    found = {r.data.tags[SIZE_RUN_TAG]: r.info.run_id for r in existing if SIZE_RUN_TAG in r.data.tags}
    shared = {k: v for k, v in parent.data.tags.items() if k in SHARED_TAGS}
    now = int(time.time() * 1000)
    # The runs table lists the newest first: the last row starts first, so the sizes read in order.
    for index in reversed(range(len(rows))):
        label = size_label(rows[index])
        if label not in found:
            tags = {**shared, PARENT_RUN_TAG: run_id, SIZE_RUN_TAG: label,
                    RUN_COLOR_TAG: SIZE_RUN_COLORS[index % len(SIZE_RUN_COLORS)]}
            started = now + len(rows) - 1 - index
            found[label] = client.create_run(experiment_id, start_time=started, tags=tags, run_name=label).info.run_id
    runs = {size_label(row): found[size_label(row)] for row in rows}
    for row in rows:
        client.log_batch(runs[size_label(row)], params=[Param(k, str(row[k])) for k in ROW_PARAMS if k in row])
    return runs


def finish_size_runs(client, size_runs: dict[str, str], rows: list[dict[str, Any]]) -> None:
    """Each size run's results (:func:`child_metric_name`), and the run marked finished."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    for row in rows:
        child = size_runs[size_label(row)]
        metrics = [Metric(child_metric_name(k), float(v), now, 0) for k, v in row.items() if k not in ("triple", *ROW_PARAMS)]
        client.log_batch(child, metrics=metrics)
        client.set_terminated(child)
