"""``python -m serving.rest`` (``make serve``): the REST endpoint of one exported size.

    python -m serving.rest --model exports/d64 --port 8000
    python -m serving.rest --model models:/NAME-d64@champion --port 8000

``--model`` is an export directory (``python -m serving.export``) or an MLflow model URI of a
size logged by ``recsys.train`` (``models:/NAME@alias``, ``models:/NAME/VERSION``), which is then
downloaded once into a temporary directory; MLflow is imported in that case only. The server listens on 127.0.0.1 (``--host`` to change it) and answers

- ``GET /health``: ``{"status": "ok", "size": ..., "num_items": ..., "encoder": ...}``;
- ``POST /recommend``: a JSON request as ``serving/online.py`` describes (histories, ``k``,
  ``exclude_seen``, ``strict``), answered with the top items per history, the unknown ids and
  whether the popular fallback was used.

Errors are JSON ``{"error": "one line"}``: 400 for a bad request (malformed JSON, a bad field,
unknown ids under ``strict``), 404 and 405 for a wrong path or method, 408 for a body that stops
arriving, 411 without a ``Content-Length``, 413 for a body over ``--max-body-bytes`` or more than
``--max-batch`` histories, 500 ``"internal error"`` for a defect of ours, whose traceback goes to
the server's log only: no client ever sees a trace or a server path. Each connection has a thread; at most
``--workers`` requests (default: one per core) are computed at once, each on ``--threads``
threads (default 1). docs/serving.md has the details, real requests and responses, and when to use
``mlflow models serve`` instead.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import sys
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from recsys.errors import UserError
from serving.online import Limits, RequestError, answer, parse_request

__all__ = ["ServeError", "make_server", "resolve_model", "main"]

log = logging.getLogger("serving.rest")  # not __name__: that is "__main__" under `python -m`

DEFAULT_MAX_BODY_BYTES = 1 << 20
#: requests answered at once: one per core, each computing on one thread (``--threads``)
DEFAULT_WORKERS = os.cpu_count() or 1
#: seconds a connection may stay silent mid-request before it is dropped
SOCKET_TIMEOUT_S = 30
#: bytes of a refused (too large) body read and dropped before the connection is closed
DISCARD_LIMIT = 64 << 20
ROUTES = {"/recommend": "POST", "/health": "GET"}


class ServeError(UserError):
    """A server that cannot start: a bad ``--model``, option or address."""


def resolve_model(model: str, workdir: Path) -> Path:
    """The export directory ``model`` names: itself, or for an MLflow URI (``scheme:/...``) the
    export inside the logged model, downloaded under ``workdir``."""
    if ":/" not in model:
        return Path(model)
    try:
        import mlflow  # noqa: F401 (only for a URI: serving itself runs without MLflow)
    except ImportError:
        raise ServeError(f"--model {model}: an MLflow URI needs MLflow, which is not installed; give an export directory") from None
    from serving.export import _export_of_model_uri

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per file otherwise
    (export_dir,) = _export_of_model_uri(model, None, workdir)
    return export_dir


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: clients reuse their connection
    timeout = SOCKET_TIMEOUT_S
    # headers and body leave in two writes: with Nagle's algorithm the body would wait for the
    # client's delayed acknowledgement of the headers (about 40 ms on Linux) on every answer
    disable_nagle_algorithm = True
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    def _send(self, status: int, payload: dict[str, Any]) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Protocol errors of the base class (a malformed request line, ...) as JSON too."""
        self.close_connection = True
        self._send(code, {"error": message or self.responses.get(code, ("error",))[0]})

    def _route(self, method: str) -> bool:
        """True when the path is served by ``method``; otherwise answers 404 or 405 and returns False."""
        path = urlsplit(self.path).path
        if ROUTES.get(path) == method:
            return True
        known = ", ".join(f"{m} {p}" for p, m in ROUTES.items())
        self.close_connection = True  # a body sent along is not read: the connection cannot be reused
        if path in ROUTES:
            self._send(405, {"error": f"{path} takes {ROUTES[path]}, not {method}"})
        else:
            self._send(404, {"error": f"no such path; the paths are {known}"})
        return False

    def do_GET(self) -> None:
        if self._route("GET"):
            m = self.server.model
            self._send(200, {"status": "ok", "size": m.size, "num_items": len(m.item_ids), "encoder": m.manifest["encoder"]})

    def do_POST(self) -> None:
        if not self._route("POST"):
            return
        try:
            self._send(200, self._recommend())
        except RequestError as exc:
            self._send(exc.status, {"error": str(exc), **exc.details})
        except Exception:
            log.exception("internal error answering %s", self.path)
            self.close_connection = True
            self._send(500, {"error": "internal error (logged by the server)"})

    def _recommend(self) -> dict[str, Any]:
        length = self.headers.get("Content-Length")
        if length is None:
            self.close_connection = True
            raise RequestError("a Content-Length header is required", status=411)
        if not length.isdigit():
            self.close_connection = True
            raise RequestError(f"Content-Length must be a number of bytes, got {length[:20]!r}")
        if int(length) > self.server.max_body_bytes:
            self._discard(int(length))
            raise RequestError(f"the body is {int(length)} bytes; the limit is {self.server.max_body_bytes}", status=413)
        try:
            raw = self.rfile.read(int(length))
        except TimeoutError:
            self.close_connection = True
            raise RequestError(f"the body did not arrive within {self.timeout} s", status=408) from None
        try:
            body = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise RequestError(f"the body is not valid JSON ({exc})") from None
        model = self.server.model
        request = parse_request(body, len(model.item_ids), self.server.limits)
        with self.server.model_slots:
            return answer(model, request)


    def _discard(self, length: int) -> None:
        """Read and drop a refused body (up to ``DISCARD_LIMIT`` bytes, in small blocks), so that the
        client, still sending, gets the answer rather than a reset connection; then close."""
        self.close_connection = True
        left = min(length, DISCARD_LIMIT)
        while left > 0:
            block = self.rfile.read(min(left, 1 << 16))
            if not block:
                break
            left -= len(block)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = socket.SOMAXCONN  # the default 5 resets clients that connect at once

    def __init__(self, address, model, limits: Limits, max_body_bytes: int, workers: int):
        self.model, self.limits, self.max_body_bytes = model, limits, max_body_bytes
        self.model_slots = threading.BoundedSemaphore(workers)  # requests the model answers at once
        super().__init__(address, _Handler)


