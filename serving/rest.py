"""``python -m serving.rest`` (``make serve``): the REST endpoint of one exported size.

    python -m serving.rest --model exports/d64 --port 8000
    python -m serving.rest --model models:/NAME-d64@champion --port 8000

``--model`` is an export directory (``python -m recsys.export``) or an MLflow model URI of a
size logged by ``recsys.train`` (``models:/NAME@alias``, ``models:/NAME/VERSION``), which is then
downloaded once into a temporary directory; MLflow is imported in that case only. The endpoint is
an ASGI application (FastAPI) run by uvicorn, on 127.0.0.1 unless ``--host`` says otherwise:

- ``GET /health``: ``{"status": "ok", "size": ..., "num_items": ..., "encoder": ...}``;
- ``POST /recommend``: a JSON request as ``serving/online.py`` describes (histories, ``k``,
  ``exclude_seen``, ``strict``), answered with the top items per history, the unknown ids and
  whether the popular fallback was used;
- ``POST /invocations``: the same, in the request formats of ``mlflow models serve``
  (``dataframe_split``, ``dataframe_records``, ``inputs``; ``k``, ``exclude_seen`` and ``strict``
  in ``params``), answered as it answers: ``{"predictions": [...]}``;
- ``GET /docs`` and ``GET /openapi.json``: the requests and responses, described.

``serving/online.py`` decides what a request means; this module reads bodies within their limits,
decodes strict JSON and turns errors into statuses. Errors are JSON ``{"error": "one line"}``: 400
for a bad request (malformed HTTP or JSON, a bad field, unknown ids under ``strict``), 404 and 405
for a wrong path or method, 408 for a body that stops arriving, 411 for a body with neither a length
nor chunks, 413 for a body over ``--max-body-bytes`` or more than ``--max-batch`` histories, 500
``"internal error"`` for a defect of ours, whose traceback goes to the server's log only: no client
ever sees a trace or a server path. The model computes in a pool of ``--concurrency`` threads, so the
event loop keeps reading and answering other connections meanwhile; ``--workers`` runs several such
processes on the one port. docs/serving.md has the details, real requests and responses, and when to
use ``mlflow models serve`` instead.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import socket
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import h11
import uvicorn
from fastapi import FastAPI, Request, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.supervisors import Multiprocess

from recsys.errors import UserError
from recsys.json_depth import nests_deeper_than
from serving.online import FIELDS, Limits, RequestError, answer, parse_request

__all__ = ["ServeError", "Server", "make_app", "make_server", "resolve_model", "main"]

log = logging.getLogger("serving.rest")  # not __name__: that is "__main__" under `python -m`

DEFAULT_MAX_BODY_BYTES = 1 << 20
#: requests one process computes at once: one per core, each on one thread (``--threads``)
DEFAULT_CONCURRENCY = os.cpu_count() or 1
#: seconds a body may stop arriving before the request is answered 408
BODY_TIMEOUT_S = 30
#: seconds an idle kept-alive connection stays open
KEEP_ALIVE_S = 5
#: the deepest nesting of lists and objects a body may have (a request needs 3, /invocations 5)
MAX_DEPTH = 32
INTERNAL_ERROR = "internal error (logged by the server)"
ROUTES = {"/recommend": "POST", "/health": "GET", "/invocations": "POST", "/docs": "GET", "/openapi.json": "GET"}
#: the request formats of ``mlflow models serve`` that /invocations takes, and its parameters
MLFLOW_FORMATS = ("dataframe_split", "dataframe_records", "inputs")
MLFLOW_PARAMS = tuple(name for name in FIELDS if name != "histories")
#: where ``--workers`` processes find their settings (they are started afresh, not forked)
SETTINGS_VARIABLE = "SERVING_REST_SETTINGS"


class ServeError(UserError):
    """A server that cannot start: a bad ``--model``, option or address."""


# --- what the OpenAPI page (/docs, /openapi.json) shows; requests are checked by serving/online.py


class RecommendRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    histories: list[list[int | str]] = Field(
        description="one list of item ids per user, oldest first; ids are integers or text, as the catalogue "
        "holds them (any other JSON value names no item and comes back in `unknown`)",
        examples=[[[281, 390, 196], ["12", "sku-9"]]],
    )
    k: int = Field(10, ge=1, description="items per history (default 10, or the catalogue size if smaller)")
    exclude_seen: bool = Field(True, description="leave out the items of the user's history")
    strict: bool = Field(False, description="refuse the request (400) when any id names no item")


class Recommendation(BaseModel):
    item_ids: list[int | str] = Field(description="the top k items, best first (fewer when fewer are left)")
    scores: list[float] = Field(description="their scores (training counts when `fallback`)")
    unknown: list[Any] = Field(description="the ids of the history that name no item, as sent")
    fallback: bool = Field(description="no id named an item: the items are the most popular ones")


class RecommendResponse(BaseModel):
    size: int
    k: int
    exclude_seen: bool
    results: list[Recommendation] = Field(description="one per history, in order")


class InvocationsRequest(BaseModel):
    """Exactly one of ``dataframe_split``, ``dataframe_records`` and ``inputs``."""

    model_config = ConfigDict(extra="forbid")
    dataframe_split: dict[str, list] | None = Field(
        None, description='`{"columns": ["history"], "data": [[history], ...]}` (other columns are ignored)',
        examples=[{"columns": ["history"], "data": [[[281, 390, 196]], [["12", "sku-9"]]]}],
    )
    dataframe_records: list[dict[str, Any]] | None = Field(None, description='`[{"history": [...]}, ...]`')
    inputs: dict[str, Any] | list[dict[str, Any]] | None = Field(
        None, description='`[{"history": [...]}, ...]`, or one history as `{"history": [...]}`'
    )
    params: dict[str, int | bool] | None = Field(None, description="`k`, `exclude_seen`, `strict`, as for /recommend")


class InvocationsResponse(BaseModel):
    predictions: list[Recommendation] = Field(description="one per history, in order")


class Health(BaseModel):
    status: str
    size: int
    num_items: int
    encoder: str


class ErrorBody(BaseModel):
    error: str = Field(description="what is wrong, in one line")
    unknown: list[list[Any]] | None = Field(None, description="under `strict`: the unknown ids of each history")


ERRORS = {
    400: {"model": ErrorBody, "description": "a bad request: malformed JSON, a bad field, unknown ids under strict"},
    408: {"model": ErrorBody, "description": "the body stopped arriving"},
    411: {"model": ErrorBody, "description": "a body with neither Content-Length nor chunks"},
    413: {"model": ErrorBody, "description": "a body over the byte limit, or more histories than the batch limit"},
    500: {"model": ErrorBody, "description": "a defect of the server (logged there)"},
}


def _body(model: type[BaseModel]) -> dict:
    """The OpenAPI request body of a route that reads its body itself (to bound it)."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": model.model_json_schema()}}}}


