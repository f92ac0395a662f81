"""loadtest.openloop: arrival times, the response parser, overflow, and one real run."""

from __future__ import annotations

import io
import json
import select
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from loadtest.openloop import (
    RequestSpec,
    Response,
    ResponseParser,
    arrival_times,
    read_request_pool,
    request_bytes,
    run_open_loop,
    score_requests,
    write_request_pool,
)
from loadtest.outcomes import summarize
from loadtest.shapes import ArrivalSchedule, constant

REPO = Path(__file__).resolve().parents[1]

# -- arrival times ------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_arrival_rate_is_the_stage_rate(seed: int) -> None:
    t, st = arrival_times(constant(1000, 20), seed)
    assert abs(len(t) - 20_000) < 5 * 20_000 ** 0.5  # Poisson count: 5 sigma
    gaps = np.diff(t)
    assert abs(gaps.mean() - 1e-3) < 0.05e-3 and (gaps >= 0).all()
    assert 0.85e-3 < gaps.std() < 1.15e-3  # exponential gaps: sd = mean
    assert (st == 0).all() and t.min() >= 0 and t.max() < 20


def test_stages_are_respected() -> None:
    s = ArrivalSchedule(((2.0, 100.0), (1.0, 0.0), (3.0, 500.0), (0.5, 2000.0)))
    t, st = arrival_times(s, 3)
    bounds = [(0.0, 2.0), (2.0, 3.0), (3.0, 6.0), (6.0, 6.5)]
    for k, ((lo, hi), (d, r)) in enumerate(zip(bounds, s.stages, strict=True)):
        tk = t[st == k]
        assert ((tk >= lo) & (tk < hi)).all()
        assert abs(len(tk) - d * r) <= 5 * (d * r) ** 0.5
    assert (st == 1).sum() == 0
    assert (np.diff(st) >= 0).all() and (np.diff(t) >= 0).all()


def test_same_seed_same_times_and_stages_are_independent() -> None:
    s = ArrivalSchedule(((1.0, 200.0), (1.0, 300.0)))
    a, sa = arrival_times(s, 5)
    b, sb = arrival_times(s, 5)
    assert np.array_equal(a, b) and np.array_equal(sa, sb)
    c, _ = arrival_times(s, 6)
    assert len(a) != len(c) or not np.array_equal(a, c)
    other = ArrivalSchedule(((1.0, 50.0), (1.0, 300.0)))  # only stage 0 changes
    d, sd = arrival_times(other, 5)
    assert np.array_equal(a[sa == 1], d[sd == 1])


# -- the response parser ------------------------------------------------------------------------

OK = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 10\r\n\r\n"
      b'{"a":"\r\n"}')
CHUNKED = (b"HTTP/1.1 503 Service Unavailable\r\ntransfer-encoding: gzip, chunked\r\n\r\n"
           b"4;ext=1\r\n{\"er\r\nA\r\nror\":\"queu\r\n7\r\ne_full\"\r\n1\r\n}\r\n"
           b"0\r\nX-Trailer: 1\r\n\r\n")
CASES = [
    (OK, [Response(200, b'{"a":"\r\n"}', True)]),
    (OK + CHUNKED, [Response(200, b'{"a":"\r\n"}', True),
                    Response(503, b'{"error":"queue_full"}', True)]),
    (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\nServer: x\r\n\r\n"
     b"HTTP/1.1 504 Gateway Timeout\r\ncontent-LENGTH:   3  \r\nConnection: Close\r\n\r\nabc",
     [Response(204, b"", True), Response(504, b"abc", False)]),
    (b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n",
     [Response(200, b"", True)]),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nhi",
     [Response(200, b"hi", True)]),
]


def _feed_all(pieces: list[bytes]) -> list[Response]:
    p = ResponseParser()
    out: list[Response] = []
    for piece in pieces:
        out += p.feed(piece)
    assert p.feed_eof() is None
    return out


@pytest.mark.parametrize("raw,expected", CASES)
def test_parser_at_every_byte_boundary(raw: bytes, expected: list[Response]) -> None:
    assert _feed_all([raw]) == expected
    assert _feed_all([raw[i:i + 1] for i in range(len(raw))]) == expected
    for cut in range(len(raw) + 1):
        assert _feed_all([raw[:cut], raw[cut:]]) == expected, cut


def test_parser_close_delimited_body() -> None:
    raw = b"HTTP/1.0 200 OK\r\nServer: old\r\n\r\nhello"
    for cut in range(len(raw) + 1):
        p = ResponseParser()
        assert p.feed(raw[:cut]) == [] and p.feed(raw[cut:]) == []
        assert p.feed_eof() == Response(200, b"hello", False)