def make_server(
    model,
    host: str = "127.0.0.1",
    port: int = 0,
    limits: Limits = Limits(),
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    workers: int = DEFAULT_WORKERS,
) -> ThreadingHTTPServer:
    """A server for ``model`` (a loaded :class:`serving.SizedRecommender`), bound and ready for
    ``serve_forever()``; ``port=0`` picks a free port (``server.server_address[1]``). At most
    ``workers`` requests are answered by the model at once; the others wait their turn."""
    try:
        return _Server((host, port), model, limits, max_body_bytes, workers)
    except OSError as exc:
        raise ServeError(f"cannot listen on {host}:{port} ({exc.strerror or exc})") from None


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return int(text)


def _port(text: str) -> int:
    if not text.isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"must be a port number from 0 to 65535, got {text!r}")
    return int(text)


def _set_threads(threads: int) -> None:
    """Threads of one request's computation. Several threads per small request lose more to
    waiting for each other than they gain, and much more on a loaded machine (docs/serving.md)."""
    import torch

    torch.set_num_threads(threads)
    if "faiss" in sys.modules:  # imported by exports that search with a faiss index
        sys.modules["faiss"].omp_set_num_threads(threads)


def _stop(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serving.rest", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="export directory (d<size>) or MLflow URI (models:/NAME@alias)")
    parser.add_argument("--port", type=_port, default=8000, help="TCP port (0: any free port; default 8000)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--max-body-bytes", type=_positive, default=DEFAULT_MAX_BODY_BYTES, help="larger bodies get 413")
    parser.add_argument("--max-batch", type=_positive, default=Limits.max_batch, help="histories per request")
    parser.add_argument("--max-k", type=_positive, default=Limits.max_k, help="largest k a request may ask")
    parser.add_argument("--workers", type=_positive, default=DEFAULT_WORKERS,
                        help=f"requests the model answers at once (default: the {DEFAULT_WORKERS} cores)")
    parser.add_argument("--threads", type=_positive, default=1,
                        help="torch and faiss threads for each request (default 1: one request's work is small)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    logging.getLogger("faiss").setLevel(logging.WARNING)  # its loader reports every CPU variant it tries
    with tempfile.TemporaryDirectory(prefix="serving-rest-") as workdir:
        try:
            import serving

            model = serving.load(resolve_model(args.model, Path(workdir)), device=args.device)
            _set_threads(args.threads)
            limits = Limits(args.max_batch, args.max_k)
            server = make_server(model, args.host, args.port, limits, args.max_body_bytes, args.workers)
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        host, port = server.server_address[:2]
        log.info("serving %s (size %d, %d items) on http://%s:%d: POST /recommend, GET /health",
                 args.model, model.size, len(model.item_ids), host, port)
        # SIGTERM (kill, a supervisor) stops it as Ctrl-C does; a background job ignores SIGINT
        signal.signal(signal.SIGTERM, _stop)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            log.info("stopped")
        finally:
            server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