# --- strict JSON in and out


def _constant(name: str) -> None:
    raise RequestError(f"the body is not valid JSON ({name} is not a JSON number)")


def _finite(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise RequestError(f"the body has a number out of range: {text[:20]}")
    return value


def _decode(raw: bytes) -> Any:
    """A body as strict JSON (no NaN or Infinity) nested at most ``MAX_DEPTH`` deep; RequestError otherwise."""
    too_deep = RequestError(f"the body nests lists and objects more than {MAX_DEPTH} deep")
    try:
        value = json.loads(raw, parse_constant=_constant, parse_float=_finite)
    except RecursionError:
        raise too_deep from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RequestError(f"the body is not valid JSON ({exc})") from None
    except ValueError:  # an integer too long to convert
        raise RequestError(f"the body has an integer of more than {sys.get_int_max_str_digits()} digits") from None
    # fewer opening brackets than the limit cannot nest deeper: most requests skip the walk
    if isinstance(value, (list, dict)) and raw.count(b"[") + raw.count(b"{") > MAX_DEPTH and nests_deeper_than(value, MAX_DEPTH):
        raise too_deep
    return value


def _encode(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, allow_nan=False).encode()  # a NaN score is a defect (500), never unquoted NaN


def _json(status: int, body: bytes, close: bool = False, headers: dict[str, str] | None = None) -> Response:
    headers = {**(headers or {}), **({"Connection": "close"} if close else {})}
    return Response(body, status_code=status, media_type="application/json", headers=headers)


def _error(status: int, message: str, close: bool = False, headers: dict[str, str] | None = None) -> Response:
    return _json(status, _encode({"error": message}), close, headers)


# --- /invocations: MLflow's request formats to the request of /recommend


def _column(rows: Any, where: str) -> list:
    """The ``history`` of each record of ``rows`` (a list of JSON objects)."""
    if not isinstance(rows, list):
        raise RequestError(f'{where} must be a list of records like {{"history": [...]}}')
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or "history" not in row:
            raise RequestError(f'{where}[{i}] must be a record with a "history"')
    return [row["history"] for row in rows]


def _mlflow_histories(kind: str, data: Any) -> list:
    if kind == "dataframe_records":
        return _column(data, kind)
    if kind == "inputs":  # one record, as MLflow reads an object here, or a list of them
        return _column([data] if isinstance(data, dict) else data, kind)
    if not isinstance(data, dict) or "data" not in data or set(data) - {"columns", "data", "index"}:
        raise RequestError('dataframe_split must be {"columns": [...], "data": [[...], ...]} (and optionally "index")')
    columns, rows = data.get("columns"), data["data"]
    if not isinstance(columns, list) or "history" not in columns:
        raise RequestError('dataframe_split needs "columns" with "history"')
    at = columns.index("history")
    if not isinstance(rows, list) or not all(isinstance(row, list) and len(row) == len(columns) for row in rows):
        raise RequestError(f"dataframe_split data must be a list of rows of {len(columns)} value(s), one per column")
    return [row[at] for row in rows]


def mlflow_request(body: Any) -> dict[str, Any]:
    """The /recommend request that an /invocations body (``mlflow models serve``'s formats) asks."""
    if not isinstance(body, dict):
        raise RequestError(f"the request must be a JSON object with one of {', '.join(MLFLOW_FORMATS)}")
    kinds = [name for name in body if name in MLFLOW_FORMATS]
    extra = [name for name in body if name not in (*MLFLOW_FORMATS, "params")]
    if len(kinds) != 1 or extra:
        raise RequestError(f"the request must have exactly one of {', '.join(MLFLOW_FORMATS)} (and optionally params)")
    params = {} if body.get("params") is None else body["params"]
    if not isinstance(params, dict):
        raise RequestError("params must be a JSON object")
    unknown = [name for name in params if name not in MLFLOW_PARAMS]
    if unknown:
        known = ", ".join(MLFLOW_PARAMS)
        raise RequestError(f"unknown parameter {json.dumps(unknown[0])[:60]}; the parameters are {known}")
    return {"histories": _mlflow_histories(kinds[0], body[kinds[0]]), **params}


# --- the application


class _RefuseAmbiguousLength:
    """A request with both Content-Length and Transfer-Encoding is refused and its connection closed:
    the two framings may disagree between a proxy and this server (request smuggling). h11 refuses
    differing lengths and other codings itself, but would read such a request by its chunks."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            names = [name for name, _ in scope["headers"]]
            if b"content-length" in names and b"transfer-encoding" in names:
                response = _error(400, "a request may not have both Content-Length and Transfer-Encoding", close=True)
                return await response(scope, receive, send)
        await self.app(scope, receive, send)


class _ClientLeft(Exception):
    """The client closed its connection before its request was read."""


async def _read_body(request: Request, max_bytes: int) -> bytes:
    """The whole body, refused with 413 when its Content-Length says it is too large (before reading)
    or once a chunked body passes the limit, and with 408 when it stops arriving."""
    length = request.headers.get("content-length")  # h11 has checked that it is a number
    if length is None and "transfer-encoding" not in request.headers:
        raise RequestError("a Content-Length header (or a chunked body) is required", status=411)
    if length is not None and int(length) > max_bytes:
        raise RequestError(f"the body is {int(length)} bytes; the limit is {max_bytes}", status=413)
    body = bytearray()
    while True:
        try:
            message = await asyncio.wait_for(request.receive(), BODY_TIMEOUT_S)
        except TimeoutError:
            raise RequestError(f"the body did not arrive within {BODY_TIMEOUT_S} s", status=408) from None
        if message["type"] == "http.disconnect":
            raise _ClientLeft
        body += message.get("body", b"")
        if len(body) > max_bytes:
            raise RequestError(f"the body is more than {max_bytes} bytes, the limit", status=413)
        if not message.get("more_body", False):
            return bytes(body)


def make_app(
    model, limits: Limits = Limits(), max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, concurrency: int = DEFAULT_CONCURRENCY
) -> FastAPI:
    """The ASGI application serving ``model`` (a loaded :class:`serving.SizedRecommender`); at most
    ``concurrency`` requests are computed at once, in threads; the others wait their turn."""
    num_items = len(model.item_ids)
    pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="recommend")
    app = FastAPI(
        title="Sequential recommendation",
        description=f"One exported size: {model.size} dimensions, {num_items} items. At most {limits.max_batch} "
        f"histories per request, k at most {min(limits.max_k, num_items)}, bodies of at most {max_body_bytes} bytes.",
        docs_url="/docs", redoc_url=None, swagger_ui_oauth2_redirect_url=None, openapi_url="/openapi.json",
        redirect_slashes=False,
    )
    app.add_middleware(_RefuseAmbiguousLength)

    def recommend(body: Any) -> dict[str, Any]:
        return answer(model, parse_request(body, num_items, limits))

    def invocations(body: Any) -> dict[str, Any]:
        return {"predictions": recommend(mlflow_request(body))["results"]}

    def compute(route, raw: bytes) -> tuple[int, bytes]:
        """The status and body of the answer (in a thread of the pool: JSON and torch work here)."""
        try:
            return 200, _encode(route(_decode(raw)))
        except RequestError as exc:
            return exc.status, _encode({"error": str(exc), **exc.details})
        except Exception:
            log.exception("internal error answering a request")
            return 500, _encode({"error": INTERNAL_ERROR})

    async def respond(request: Request, route) -> Response:
        try:
            raw = await _read_body(request, max_body_bytes)
            status, body = await asyncio.get_running_loop().run_in_executor(pool, compute, route, raw)
            return _json(status, body)
        except RequestError as exc:
            # a body cut short (408) or sent unframed (411): what follows on the connection is no
            # request, so it is closed; after a 413, uvicorn reads the rest of the body and drops it
            return _error(exc.status, str(exc), close=exc.status in (408, 411))
        except _ClientLeft:  # nobody reads the answer
            return Response(status_code=400)
        except Exception:
            log.exception("internal error reading a request")
            return _error(500, INTERNAL_ERROR, close=True)

    @app.get("/health", response_model=Health)
    @app.head("/health", include_in_schema=False)
    async def health() -> Response:
        state = {"status": "ok", "size": model.size, "num_items": num_items, "encoder": model.manifest["encoder"]}
        return _json(200, _encode(state))

    @app.post("/recommend", response_model=RecommendResponse, responses=ERRORS, openapi_extra=_body(RecommendRequest))
    async def recommend_route(request: Request) -> Response:
        """The top k items of each history (serving/online.py)."""
        return await respond(request, recommend)

    @app.post("/invocations", response_model=InvocationsResponse, responses=ERRORS, openapi_extra=_body(InvocationsRequest))
    async def invocations_route(request: Request) -> Response:
        """The same as /recommend, in the request and response formats of `mlflow models serve`."""
        return await respond(request, invocations)

    @app.exception_handler(HTTPException)
    async def wrong_path_or_method(request: Request, exc: HTTPException) -> Response:
        path, headers = request.url.path, exc.headers or {}
        if exc.status_code == 404:
            known = ", ".join(f"{m} {p}" for p, m in ROUTES.items())
            return _error(404, f"no such path; the paths are {known}")
        if exc.status_code == 405:
            allowed = ROUTES.get(path) or headers.get("Allow")
            return _error(405, f"{path} takes {allowed}, not {request.method}", headers=headers)
        return _error(exc.status_code, str(exc.detail).splitlines()[0], headers=headers)

    @app.exception_handler(Exception)
    async def defect(request: Request, exc: Exception) -> Response:  # uvicorn logs the traceback
        return _error(500, INTERNAL_ERROR, close=True)

    return app


class JsonH11Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol (h11), with its refusal of a malformed request (a bad request line
    or header, differing Content-Lengths, a coding other than chunked) in JSON like every other error."""

    def send_400_response(self, msg: str) -> None:
        body = _encode({"error": "malformed HTTP request"})
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                   (b"connection", b"close")]
        for event in (h11.Response(status_code=400, headers=headers, reason=b"Bad Request"), h11.Data(data=body),
                      h11.EndOfMessage()):
            self.transport.write(self.conn.send(event))
        self.transport.close()


