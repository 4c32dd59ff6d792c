"""Load test of the REST endpoint (``python -m serving.rest``) on 127.0.0.1 (bench/README.md §7).

    python bench/serve.py --clients 8 --seconds 20
    python bench/serve.py --checkpoint CKPT --data-dir DIR    # a model trained already, and its data

Without ``--checkpoint`` it first trains the built-in recipe (``configs/default.yaml``, the
synthetic log) for ``--epochs`` epochs through ``python -m recsys.train --tracking csv``. Then it
exports size ``--size`` (``python -m serving.export``), starts the server as its own process at a
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
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import date
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from machine import cpu_model  # noqa: E402  bench/machine.py (the script directory is on sys.path)
from recsys.atomic import write_json_atomically  # noqa: E402

RESULT = ROOT / "bench" / "results" / "serve.json"
#: the server's default threads per request (``python -m serving.rest --threads``), used in process too
SERVER_THREADS = 1


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


class Server:
    """``python -m serving.rest`` in its own process, at a free port."""

    def __init__(self, export: Path, log: Path):
        self.log = open(log, "w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "serving.rest", "--model", str(export), "--port", "0"],
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
    parser.add_argument("--out", type=Path, default=RESULT)
    args = parser.parse_args(argv)
    if (args.checkpoint is None) != (args.data_dir is None):
        parser.error("give --checkpoint and --data-dir together, or neither")

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
        run([sys.executable, "-m", "serving.export", "--checkpoint", str(checkpoint), "--dims", str(args.size),
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

        in_process(model, requests[:20], 1.0)  # warm-up
        local = in_process(model, requests, args.single_seconds)
        print(f"in process: p50 {local['p50_ms']:.2f} ms, p99 {local['p99_ms']:.2f} ms", flush=True)

        server = Server(export, work / "server.log")
        try:
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
        finally:
            exit_code = server.stop()

    report = {
        "command": "python bench/serve.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": date.today().isoformat(),
        "machine": {"cpu": cpu_model(), "cpu_count": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version()},
        "threads_per_request": SERVER_THREADS,
        "server_workers": os.cpu_count(),
        "load_average_start": load_start,
        "load_average_end": os.getloadavg(),
        "model": {"size": model.size, "num_items": len(model.item_ids), "encoder": model.manifest["encoder"],
                  "max_len": model.max_len, "num_parameters": model.num_parameters,
                  "retriever": model.manifest["retriever"]["kind"], "trained": trained},
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
    }
    write_json_atomically(args.out, report, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
