"""Load test of the REST endpoint (``python -m serving.rest``) on 127.0.0.1 (bench/README.md §7).

    python bench/serve.py --clients 8 --seconds 20
    python bench/serve.py --checkpoint CKPT --data-dir DIR    # a model trained already, and its data

Without ``--checkpoint`` it first trains the built-in recipe (``configs/default.yaml``, the
synthetic log) for ``--epochs`` epochs through ``python -m recsys.train --tracking csv``. Then it
exports size ``--size`` (``python -m recsys.export``), starts the server as its own process at a
free port, and measures, one after another (so that they never share the cores):

1. in-process ``recommend`` of one history per call (the model loaded in this process): the time
   the endpoint cannot go below;
2. one client sending requests back to back over one keep-alive connection (``--single-seconds``);
3. ``--clients`` client threads, each with its own connection, for ``--seconds`` seconds.

Each request holds ``--histories-per-request`` real users' histories (their last ``max_len``
items, as original ids, drawn with a fixed seed) and asks for ``k`` items. Reported: requests per
second, p50 and p99 latency, the error count (any status but 200, or a failed connection), and the
ratio of endpoint latency to in-process ``recommend`` time. Afterwards the server must still
answer correctly: ``--check`` histories, one request each, must equal in-process ``recommend``
exactly (ids and scores), and ``/health`` must answer. Writes ``bench/results/serve.json``.

Then, with an external client, it load-tests the same uvicorn endpoint and the same application as
a Ray Serve deployment (``python -m serving.ray_serve``, ``--ray-replicas`` replicas, started as its
own process at a free port): ``--external-requests`` POST /recommend of one fixed body (the first
request's histories), at 1 client and at 8, each without and with keep-alive, beside in-process
``recommend`` of that same batch. The client (``--external-client``): ``hey`` (Debian package
``hey``; HTTP/1.1, keep-alive unless ``-disable-keepalive``) when installed, else Apache Bench
(``ab``; Debian package ``apache2-utils``), or ``both``. ab speaks HTTP/1.0, and ``ab -k`` asks for
HTTP/1.0 keep-alive, which uvicorn (the server of ``serving.rest`` and Ray Serve's proxy alike)
answers with ``Connection: close``: ab's connections stay one per request (``keep_alive_requests``
0), so only hey measures keep-alive. Each run reports requests per second, p50 and p99 latency
(the total time of each answered request, connecting included: ab's percentiles, or computed from
hey's per-request rows, ``-o csv``), errors (failed requests plus non-2xx answers), and
``connections_accepted``: the TCP connections accepted on this machine during the run (the kernel's
``PassiveOpens``, /proc/net/snmp), the clients' count when keep-alive holds, one per request when it
does not. hey sends ``--external-requests`` rounded down to a multiple of the clients. Afterwards the
deployment's answers must equal in-process ``recommend`` as above. Without either client (or without
Ray Serve, for its part) that part is skipped with one line. These results go under the key
``external_load``; the keys already in ``--out`` that a run does not write are kept.
``--external-only`` runs the external part alone and updates only ``external_load``.

    python bench/serve.py --clients 8 --seconds 20 --external-requests 5000 --ray-replicas 2
"""

from __future__ import annotations

import argparse
import csv
import http.client
import importlib.util
import io
import json
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import date
from pathlib import Path

import numpy as np

from machine import cpu_model  # bench/machine.py (the script directory is on sys.path)
from recsys.atomic import write_json_atomically

ROOT = Path(__file__).resolve().parents[1]

RESULT = ROOT / "bench" / "results" / "serve.json"
#: the server's default threads per request (``python -m serving.rest --threads``), used in process too
SERVER_THREADS = 1
#: the external runs: clients (-c) and keep-alive (hey unless -disable-keepalive, ab -k)
EXTERNAL_CLIENTS = (1, 8)
EXTERNAL_KEEP_ALIVE = (False, True)
#: ab's percentile file (-e) reads past its samples below about 50 requests: every run sends at least this many
MIN_EXTERNAL_REQUESTS = 100
#: the external clients, the preferred first (--external-client auto takes the first installed)
EXTERNAL_TOOLS = ("hey", "ab")


def run(command: list[str], log: Path) -> None:
    """Run one of our commands in a child process; its output goes to ``log``; stop on failure."""
    with open(log, "w") as out:
        done = subprocess.run(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command[:3])} failed; its output: {log}\n{log.read_text()[-3000:]}")


