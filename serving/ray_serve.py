"""``python -m serving.ray_serve`` (``recsys-serve-ray``): the REST endpoint as a Ray Serve deployment.

    pip install -e .[ray]
    python -m serving.ray_serve --model exports/d64 --replicas 2 --port 8000

The application is the one of ``python -m serving.rest`` (``serving.rest.make_app``: the same
routes, limits, answers and one-line JSON errors); only what runs it differs. Each of ``--replicas``
Ray Serve replicas (actors) loads the export once and serves that application; Ray Serve's HTTP
proxy listens on ``--host``:``--port`` and hands each request to a replica (``@serve.ingress`` with
the application built in the replica, so nothing of the request handling is written twice).

Before anything starts, the options, the export (loaded once in this process, then dropped) and the
address are checked: a bad one is one ``error: ...`` line and exit status 2. Without
``--ray-address`` a local Ray instance is started (``--num-cpus`` CPUs, all by default; no
dashboard) and stopped again at the end. Ctrl-C or SIGTERM stops the deployment (Serve lets the
replicas finish the requests under way), then Ray, and exits with status 0.

Differences from ``serving.rest``, all from Ray Serve's proxy (its own uvicorn) in front of the
application: a malformed HTTP request is refused by the proxy, not as JSON; the proxy also answers
``/-/healthz`` and ``/-/routes``; ``--port 0`` (any free port) is not possible.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from recsys.errors import UserError
from serving.online import Limits
from serving.rest import (
    BODY_TIMEOUT_S,
    DEFAULT_MAX_BODY_BYTES,
    KEEP_ALIVE_S,
    ServeError,
    app_of,
    bind_socket,
    configure_logging,
    load_model,
    resolve_model,
)

__all__ = ["APP_NAME", "DEPLOYMENT_NAME", "build", "main"]

log = logging.getLogger("serving.ray_serve")  # not __name__: that is "__main__" under `python -m`

APP_NAME = "recsys"
DEPLOYMENT_NAME = "recommender"
#: Serve's own log lines (controller, proxy, replicas): warnings and errors only (a 500's traceback among
#: them), no access line per request
QUIET = {"log_level": "WARNING", "enable_access_log": False}
#: a replica whose constructor fails is tried this many times more, then the deployment fails
CONSTRUCTOR_RETRIES = 1


class _Replica:
    """One replica: the export loaded once, and serving.rest's application over it (built by Ray
    Serve, after the constructor, through ``__serve_build_asgi_app__``)."""

    def __init__(self, settings: dict[str, Any]):
        self.settings = settings
        self.model = load_model(settings)

    def __serve_build_asgi_app__(self):
        return app_of(self.model, self.settings)


def _import_serve():
    try:
        import ray
        from ray import serve
    except ImportError:
        raise ServeError("serving.ray_serve needs Ray Serve: pip install -e .[ray] (or use python -m serving.rest)") from None
    return ray, serve


def build(settings: dict[str, Any], replicas: int, replica_cpus: float, replica_gpus: float = 0.0):
    """The Ray Serve application (``serve.run`` it): ``replicas`` replicas of :class:`_Replica`, each
    reserving ``replica_cpus`` CPUs (and ``replica_gpus`` GPUs), with ``settings`` as
    ``python -m serving.rest`` makes them (``export``, ``device``, ``threads``, ``max_batch``,
    ``max_k``, ``max_body_bytes``, ``concurrency``)."""
    _, serve = _import_serve()
    actor_options: dict[str, Any] = {"num_cpus": replica_cpus}
    if replica_gpus:
        actor_options["num_gpus"] = replica_gpus
    deployment = serve.deployment(
        serve.ingress()(_Replica),
        name=DEPLOYMENT_NAME,
        num_replicas=replicas,
        ray_actor_options=actor_options,
        max_constructor_retry_count=CONSTRUCTOR_RETRIES,
        graceful_shutdown_timeout_s=BODY_TIMEOUT_S,  # requests under way when it stops, as serving.rest
        # no access line per request; errors of ours (a 500's traceback) still reach the log
        logging_config=QUIET,
    )
    return deployment.bind(settings)


def _start_ray(ray, address: str | None, num_cpus: int | None) -> None:
    """Join ``address``, or start a local instance whose workers import this same code."""
    if address is not None:
        ray.init(address=address, configure_logging=False)
        return
    root = str(Path(__file__).resolve().parents[1])
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if root not in paths:  # the replicas import serving from the tree this command runs
        os.environ["PYTHONPATH"] = os.pathsep.join([root, *paths])
    # "local": a new instance of its own, even where RAY_ADDRESS or a running instance is found
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, configure_logging=False)


def _count(text: str, option: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise ServeError(f"{option} must be a positive integer, got {text!r}")
    return int(text)


def _port_number(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise ServeError(f"--port must be a port number from 1 to 65535, got {text!r}")
    return int(text)


def _cpus(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):
        raise ServeError(f"--replica-cpus must be a positive number, got {text!r}")
    return value


def _replica_resources(ray, replicas: int, device: str, replica_cpus: float | None) -> tuple[float, float]:
    """The CPUs and GPUs each replica reserves: by default one CPU each, or an equal share of the
    cluster's CPUs when it has fewer than ``replicas``; one GPU each (or a share) on ``cuda``."""
    resources = ray.cluster_resources()
    cpus = float(resources.get("CPU", 0))
    if replica_cpus is None:
        replica_cpus = min(1.0, round(cpus / replicas, 4)) if cpus else 1.0
    if replica_cpus * replicas > cpus + 1e-9:
        raise ServeError(f"{replicas} replica(s) of {replica_cpus:g} CPU(s) need {replica_cpus * replicas:g} CPUs; "
                         f"the Ray cluster has {cpus:g}")
    gpus = 0.0
    if device.startswith("cuda"):
        total = float(resources.get("GPU", 0))
        if total == 0:
            raise ServeError("--device cuda: the Ray cluster has no GPU")
        gpus = 1.0 if total >= replicas else round(total / replicas, 4)
    return replica_cpus, gpus