@pytest.mark.parametrize("raw", [
    b"HTTP/2 200 OK\r\n\r\n",
    b"HTTP/1.1 2x0 OK\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nab\r\n",
    b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
])
def test_parser_rejects_garbage(raw: bytes) -> None:
    with pytest.raises(ValueError):
        ResponseParser().feed(raw)


def test_parser_rejects_eof_mid_response() -> None:
    p = ResponseParser()
    assert p.feed(OK[:-3]) == []
    with pytest.raises(ValueError):
        p.feed_eof()


# -- pool and wire format -----------------------------------------------------------------------

def test_request_pool_round_trip_with_binary_bodies(tmp_path: Path) -> None:
    reqs = [RequestSpec("/v2/models/m/infer",
                        {"Content-Type": "application/octet-stream",
                         "Inference-Header-Content-Length": "120"}, bytes(range(256)) * 3, 7),
            *score_requests([(b'{"candidates":[]}', 300)], headers={"X-Request-Timeout-Ms": "50"})]
    write_request_pool(tmp_path / "pool.jsonl", reqs)
    assert read_request_pool(tmp_path / "pool.jsonl") == reqs
    with pytest.raises(ValueError, match="line 2"):
        read_request_pool(io.StringIO('{"path": "/a", "body_b64": ""}\n{"body_b64": "x"}\n'))


def test_request_bytes() -> None:
    spec = RequestSpec("/v1/score", {"Content-Length": "9", "A": "b"}, b"xyz", 1)
    assert request_bytes("h:1", "/api", spec) == (
        b"POST /api/v1/score HTTP/1.1\r\nHost: h:1\r\nContent-Length: 3\r\nA: b\r\n\r\nxyz")
    with pytest.raises(ValueError):
        request_bytes("h", "", RequestSpec("/", {"A": "b\r\nEvil: 1"}, b"", 1))


# -- runs ---------------------------------------------------------------------------------------

def test_overflow_when_the_server_never_answers() -> None:
    """Two connections allowed, both stuck: every later arrival is client_overflow."""
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(16)  # the kernel accepts the connections; nobody ever answers
        url = f"http://127.0.0.1:{srv.getsockname()[1]}"
        schedule = constant(100, 0.3)
        n = len(arrival_times(schedule, 0)[0])
        t0 = time.monotonic()
        res = run_open_loop(url, score_requests([(b"{}", 4)]), schedule, max_connections=2,
                            timeout_s=1.0, warm_connections=0)
        wall = time.monotonic() - t0
    # the first timeout frees a connection only after the last arrival (0.3 s < 1 s)
    outcomes = {k: e["count"] for k, e in res["stages"][0].items()}
    assert outcomes == {"connection_error": 2, "client_overflow": n - 2}
    assert res["stages"][0]["client_overflow"]["rows"] == 4 * (n - 2)
    assert res["requests_sent"] == 2 and res["peak_connections"] == 2
    assert wall < 0.3 + 1.0 + 5.0


SERVER = r'''
import asyncio, json, sys

def answer(status, body, extra=b""):
    return (b"HTTP/1.1 %d X\r\nContent-Length: %d\r\n%s\r\n" % (status, len(body), extra)) + body

async def handle(reader, writer):
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            path = lines[0].split()[1]
            n = 0
            for line in lines[1:]:
                k, _, v = line.partition(":")
                if k.strip().lower() == "content-length":
                    n = int(v)
            await reader.readexactly(n)
            if path == "/hang":
                await reader.read()  # until the client gives up
                return
            if path == "/drop":
                return  # closes without an answer
            if path == "/slow":
                await asyncio.sleep(0.03)
            if path in ("/ok", "/slow"):
                writer.write(answer(200, b'{"scores":[0.5]}'))
            elif path == "/busy":
                writer.write(answer(503, b'{"error":"queue_full"}'))
            elif path == "/late":
                writer.write(answer(504, b'{"error":"deadline_exceeded"}'))
            elif path == "/close":
                writer.write(answer(200, b"{}", b"Connection: close\r\n"))
                await writer.drain()
                return
            elif path == "/chunked":
                writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\n{\"a")
                await writer.drain()
                await asyncio.sleep(0.001)
                writer.write(b"\r\n3\r\n\":1\r\n1\r\n}\r\n0\r\n\r\n")
            else:
                writer.write(answer(500, b'{"error":"boom"}'))
            await writer.drain()
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
        pass
    finally:
        writer.close()

async def main():
    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    print(srv.sockets[0].getsockname()[1], flush=True)
    await srv.serve_forever()

asyncio.run(main())
'''

PATHS = ["/ok", "/busy", "/late", "/err", "/close", "/chunked", "/slow", "/hang", "/drop"]
KIND = {"/ok": "ok", "/busy": "503_queue_full", "/late": "504_deadline_exceeded",
        "/err": "http_500", "/close": "ok", "/chunked": "ok", "/slow": "ok",
        "/hang": "connection_error", "/drop": "connection_error"}