def train(work: Path, epochs: int) -> tuple[Path, Path, list[dict]]:
    """Train the built-in recipe; its best checkpoint, its prepared data and its per-size test rows."""
    run_dir = work / "run"
    run([sys.executable, "-m", "recsys.train", "--config", "configs/default.yaml", "--tracking", "csv",
         "--run_dir", str(run_dir), "--trainer.max_epochs", str(epochs),
         "--data.synthetic_cache_dir", str(work / "synthetic"),
         "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"], work / "train.log")
    (data_dir,) = {p.parent for p in (work / "synthetic").rglob("stats.json")}
    return run_dir / "checkpoints" / "best.ckpt", data_dir, json.loads((run_dir / "results.json").read_text())


def histories_of(data_dir: Path, max_len: int, count: int, seed: int) -> list[list]:
    """``count`` real users' histories (their last ``max_len`` items, as original ids)."""
    from recsys.data.prepared import load_prepared

    data = load_prepared(data_dir)
    rng = np.random.default_rng(seed)
    users = rng.choice(np.arange(1, data.num_users + 1), size=min(count, data.num_users), replace=False)
    return [[data.item_ids[row] for row in data.history(int(u))[-max_len:]] for u in users]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """``python -m serving.rest`` in its own process, at a free port (or another serving ``module``
    with its own ``options``: ``serving.ray_serve`` with a free ``--port``)."""

    def __init__(self, export: Path, log: Path, module: str = "serving.rest", options: tuple[str, ...] = ("--port", "0")):
        self.log = open(log, "w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", module, "--model", str(export), *options],
            cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            found = re.search(r"on http://127\.0\.0\.1:(\d+)", log.read_text())
            if found:
                self.port = int(found[1])
                return
            if self.process.poll() is not None:
                raise SystemExit(f"the server stopped: {log.read_text()[-3000:]}")
            time.sleep(0.2)
        raise SystemExit("the server did not start within 300 s")

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self) -> int:
        self.process.terminate()
        code = self.process.wait(timeout=60)
        self.log.close()
        return code


class Client:
    """One keep-alive connection; ``post`` returns the status and the decoded body."""

    def __init__(self, port: int):
        self.port = port
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)

    def post(self, body: dict) -> tuple[int, dict]:
        data = json.dumps(body).encode()
        self.conn.request("POST", "/recommend", body=data, headers={"Content-Type": "application/json"})
        response = self.conn.getresponse()
        return response.status, json.loads(response.read())

    def get(self, path: str) -> int:
        self.conn.request("GET", path)
        response = self.conn.getresponse()
        response.read()
        return response.status

    def close(self) -> None:
        self.conn.close()


def percentile_ms(seconds: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(seconds) * 1e3, q)) if seconds else float("nan")


def summary(latencies: list[float], errors: int, elapsed: float) -> dict:
    return {
        "requests": len(latencies) + errors, "errors": errors, "seconds": elapsed,
        "requests_per_s": len(latencies) / elapsed,
        "p50_ms": percentile_ms(latencies, 50), "p99_ms": percentile_ms(latencies, 99),
        "mean_ms": statistics.fmean(latencies) * 1e3 if latencies else float("nan"),
    }


def load(port: int, requests: list[dict], clients: int, seconds: float) -> dict:
    """``clients`` threads, each sending requests back to back for ``seconds``."""
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors = [0] * clients
    start = time.perf_counter()
    deadline = start + seconds

    def one(i: int) -> None:
        client = Client(port)
        n = i
        while time.perf_counter() < deadline:
            sent = time.perf_counter()
            try:
                status, _ = client.post(requests[n % len(requests)])
            except (OSError, http.client.HTTPException, ValueError):
                status = -1
                client.close()
                client = Client(port)
            if status == 200:
                latencies[i].append(time.perf_counter() - sent)
            else:
                errors[i] += 1
            n += clients
        client.close()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"clients": clients, **summary([x for per in latencies for x in per], sum(errors), time.perf_counter() - start)}


def in_process(model, requests: list[dict], seconds: float) -> dict:
    """``model.recommend`` of each request's histories, back to back for ``seconds``."""
    times = []
    start = time.perf_counter()
    n = 0
    while time.perf_counter() - start < seconds:
        r = requests[n % len(requests)]
        sent = time.perf_counter()
        model.recommend(r["histories"], k=r["k"])
        times.append(time.perf_counter() - sent)
        n += 1
    return summary(times, 0, time.perf_counter() - start)


