"""The REST endpoint (serving/rest.py, serving/online.py): a server (FastAPI on uvicorn) started and
stopped by the tests on 127.0.0.1 at a free port, over tiny exports with text and with integer item ids."""

from __future__ import annotations

import http.client
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import serving
from recsys.item_features import ItemFeatures
from recsys.model import MatryoshkaRecommender
from recsys.export import export_sizes
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
    """A server answering in a thread (uvicorn's loop), and a client for it."""

    def __init__(self, directory: Path, limits: Limits = LIMITS, max_body_bytes: int = MAX_BODY, concurrency: int = 4):
        self.directory = directory
        self.model = serving.load(directory)  # for comparisons: not the server's own instance
        self.served = serving.load(directory)  # the server's own (tests may break it)
        self.server = make_server(self.served, port=0, limits=limits, max_body_bytes=max_body_bytes, concurrency=concurrency)
        self.port = self.server.port
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.stop()
        self.thread.join(timeout=30)
        assert not self.thread.is_alive(), "the server did not stop"

    def request(self, method: str, path: str, body: bytes | None = None):
        return request(self.port, method, path, body)

    def post(self, body, path: str = "/recommend") -> tuple[int, dict]:
        return post(self.port, body, path)


def strict_json(raw: bytes):
    """JSON as a strict parser reads it: NaN and Infinity are not JSON."""

    def refuse(name):
        raise AssertionError(f"{name} in a response: {raw[:200]!r}")

    return json.loads(raw, parse_constant=refuse)


