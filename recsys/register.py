"""``python -m recsys.register``: register one size of a training run in the MLflow Model Registry and point an alias at it.

    python -m recsys.register --run-id RUN_ID --size 64 --name shop --alias champion
    make serve MODEL=models:/shop@champion

The size's logged model (``recsys.train`` logs one per size) becomes a version of the registered
model NAME (created when new; the version it already is when registered before), and ALIAS points at
that version (moved there from any other). It prints the URI ``models:/NAME@ALIAS``, which
``make serve MODEL=...``, ``python -m serving.rest --model``, ``python -m recsys.export --model-uri``
and ``mlflow.pyfunc.load_model`` take.

RUN_ID is the training run (the training prints it at its end) or one size's run under it (a row
of the runs table); the size is ``64`` or ``d64``, or for a run trained on a grid a triple such as
``L2_w128_d64``. The store is ``--tracking-uri``, else ``$MLFLOW_TRACKING_URI``, else
``sqlite:///mlflow.db`` (the training's default). A bad input is one ``error:`` line and exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from pathlib import Path

from recsys.errors import UserError, exit_code_of

__all__ = ["RegisterError", "main", "register_size"]

log = logging.getLogger("recsys.register")  # by name: also when run as __main__

#: a registered model's name here: it must read back out of ``models:/NAME@ALIAS`` and the shell
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,254}")
ALIAS = re.compile(r"[A-Za-z0-9_-]{1,255}")  # MLflow's own rule (word characters and dashes), in ASCII
SIZE = re.compile(r"d?([0-9]+)")
TRIPLE = re.compile(r"L[0-9]+_w[0-9]+_d[0-9]+")


class RegisterError(UserError, ValueError):
    """A run, size, name or alias that cannot be registered: the message says which and why."""


def parser() -> argparse.ArgumentParser:
    doc = (__doc__ or "").replace("``", "`")
    p = argparse.ArgumentParser(prog="python -m recsys.register", description=doc.split("\n\n")[0],
                                epilog="\n\n".join(doc.split("\n\n")[1:]), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-id", required=True, help="the training run (or one size's run under it)")
    p.add_argument("--size", required=True, help="the size to register: 64 or d64 (a grid's triple: L2_w128_d64)")
    p.add_argument("--name", required=True, help="the registered model's name, e.g. shop")
    p.add_argument("--alias", default="champion", help="the alias pointed at that version (default: champion)")
    p.add_argument("--tracking-uri", default=None,
                   help="the MLflow store (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    return p


def check_name(name: str) -> None:
    if not NAME.fullmatch(name):
        raise RegisterError(f"--name {name!r}: a model name here holds letters, digits, '.', '_' and '-' only, starts "
                            "with a letter or digit and is at most 255 characters (it becomes models:/NAME@ALIAS)")


def check_alias(alias: str) -> None:
    if not ALIAS.fullmatch(alias) or alias.lower() == "latest" or re.fullmatch(r"[vV]\d+", alias):
        raise RegisterError(f"--alias {alias!r}: an alias holds letters, digits, '_' and '-' only, at most 255, and is "
                            "neither 'latest' nor a version such as v2 (MLflow keeps those)")


def label_of_size_option(size: str) -> str:
    """``64`` and ``d64`` -> ``d64``; a triple ``L2_w128_d64`` as it is."""
    if TRIPLE.fullmatch(size):
        return size
    match = SIZE.fullmatch(size.strip())
    if match is None:
        raise RegisterError(f"--size {size!r}: give a size such as 64 or d64 (or a grid's triple such as L2_w128_d64)")
    return f"d{int(match.group(1))}"


def check_store(uri: str) -> None:
    """A local sqlite store must exist (MLflow would create an empty one); a server must answer."""
    from recsys.tracking import TrackingUnavailableError, check_reachable

    if uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///"):])
        if not path.is_file():
            raise RegisterError(f"the MLflow store {uri}: {path}: no such file; give the store the training recorded "
                                "to with --tracking-uri or MLFLOW_TRACKING_URI")
        return
    try:
        check_reachable(uri)
    except TrackingUnavailableError:
        raise RegisterError(f"the MLflow tracking server {uri} does not answer; start it, or fix --tracking-uri or "
                            "MLFLOW_TRACKING_URI") from None


def _training_run(client, run_id: str, uri: str):
    """The training run of ``run_id``: itself, or the parent of one size's run."""
    from mlflow.exceptions import MlflowException

    from recsys.tracking import PARENT_RUN_TAG, SIZE_RUN_TAG

    try:
        run = client.get_run(run_id)
        if SIZE_RUN_TAG in run.data.tags and PARENT_RUN_TAG in run.data.tags:
            run = client.get_run(run.data.tags[PARENT_RUN_TAG])
    except MlflowException as exc:
        if exc.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):  # no such run, not a run id
            raise
        raise RegisterError(f"--run-id {run_id}: no such run in {uri}") from None
    if run.info.lifecycle_stage == "deleted":
        raise RegisterError(f"--run-id {run_id}: the run '{run.info.run_name}' is deleted")
    return run