def check(port: int, model, histories: list[list], k: int) -> dict:
    """Every history's answer equals in-process ``recommend`` exactly; ``/health`` answers."""
    client = Client(port)
    equal = 0
    for history in histories:
        status, got = client.post({"histories": [history], "k": k})
        want = model.recommend([history], k=k)[0]
        equal += status == 200 and (got["results"][0]["item_ids"], got["results"][0]["scores"]) == (
            [i for i, _ in want], [s for _, s in want])
    health = client.get("/health")
    client.close()
    return {"checked": len(histories), "equal": equal, "health_status": health}


def _number(pattern: str, text: str, default: float | None = None) -> float:
    found = re.search(pattern, text)
    if found is None:
        if default is None:
            raise SystemExit(f"ab's output has no {pattern!r}:\n{text[-3000:]}")
        return default
    return float(found[1])


def ab(ab_path: str, port: int, body: Path, requests: int, clients: int, keep_alive: bool, work: Path) -> dict:
    """One Apache Bench run: ``requests`` POST /recommend of ``body`` from ``clients`` concurrent
    clients; requests per second, p50 and p99 (ms, ab's percentiles of the total time of each
    request, connecting included), and errors (failed requests plus non-2xx answers)."""
    percentiles = work / f"ab-{port}-{clients}-{int(keep_alive)}.csv"
    command = [ab_path, "-q", "-r", "-s", "60", "-n", str(requests), "-c", str(clients), "-T", "application/json",
               "-p", str(body), "-e", str(percentiles), *(["-k"] if keep_alive else []),
               f"http://127.0.0.1:{port}/recommend"]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"ab failed ({done.returncode}): {done.stderr[-2000:]}")
    out = done.stdout
    served = {}
    for line in percentiles.read_text().splitlines()[1:]:
        at, ms = line.split(",")
        served[int(at)] = float(ms)
    failed, non_2xx = int(_number(r"Failed requests:\s+(\d+)", out)), int(_number(r"Non-2xx responses:\s+(\d+)", out, 0))
    return {
        "tool": "ab", "clients": clients, "keep_alive": keep_alive,
        "requests": int(_number(r"Complete requests:\s+(\d+)", out)),
        "errors": failed + non_2xx, "failed": failed, "non_2xx": non_2xx,
        "keep_alive_requests": int(_number(r"Keep-Alive requests:\s+(\d+)", out, 0)),
        "seconds": _number(r"Time taken for tests:\s+([\d.]+) seconds", out),
        "requests_per_s": _number(r"Requests per second:\s+([\d.]+)", out),
        "p50_ms": served[50], "p99_ms": served[99],
        "mean_ms": _number(r"Time per request:\s+([\d.]+) \[ms\] \(mean\)\n", out),
        "answer_bytes": int(_number(r"Document Length:\s+(\d+) bytes", out)),
    }


def hey(hey_path: str, port: int, body: Path, requests: int, clients: int, keep_alive: bool, work: Path) -> dict:
    """One hey run: ``requests // clients`` POST /recommend of ``body`` from each of ``clients``
    concurrent workers, over HTTP/1.1 (keep-alive unless ``keep_alive`` is False); requests per
    second, p50 and p99 (ms, of the total time of each answered request, connecting included) and
    errors, from hey's per-request rows (``-o csv``: one per answer, none for a failed request)."""
    command = [hey_path, "-n", str(requests), "-c", str(clients), "-t", "60", "-m", "POST", "-T", "application/json",
               "-D", str(body), "-o", "csv", *([] if keep_alive else ["-disable-keepalive"]),
               f"http://127.0.0.1:{port}/recommend"]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"hey failed ({done.returncode}): {done.stderr[-2000:]}")
    rows = list(csv.DictReader(io.StringIO(done.stdout)))
    sent = requests // clients * clients  # hey's workers send requests // clients each
    latencies = [float(row["response-time"]) for row in rows]
    non_2xx = sum(not 200 <= int(row["status-code"]) < 300 for row in rows)
    seconds = max((float(row["offset"]) + float(row["response-time"]) for row in rows), default=float("nan"))
    return {
        "tool": "hey", "clients": clients, "keep_alive": keep_alive, "requests": sent,
        "errors": sent - len(rows) + non_2xx, "failed": sent - len(rows), "non_2xx": non_2xx,
        "seconds": seconds, "requests_per_s": len(rows) / seconds,
        "p50_ms": percentile_ms(latencies, 50), "p99_ms": percentile_ms(latencies, 99),
        "mean_ms": statistics.fmean(latencies) * 1e3 if latencies else float("nan"),
    }


