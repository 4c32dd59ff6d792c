"""The REST endpoint (serving/rest.py, serving/online.py): a server started and stopped by the tests on
127.0.0.1 at a free port, over tiny exports with text and with integer item ids."""

from __future__ import annotations

import http.client
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

import serving
from recsys.item_features import ItemFeatures
from recsys.model import MatryoshkaRecommender
from serving.export import export_sizes
from serving.online import Limits
from serving.rest import main as rest_main
from serving.rest import make_server

ROOT = Path(__file__).resolve().parents[1]
N = 30
SIZE = 16
LIMITS = Limits(max_batch=8, max_k=20)
MAX_BODY = 16 << 10


def export(directory: Path, item_ids: list) -> Path:
    """A tiny untrained model over ``item_ids`` (text vectors only), exported at size 16."""
    g = torch.Generator().manual_seed(0)
    features = ItemFeatures(num_items=len(item_ids), dense={"text": torch.randn(len(item_ids) + 1, 6, generator=g)})
    torch.manual_seed(0)
    model = MatryoshkaRecommender(item_features=features, sizes=[8, SIZE], max_len=10).eval()
    popularity = list(range(len(item_ids), 0, -1))
    checkpoint = directory / "model.ckpt"
    catalogue = {"item_ids": item_ids, "popularity": popularity, "stats": {}}
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams), "catalogue": catalogue}, checkpoint)
    (path,) = export_sizes(checkpoint, [SIZE], directory / "exports")
    return path


class Running:
    """A server answering in a thread, and a client for it."""

    def __init__(self, directory: Path, limits: Limits = LIMITS):
        self.directory = directory
        self.model = serving.load(directory)  # for comparisons: not the server's own instance
        self.server = make_server(serving.load(directory), port=0, limits=limits, max_body_bytes=MAX_BODY)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)

    def request(self, method: str, path: str, body: bytes | None = None):
        return request(self.port, method, path, body)

    def post(self, body) -> tuple[int, dict]:
        return post(self.port, body)


