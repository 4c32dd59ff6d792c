"""The REST endpoint as a Ray Serve deployment (serving/ray_serve.py): the command started with two
local replicas on 127.0.0.1 at a free port, its answers compared with in-process ``recommend`` and,
byte for byte, with the answers of serving.rest over the same export; then stopped by SIGTERM.
Skipped where Ray Serve is not installed (``pip install -e .[ray]``)."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

try:
    import ray.serve  # noqa: F401
except ImportError:
    pytest.skip("ray.serve cannot be imported: Ray Serve is not installed (pip install -e .[ray])", allow_module_level=True)

from test_rest import LIMITS, MAX_BODY, Running, _expected, export, request  # tests/ is on the path

from serving.ray_serve import main as ray_serve_main

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
ENV.pop("RAY_ADDRESS", None)
#: seconds for the deployment to start (a local Ray instance, two replicas) and to stop
START_S = 40
STOP_S = 20
TEXT_IDS = [f"item-{i}" for i in range(1, 31)]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_bad_options_are_one_line_and_exit_2(tmp_path, capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        model = export(tmp_path, TEXT_IDS)
        cases = [
            (["--model", str(tmp_path / "nothing")], f"error: {tmp_path / 'nothing'}: no such export directory"),
            (["--model", str(model), "--replicas", "0"], "error: --replicas must be a positive integer, got '0'"),
            (["--model", str(model), "--port", "70000"], "error: --port must be a port number from 1 to 65535, got '70000'"),
            (["--model", str(model), "--port", "0"], "error: --port must be a port number from 1 to 65535, got '0'"),
            (["--model", str(model), "--port", str(taken)], f"error: cannot listen on 127.0.0.1:{taken} ("),
        ]
        for argv, line in cases:
            assert ray_serve_main(argv) == 2, argv
            err = capsys.readouterr().err.strip()
            assert err.startswith(line) and "\n" not in err, (argv, err)


def test_the_deployment_imports_no_training_code():
    script = textwrap.dedent(
        """
        import json, sys
        from serving.ray_serve import build
        build({"export": "x"}, replicas=2, replica_cpus=1.0)
        watch = ["lightning", "mlflow", "recsys.data", "transformers", "sentence_transformers", "torchrec"]
        print(json.dumps(sorted(w for w in watch if any(m == w or m.startswith(w + ".") for m in sys.modules))))
        """
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []


def _wait_for(log: Path, process: subprocess.Popen, pattern: str, seconds: float) -> re.Match:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        found = re.search(pattern, log.read_text())
        if found:
            return found
        assert process.poll() is None, f"the command stopped ({process.returncode}): {log.read_text()[-3000:]}"
        time.sleep(0.25)
    raise AssertionError(f"no {pattern!r} within {seconds} s: {log.read_text()[-3000:]}")


def test_two_replicas_answer_as_serving_rest_and_stop_on_sigterm(tmp_path):
    model_dir = export(tmp_path, TEXT_IDS)
    rest = Running(model_dir)  # serving.rest in this process, same export and limits: the reference answers
    port = _free_port()
    log = tmp_path / "ray_serve.log"
    with open(log, "w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "serving.ray_serve", "--model", str(model_dir), "--replicas", "2",
             "--port", str(port), "--num-cpus", "2", "--max-batch", str(LIMITS.max_batch), "--max-k", str(LIMITS.max_k),
             "--max-body-bytes", str(MAX_BODY)],
            cwd=tmp_path, env=ENV, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        ready = _wait_for(log, process, rf"on http://127\.0\.0\.1:{port}: .*Ray Serve, (\d+) of 2 replica", START_S)
        assert ready[1] == "2", ready[0]

        def both(method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
            """The status and body from the deployment, checked equal to serving.rest's."""
            status, kind, raw = request(port, method, path, body)
            assert (status, kind, raw) == rest.request(method, path, body), (method, path, body)
            return status, raw

        status, raw = both("GET", "/health")
        assert status == 200 and json.loads(raw)["num_items"] == len(TEXT_IDS)

        histories = [TEXT_IDS[:5], TEXT_IDS[10:12], [TEXT_IDS[3], "no-such"], []]
        for k, exclude_seen in [(6, True), (3, False)]:
            body = json.dumps({"histories": histories, "k": k, "exclude_seen": exclude_seen}).encode()
            status, raw = both("POST", "/recommend", body)
            assert status == 200
            got = [(r["item_ids"], r["scores"]) for r in json.loads(raw)["results"]]
            assert got == _expected(rest.model, histories, k, exclude_seen)  # in-process serving.load(dir).recommend

        invocations = {"dataframe_split": {"columns": ["history"], "data": [[h] for h in histories]}, "params": {"k": 4}}
        assert both("POST", "/invocations", json.dumps(invocations).encode())[0] == 200

        bad = [
            (b'{"histories": [["item-1"]], "k": 0}', 400),
            (b'{"histories": []}', 400),
            (b'{"histories": [["item-1"]], "kk": 3}', 400),
            (b'{"histories": [["item-1"]', 400),
            (b'{"histories": [["item-1"]], "k": NaN}', 400),
            (json.dumps({"histories": [["x"]], "strict": True}).encode(), 400),
            (json.dumps({"histories": [["item-1"]] * (LIMITS.max_batch + 1)}).encode(), 413),
            (b"x" * (MAX_BODY + 1), 413),  # over the byte limit
        ]
        for body, expected in bad:
            status, raw = both("POST", "/recommend", body)
            assert status == expected and set(json.loads(raw)) <= {"error", "unknown"}, raw
        assert both("GET", "/no-such-path")[0] == 404
        assert both("GET", "/recommend")[0] == 405

        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=STOP_S) == 0, log.read_text()[-3000:]
        text = log.read_text()
        assert "Traceback" not in text and text.rstrip().endswith("serving.ray_serve: stopped"), text[-3000:]
        with pytest.raises(OSError):  # the proxy is gone with Ray
            request(port, "GET", "/health")
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)  # the driver, and the local Ray instance it started
            process.wait()
        rest.stop()