def tcp_accepted() -> int | None:
    """TCP connections accepted so far in this network namespace (``PassiveOpens`` of /proc/net/snmp), or None."""
    try:
        lines = Path("/proc/net/snmp").read_text().splitlines()
        names, values = (line.split() for line in lines if line.startswith("Tcp:"))
        return int(values[names.index("PassiveOpens")])
    except (OSError, ValueError):
        return None


def external_runs(tools: dict[str, str], port: int, body: Path, requests: int, work: Path, name: str,
                  in_process_p50_ms: float) -> list[dict]:
    """Each tool's four runs (1 and 8 clients, without and with keep-alive) against one endpoint."""
    runs = []
    for tool, path in tools.items():
        measure = hey if tool == "hey" else ab
        measure(path, port, body, MIN_EXTERNAL_REQUESTS, 1, False, work)  # warm-up
        for clients in EXTERNAL_CLIENTS:
            for keep_alive in EXTERNAL_KEEP_ALIVE:
                before = tcp_accepted()
                run_ = measure(path, port, body, requests, clients, keep_alive, work)
                after = tcp_accepted()
                accepted = None if None in (before, after) else after - before
                run_ = {"endpoint": name, **run_, "connections_accepted": accepted,
                        "ratio_p50_to_in_process": run_["p50_ms"] / in_process_p50_ms}
                print(f"{tool:3} {name}, {clients} client(s), keep-alive {'on ' if keep_alive else 'off'}: "
                      f"{run_['requests']} requests, {run_['requests_per_s']:.0f} req/s, p50 {run_['p50_ms']:.2f} ms "
                      f"({run_['ratio_p50_to_in_process']:.1f}x in process), p99 {run_['p99_ms']:.2f} ms, "
                      f"{run_['errors']} errors, {run_['connections_accepted']} connections accepted", flush=True)
                runs.append(run_)
    return runs


def external_tools(choice: str) -> tuple[dict[str, str], str | None]:
    """The external clients to run (name: path) for ``--external-client``, and a line naming those
    wanted but not installed (None if none is missing)."""
    found = {tool: path for tool in EXTERNAL_TOOLS if (path := shutil.which(tool)) is not None}
    if choice == "auto":
        tools = dict(list(found.items())[:1])
        return tools, None if tools else "neither hey nor ab (Apache Bench) is installed (apt-get install hey)"
    wanted = EXTERNAL_TOOLS if choice == "both" else (choice,)
    tools = {tool: found[tool] for tool in wanted if tool in found}
    missing = [tool for tool in wanted if tool not in found]
    return tools, f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not installed" if missing else None


def tool_version(tool: str, path: str) -> str:
    """``ab -V``'s first line; for hey (which has no version option) its Debian package's version."""
    if tool == "ab":
        return subprocess.run([path, "-V"], capture_output=True, text=True).stdout.splitlines()[0].removeprefix("This is ")
    if shutil.which("dpkg-query") is None:
        return "hey"
    done = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "hey"], capture_output=True, text=True)
    return f"hey {done.stdout}" if done.returncode == 0 else "hey"


def ray_serve_missing() -> str | None:
    """Why the Ray Serve deployment cannot run here, or None."""
    try:
        import ray.serve  # noqa: F401
    except ImportError:
        return "ray.serve cannot be imported (pip install -e .[ray])"
    return None