@pytest.fixture(scope="module")
def server_url() -> Iterator[str]:
    proc = subprocess.Popen([sys.executable, "-c", SERVER], stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 20.0)
        assert ready, "test server did not start"
        yield f"http://127.0.0.1:{int(proc.stdout.readline())}"
    finally:
        proc.kill()
        proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()


def _pool() -> list[RequestSpec]:
    return [RequestSpec(p, {"Content-Type": "application/json"}, b'{"x":' + b"1" * 3000 + b"}",
                        k + 1) for k, p in enumerate(PATHS)]


def _expected(schedule: ArrivalSchedule) -> tuple[Counter[str], Counter[str]]:
    """(count, rows) by kind of a round-robin run over the pool with seed 0."""
    n = len(arrival_times(schedule, 0)[0])
    counts: Counter[str] = Counter()
    rows: Counter[str] = Counter()
    for i in range(n):
        k = i % len(PATHS)
        counts[KIND[PATHS[k]]] += 1
        rows[KIND[PATHS[k]]] += k + 1
    return counts, rows


def _check(res: dict, schedule: ArrivalSchedule, timeout_s: float, max_connections: int) -> None:
    counts, rows = _expected(schedule)
    stage = res["stages"][0]
    assert {k: e["count"] for k, e in stage.items()} == dict(counts)
    assert {k: e["rows"] for k, e in stage.items()} == dict(rows)
    assert len(stage["ok"]["latency_ms"]) == counts["ok"] == len(stage["ok"]["send_latency_ms"])
    n_hang = sum(1 for i in range(res["requests_scheduled"]) if PATHS[i % len(PATHS)] == "/hang")
    timed_out = [x for x in stage["connection_error"]["latency_ms"] if x >= timeout_s * 1e3]
    assert len(timed_out) >= n_hang  # timed out, counted from the arrival time
    s = summarize(stage, schedule.total_s)
    assert s["served"] == counts["ok"] and 0 < s["p50_ms"] <= s["p99_ms"]
    assert res["requests_sent"] == res["requests_scheduled"] == sum(counts.values())
    assert 0 <= res["p50_lag_s"] <= res["p99_lag_s"] <= res["max_lag_s"]
    assert 1 <= res["peak_connections"] <= max_connections
    assert res["elapsed_s"] < schedule.total_s + timeout_s + 3.0
    assert res["schedule"] == [[schedule.total_s, schedule.stages[0][1]]]


def test_cli_run_against_a_real_server(server_url: str, tmp_path: Path) -> None:
    schedule, timeout_s = constant(150, 1.0), 0.5
    write_request_pool(tmp_path / "pool.jsonl", _pool())
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "loadtest.openloop", "--url", server_url, "--pool",
         str(tmp_path / "pool.jsonl"), "--schedule", schedule.to_json(), "--out",
         str(tmp_path / "res.json"), "--timeout-s", str(timeout_s), "--max-connections", "64",
         "--order", "round_robin", "--per-request"],
        cwd=REPO, capture_output=True, text=True, timeout=60)
    wall = time.monotonic() - t0
    assert proc.returncode == 0, proc.stderr
    assert "stage 0: offered 150 rps" in proc.stdout
    res = json.loads((tmp_path / "res.json").read_text())
    _check(res, schedule, timeout_s, 64)
    assert wall < schedule.total_s + timeout_s + 20.0  # interpreter start-up included
    rq = res["requests"]
    errors = Counter(e for e, k in zip(rq["error"], rq["kind"], strict=True) if k != "ok")
    assert errors["queue_full"] == res["stages"][0]["503_queue_full"]["count"]
    assert errors["deadline_exceeded"] == res["stages"][0]["504_deadline_exceeded"]["count"]
    assert set(rq["status"]) == {200, 503, 504, 500, None}


def test_stdlib_loop_and_loop_timers(server_url: str) -> None:
    schedule, timeout_s = constant(120, 0.8), 0.4
    res = run_open_loop(server_url, _pool(), schedule, timeout_s=timeout_s, max_connections=32,
                        order="round_robin", timer="loop", use_uvloop=False, warm_connections=1)
    assert res["event_loop"] == "asyncio" and res["timer"] == "loop"
    _check(res, schedule, timeout_s, 32)


def test_cli_server_down_is_one_line(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    write_request_pool(tmp_path / "pool.jsonl", score_requests([(b"{}", 1)]))
    proc = subprocess.run(
        [sys.executable, "-m", "loadtest.openloop", "--url", f"http://127.0.0.1:{port}",
         "--pool", str(tmp_path / "pool.jsonl"), "--schedule", "[[1, 10]]"],
        cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "cannot connect" in proc.stderr