def _config(app, workers: int = 1) -> uvicorn.Config:
    """uvicorn's settings: ``app`` is the application, or for ``workers`` > 1 its factory's import path."""
    return uvicorn.Config(
        app, factory=isinstance(app, str), workers=workers, http=JsonH11Protocol, ws="none", lifespan="off",
        log_config=None, access_log=False, proxy_headers=False, timeout_keep_alive=KEEP_ALIVE_S,
        timeout_graceful_shutdown=BODY_TIMEOUT_S,
    )


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening socket (bound here, so that a busy port is one clear line before anything starts)."""
    # IPPROTO_TCP named: asyncio turns Nagle's algorithm off only on sockets that say so, and an
    # answer's headers and body are separate writes (the body would wait for a delayed ACK, ~40 ms)
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(socket.SOMAXCONN)
    except OSError as exc:
        sock.close()
        raise ServeError(f"cannot listen on {host}:{port} ({exc.strerror or exc})") from None
    sock.set_inheritable(True)  # for --workers processes
    return sock


class Server:
    """``app`` served by uvicorn on a listening socket: :meth:`run` returns after :meth:`stop` (from
    another thread) or, in the main thread, SIGINT or SIGTERM."""

    def __init__(self, app, sock: socket.socket):
        self.socket = sock
        self.host, self.port = sock.getsockname()[:2]
        self.uvicorn = uvicorn.Server(_config(app))

    def run(self) -> None:
        self.uvicorn.run(sockets=[self.socket])  # closes the socket when it stops

    def stop(self) -> None:
        self.uvicorn.should_exit = True


def make_server(
    model,
    host: str = "127.0.0.1",
    port: int = 0,
    limits: Limits = Limits(),
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    concurrency: int = DEFAULT_CONCURRENCY,
) -> Server:
    """A server for ``model`` (a loaded :class:`serving.SizedRecommender`), listening and ready to
    :meth:`Server.run`; ``port=0`` picks a free port (``server.port``)."""
    return Server(make_app(model, limits, max_body_bytes, concurrency), bind_socket(host, port))


def resolve_model(model: str, workdir: Path) -> Path:
    """The export directory ``model`` names: itself, or for an MLflow URI (``scheme:/...``) the
    export inside the logged model, downloaded under ``workdir``."""
    if ":/" not in model:
        return Path(model)
    try:
        import mlflow  # noqa: F401 (only for a URI: serving itself runs without MLflow)
    except ImportError:
        raise ServeError(f"--model {model}: an MLflow URI needs MLflow, which is not installed; give an export directory") from None
    from recsys.export_dir import fetch_export

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per file otherwise
    (export_dir,) = fetch_export(model, None, workdir)
    return export_dir


def load_model(settings: dict[str, Any]):
    """The model of ``settings`` (from the command line), with its threads per request set."""
    import serving
    import torch

    model = serving.load(settings["export"], device=settings["device"])
    # threads of one request's computation: several threads per small request lose more to waiting
    # for each other than they gain, and much more on a loaded machine (docs/serving.md)
    torch.set_num_threads(settings["threads"])
    if "faiss" in sys.modules:  # imported by exports that search with a faiss index
        sys.modules["faiss"].omp_set_num_threads(settings["threads"])
    return model


def app_of(model, settings: dict[str, Any]) -> FastAPI:
    """The application over a loaded model with the limits of ``settings`` (also Ray Serve's replicas')."""
    limits = Limits(settings["max_batch"], settings["max_k"])
    return make_app(model, limits, settings["max_body_bytes"], settings["concurrency"])


def configure_logging() -> None:
    """Our log lines at INFO with a time stamp, faiss's loader quiet (the servers' console)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    logging.getLogger("faiss").setLevel(logging.WARNING)  # its loader reports every CPU variant it tries