def external_load(args, model, export: Path, request: dict, histories: list[list], work: Path, uvicorn_port: int) -> dict:
    """The external part: the uvicorn endpoint (at ``uvicorn_port``, already serving ``export``) and the
    Ray Serve deployment, beside in-process ``recommend`` of the same batch; ``histories`` are
    checked against in-process ``recommend`` on the deployment afterwards."""
    tools, missing = external_tools(args.external_client)
    if missing is not None:
        print(f"{missing}: the external load test {'runs ' + ' and '.join(tools) + ' only' if tools else 'is skipped'}", flush=True)
    if not tools:
        return {"skipped": missing}
    body = work / "external-body.json"
    body.write_text(json.dumps(request))
    in_process(model, [request], 1.0)  # warm-up
    local = in_process(model, [request], args.single_seconds)
    print(f"in process, the external batch: p50 {local['p50_ms']:.2f} ms, p99 {local['p99_ms']:.2f} ms", flush=True)
    result = {
        "tools": {tool: tool_version(tool, path) for tool, path in tools.items()},
        "requests_per_run": args.external_requests, "body_bytes": body.stat().st_size,
        "histories_per_request": len(request["histories"]), "k": request["k"],
        "uvicorn_loop": "uvloop" if importlib.util.find_spec("uvloop") else "asyncio",
        "in_process_same_batch": local,
        "uvicorn": {"command": "python -m serving.rest --port 0",
                    "runs": external_runs(tools, uvicorn_port, body, args.external_requests, work, "uvicorn", local["p50_ms"])},
    }
    missing = "skipped by --no-ray" if args.no_ray else ray_serve_missing()
    if missing is not None:
        print(f"Ray Serve: {missing}: its external load test is skipped", flush=True)
        result["ray_serve"] = {"skipped": missing}
        return result
    port = free_port()
    options = ("--replicas", str(args.ray_replicas), "--port", str(port))
    started = time.perf_counter()
    server = Server(export, work / "ray_serve.log", "serving.ray_serve", options)
    start_s = time.perf_counter() - started
    try:
        runs = external_runs(tools, server.port, body, args.external_requests, work,
                             f"Ray Serve ({args.ray_replicas} replicas)", local["p50_ms"])
        after = check(server.port, model, histories[: args.check], args.k)
        print(f"Ray Serve afterwards: {after['equal']} of {after['checked']} answers equal to in-process recommend, "
              f"/health {after['health_status']}", flush=True)
    finally:
        exit_code = server.stop()
    result["ray_serve"] = {"command": f"python -m serving.ray_serve {' '.join(options)}", "replicas": args.ray_replicas,
                           "start_s": start_s, "runs": runs, "after_load": after, "exit_code_on_sigterm": exit_code}
    return result