def _replicas_running(serve) -> int:
    with contextlib.suppress(Exception):  # only for the log line
        states = serve.status().applications[APP_NAME].deployments[DEPLOYMENT_NAME].replica_states
        return int(states.get("RUNNING", 0))
    return -1


def _stop(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m serving.ray_serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="export directory (d<size>) or MLflow URI (models:/NAME@alias)")
    parser.add_argument("--replicas", default="1", help="Ray Serve replicas, each with its own copy of the model (default 1)")
    parser.add_argument("--port", default="8000", help="TCP port of Ray Serve's HTTP proxy (default 8000)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--max-body-bytes", default=str(DEFAULT_MAX_BODY_BYTES), help="larger bodies get 413")
    parser.add_argument("--max-batch", default=str(Limits.max_batch), help="histories per request")
    parser.add_argument("--max-k", default=str(Limits.max_k), help="largest k a request may ask")
    parser.add_argument("--concurrency", default=None,
                        help="requests each replica computes at once (default: the cores shared among the replicas)")
    parser.add_argument("--threads", default="1", help="torch and faiss threads for each request (default 1)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (a GPU, or a share of one, per replica)")
    parser.add_argument("--replica-cpus", default=None,
                        help="CPUs Ray reserves for each replica (default 1, or an equal share when there are fewer)")
    parser.add_argument("--num-cpus", default=None, help="CPUs of the local Ray instance (default: all)")
    parser.add_argument("--ray-address", default=None, help="Ray cluster to join (default: start a local instance)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    configure_logging()
    with tempfile.TemporaryDirectory(prefix="serving-ray-") as workdir:
        try:
            replicas = _count(args.replicas, "--replicas")
            port = _port_number(args.port)
            num_cpus = None if args.num_cpus is None else _count(args.num_cpus, "--num-cpus")
            replica_cpus = None if args.replica_cpus is None else _cpus(args.replica_cpus)
            cores = num_cpus or os.cpu_count() or 1
            settings = {
                "device": args.device, "threads": _count(args.threads, "--threads"),
                "max_batch": _count(args.max_batch, "--max-batch"), "max_k": _count(args.max_k, "--max-k"),
                "max_body_bytes": _count(args.max_body_bytes, "--max-body-bytes"),
                "concurrency": max(1, cores // replicas) if args.concurrency is None else _count(args.concurrency, "--concurrency"),
            }
            ray, serve = _import_serve()
            export = resolve_model(args.model, Path(workdir))
            # a bad export is one line here (naming it as given), not a replica failing on the cluster
            # (on the CPU: this process may have no GPU)
            model = load_model({**settings, "export": str(export), "device": "cpu"})
            settings["export"] = str(export.resolve())  # the replicas run in other working directories
            size, num_items = model.size, len(model.item_ids)
            del model
            if args.ray_address is None:  # a busy port is one line here, not a proxy failing to start
                bind_socket(args.host, port).close()
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        code = 0
        handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
        try:
            _start_ray(ray, args.ray_address, num_cpus)
            replica_cpus, replica_gpus = _replica_resources(ray, replicas, args.device, replica_cpus)
            serve.start(http_options={"host": args.host, "port": port, "keep_alive_timeout_s": KEEP_ALIVE_S},
                        proxy_location="HeadOnly", logging_config=QUIET)
            logging.getLogger("ray.serve").setLevel(logging.WARNING)  # as QUIET, in this process (set by serve.start)
            # SIGTERM (kill, a supervisor) stops it as Ctrl-C does (ray.init set a handler of its own)
            signal.signal(signal.SIGTERM, _stop)
            serve.run(build(settings, replicas, replica_cpus, replica_gpus), name=APP_NAME, route_prefix="/")
            log.info("serving %s (size %d, %d items) on http://%s:%d: POST /recommend, POST /invocations, GET /health, "
                     "GET /docs; Ray Serve, %d of %d replica(s) running, %d request(s) at once in each",
                     args.model, size, num_items, args.host, port, _replicas_running(serve), replicas,
                     settings["concurrency"])
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr)
            code = 2
        finally:
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # let the stopping finish
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            _shutdown(ray, serve, joined=args.ray_address is not None)
            signal.signal(signal.SIGINT, handlers[0])
            signal.signal(signal.SIGTERM, handlers[1])
        log.info("stopped")
    return code


def _shutdown(ray, serve, joined: bool) -> None:
    """Delete the application (its replicas answer the requests under way first), then stop the
    local Ray instance (Serve's controller and proxy with it); a joined cluster keeps running."""
    if not ray.is_initialized():
        return
    try:
        serve.delete(APP_NAME)  # waits for the replicas to finish their requests; ray.shutdown ends the rest
    except Exception as exc:  # Ray itself may be going already (Ctrl-C reaches its processes too)
        log.warning("stopping Ray Serve: %s", str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    finally:
        if not joined:
            ray.shutdown()


if __name__ == "__main__":
    # run the module under its own name, so that Ray pickles _Replica by reference (serving.ray_serve),
    # not as a class of __main__
    from serving.ray_serve import main as _main

    sys.exit(_main())