def request(port: int, method: str, path: str, body: bytes | None = None) -> tuple[int, str, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, response.getheader("Content-Type"), response.read()
    finally:
        conn.close()


def post(port: int, body, path: str = "/recommend") -> tuple[int, dict]:
    """POST /recommend (or ``path``); ``body`` is raw bytes or a value sent as JSON."""
    status, kind, raw = request(port, "POST", path, body if isinstance(body, bytes) else json.dumps(body).encode())
    assert kind == "application/json"
    return status, strict_json(raw)


def exchange(port: int, data: bytes, wait: float = 10, until: bytes | None = None) -> tuple[bytes, bool]:
    """Raw bytes sent on one connection; what the server answers (until it closes the connection, the
    answer ends with ``until`` or ``wait`` seconds pass without a byte), and whether it closed it."""
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as sock:
        sock.sendall(data)
        answer = b""
        try:
            while block := sock.recv(1 << 16):
                answer += block
                if until is not None and answer.endswith(until):
                    return answer, False
        except TimeoutError:
            return answer, False
        return answer, True


def statuses(answer: bytes) -> list[int]:
    """The status of each response in raw bytes (a response body here never contains "HTTP/1.")."""
    return [int(m) for m in re.findall(rb"HTTP/1\.[01] (\d{3}) ", answer)]


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


def test_integer_ids_of_a_text_log_come_back_as_json_integers(tmp_path):
    """Issue 32: a TSV log of integer ids gives answers whose ids are JSON integers, not strings;
    a request may send them as integers or as their usual spelling in text."""
    from csv_exports import INT_ITEMS, export_of_log, write_log  # tests/ is on the path

    running = Running(export_of_log(write_log(tmp_path / "log.tsv"), tmp_path), Limits())
    try:
        status, kind, raw = running.request("POST", "/recommend", json.dumps(
            {"histories": [[2, 10], ["2", "10"], ["010"]], "k": 3}).encode())
    finally:
        running.stop()
    assert (status, kind) == (200, "application/json")
    results = json.loads(raw)["results"]
    assert all(type(i) is int and i in INT_ITEMS for r in results for i in r["item_ids"])
    assert results[0]["item_ids"] == results[1]["item_ids"] and results[0]["unknown"] == results[1]["unknown"] == []
    assert results[2]["unknown"] == ["010"] and results[2]["fallback"] is True
    assert not re.search(rb'"item_ids": ?\[[^\]]*"', raw)  # no quoted id anywhere


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


def test_deeply_nested_json_gets_400_not_a_recursion_error(tmp_path, text_ids):
    running = Running(export(tmp_path, text_ids), max_body_bytes=1 << 20)
    try:
        for raw in (
            b"[" * 100_000 + b"]" * 100_000,  # deeper than the JSON decoder goes
            b'{"histories": [["item-1", ' + b"[" * 900 + b"]" * 900 + b"]]}",  # decodes, then too deep
            b'{"histories": [["item-1", ' + b"[" * 40 + b"]" * 40 + b"]]}",
            b'{"histories": [["item-1", ' + b'{"a": ' * 40 + b"1" + b"}" * 40 + b"]]}",
        ):
            status, got = running.post(raw)
            assert status == 400 and got == {"error": "the body nests lists and objects more than 32 deep"}
        # an id that is a (shallow) list names no item and comes back as sent
        status, got = running.post({"histories": [[text_ids[0], [[1]]]], "k": 2})
        assert status == 200 and got["results"][0]["unknown"] == [[[1]]]
        status, got = running.post({"dataframe_records": [{"history": [text_ids[0], [1]]}]}, "/invocations")
        assert status == 200 and got["predictions"][0]["unknown"] == [[1]]
    finally:
        running.stop()


def test_a_huge_integer_gets_400_and_one_line(text_server):
    status, got = text_server.post(b'{"histories": [["item-1"]], "k": ' + b"7" * 5000 + b"}")
    assert status == 400 and got == {"error": f"the body has an integer of more than {sys.get_int_max_str_digits()} digits"}
    status, got = text_server.post(b'{"histories": [["item-1"]], "k": ' + b"7" * 4000 + b"}")  # readable, out of range
    assert status == 400 and got["error"].startswith("k must be an integer from 1 to 20 (the server's limit), got 777")
    assert len(got["error"]) < 150 and "\n" not in got["error"]


@pytest.mark.parametrize(
    "raw, message",
    [
        (b'{"histories": [["item-1"]], "k": NaN}', "the body is not valid JSON (NaN is not a JSON number)"),
        (b'{"histories": [["item-1", Infinity]]}', "the body is not valid JSON (Infinity is not a JSON number)"),
        (b'{"histories": [["item-1", -Infinity]]}', "the body is not valid JSON (-Infinity is not a JSON number)"),
        (b'{"histories": [["item-1", 1e400]]}', "the body has a number out of range: 1e400"),
        (b'{"histories": [["item-1"]], "k": -1E999}', "the body has a number out of range: -1E999"),
    ],
)
def test_nan_and_infinity_are_refused(text_server, raw, message):
    status, got = text_server.post(raw)
    assert status == 400 and got == {"error": message}


def test_a_chunked_body_is_read_and_bounded_while_it_streams(text_server, text_ids):
    def chunks(body: bytes, size: int = 1000):
        return (body[i : i + size] for i in range(0, len(body), size))

    conn = http.client.HTTPConnection("127.0.0.1", text_server.port, timeout=30)
    try:
        small = json.dumps({"histories": [text_ids[:3]], "k": 2}).encode()
        conn.request("POST", "/recommend", body=chunks(small), encode_chunked=True)
        response = conn.getresponse()
        assert response.status == 200 and len(strict_json(response.read())["results"]) == 1
        big = json.dumps({"histories": [text_ids * 40] * 8}).encode()
        assert len(big) > MAX_BODY
        conn.request("POST", "/recommend", body=chunks(big), encode_chunked=True)
        response = conn.getresponse()
        assert response.status == 413
        assert strict_json(response.read()) == {"error": f"the body is more than {MAX_BODY} bytes, the limit"}
        conn.request("POST", "/recommend", body=small)  # the rest of the big body was read and dropped
        assert conn.getresponse().status == 200
    finally:
        conn.close()


def test_a_body_over_the_limit_is_refused_by_its_length_before_it_is_read(text_server, text_ids):
    """A declared length over the limit is answered at once, even before the body is sent."""
    head = b"POST /recommend HTTP/1.1\r\nHost: x\r\nContent-Length: 2000000\r\n\r\n"
    error = b'{"error": "the body is 2000000 bytes; the limit is 16384"}'
    answer, closed = exchange(text_server.port, head, until=error)  # no body sent at all
    assert statuses(answer) == [413] and answer.endswith(error) and not closed


REQUEST = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"


@pytest.mark.parametrize(
    "head, body",
    [
        # Content-Length and Transfer-Encoding together (refused here: h11 would read the chunks)
        (b"Content-Length: 5\r\nTransfer-Encoding: chunked", b"0\r\n\r\n" + REQUEST),
        (b"Transfer-Encoding: chunked\r\nContent-Length: 40", b"0\r\n\r\n" + REQUEST),
        # differing lengths, in two headers or in one (refused by h11)
        (b"Content-Length: 2\r\nContent-Length: 40", b"{}" + REQUEST),
        (b"Content-Length: 2, 40", b"{}" + REQUEST),
        # lengths and codings that are not what they seem (refused by h11)
        (b"Content-Length: +2", b"{}" + REQUEST),
        (b"Content-Length: -1", REQUEST),
        (b"Content-Length: 0x2", b"{}" + REQUEST),
        (b"Transfer-Encoding: gzip, chunked", b"0\r\n\r\n" + REQUEST),
        (b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked", b"0\r\n\r\n" + REQUEST),
        (b"Transfer-Encoding : chunked", b"0\r\n\r\n" + REQUEST),
        (b"Transfer-Encoding: chunked", b"zz\r\n{}\r\n0\r\n\r\n" + REQUEST),  # a bad chunk size
    ],
)
def test_request_smuggling_patterns_are_refused_and_the_connection_closed(text_server, head, body):
    """Each framing a proxy and this server could read differently: one 400 (JSON), the connection
    closed, and the request hidden behind it never answered."""
    answer, closed = exchange(text_server.port, b"POST /recommend HTTP/1.1\r\nHost: x\r\n" + head + b"\r\n\r\n" + body)
    assert statuses(answer) == [400] and closed, answer
    got = strict_json(answer.split(b"\r\n\r\n", 1)[1])
    assert set(got) == {"error"} and "\n" not in got["error"]


def test_a_repeated_identical_length_is_one_length(text_server):
    """``Content-Length: 2`` twice is read as one length of 2 (RFC 9110 8.6 allows it; h11 does it): the
    same framing whichever header a proxy reads, so the request behind the body is a request of its own."""
    body = b'{"histories": [["item-1"]], "k": 2}'
    head = b"POST /recommend HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\nContent-Length: %d\r\n\r\n" % (len(body), len(body))
    answer, closed = exchange(text_server.port, head + body + b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert statuses(answer) == [200, 200] and closed


def test_a_body_needs_a_content_length_or_chunks(text_server):
    conn = http.client.HTTPConnection("127.0.0.1", text_server.port, timeout=30)
    try:
        conn.putrequest("POST", "/recommend")
        conn.endheaders()
        response = conn.getresponse()
        assert response.status == 411
        assert json.loads(response.read()) == {"error": "a Content-Length header (or a chunked body) is required"}
    finally:
        conn.close()


def test_wrong_paths_and_methods(text_server):
    status, _, raw = text_server.request("GET", "/recommend")
    assert status == 405 and json.loads(raw) == {"error": "/recommend takes POST, not GET"}
    status, _, raw = text_server.request("POST", "/health", b"{}")
    assert status == 405 and json.loads(raw) == {"error": "/health takes GET, not POST"}
    status, _, raw = text_server.request("GET", "/predict")
    paths = "POST /recommend, GET /health, POST /invocations, GET /docs, GET /openapi.json"
    assert status == 404 and json.loads(raw) == {"error": f"no such path; the paths are {paths}"}
    status, _, raw = text_server.request("GET", "/recommend/")  # no redirect to /recommend
    assert status == 404


@pytest.mark.parametrize("method", ["HEAD", "OPTIONS", "PUT", "DELETE", "PATCH", "TRACE"])
def test_other_methods_get_405_with_allow(text_server, method):
    conn = http.client.HTTPConnection("127.0.0.1", text_server.port, timeout=30)
    try:
        conn.request(method, "/recommend")
        response = conn.getresponse()
        raw = response.read()
        assert response.status == 405 and response.getheader("Allow") == "POST"
        assert response.getheader("Content-Type") == "application/json"
        if method != "HEAD":  # a HEAD answer has no body
            assert json.loads(raw) == {"error": f"/recommend takes POST, not {method}"}
    finally:
        conn.close()
    status, kind, raw = text_server.request("HEAD", "/health")
    assert (status, kind, raw) == (200, "application/json", b"")


def test_a_refused_body_never_becomes_the_next_request(text_server, text_ids):
    """A body sent to a wrong path is not read by the application; the server still reads it to its
    end as a body (by its length), so that the next request on the connection is the client's next one."""
    conn = http.client.HTTPConnection("127.0.0.1", text_server.port, timeout=30)
    try:
        conn.request("POST", "/health", body=b"GET /predict HTTP/1.1\r\nHost: x\r\n\r\n")
        response = conn.getresponse()
        assert response.status == 405
        response.read()
        first = conn.sock
        conn.request("POST", "/recommend", body=json.dumps({"histories": [[text_ids[0]]], "k": 2}).encode())
        response = conn.getresponse()
        assert response.status == 200 and len(json.loads(response.read())["results"]) == 1
        assert conn.sock is first  # the same connection
    finally:
        conn.close()


def test_a_body_that_stops_arriving_gets_408(text_server, monkeypatch):
    from serving import rest

    monkeypatch.setattr(rest, "BODY_TIMEOUT_S", 0.5)
    conn = http.client.HTTPConnection("127.0.0.1", text_server.port, timeout=30)
    try:
        conn.putrequest("POST", "/recommend")
        conn.putheader("Content-Length", "100")
        conn.endheaders(b'{"histories": ')
        response = conn.getresponse()
        assert response.status == 408 and response.getheader("Connection") == "close"
        assert json.loads(response.read()) == {"error": "the body did not arrive within 0.5 s"}
    finally:
        conn.close()


def test_an_internal_error_shows_no_trace_or_path_to_the_client(text_server, text_ids, monkeypatch, caplog):
    secret = str(text_server.directory / "model.safetensors")

    def broken(*args, **kwargs):
        raise RuntimeError(f"cannot read {secret}")

    monkeypatch.setattr(text_server.served, "recommend_rows", broken)
    with caplog.at_level(logging.ERROR, logger="serving.rest"):
        status, _, raw = text_server.request("POST", "/recommend", json.dumps({"histories": [[text_ids[0]]]}).encode())
    assert status == 500 and json.loads(raw) == {"error": "internal error (logged by the server)"}
    assert b"Traceback" not in raw and secret.encode() not in raw and b"/" not in raw
    assert "Traceback" in caplog.text and secret in caplog.text  # the server's log has it all
    monkeypatch.undo()
    assert text_server.post({"histories": [[text_ids[0]]], "k": 2})[0] == 200


def test_a_nan_score_is_a_500_never_unquoted_nan(text_server, text_ids, monkeypatch):
    import numpy as np

    recommend_rows = text_server.served.recommend_rows

    def nan_scores(*args, **kwargs):
        rows, scores = recommend_rows(*args, **kwargs)
        return rows, np.full_like(scores, np.nan)

    monkeypatch.setattr(text_server.served, "recommend_rows", nan_scores)
    status, _, raw = text_server.request("POST", "/recommend", json.dumps({"histories": [[text_ids[0]]]}).encode())
    assert status == 500 and strict_json(raw) == {"error": "internal error (logged by the server)"}


def test_answers_leave_without_waiting_for_an_acknowledgement(text_server, text_ids):
    """Headers and body are separate writes; with Nagle's algorithm on, the body of every answer on a
    kept-alive connection would wait for the client's delayed ACK (about 40 ms on Linux)."""
    conn = http.client.HTTPConnection("127.0.0.1", text_server.port, timeout=30)
    try:
        conn.request("POST", "/recommend", body=json.dumps({"histories": [[text_ids[0]]], "k": 2}).encode())
        assert conn.getresponse().read() and conn.sock is not None  # still open: kept alive
        client = conn.sock.getsockname()
        (served,) = [c for c in text_server.server.uvicorn.server_state.connections if c.client == client]
        assert served.transport.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    finally:
        conn.close()


def test_keep_alive_for_http_1_1_and_1_0(text_server, text_ids):
    conn = http.client.HTTPConnection("127.0.0.1", text_server.port, timeout=30)
    try:
        used = []
        for _ in range(3):
            conn.request("POST", "/recommend", body=json.dumps({"histories": [[text_ids[0]]], "k": 2}).encode())
            response = conn.getresponse()
            assert response.status == 200 and response.read()
            used.append(conn.sock)
        assert all(sock is used[0] for sock in used)  # one connection for all three
    finally:
        conn.close()
    # HTTP/1.0 asking to keep the connection: answered at once, and the connection closed right after
    # (uvicorn's h11 keeps HTTP/1.1 connections only), not held open
    started = time.monotonic()
    answer, closed = exchange(text_server.port, b"GET /health HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", wait=10)
    assert closed and time.monotonic() - started < 5
    assert statuses(answer) == [200] and strict_json(answer.split(b"\r\n\r\n", 1)[1])["status"] == "ok"
    body = json.dumps({"histories": [[text_ids[0]]], "k": 2}).encode()
    answer, closed = exchange(
        text_server.port,
        b"POST /recommend HTTP/1.0\r\nConnection: keep-alive\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body),
    )
    assert closed and statuses(answer) == [200]


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


def test_model_work_leaves_the_event_loop_free(text_server, text_ids, monkeypatch):
    """A request the model takes 2 s over does not hold up the answers to others."""
    recommend_rows = text_server.served.recommend_rows

    def slow(*args, **kwargs):
        time.sleep(2)
        return recommend_rows(*args, **kwargs)

    monkeypatch.setattr(text_server.served, "recommend_rows", slow)
    done = {}
    slow_client = threading.Thread(target=lambda: done.update(slow=text_server.post({"histories": [[text_ids[0]]], "k": 2})))
    slow_client.start()
    time.sleep(0.3)
    started = time.monotonic()
    assert text_server.request("GET", "/health")[0] == 200
    assert time.monotonic() - started < 1.5
    slow_client.join(timeout=30)
    assert done["slow"][0] == 200


def test_at_most_concurrency_requests_are_computed_at_once(tmp_path, text_ids, monkeypatch):
    running = Running(export(tmp_path, text_ids), concurrency=2)
    recommend_rows, lock, now, most = running.served.recommend_rows, threading.Lock(), [0], [0]

    def counted(*args, **kwargs):
        with lock:
            now[0] += 1
            most[0] = max(most[0], now[0])
        time.sleep(0.3)
        with lock:
            now[0] -= 1
        return recommend_rows(*args, **kwargs)

    monkeypatch.setattr(running.served, "recommend_rows", counted)
    try:
        results = []
        clients = [threading.Thread(target=lambda: results.append(running.post({"histories": [[text_ids[0]]]})[0]))
                   for _ in range(6)]
        for client in clients:
            client.start()
        for client in clients:
            client.join(timeout=60)
        assert results == [200] * 6 and most[0] == 2
    finally:
        running.stop()


@pytest.fixture(scope="module")
def answer_of_recommend(text_server, text_ids):
    """/recommend's answer to three histories (one with an unknown id, one empty), k=4."""
    histories = [text_ids[:3], ["nope", text_ids[5]], []]
    status, got = text_server.post({"histories": histories, "k": 4})
    assert status == 200
    return histories, got["results"]


@pytest.mark.parametrize("kind", ["dataframe_split", "dataframe_records", "inputs"])
def test_invocations_answers_like_recommend_in_each_mlflow_format(text_server, answer_of_recommend, kind):
    histories, results = answer_of_recommend
    data = {
        "dataframe_split": {"index": [7, 8, 9], "columns": ["user", "history"], "data": [[i, h] for i, h in enumerate(histories)]},
        "dataframe_records": [{"history": h, "user": i} for i, h in enumerate(histories)],
        "inputs": [{"history": h} for h in histories],
    }[kind]
    status, got = text_server.post({kind: data, "params": {"k": 4}}, "/invocations")
    assert status == 200 and got == {"predictions": results}
    if kind == "inputs":  # one object: one history, as MLflow reads it
        status, got = text_server.post({"inputs": {"history": histories[0]}, "params": {"k": 4}}, "/invocations")
        alone = text_server.post({"histories": histories[:1], "k": 4})[1]["results"]  # a batch of one, like it
        assert status == 200 and got == {"predictions": alone}


@pytest.mark.parametrize(
    "body, status, message",
    [
        ({"inputs": [{"history": ["item-1"]}], "params": {"k": 0}}, 400, "k must be an integer from 1 to 20 (the server's limit), got 0"),
        ({"inputs": [{"history": ["item-1"]}], "params": {"kk": 3}}, 400, 'unknown parameter "kk"; the parameters are k, exclude_seen, strict'),
        ({"inputs": [{"history": ["item-1"]}], "params": {"histories": [[]]}}, 400, 'unknown parameter "histories"'),
        ({"inputs": [{"history": ["item-1"]}], "params": [3]}, 400, "params must be a JSON object"),
        ({"inputs": [{"history": ["item-1"]}], "params": []}, 400, "params must be a JSON object"),
        ({"inputs": [{"history": ["x"]}], "params": {"strict": True}}, 400, '1 unknown item id(s) (strict): histories[0]: "x"'),
        ({"inputs": [{"history": ["item-1"]}], "dataframe_records": []}, 400, "exactly one of dataframe_split, dataframe_records, inputs"),
        ({"instances": [{"history": ["item-1"]}]}, 400, "exactly one of dataframe_split, dataframe_records, inputs"),
        ({"histories": [["item-1"]]}, 400, "exactly one of dataframe_split, dataframe_records, inputs"),
        ([["item-1"]], 400, "the request must be a JSON object with one of dataframe_split, dataframe_records, inputs"),
        ({"dataframe_split": {"data": [[["item-1"]]]}}, 400, 'dataframe_split needs "columns" with "history"'),
        ({"dataframe_split": {"columns": ["history"], "data": [["item-1"]], "x": 1}}, 400, "dataframe_split must be"),
        ({"dataframe_split": {"columns": ["history"], "data": [[["a"], 2]]}}, 400, "rows of 1 value(s), one per column"),
        ({"dataframe_records": [{"hist": ["item-1"]}]}, 400, 'dataframe_records[0] must be a record with a "history"'),
        ({"dataframe_records": {"history": ["item-1"]}}, 400, 'dataframe_records must be a list of records'),
        ({"dataframe_records": [{"history": "item-1"}]}, 400, 'histories[0] must be a list of item ids, got "item-1"'),
        ({"dataframe_records": []}, 400, "histories must be a non-empty list"),
        ({"dataframe_records": [{"history": ["item-1"]}] * 9}, 413, "at most 8 histories per request, got 9"),
    ],
)
def test_invocations_refuses_what_it_cannot_read_in_one_line(text_server, body, status, message):
    got_status, got = text_server.post(body, "/invocations")
    assert got_status == status and message in got["error"] and "\n" not in got["error"]


def test_the_openapi_page_describes_requests_and_responses(text_server):
    status, kind, raw = text_server.request("GET", "/openapi.json")
    assert (status, kind) == (200, "application/json")
    spec = json.loads(raw)
    paths = spec["paths"]
    assert set(paths) == {"/health", "/recommend", "/invocations"}
    recommend = paths["/recommend"]["post"]
    request_schema = recommend["requestBody"]["content"]["application/json"]["schema"]
    assert set(request_schema["properties"]) == {"histories", "k", "exclude_seen", "strict"}
    assert request_schema["required"] == ["histories"]
    assert recommend["responses"]["200"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/RecommendResponse"}
    assert {"400", "413", "500"} <= set(recommend["responses"])
    invocations = paths["/invocations"]["post"]
    assert set(invocations["requestBody"]["content"]["application/json"]["schema"]["properties"]) == {
        "dataframe_split", "dataframe_records", "inputs", "params"}
    schemas = spec["components"]["schemas"]
    assert set(schemas["Recommendation"]["properties"]) == {"item_ids", "scores", "unknown", "fallback"}
    assert set(schemas["InvocationsResponse"]["properties"]) == {"predictions"}
    status, kind, raw = text_server.request("GET", "/docs")
    assert status == 200 and kind.startswith("text/html") and b"/openapi.json" in raw


def test_the_command_reports_a_bad_model_and_a_busy_port(tmp_path, text_server, capsys):
    assert rest_main(["--model", str(tmp_path / "nothing"), "--port", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "no such export directory" in err and "\n" not in err
    assert rest_main(["--model", str(text_server.directory), "--port", str(text_server.port)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: cannot listen on 127.0.0.1:{text_server.port} (") and "\n" not in err


@pytest.mark.parametrize("workers", [1, 2])
def test_the_command_serves_until_sigterm(text_server, text_ids, workers):
    """One process, or ``--workers 2`` processes sharing the port (each loads the model afresh)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    process = subprocess.Popen(
        [sys.executable, "-m", "serving.rest", "--model", str(text_server.directory), "--port", "0", "--workers", str(workers)],
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
        assert process.wait(timeout=60) == 0
        rest = process.stderr.read()
        assert "Traceback" not in rest and "stopped" in rest, rest[-3000:]
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
threading.Thread(target=server.run, daemon=True).start()
body = json.dumps({{"histories": [{text_ids[:3]!r}], "k": 2}}).encode()
with urllib.request.urlopen(f"http://127.0.0.1:{{server.port}}/recommend", body) as answer:
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

    from recsys.logged_models import log_size_models
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
        # MLflow's own scoring (what `mlflow models serve` answers) and /invocations, in each format
        from mlflow.pyfunc import scoring_server

        histories = [[101, 102], ["103", "nope"], []]
        for body in (
            {"dataframe_split": {"columns": ["history"], "data": [[h] for h in histories]}, "params": {"k": 3}},
            {"dataframe_records": [{"history": h} for h in histories], "params": {"k": 3, "exclude_seen": False}},
            {"inputs": [{"history": h} for h in histories]},
            {"inputs": {"history": histories[0]}, "params": {"k": 2}},
        ):
            mlflow_answer = scoring_server.invocations(json.dumps(body), "application/json", pyfunc, pyfunc.metadata.get_input_schema())
            assert mlflow_answer.status == 200
            assert int_server.post(body, "/invocations") == (200, json.loads(mlflow_answer.response)), body
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