def _models_by_label(client, run) -> dict[str, object]:
    """The training run's logged models by size label (d64, L2_w128_d64): the newest of each, READY."""
    from mlflow.entities import LoggedModelStatus

    ids = {o.model_id for o in (run.outputs.model_outputs if run.outputs else [])}
    models = {}
    for model in (client.get_logged_model(i) for i in ids):
        if model.status != LoggedModelStatus.READY:
            continue
        if model.name not in models or model.creation_timestamp > models[model.name].creation_timestamp:
            models[model.name] = model
    return models


def _size_runs(client, run) -> list[str]:
    from recsys.tracking import PARENT_RUN_TAG, SIZE_RUN_TAG

    children = client.search_runs([run.info.experiment_id], f"tags.{PARENT_RUN_TAG} = '{run.info.run_id}'")
    return [c.data.tags[SIZE_RUN_TAG] for c in children if SIZE_RUN_TAG in c.data.tags]


def _export_options(label: str) -> str:
    """``recsys.export``'s options for the size ``label`` (d64, or a triple L2_w128_d64)."""
    if TRIPLE.fullmatch(label):
        depth, width, size = _label_order(label)
        return f"--depth {depth} --width {width} --dims {size}"
    return f"--dims {label[1:]}"


def _label_order(label: str) -> tuple:
    return tuple(int(n) for n in re.findall(r"[0-9]+", label))


def register_size(run_id: str, size: str, name: str, alias: str, tracking_uri: str | None = None) -> str:
    """Register ``size`` of the training run ``run_id`` as a version of ``name`` and point ``alias``
    at it; returns ``models:/NAME@ALIAS``."""
    check_name(name)
    check_alias(alias)
    label = label_of_size_option(size)
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    check_store(uri)
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # its store migrations and notices
    import mlflow

    previous = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    # the registry looks the logged model up in the global store, whatever the client's
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    from sqlalchemy.exc import SQLAlchemyError

    try:
        return _register(mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri), run_id, size, label, name, alias, uri)
    except SQLAlchemyError as exc:  # not a database, read-only, a full disk: the database's own words
        reason = str(getattr(exc, "orig", None) or exc).splitlines()[0]
        raise RegisterError(f"the MLflow store {uri} cannot be used ({reason}); give the store the training recorded "
                            "to with --tracking-uri or MLFLOW_TRACKING_URI") from None
    finally:
        mlflow.set_tracking_uri(previous[0])
        mlflow.set_registry_uri(previous[1])


def _register(client, run_id: str, size: str, label: str, name: str, alias: str, uri: str) -> str:
    from mlflow.exceptions import MlflowException

    run = _training_run(client, run_id, uri)
    models = _models_by_label(client, run)
    if label not in models:
        known = sorted(set(models) | set(_size_runs(client, run)), key=_label_order)
        if label in known:
            raise RegisterError(f"--run-id {run_id}: size {label} of run '{run.info.run_name}' has no logged model "
                                f"(it was trained with --mlflow.log_models false); export it instead: "
                                f"python -m recsys.export --run-id {run.info.run_id} {_export_options(label)} --out exports/")
        has = f"its sizes: {', '.join(known)}" if known else "it has no sizes (not a run of recsys.train?)"
        raise RegisterError(f"--size {size}: run '{run.info.run_name}' ({run.info.run_id}) has no size {label}; {has}")
    model = models[label]
    try:
        version = _version_of(client, name, model, f"{label} of the training run '{run.info.run_name}' ({run.info.run_id})")
        client.set_registered_model_alias(name, alias, version.version)
    except MlflowException as exc:  # the registry's own refusal (a name it takes otherwise, a full store, ...)
        raise RegisterError(f"--name {name}: the registry refused it ({str(exc.message).splitlines()[0]})") from None
    log.info("%s of run '%s' is version %s of %s, and @%s points at it; serve it with make serve MODEL=models:/%s@%s",
             label, run.info.run_name, version.version, name, alias, name, alias)
    return f"models:/{name}@{alias}"


def _version_of(client, name: str, model, description: str):
    """The version of ``name`` that holds ``model``: the one registered before, or a new one."""
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name)
    except MlflowException as exc:
        if exc.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise
        for version in client.search_model_versions(f"name = '{name}'"):
            if version.source == model.model_uri:  # the registry keeps the URI it was given
                return version
    return client.create_model_version(name, source=model.model_uri, run_id=model.source_run_id,
                                       model_id=model.model_id, description=description)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", force=True)
    log.setLevel(logging.INFO)

    def run() -> None:
        print(register_size(args.run_id, args.size, args.name, args.alias, args.tracking_uri))

    return exit_code_of(run)


if __name__ == "__main__":
    sys.exit(main())