def app_from_environment() -> FastAPI:
    """The application of one ``--workers`` process (uvicorn starts each afresh and calls this)."""
    configure_logging()
    settings = json.loads(os.environ[SETTINGS_VARIABLE])
    return app_of(load_model(settings), settings)


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return int(text)


def _port(text: str) -> int:
    if not text.isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"must be a port number from 0 to 65535, got {text!r}")
    return int(text)


def _stop(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    cores = DEFAULT_CONCURRENCY
    parser = argparse.ArgumentParser(prog="python -m serving.rest", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="export directory (d<size>) or MLflow URI (models:/NAME@alias)")
    parser.add_argument("--port", type=_port, default=8000, help="TCP port (0: any free port; default 8000)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--max-body-bytes", type=_positive, default=DEFAULT_MAX_BODY_BYTES, help="larger bodies get 413")
    parser.add_argument("--max-batch", type=_positive, default=Limits.max_batch, help="histories per request")
    parser.add_argument("--max-k", type=_positive, default=Limits.max_k, help="largest k a request may ask")
    parser.add_argument("--workers", type=_positive, default=1, help="server processes on the one port (default 1)")
    parser.add_argument("--concurrency", type=_positive, default=None,
                        help=f"requests each process computes at once (default: the {cores} cores shared among the workers)")
    parser.add_argument("--threads", type=_positive, default=1,
                        help="torch and faiss threads for each request (default 1: one request's work is small)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args(argv)
    configure_logging()
    with tempfile.TemporaryDirectory(prefix="serving-rest-") as workdir:
        try:
            settings = {
                "export": str(resolve_model(args.model, Path(workdir))), "device": args.device, "threads": args.threads,
                "max_batch": args.max_batch, "max_k": args.max_k, "max_body_bytes": args.max_body_bytes,
                "concurrency": args.concurrency or max(1, cores // args.workers),
            }
            model = load_model(settings)
            sock = bind_socket(args.host, args.port)
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        host, port = sock.getsockname()[:2]
        log.info("serving %s (size %d, %d items) on http://%s:%d: POST /recommend, POST /invocations, GET /health, "
                 "GET /docs; %d process(es), %d request(s) at once in each",
                 args.model, model.size, len(model.item_ids), host, port, args.workers, settings["concurrency"])
        # SIGTERM (kill, a supervisor) stops it as Ctrl-C does; a background job ignores SIGINT
        signal.signal(signal.SIGTERM, _stop)
        try:
            if args.workers == 1:
                Server(app_of(model, settings), sock).run()
            else:
                del model  # each process loads its own
                os.environ[SETTINGS_VARIABLE] = json.dumps(settings)
                Multiprocess(_config("serving.rest:app_from_environment", args.workers), sockets=[sock]).run()
        except KeyboardInterrupt:
            pass
        finally:
            sock.close()
        log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