def write_merged(path: Path, report: dict) -> None:
    """``report`` written into ``path``: its keys replaced or added, the file's other keys kept."""
    existing = json.loads(path.read_text()) if path.exists() else {}
    write_json_atomically(path, {**existing, **report}, indent=2)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, help="a trained checkpoint (default: train the built-in recipe)")
    parser.add_argument("--data-dir", type=Path, help="the prepared data of --checkpoint (for the histories)")
    parser.add_argument("--epochs", type=int, default=2, help="epochs of the built-in recipe when training")
    parser.add_argument("--size", type=int, default=64, help="the exported size")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--histories-per-request", type=int, default=1)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=20.0, help="duration of the loaded run")
    parser.add_argument("--single-seconds", type=float, default=10.0, help="duration of the one-client run and of in-process timing")
    parser.add_argument("--check", type=int, default=100, help="histories checked against in-process recommend afterwards")
    parser.add_argument("--external-requests", "--ab-requests", dest="external_requests", type=int, default=5000,
                        help=f"requests of each external client's run (at least {MIN_EXTERNAL_REQUESTS})")
    parser.add_argument("--external-client", choices=("auto", *EXTERNAL_TOOLS, "both"), default="auto",
                        help="the external client: auto (hey when installed, else ab), hey, ab or both")
    parser.add_argument("--ray-replicas", type=int, default=2, help="replicas of the Ray Serve deployment")
    parser.add_argument("--no-ray", action="store_true", help="leave the Ray Serve deployment out of the external part")
    parser.add_argument("--external-only", action="store_true",
                        help="run the external part alone and update only external_load in --out")
    parser.add_argument("--out", type=Path, default=RESULT)
    args = parser.parse_args(argv)
    if (args.checkpoint is None) != (args.data_dir is None):
        parser.error("give --checkpoint and --data-dir together, or neither")
    if args.external_requests < MIN_EXTERNAL_REQUESTS:
        parser.error(f"--external-requests must be at least {MIN_EXTERNAL_REQUESTS} (ab's percentiles need them)")
    if args.ray_replicas < 1:
        parser.error("--ray-replicas must be positive")
    tools, missing = external_tools(args.external_client)
    if args.external_only and not tools:
        print(f"{missing}: the external load test is skipped; {args.out} is left as it is")
        return
    command = "python bench/serve.py " + " ".join(argv if argv is not None else sys.argv[1:])
    machine = {"cpu": cpu_model(), "cpu_count": os.cpu_count(), "platform": platform.platform(),
               "python": platform.python_version()}

    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        work = Path(tmp)
        trained = None
        if args.checkpoint is None:
            print(f"training configs/default.yaml for {args.epochs} epochs ...", flush=True)
            started = time.perf_counter()
            checkpoint, data_dir, results = train(work, args.epochs)
            trained = {"config": "configs/default.yaml", "epochs": args.epochs, "train_s": time.perf_counter() - started,
                       "test": next(r for r in results if r["size"] == args.size)}
        else:
            checkpoint, data_dir = args.checkpoint, args.data_dir
        run([sys.executable, "-m", "recsys.export", "--checkpoint", str(checkpoint), "--dims", str(args.size),
             "--out", str(work / "exports")], work / "export.log")
        export = work / "exports" / f"d{args.size}"

        import torch

        import serving

        torch.set_num_threads(SERVER_THREADS)  # as the server computes each request (serving.rest --threads)
        model = serving.load(export)
        histories = histories_of(data_dir, model.max_len, 1000, seed=0)
        per = args.histories_per_request
        requests = [{"histories": histories[i : i + per], "k": args.k} for i in range(0, len(histories) - per + 1, per)]
        print(f"size {model.size}, {len(model.item_ids):,} items; {len(requests)} distinct requests", flush=True)
        model_info = {"size": model.size, "num_items": len(model.item_ids), "encoder": model.manifest["encoder"],
                      "max_len": model.max_len, "num_parameters": model.num_parameters,
                      "retriever": model.manifest["retriever"]["kind"], "trained": trained}

        if not args.external_only:
            in_process(model, requests[:20], 1.0)  # warm-up
            local = in_process(model, requests, args.single_seconds)
            print(f"in process: p50 {local['p50_ms']:.2f} ms, p99 {local['p99_ms']:.2f} ms", flush=True)

        server = Server(export, work / "server.log")
        try:
            if not args.external_only:
                load(server.port, requests[:20], 1, 1.0)  # warm-up
                rss_before = server.rss_mb()
                single = load(server.port, requests, 1, args.single_seconds)
                print(f"1 client: {single['requests_per_s']:.0f} req/s, p50 {single['p50_ms']:.2f} ms, "
                      f"p99 {single['p99_ms']:.2f} ms, {single['errors']} errors", flush=True)
                loaded = load(server.port, requests, args.clients, args.seconds)
                print(f"{args.clients} clients: {loaded['requests_per_s']:.0f} req/s, p50 {loaded['p50_ms']:.2f} ms, "
                      f"p99 {loaded['p99_ms']:.2f} ms, {loaded['errors']} errors", flush=True)
                rss_after = server.rss_mb()
                after = check(server.port, model, histories[: args.check], args.k)
                print(f"afterwards: {after['equal']} of {after['checked']} answers equal to in-process recommend, "
                      f"/health {after['health_status']}", flush=True)
            external_start = os.getloadavg()
            external = external_load(args, model, export, requests[0], histories, work, server.port)
        finally:
            exit_code = server.stop()

    external = {
        "command": command, "date": date.today().isoformat(), "machine": machine,
        "load_average_start": external_start, "load_average_end": os.getloadavg(),
        "model": {k: model_info[k] for k in ("size", "num_items", "encoder", "retriever")}, **external,
        "note": ("the client, the server and (for Ray Serve) Ray's processes share the machine's cores; runs one after "
                 "another; latency is the client's total time of a request, connecting included; connections_accepted "
                 "counts the whole network namespace (/proc/net/snmp PassiveOpens)"),
    }
    if args.external_only:
        write_merged(args.out, {"external_load": external})
        print(f"wrote external_load into {args.out}")
        return
    report = {
        "command": command,
        "date": date.today().isoformat(),
        "machine": machine,
        "threads_per_request": SERVER_THREADS,
        "server_workers": os.cpu_count(),
        "load_average_start": load_start,
        "load_average_end": os.getloadavg(),
        "model": model_info,
        "k": args.k,
        "histories_per_request": per,
        "history_length_mean": statistics.fmean(len(h) for h in histories),
        "in_process": local,
        "single_client": single,
        "loaded": loaded,
        "ratio_p50_single_client_to_in_process": single["p50_ms"] / local["p50_ms"],
        "ratio_p50_loaded_to_in_process": loaded["p50_ms"] / local["p50_ms"],
        "after_load": after,
        "server_rss_mb": {"before": rss_before, "after": rss_after},
        "server_exit_code_on_sigterm": exit_code,
        "note": ("the server is a separate process on the same cores as the clients; phases run one after another; "
                 "latency is the client's wall time from sending a request to reading the whole answer"),
        "external_load": external,
    }
    write_merged(args.out, report)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