def request(port: int, method: str, path: str, body: bytes | None = None) -> tuple[int, str, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, response.getheader("Content-Type"), response.read()
    finally:
        conn.close()


def post(port: int, body) -> tuple[int, dict]:
    """POST /recommend; ``body`` is raw bytes or a value sent as JSON."""
    status, kind, raw = request(port, "POST", "/recommend", body if isinstance(body, bytes) else json.dumps(body).encode())
    assert kind == "application/json"
    return status, json.loads(raw)


@pytest.fixture(scope="module")
def text_ids():
    return [f"item-{i}" for i in range(1, N + 1)]


@pytest.fixture(scope="module")
def text_server(tmp_path_factory, text_ids):
    running = Running(export(tmp_path_factory.mktemp("text"), text_ids))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def int_server(tmp_path_factory):
    running = Running(export(tmp_path_factory.mktemp("int"), list(range(101, 101 + N))))
    yield running
    running.stop()


def _expected(model, histories, k, exclude_seen=True):
    recs = model.recommend(histories, k=k, exclude_seen=exclude_seen, on_unknown="skip")
    return [([i for i, _ in r], [s for _, s in r]) for r in recs]


def test_health(text_server):
    status, kind, raw = text_server.request("GET", "/health")
    assert (status, kind) == (200, "application/json")
    assert json.loads(raw) == {"status": "ok", "size": SIZE, "num_items": N, "encoder": "lru"}


@pytest.mark.parametrize("exclude_seen", [True, False])
def test_a_batch_of_text_histories_equals_in_process_recommend(text_server, text_ids, exclude_seen):
    histories = [text_ids[:5], text_ids[10:12], [text_ids[3]], text_ids[7:20]]
    status, got = text_server.post({"histories": histories, "k": 6, "exclude_seen": exclude_seen})
    assert status == 200
    assert (got["size"], got["k"], got["exclude_seen"]) == (SIZE, 6, exclude_seen)
    want = _expected(text_server.model, histories, 6, exclude_seen)
    assert [(r["item_ids"], r["scores"]) for r in got["results"]] == want  # JSON floats round-trip exactly
    assert all(r["unknown"] == [] and r["fallback"] is False for r in got["results"])
    if exclude_seen:
        assert all(not set(h) & set(r["item_ids"]) for h, r in zip(histories, got["results"]))


def test_integer_catalogue_takes_integer_ids(int_server):
    histories = [[101, 105, 110], [120]]
    status, got = int_server.post({"histories": histories, "k": 4})
    assert status == 200
    assert [(r["item_ids"], r["scores"]) for r in got["results"]] == _expected(int_server.model, histories, 4)
    assert all(isinstance(i, int) for r in got["results"] for i in r["item_ids"])
    assert got["k"] == 4


def test_default_k_is_ten(int_server):
    status, got = int_server.post({"histories": [[101]]})
    assert status == 200 and got["k"] == 10 and len(got["results"][0]["item_ids"]) == 10


def test_unknown_ids_are_reported_and_an_all_unknown_history_is_flagged(text_server, text_ids):
    histories = [[text_ids[0], "no-such", text_ids[4]], ["nope", 7, 2.5, True, None], []]
    status, got = text_server.post({"histories": histories, "k": 3})
    assert status == 200
    first, unknown_only, empty = got["results"]
    assert first["unknown"] == ["no-such"] and first["fallback"] is False
    assert first["item_ids"] == _expected(text_server.model, [[text_ids[0], text_ids[4]]], 3)[0][0]
    assert unknown_only["unknown"] == ["nope", 7, 2.5, True, None]
    popular = (text_ids[:3], [float(N), float(N - 1), float(N - 2)])  # the training counts
    assert unknown_only["fallback"] is True and (unknown_only["item_ids"], unknown_only["scores"]) == popular
    assert empty["fallback"] is True and empty["unknown"] == [] and empty["item_ids"] == text_ids[:3]


def test_strict_refuses_unknown_ids_and_names_them(text_server, text_ids):
    status, got = text_server.post({"histories": [[text_ids[0]], [text_ids[1], "x", 3.5]], "strict": True})
    assert status == 400
    assert got["error"] == '2 unknown item id(s) (strict): histories[1]: "x", 3.5'
    assert got["unknown"] == [[], ["x", 3.5]]
    status, got = text_server.post({"histories": [["x"]], "strict": True})
    assert status == 400 and got["unknown"] == [["x"]]
    status, got = text_server.post({"histories": [[text_ids[0]], []], "strict": True, "k": 2})
    assert status == 200 and got["results"][1]["fallback"] is True  # an empty history is not an unknown id


@pytest.mark.parametrize(
    "body, message",
    [
        ({"histories": [["item-1"]], "k": 0}, "k must be an integer from 1 to 20 (the server's limit), got 0"),
        ({"histories": [["item-1"]], "k": -3}, "got -3"),
        ({"histories": [["item-1"]], "k": 21}, "got 21"),
        ({"histories": [["item-1"]], "k": 2.5}, "got 2.5"),
        ({"histories": [["item-1"]], "k": "5"}, 'got "5"'),
        ({"histories": [["item-1"]], "k": True}, "got true"),
        ({"histories": [["item-1"]], "exclude_seen": "no"}, 'exclude_seen must be true or false, got "no"'),
        ({"histories": [["item-1"]], "strict": 1}, "strict must be true or false, got 1"),
        ({"histories": [["item-1"]], "kk": 3}, 'unknown field "kk"; the fields are histories, k, exclude_seen, strict'),
        ({"k": 3}, 'the request has no "histories"'),
        ({"histories": []}, "histories must be a non-empty list of item-id lists, got []"),
        ({"histories": "item-1"}, 'histories must be a non-empty list of item-id lists, got "item-1"'),
        ({"histories": [["item-1"], "item-2"]}, 'histories[1] must be a list of item ids, got "item-2"'),
        ([["item-1"]], 'the request must be a JSON object with "histories", got [["item-1"]]'),
    ],
)
def test_bad_requests_get_400_and_one_clear_line(text_server, body, message):
    status, got = text_server.post(body)
    assert status == 400
    assert message in got["error"] and "\n" not in got["error"]
    assert set(got) == {"error"}


def test_k_above_a_small_catalogue_names_the_catalogue(tmp_path):
    running = Running(export(tmp_path, ["a", "b", "c"]))
    try:
        status, got = running.post({"histories": [["a"]], "k": 4})
        assert status == 400 and got["error"] == "k must be an integer from 1 to 3 (the catalogue size), got 4"
        status, got = running.post({"histories": [["a"]]})  # the default k is capped by the catalogue
        assert status == 200 and got["k"] == 3 and got["results"][0]["item_ids"] in (["b", "c"], ["c", "b"])
    finally:
        running.stop()


@pytest.mark.parametrize(
    "raw, message",
    [
        (b'{"histories": [["item-1"]', "the body is not valid JSON (Expecting ',' delimiter: line 1 column 26"),
        (b"", "the body is not valid JSON"),
        (b"\xff\xfe", "the body is not valid JSON"),
        (b"histories=item-1", "the body is not valid JSON"),
    ],
)
def test_malformed_json_gets_400(text_server, raw, message):
    status, got = text_server.post(raw)
    assert status == 400 and got["error"].startswith(message)


def test_body_and_batch_limits_get_413_and_the_server_goes_on(text_server, text_ids):
    big = json.dumps({"histories": [text_ids * 40] * 8}).encode()
    assert len(big) > MAX_BODY
    status, got = text_server.post(big)
    assert status == 413 and got["error"] == f"the body is {len(big)} bytes; the limit is {MAX_BODY}"
    status, got = text_server.post({"histories": [[text_ids[0]]] * 9})
    assert status == 413 and got["error"] == "at most 8 histories per request, got 9"
    status, got = text_server.post({"histories": [[text_ids[0]]] * 8, "k": 2})
    assert status == 200 and len(got["results"]) == 8


def test_a_body_needs_a_content_length(text_server):
    conn = http.client.HTTPConnection("127.0.0.1", text_server.port, timeout=30)
    try:
        conn.putrequest("POST", "/recommend")
        conn.endheaders()
        response = conn.getresponse()
        assert response.status == 411
        assert json.loads(response.read()) == {"error": "a Content-Length header is required"}
    finally:
        conn.close()


def test_wrong_paths_and_methods(text_server):
    status, _, raw = text_server.request("GET", "/recommend")
    assert status == 405 and json.loads(raw) == {"error": "/recommend takes POST, not GET"}
    status, _, raw = text_server.request("POST", "/health", b"{}")
    assert status == 405
    status, _, raw = text_server.request("GET", "/predict")
    assert status == 404 and json.loads(raw) == {"error": "no such path; the paths are POST /recommend, GET /health"}
    status, _, raw = text_server.request("DELETE", "/recommend")
    assert status == 501 and set(json.loads(raw)) == {"error"}


def test_a_refused_body_never_becomes_the_next_request(text_server, text_ids):
    """A body sent to a wrong path is not read; answering on the same connection would parse it
    as the next request. The server closes the connection instead."""
    conn = http.client.HTTPConnection("127.0.0.1", text_server.port, timeout=30)
    try:
        conn.request("POST", "/health", body=b'{"histories": [["item-1"]]}')
        response = conn.getresponse()
        assert response.status == 405 and response.getheader("Connection") == "close"
        response.read()
        conn.request("POST", "/recommend", body=json.dumps({"histories": [[text_ids[0]]], "k": 2}).encode())
        assert conn.getresponse().status == 200  # on a new connection: http.client reconnects
    finally:
        conn.close()


def test_a_body_that_stops_arriving_gets_408(text_server, monkeypatch):
    from serving import rest

    monkeypatch.setattr(rest._Handler, "timeout", 0.5)
    conn = http.client.HTTPConnection("127.0.0.1", text_server.port, timeout=30)
    try:
        conn.putrequest("POST", "/recommend")
        conn.putheader("Content-Length", "100")
        conn.endheaders(b'{"histories": ')
        response = conn.getresponse()
        assert response.status == 408
        assert json.loads(response.read()) == {"error": "the body did not arrive within 0.5 s"}
    finally:
        conn.close()


def test_an_internal_error_shows_no_trace_or_path_to_the_client(text_server, text_ids, monkeypatch, caplog):
    secret = str(text_server.directory / "model.safetensors")

    def broken(*args, **kwargs):
        raise RuntimeError(f"cannot read {secret}")

    monkeypatch.setattr(text_server.server.model, "recommend_rows", broken)
    with caplog.at_level(logging.ERROR, logger="serving.rest"):
        status, _, raw = text_server.request("POST", "/recommend", json.dumps({"histories": [[text_ids[0]]]}).encode())
    assert status == 500 and json.loads(raw) == {"error": "internal error (logged by the server)"}
    assert b"Traceback" not in raw and secret.encode() not in raw and b"/" not in raw
    assert "Traceback" in caplog.text and secret in caplog.text  # the server's log has it all
    monkeypatch.undo()
    assert text_server.post({"histories": [[text_ids[0]]], "k": 2})[0] == 200


def test_answers_leave_without_waiting_for_an_acknowledgement(text_server, text_ids, monkeypatch):
    """Headers and body are two writes; with Nagle's algorithm on, the body of every answer on a
    kept-alive connection waited for the client's delayed ACK (about 40 ms on Linux)."""
    import socket

    from serving import rest

    seen = []
    setup = rest._Handler.setup

    def recording(handler):
        setup(handler)
        seen.append(handler.connection.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

    monkeypatch.setattr(rest._Handler, "setup", recording)
    assert text_server.post({"histories": [[text_ids[0]]], "k": 2})[0] == 200
    assert seen and all(seen)


def test_concurrent_clients_get_their_own_answers(text_server, text_ids):
    """64 clients connecting at once: none is reset (the listen backlog), each gets its own answer."""
    clients = 64
    histories = [[text_ids[i % N], text_ids[(7 * i + 3) % N]] for i in range(clients)]
    want = [_expected(text_server.model, [h], 5)[0] for h in histories]  # each alone, as each client asks
    got: dict[int, list] = {}

    def client(i):
        status, body = text_server.post({"histories": [histories[i]], "k": 5})
        got[i] = (status, [(r["item_ids"], r["scores"]) for r in body["results"]])

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert got == {i: (200, [want[i]]) for i in range(clients)}


def test_the_command_reports_a_bad_model_and_a_busy_port(tmp_path, text_server, capsys):
    assert rest_main(["--model", str(tmp_path / "nothing"), "--port", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "no such export directory" in err and "\n" not in err
    assert rest_main(["--model", str(text_server.directory), "--port", str(text_server.port)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: cannot listen on 127.0.0.1:{text_server.port} (") and "\n" not in err


def test_the_command_serves_until_sigterm(text_server, text_ids):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    process = subprocess.Popen(
        [sys.executable, "-m", "serving.rest", "--model", str(text_server.directory), "--port", "0"],
        cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True,
    )
    try:
        lines = []
        for line in process.stderr:
            lines.append(line)
            found = re.search(r"on http://127\.0\.0\.1:(\d+)", line)
            if found:
                break
        assert found, "".join(lines)
        assert not any("faiss.loader" in line for line in lines), "third-party loader noise"
        status, got = post(int(found[1]), {"histories": [text_ids[:3]], "k": 4})
        assert status == 200 and [(r["item_ids"], r["scores"]) for r in got["results"]] == _expected(
            text_server.model, [text_ids[:3]], 4
        )
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
        process.stderr.close()


def test_the_endpoint_imports_no_training_code(text_server, text_ids):
    """An export directory is served without Lightning, MLflow, the data pipeline or torchrec."""
    script = f"""
import json, sys, threading, urllib.request
import serving
from serving.rest import make_server
server = make_server(serving.load({str(text_server.directory)!r}))
threading.Thread(target=server.serve_forever, daemon=True).start()
body = json.dumps({{"histories": [{text_ids[:3]!r}], "k": 2}}).encode()
with urllib.request.urlopen(f"http://127.0.0.1:{{server.server_address[1]}}/recommend", body) as answer:
    assert len(json.load(answer)["results"][0]["item_ids"]) == 2
watch = ["lightning", "mlflow", "recsys.data", "transformers", "sentence_transformers", "torchrec"]
print(json.dumps(sorted(w for w in watch if any(m == w or m.startswith(w + ".") for m in sys.modules))))
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []


def test_the_logged_pyfunc_answers_like_the_endpoint_and_a_models_uri_serves(tmp_path, int_server):
    """The MLflow pyfunc takes integer and text ids (its signature does not fix one type), reports unknown
    ids, refuses bad parameters with the same one line; ``models:/NAME/VERSION`` resolves to the export."""
    mlflow = pytest.importorskip("mlflow")
    import pandas as pd
    from mlflow.exceptions import MlflowException

    from recsys.tracking import log_size_models
    from serving.rest import resolve_model

    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    try:
        with mlflow.start_run() as run:
            pass
        rows = [{"size": SIZE, "parameters": int_server.model.num_parameters, "ndcg_10": 0.5}]
        uris = log_size_models(run.info.run_id, {SIZE: int_server.directory}, rows, register_as="shop")
        pyfunc = mlflow.pyfunc.load_model(uris[SIZE])
        histories = [[101, 102], ["103", "nope", 7.5]]
        out = pyfunc.predict(pd.DataFrame({"history": histories}), params={"k": 3})
        want = _expected(int_server.model, [[101, 102], [103]], 3)
        assert [(list(i), list(s)) for i, s in zip(out["item_ids"], out["scores"])] == want
        assert [list(u) for u in out["unknown"]] == [[], ["nope", 7.5]] and list(out["fallback"]) == [False, False]
        with pytest.raises(MlflowException, match=r"k must be an integer from 1 to 30 \(the catalogue size\), got 0"):
            pyfunc.predict(pd.DataFrame({"history": histories}), params={"k": 0})
        with pytest.raises(MlflowException, match=r'unknown item id\(s\) \(strict\): histories\[1\]: "nope", 7.5'):
            pyfunc.predict(pd.DataFrame({"history": histories}), params={"strict": True})
        export_dir = resolve_model("models:/shop-d16/1", tmp_path / "work")
        assert serving.load(export_dir).recommend([[101, 102]], k=3) == int_server.model.recommend([[101, 102]], k=3)
    finally:
        mlflow.set_tracking_uri(previous)


# ---------------------------------------------------------------------------------------------
# The one id rule (serving/item_ids.py) in all three paths: serving.load, serving.candidates, REST
# ---------------------------------------------------------------------------------------------

#: ids as a client may send them (JSON values)
SENT = [7, "7", "007", "+7", " 7", "7.0", 7.0, True, False, 2.5, None, "-0", 2**70, 1, "1", "a", "A", 2**40, str(2**40)]
#: the item each id names, per catalogue (None: unknown)
NAMED = {
    "integer": ([1, 2, 7, 10, 2**40],
                [7, 7, None, None, None, None, None, None, None, None, None, None, None, 1, 1, None, None, 2**40, 2**40]),
    "text": (["1", "2", "7", "007", "2.5", "a"],
             ["7", "7", "007", None, None, None, None, None, None, None, None, None, None, "1", "1", "a", None, None, None]),
}


def _named_by_exclusion(catalogue, recommended):
    """The item a one-id history named: the one missing from a top-everything list that excludes seen items."""
    missing = set(catalogue) - set(recommended)
    assert len(missing) <= 1
    return missing.pop() if missing else None


@pytest.mark.parametrize("kind", NAMED)
def test_every_path_names_the_same_items(tmp_path, kind):
    catalogue, named = NAMED[kind]
    directory = export(tmp_path, catalogue)
    model = serving.load(directory)
    assert list(zip(SENT, named)) == [
        (sent, model.item_ids[rows[0] - 1] if rows else None) for sent, rows in zip(SENT, model.lookup([[s] for s in SENT])[0])
    ], "serving.load"

    running = Running(directory, Limits())
    try:
        status, got = running.post({"histories": [[s] for s in SENT], "k": len(catalogue)})
    finally:
        running.stop()
    assert status == 200
    assert [(s, _named_by_exclusion(catalogue, r["item_ids"])) for s, r in zip(SENT, got["results"])] == list(zip(SENT, named))
    assert [r["unknown"] == [s] for s, r in zip(SENT, got["results"])] == [n is None for n in named], "REST"

    # the batch job: files hold ids as text (CSV, or a list of strings) or integers; floats and
    # booleans are refused as a column type before anything runs (tests/test_candidates.py)
    import polars as pl

    from serving.candidates import generate_candidates

    for dtype, chosen in (
        (pl.String, [i for i, s in enumerate(SENT) if isinstance(s, str)]),
        (pl.Int64, [i for i, s in enumerate(SENT) if type(s) is int and s < 2**63]),
    ):
        table = tmp_path / f"histories-{dtype}.parquet"
        pl.DataFrame({"user_id": chosen, "history": [[SENT[i]] for i in chosen]},
                     schema={"user_id": pl.Int64, "history": pl.List(dtype)}).write_parquet(table)
        out = tmp_path / f"out-{dtype}"
        generate_candidates(directory, table, out, len(catalogue), history_col="history", progress=False)
        parts = pl.read_parquet(out / "part-*.parquet")
        by_user = {u: parts.filter(pl.col("user_id") == u)["item_id"].to_list() for u in chosen}
        assert [(SENT[u], _named_by_exclusion(catalogue, by_user[u])) for u in chosen] == [(SENT[u], named[u]) for u in chosen], dtype


def test_the_lookup_takes_any_integer_width_and_refuses_other_types():
    import polars as pl

    from serving.item_ids import ItemLookup

    lookup = ItemLookup(pl.Series([30, 10, 20], dtype=pl.UInt16))
    assert lookup.rows(pl.Series([10, 20, 30, 40], dtype=pl.Int32)).to_list() == [2, 3, 1, None]
    assert lookup.rows(pl.Series(["20", "020"])).to_list() == [3, None]
    assert lookup.rows(pl.Series([10.0, 20.0])).to_list() == [None, None]
    assert lookup.rows(pl.Series([True, False])).to_list() == [None, None]
    huge = ItemLookup(pl.Series([2**64 - 1, 5], dtype=pl.UInt64))  # beyond Int64: compared as text
    assert huge.rows(pl.Series([2**64 - 1, 5], dtype=pl.UInt64)).to_list() == [1, 2]
    assert huge.rows(pl.Series([str(2**64 - 1), "5", "05"])).to_list() == [1, 2, None]
