"""End to end: a real ``mldcn serve`` process, real exported models, real HTTP and /metrics.

Server S1 serves ``mldcn`` (large preset, ~10 ms per 1000 rows here) and ``mlp`` (cheap) with
``timeout_action=degrade`` to ``mlp``. Server S2 has 1024-row batches, a long queue delay
(300 ms) and a queue of one request, so that merging, chunking, a full queue and a disconnected
client happen deterministically.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from service_support import (
    Models,
    Server,
    exported_models,
    metric,
    request_for,
    run_server,
    torch_scores,
)


@pytest.fixture(scope="module")
def models() -> Models:
    return exported_models()


@pytest.fixture(scope="module")
def s1(models: Models) -> Iterator[Server]:
    env = {"MLDCN_TIMEOUT_ACTION": "degrade", "MLDCN_FALLBACK_MODEL": "mlp",
           "MLDCN_DEFAULT_MODEL": "mldcn", "MLDCN_DEFAULT_TIMEOUT_MS": "200",
           "MLDCN_MAX_CANDIDATES": "4096", "MLDCN_MAX_BODY_BYTES": str(1 << 20)}
    with run_server(models.repo, env) as server:
        yield server


@pytest.fixture(scope="module")
def s2(models: Models) -> Iterator[Server]:
    env = {"MLDCN_MAX_BATCH_SIZE": "1024", "MLDCN_MAX_QUEUE_DELAY_MS": "300",
           "MLDCN_MAX_QUEUE_SIZE": "1", "MLDCN_DEFAULT_TIMEOUT_MS": "3000"}
    with run_server(models.repo, env) as server:
        yield server


# -- scores ---------------------------------------------------------------------------------------
def test_scores_equal_pytorch_on_real_rows(s1: Server, models: Models) -> None:
    run = models.runs["mldcn"]
    # each of 24 real rows scored exactly as it is (one candidate per request) ...
    for i in range(24):
        body = request_for(run, i, [i])
        status, out = s1.score(body)
        assert status == 200, out
        np.testing.assert_allclose(out["scores"], torch_scores(run, body), atol=1e-5, rtol=0)
    # ... and 512 real candidates broadcast against one user, in both formats
    for user_row in (0, 7):
        for columnar in (True, False):
            body = request_for(run, user_row, list(range(512)), columnar=columnar)
            status, out = s1.score(body)
            assert status == 200, out
            assert out["model"] == "mldcn" and out["version"] == 1 and not out["degraded"]
            np.testing.assert_allclose(out["scores"], torch_scores(run, body), atol=1e-5, rtol=0)


def test_row_and_columnar_formats_agree(s1: Server, models: Models) -> None:
    run = models.runs["mlp"]
    rows = list(range(100, 164))
    a = s1.score({**request_for(run, 3, rows, columnar=True), "model": "mlp",
                  "request_id": "r-1"})
    b = s1.score({**request_for(run, 3, rows, columnar=False), "model": "mlp"})
    assert a[0] == b[0] == 200
    assert a[1]["scores"] == b[1]["scores"] and len(a[1]["scores"]) == 64
    assert a[1]["request_id"] == "r-1" and a[1]["model"] == "mlp"
    t = a[1]["timing"]
    assert 0 <= t["queue_ms"] <= t["total_ms"] and 0 < t["compute_ms"] <= t["total_ms"]


def test_missing_fields_and_unknown_categories_score(s1: Server) -> None:
    status, out = s1.score({"user": {}, "candidates": [{}, {"ad_cat0": "never-seen"}]})
    assert status == 200 and len(out["scores"]) == 2


# -- status codes ---------------------------------------------------------------------------------
BAD_REQUESTS: list[tuple[str, bytes, str]] = [
    ("not json", b"{user: 1", "body"),
    ("not an object", b"[1]", "body"),
    ("timeout too large", b'{"user": {}, "candidates": [{}], "timeout_ms": 1' + b"0" * 400 + b"}",
     "timeout_ms"),
    ("empty body", b"", "body"),
    ("not utf-8", b'{"user": {"user_cat0": "\xff"}, "candidates": [{}]}', "body"),
    ("nested too deeply", b'{"user": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "body"),
    ("user missing", b'{"candidates": [{}]}', "user"),
    ("extra key", b'{"user": {}, "candidates": [{}], "foo": 1}', "foo"),
    ("NaN", b'{"user": {}, "candidates": {"ad_num0": [1.0, NaN]}}', "candidates.ad_num0[1]"),
    ("inf", b'{"user": {"user_num0": 1e999}, "candidates": [{}]}', "user.user_num0"),
    ("list value", b'{"user": {"user_cat0": [1]}, "candidates": [{}]}', "user.user_cat0"),
    ("string in numeric", b'{"user": {}, "candidates": [{}, {"ad_num0": "3"}]}',
     "candidates[1].ad_num0"),
    ("unknown field", b'{"user": {"nope": 1}, "candidates": [{}]}', "user.nope"),
    ("wrong side", b'{"user": {"ad_cat0": "1"}, "candidates": [{}]}', "user.ad_cat0"),
    ("ragged columns", b'{"user": {}, "candidates": {"ad_cat0": ["1"], "ad_num0": [1, 2]}}',
     "candidates.ad_num0"),
    ("no candidates", b'{"user": {}, "candidates": []}', "candidates"),
    ("too many", json.dumps({"user": {}, "candidates": {"ad_cat0": ["1"] * 4097}}).encode(),
     "candidates"),
    ("long string", json.dumps({"user": {"user_cat0": "x" * 300}, "candidates": [{}]}).encode(),
     "user.user_cat0"),
    ("bad timeout", b'{"user": {}, "candidates": [{}], "timeout_ms": -1}', "timeout_ms"),
]


@pytest.mark.parametrize("case,body,field", BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_input_is_422_naming_the_field(s1: Server, case: str, body: bytes,
                                           field: str) -> None:
    status, out = s1.score(body)
    assert status == 422, out
    assert out["error"] == "invalid_request"
    assert field in [e["field"] for e in out["errors"]], out
    assert "Traceback" not in json.dumps(out)


def test_bad_header_is_422(s1: Server) -> None:
    status, out = s1.score({"user": {}, "candidates": [{}]}, {"X-Request-Timeout-Ms": "soon"})
    assert status == 422 and "x-request-timeout-ms" in out["errors"][0]["field"].lower()


def test_unknown_model_is_404_and_body_limit_413(s1: Server) -> None:
    status, out = s1.score({"model": "nope", "user": {}, "candidates": [{}]})
    assert status == 404 and out["error"] == "model_not_found"
    status, _, data = s1.request("POST", "/v1/score", b" " * ((1 << 20) + 1))
    assert status == 413 and json.loads(data)["error"] == "body_too_large"
    assert s1.request("GET", "/v2/models/nope")[0] == 404
    assert s1.request("GET", "/v2/models/nope/ready")[0] == 404


def test_health_and_model_metadata(s1: Server) -> None:
    assert s1.request("GET", "/v2/health/live")[0] == 200
    assert s1.request("GET", "/v2/health/ready")[0] == 200
    assert s1.request("GET", "/v2/models/mldcn/ready")[0] == 200
    status, _, data = s1.request("GET", "/v2/models/mldcn")
    meta = json.loads(data)
    assert status == 200 and meta["versions"] == ["1"]
    assert [i["name"] for i in meta["inputs"]] == ["cat_ids", "dense"]
    assert meta["parameters"]["provider"] == "CPUExecutionProvider"
    assert meta["parameters"]["fallback"] is False and meta["parameters"]["default"] is True
    status, _, data = s1.request("GET", "/openapi.json")
    assert status == 200 and "ScoreRequest" in json.loads(data)["components"]["schemas"]


def test_budget_degrade_and_deadline(s1: Server, models: Models) -> None:
    body = request_for(models.runs["mldcn"], 0, list(range(512)) * 8)  # 4096 candidates
    # ~40 ms of mldcn compute cannot fit 25 ms: the fallback (~2 ms) scores it, flagged
    status, out = s1.score({**body, "timeout_ms": 25})
    assert status == 200, out
    assert out["degraded"] is True and out["model"] == "mlp"
    assert out["timing"]["total_ms"] <= 25
    # the header can lower the budget too; 200 ms is plenty for mldcn itself
    status, out = s1.score(body, {"X-Request-Timeout-Ms": "25"})
    assert status == 200 and out["degraded"] is True
    status, out = s1.score(body)
    assert status == 200 and out["degraded"] is False and out["model"] == "mldcn"
    # a budget over before the request is even read: 504 deadline_exceeded
    status, out = s1.score({**body, "timeout_ms": 0.001})
    assert status == 504 and out["error"] == "deadline_exceeded"


def test_metrics_parse_and_counters_move(s1: Server, models: Models) -> None:
    before = s1.metrics()
    body = request_for(models.runs["mldcn"], 1, list(range(10)))
    for _ in range(3):
        assert s1.score(body)[0] == 200
    assert s1.score({"model": "nope", "user": {}, "candidates": [{}]})[0] == 404
    assert s1.score({"user": {"nope": 1}, "candidates": [{}]})[0] == 422
    assert s1.score(b"[]")[0] == 422
    after = s1.metrics()

    def delta(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert delta("mldcn_requests_total", model="mldcn", code="200") == 3
    assert delta("mldcn_requests_total", model="unknown", code="404") == 1
    assert delta("mldcn_requests_total", model="mldcn", code="422") == 1
    assert delta("mldcn_requests_total", model="unknown", code="422") == 1
    assert delta("mldcn_request_duration_seconds_count", model="mldcn", code="200") == 3
    assert delta("mldcn_candidates_per_request_sum", model="mldcn") == 31  # 3 x 10 + 1
    v = {"model": "mldcn", "version": "1"}
    assert delta("mldcn_batch_size_rows_sum", **v) == 30
    assert delta("mldcn_queue_duration_seconds_count", **v) == 3
    assert delta("mldcn_deadline_slack_seconds_count", model="mldcn") == 3
    assert metric(after, "mldcn_model_info", model="mldcn", version="1",
                  provider="CPUExecutionProvider", precision="fp32", arch="mldcn") == 1
    assert metric(after, "mldcn_model_flops_per_example", **v) > 0
    assert metric(after, "mldcn_inflight_requests") == 0
    assert metric(after, "mldcn_latency_model_per_row_seconds", model="mldcn") > 0
    # batch sizes are in rows with power-of-two buckets; latencies in seconds
    assert (("mldcn_batch_size_rows_bucket", tuple(sorted({**v, "le": "1024.0"}.items())))
            in after)
    assert (("mldcn_compute_duration_seconds_bucket",
             tuple(sorted({**v, "le": "0.0005"}.items()))) in after)


# -- batching, queue, disconnects (S2) ------------------------------------------------------------
def _score_later(server: Server, body: dict[str, Any], delay_s: float,
                 results: list[Any]) -> threading.Thread:
    def go() -> None:
        time.sleep(delay_s)
        results.append(server.score(body))

    t = threading.Thread(target=go)
    t.start()
    return t


def _rows(models: Models, n: int, model: str = "mlp") -> dict[str, Any]:
    body = request_for(models.runs[model], 0, [i % 512 for i in range(n)])
    return {**body, "model": model}


def test_dynamic_batcher_merges_concurrent_requests(s2: Server, models: Models) -> None:
    before = s2.metrics()
    results: list[Any] = []
    threads = [_score_later(s2, _rows(models, 2), 0.02 * i, results) for i in range(3)]
    for t in threads:
        t.join(10)
    assert [r[0] for r in results] == [200] * 3
    after = s2.metrics()
    v = {"model": "mlp", "version": "1"}
    batches = (metric(after, "mldcn_batch_size_rows_count", **v)
               - metric(before, "mldcn_batch_size_rows_count", **v))
    rows = (metric(after, "mldcn_batch_size_rows_sum", **v)
            - metric(before, "mldcn_batch_size_rows_sum", **v))
    assert (batches, rows) == (1, 6)  # three requests, one batch
    # a request above max_batch_size (1024) is split into chunks, scores still in order
    body = _rows(models, 2500)
    status, out = s2.score(body)
    assert status == 200
    np.testing.assert_allclose(out["scores"], torch_scores(models.runs["mlp"], body), atol=1e-5)
    after2 = s2.metrics()
    assert (metric(after2, "mldcn_batch_size_rows_count", **v)
            - metric(after, "mldcn_batch_size_rows_count", **v)) == 3


def test_full_queue_is_503_at_once(s2: Server, models: Models) -> None:
    # 4096 mldcn rows run as four 1024-row batches (~10 ms each here); meanwhile the rest of
    # that request occupies the whole queue (max_queue_size 1), so requests are turned away
    results: list[Any] = []
    big = _score_later(s2, _rows(models, 4096, "mldcn"), 0.0, results)
    small = json.dumps(_rows(models, 1, "mldcn")).encode()
    rejected = []
    stop = time.monotonic() + 5.0
    while big.is_alive() and time.monotonic() < stop:
        t0 = time.monotonic()
        status, out = s2.score(small)
        if status == 503:
            rejected.append((time.monotonic() - t0, out["error"]))
        else:
            assert status == 200, out
    big.join(10)
    assert results and results[0][0] == 200
    assert rejected, "no request met a full queue"
    assert all(error == "queue_full" for _, error in rejected)
    assert max(s for s, _ in rejected) < 0.05


def test_disconnected_client_is_never_computed(s2: Server, models: Models) -> None:
    before = s2.metrics()
    body = json.dumps(_rows(models, 3)).encode()
    with socket.create_connection((s2.host, s2.port)) as sock:
        sock.sendall(b"POST /v1/score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        time.sleep(0.05)  # in the batcher's 300 ms collection window
    time.sleep(0.6)
    after = s2.metrics()
    v = {"model": "mlp", "version": "1"}
    assert (metric(after, "mldcn_rejected_requests_total", model="mlp",
                   reason="client_disconnected")
            - metric(before, "mldcn_rejected_requests_total", model="mlp",
                     reason="client_disconnected")) == 1
    assert metric(after, "mldcn_batch_size_rows_sum", **v) == metric(
        before, "mldcn_batch_size_rows_sum", **v)
    assert s2.request("GET", "/v2/health/ready")[0] == 200
    # gone halfway through its body: counted as client-closed (499), never as a 5xx
    with socket.create_connection((s2.host, s2.port)) as sock:
        sock.sendall(b"POST /v1/score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                     b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n"
                     + body[: len(body) // 2])
        time.sleep(0.05)
    time.sleep(0.3)
    later = s2.metrics()
    codes = {labels: later[(name, labels)] - after.get((name, labels), 0.0)
             for name, labels in later if name == "mldcn_requests_total"}
    assert {dict(k)["code"] for k, v in codes.items() if v} == {"499"}, codes
