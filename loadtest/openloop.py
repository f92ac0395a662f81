"""Open-loop HTTP/1.1 load generator: pre-drawn Poisson arrivals sent on time from one core.

One event loop (uvloop when importable) sends request ``i`` at its scheduled arrival time on an
idle keep-alive connection, or on a new one while fewer than ``max_connections`` are open; an
arrival that finds every allowed connection busy is not sent and counts as ``client_overflow``.
Nothing waits for an answer before sending the next request, so a slow server shows up as
latency, timeouts and overflow, never as a lower offered rate.

- Arrival times are drawn up front from the seed (:func:`arrival_times`, stages of an
  :class:`~loadtest.shapes.ArrivalSchedule`); requests are picked from a pool of
  (path, headers, body, candidates) (:class:`RequestSpec`) at random (seeded) or round-robin.
- The pacer sleeps on a Linux ``timerfd`` armed at each absolute arrival time (tens of
  microseconds of wake-up error instead of the event loop's millisecond timers; ``timer="loop"``
  or a platform without timerfd falls back to the loop's timers).
- Latency is measured from the *scheduled* arrival time (client lag counts against the server,
  as it would for a real client) and also from the send time; the send lag is kept per request.
- Every wait is bounded: a request not answered ``timeout_s`` after its arrival time is a
  ``connection_error`` (its connection is dropped), and the run ends at the latest
  ``timeout_s`` (plus a little) after the schedule.

The result has the shape of :meth:`loadtest.outcomes.Recorder.to_dict` (``schedule``,
``stages`` of ``{kind: {count, rows, latency_ms}}``, ``max_lag_s``, ``elapsed_s``), so that
:func:`loadtest.outcomes.summarize` reads it; see :func:`run_open_loop` for the extra keys.

    python -m loadtest.openloop --url http://127.0.0.1:8000 --pool pool.jsonl \\
        --schedule '[[10, 500]]' --out results.json [--seed 0] [--max-connections 256] \\
        [--timeout-s 10] [--cpu 1]

Example:
    >>> import io
    >>> reqs = [RequestSpec("/v1/score", {"Content-Type": "application/json"}, b"{}", 3)]
    >>> buf = io.StringIO()
    >>> write_request_pool(buf, reqs)
    >>> _ = buf.seek(0)
    >>> read_request_pool(buf) == reqs
    True
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import ctypes
import gc
import json
import math
import os
import socket
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any, NamedTuple
from urllib.parse import urlsplit

import numpy as np

from loadtest.outcomes import OVERFLOW, outcome_kind, percentile, summarize
from loadtest.shapes import ArrivalSchedule

_monotonic = time.monotonic  # clock_gettime(CLOCK_MONOTONIC): the timerfd's clock on Linux

_SENT_NOTHING = -2  # status codes kept per request besides HTTP's: not sent (overflow)
_PENDING = -1  # no answer yet
_NO_ANSWER = 0  # refused, reset, timed out, unparseable


class RequestSpec(NamedTuple):
    """One request of the pool: POST ``path`` with ``headers`` and ``body``; ``candidates``
    is the number of rows it scores (counted as ``rows`` in the result)."""

    path: str
    headers: Mapping[str, str]
    body: bytes
    candidates: int


def score_requests(bodies: Iterable[tuple[bytes, int]], path: str = "/v1/score",
                   headers: Mapping[str, str] | None = None) -> list[RequestSpec]:
    """JSON request specs from (body, candidates) pairs (:func:`loadtest.sampling.read_pool`).

    Example:
        >>> score_requests([(b"{}", 2)])[0].headers
        {'Content-Type': 'application/json'}
    """
    hdrs = {"Content-Type": "application/json", **(headers or {})}
    return [RequestSpec(path, dict(hdrs), bytes(b), int(n)) for b, n in bodies]


def write_request_pool(dest: str | Path | IO[str], requests: Iterable[RequestSpec]) -> None:
    """Write JSON lines ``{"path", "headers", "body_b64", "n"}``, one request each."""
    with contextlib.ExitStack() as stack:
        f = stack.enter_context(open(dest, "w")) if isinstance(dest, (str, Path)) else dest
        for r in requests:
            f.write(json.dumps({"path": r.path, "headers": dict(r.headers),
                                "body_b64": base64.b64encode(r.body).decode("ascii"),
                                "n": int(r.candidates)}) + "\n")


def read_request_pool(src: str | Path | IO[str]) -> list[RequestSpec]:
    """The requests written by :func:`write_request_pool` (ValueError on a bad line)."""
    out: list[RequestSpec] = []
    with contextlib.ExitStack() as stack:
        f = stack.enter_context(open(src)) if isinstance(src, (str, Path)) else src
        for k, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
                headers = {str(a): str(b) for a, b in (d.get("headers") or {}).items()}
                out.append(RequestSpec(str(d["path"]), headers,
                                       base64.b64decode(d.get("body_b64", ""), validate=True),
                                       int(d.get("n", 1))))
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise ValueError(f"request pool line {k}: {type(e).__name__}: {e}") from None
    return out


def arrival_times(schedule: ArrivalSchedule, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(arrival times in s from the start, ascending; stage index of each) for ``schedule``.

    Each stage is a Poisson process at its rate (a Poisson count, then that many uniform times:
    the same law as exponential gaps), drawn from its own stream ``(seed, stage)``, so a stage's
    arrivals do not change when another stage does.

    Example:
        >>> s = ArrivalSchedule(((10.0, 100.0), (5.0, 0.0), (10.0, 200.0)))
        >>> t, st = arrival_times(s, seed=0)
        >>> 900 < int((st == 0).sum()) < 1100, int((st == 1).sum()), 1800 < int((st == 2).sum())
        (True, 0, True)
        >>> bool((np.diff(t) >= 0).all()), float(t[st == 2].min()) >= 15.0, float(t.max()) < 25
        (True, True, True)
    """
    times: list[np.ndarray] = []
    stages: list[np.ndarray] = []
    start = 0.0
    for k, (duration_s, rate_rps) in enumerate(schedule.stages):
        rng = np.random.default_rng([int(seed), k])
        n = int(rng.poisson(rate_rps * duration_s)) if rate_rps > 0 else 0
        t = start + np.sort(rng.uniform(0.0, duration_s, n))
        times.append(np.minimum(t, np.nextafter(start + duration_s, start)))
        stages.append(np.full(n, k, dtype=np.int64))
        start += duration_s
    return np.concatenate(times), np.concatenate(stages)


class Response(NamedTuple):
    """A whole HTTP response: status, body (de-chunked), whether the connection stays open."""

    status: int
    body: bytes
    keep_alive: bool


_HEAD, _LENGTH, _CHUNK_SIZE, _CHUNK_DATA, _TRAILER, _UNTIL_CLOSE = range(6)
_MAX_HEAD = 65536


class ResponseParser:
    """Incremental HTTP/1.x response parser: :meth:`feed` bytes as they come, get responses.

    Reads the status line, ``Content-Length``, ``Transfer-Encoding: chunked`` (extensions and
    trailers skipped) and ``Connection``; skips interim 1xx answers; 204/304 have no body; with
    neither length nor chunking the body ends with the connection (:meth:`feed_eof`). Anything
    it cannot read raises ValueError (the connection is then dropped).

    Example:
        >>> p = ResponseParser()
        >>> p.feed(b"HTTP/1.1 200 OK\\r\\nContent-Length: 2\\r\\n\\r\\nh")
        []
        >>> p.feed(b"i")
        [Response(status=200, body=b'hi', keep_alive=True)]
        >>> p.feed(b"HTTP/1.1 200 OK\\r\\nTransfer-Encoding: chunked\\r\\n\\r\\n"
        ...        b"1\\r\\na\\r\\n0\\r\\n\\r\\n")
        [Response(status=200, body=b'a', keep_alive=True)]
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._state = _HEAD
        self._scan = 0  # where the search for the end of the head resumes
        self._status = 0
        self._keep = True
        self._need = 0
        self._body = bytearray()

    def feed(self, data: bytes) -> list[Response]:
        """Every response completed by ``data`` (usually none or one)."""
        self._buf += data
        out: list[Response] = []
        while self._step(out):
            pass
        return out

    def feed_eof(self) -> Response | None:
        """The connection ended: the close-delimited response, None between responses."""
        if self._state == _UNTIL_CLOSE:
            return self._emit()
        if self._state == _HEAD and not self._buf:
            return None
        raise ValueError("connection closed in the middle of a response")

    def _emit(self) -> Response:
        r = Response(self._status, bytes(self._body), self._keep)
        self._state, self._body = _HEAD, bytearray()
        return r

    def _step(self, out: list[Response]) -> bool:
        """Advance one state; True while progress is made."""
        buf, state = self._buf, self._state
        if state == _HEAD:
            i = buf.find(b"\r\n\r\n", self._scan)
            if i < 0:
                if len(buf) > _MAX_HEAD:
                    raise ValueError("response head too long")
                self._scan = max(0, len(buf) - 3)
                return False
            head = bytes(buf[:i])
            del buf[:i + 4]
            self._scan = 0
            self._start(head)
            return True
        if state == _LENGTH:
            if len(buf) < self._need:
                return False
            self._body = buf[:self._need]
            del buf[:self._need]
            out.append(self._emit())
            return True
        if state == _CHUNK_SIZE or state == _TRAILER:
            i = buf.find(b"\r\n")
            if i < 0:
                if len(buf) > _MAX_HEAD:
                    raise ValueError("chunk line too long")
                return False
            line = bytes(buf[:i])
            del buf[:i + 2]
            if state == _TRAILER:
                if not line:
                    out.append(self._emit())
                return True
            size = line.split(b";", 1)[0].strip()
            if not size or size.strip(b"0123456789abcdefABCDEF"):
                raise ValueError(f"bad chunk size {size!r}")
            self._need = int(size, 16)
            self._state = _CHUNK_DATA if self._need else _TRAILER
            return True
        if state == _CHUNK_DATA:
            if len(buf) < self._need + 2:
                return False
            if buf[self._need:self._need + 2] != b"\r\n":
                raise ValueError("chunk data not followed by CRLF")
            self._body += buf[:self._need]
            del buf[:self._need + 2]
            self._state = _CHUNK_SIZE
            return True
        if buf:  # _UNTIL_CLOSE
            self._body += buf
            buf.clear()
        return False

    def _start(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        parts = lines[0].split(None, 2)
        if (len(parts) < 2 or parts[0] not in (b"HTTP/1.1", b"HTTP/1.0")
                or len(parts[1]) != 3 or not parts[1].isdigit()):
            raise ValueError(f"bad status line {lines[0][:80]!r}")
        status = int(parts[1])
        length: int | None = None
        chunked = False
        connection = b""
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep:
                raise ValueError(f"bad header line {line[:80]!r}")
            name, value = name.strip().lower(), value.strip()
            if name == b"content-length":
                if not value.isdigit() or (length is not None and int(value) != length):
                    raise ValueError(f"bad Content-Length {value[:40]!r}")
                length = int(value)
            elif name == b"transfer-encoding":
                chunked = value.lower().rsplit(b",", 1)[-1].strip() == b"chunked"
            elif name == b"connection":
                connection += b"," + value.lower()
        tokens = {t.strip() for t in connection.split(b",")}
        keep = b"close" not in tokens if parts[0] == b"HTTP/1.1" else b"keep-alive" in tokens
        if 100 <= status < 200:
            if status == 101:
                raise ValueError("101 Switching Protocols is not HTTP/1.1 any more")
            return  # interim answer: the real one follows
        self._status, self._keep, self._body = status, keep, bytearray()
        if status in (204, 304):
            length, chunked = 0, False
        if chunked:
            self._state = _CHUNK_SIZE
        elif length is not None:
            self._state, self._need = _LENGTH, length
        else:
            self._state, self._keep = _UNTIL_CLOSE, False


def error_field(body: bytes) -> str | None:
    """The ``error`` string of a JSON object body, else None.

    Example:
        >>> error_field(b'{"error": "queue_full"}'), error_field(b"<html>"), error_field(b"[1]")
        ('queue_full', None, None)
    """
    try:
        v = json.loads(body).get("error")
    except (ValueError, AttributeError):
        return None
    return v if isinstance(v, str) else None


# -- timers -------------------------------------------------------------------------------------

class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


_CLOCK_MONOTONIC, _TFD_TIMER_ABSTIME = 1, 1


def _libc_timerfd() -> Any | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.timerfd_create.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.timerfd_settime.argtypes = [ctypes.c_int, ctypes.c_int,
                                         ctypes.POINTER(_Itimerspec), ctypes.c_void_p]
        return libc
    except (OSError, AttributeError):
        return None


class _TimerFD:
    """A one-shot timer at an absolute CLOCK_MONOTONIC time, watched by the loop as an fd."""

    name = "timerfd"

    def __init__(self, loop: asyncio.AbstractEventLoop, callback: Callable[[], None],
                 libc: Any) -> None:
        self._libc = libc
        self._fd = libc.timerfd_create(_CLOCK_MONOTONIC, os.O_NONBLOCK | os.O_CLOEXEC)
        if self._fd < 0:
            raise OSError(ctypes.get_errno(), "timerfd_create failed")
        self._spec = _Itimerspec()
        self._loop, self._callback = loop, callback
        loop.add_reader(self._fd, self._fire)

    def _fire(self) -> None:
        with contextlib.suppress(BlockingIOError, InterruptedError):
            os.read(self._fd, 8)
        self._callback()

    def arm(self, t: float) -> None:
        sec = math.floor(t)
        self._spec.it_value.tv_sec = sec
        self._spec.it_value.tv_nsec = max(1, min(999_999_999, int((t - sec) * 1e9)))
        if self._libc.timerfd_settime(self._fd, _TFD_TIMER_ABSTIME, ctypes.byref(self._spec),
                                      None) != 0:
            raise OSError(ctypes.get_errno(), "timerfd_settime failed")

    def close(self) -> None:
        self._loop.remove_reader(self._fd)
        os.close(self._fd)


class _LoopTimer:
    """The same with the event loop's own timers (millisecond resolution)."""

    name = "loop"

    def __init__(self, loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> None:
        self._loop, self._callback = loop, callback
        self._handle: asyncio.Handle | None = None

    def arm(self, t: float) -> None:
        if self._handle is not None:
            self._handle.cancel()
        delay = t - _monotonic()
        self._handle = (self._loop.call_later(delay, self._callback) if delay > 0
                        else self._loop.call_soon(self._callback))

    def close(self) -> None:
        if self._handle is not None:
            self._handle.cancel()


# -- connections --------------------------------------------------------------------------------

class _Conn(asyncio.Protocol):
    """One keep-alive connection: at most one request in flight (``req``, -1 when idle)."""

    def __init__(self, run: _Run) -> None:
        self.run = run
        self.transport: asyncio.Transport | None = None
        self.parser = ResponseParser()
        self.req = -1
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError, AttributeError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.transport = transport  # type: ignore[assignment]
        self.run.on_connected(self)

    def data_received(self, data: bytes) -> None:
        t = _monotonic()
        try:
            responses = self.parser.feed(data)
        except ValueError:
            self.run.fail(self, t)
            return
        for r in responses:
            self.run.on_response(self, r, t)

    def eof_received(self) -> bool:
        t = _monotonic()
        try:
            r = self.parser.feed_eof()
        except ValueError:
            r = None
        if r is not None:
            self.run.on_response(self, r, t)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.run.on_lost(self)


class _Run:
    """State of one run: the schedule, the connections and what happened to each request."""

    def __init__(self, loop: asyncio.AbstractEventLoop, addr: tuple[str, int], netloc: str,
                 prefix: str, requests: Sequence[RequestSpec], schedule: ArrivalSchedule,
                 seed: int, max_connections: int, timeout_s: float, order: str,
                 timer: str) -> None:
        self.loop, self.addr = loop, addr
        self.schedule, self.max_connections, self.timeout_s = schedule, max_connections, timeout_s
        self.raw = [request_bytes(netloc, prefix, r) for r in requests]
        self.rows = [int(r.candidates) for r in requests]
        times, stages = arrival_times(schedule, seed)
        n = len(times)
        if order == "random":
            picks = np.random.default_rng([int(seed), 1 << 20]).integers(0, len(requests), n)
        elif order == "round_robin":
            picks = np.arange(n) % len(requests)
        else:
            raise ValueError(f"order must be 'random' or 'round_robin', got {order!r}")
        self.n = n
        self.offsets: list[float] = times.tolist()
        self.stage: list[int] = stages.tolist()
        self.pick: list[int] = picks.tolist()
        self.due: list[float] = []  # absolute arrival times, set at start
        self.status = [_PENDING] * n
        self.t_send = [math.nan] * n
        self.t_done = [math.nan] * n
        self.reason: dict[int, str | None] = {}
        self.next = 0
        self.idle: list[_Conn] = []
        self.busy: set[_Conn] = set()
        self.conns: set[_Conn] = set()
        self.connecting: set[asyncio.Task[Any]] = set()
        self.n_open = self.peak_open = self.opened = 0
        self.t0 = 0.0
        self.scheduled_all = False
        self.done = asyncio.Event()
        self.error: BaseException | None = None
        libc = _libc_timerfd() if timer in ("auto", "timerfd") else None
        if timer == "timerfd" and libc is None:
            raise ValueError("timer='timerfd' needs Linux")
        if timer not in ("auto", "timerfd", "loop"):
            raise ValueError(f"timer must be 'auto', 'timerfd' or 'loop', got {timer!r}")
        self.timer: _TimerFD | _LoopTimer = (_TimerFD(loop, self.tick, libc) if libc is not None
                                             else _LoopTimer(loop, self.tick))

    # pacing
    def start(self, t0: float) -> None:
        self.t0 = t0
        self.due = [t0 + x for x in self.offsets]
        if self.n:
            self.timer.arm(self.due[0])
        else:
            self.scheduled_all = True
            self.check_done()

    def tick(self) -> None:
        """Send every request whose arrival time has come, then sleep until the next one."""
        due, i, n = self.due, self.next, self.n
        now = _monotonic()
        while i < n and due[i] <= now:
            self.dispatch(i)
            i += 1
            now = _monotonic()
        self.next = i
        if i < n:
            self.timer.arm(due[i])
        elif not self.scheduled_all:
            self.scheduled_all = True
            self.check_done()

    def dispatch(self, i: int) -> None:
        idle = self.idle
        while idle:
            c = idle.pop()
            if c.transport is not None and not c.transport.is_closing():
                self.send(c, i)
                return
        if self.n_open >= self.max_connections:
            self.status[i] = _SENT_NOTHING
            return
        c = _Conn(self)
        c.req = i
        self.busy.add(c)
        self.n_open += 1
        self.opened += 1
        self.peak_open = max(self.peak_open, self.n_open)
        task = self.loop.create_task(self.connect(c))
        self.connecting.add(task)
        task.add_done_callback(self.connecting.discard)

    def send(self, c: _Conn, i: int) -> None:
        c.req = i
        self.busy.add(c)
        self.t_send[i] = _monotonic()
        c.transport.write(self.raw[self.pick[i]])  # type: ignore[union-attr]

    # connections
    async def connect(self, c: _Conn) -> None:
        try:
            await asyncio.wait_for(self.loop.create_connection(lambda: c, *self.addr),
                                   self.timeout_s)
        except (OSError, asyncio.TimeoutError):
            self.n_open -= 1
            self.fail(c, _monotonic())

    def on_connected(self, c: _Conn) -> None:
        self.conns.add(c)
        if c.req >= 0:
            self.send(c, c.req)
        else:  # its request timed out while connecting
            self.idle.append(c)

    def on_response(self, c: _Conn, r: Response, t: float) -> None:
        i = c.req
        if i < 0:  # an answer nobody asked for: the connection is out of step
            self.fail(c, t)
            return
        self.status[i] = r.status
        self.t_done[i] = t
        if r.status in (503, 504):
            self.reason[i] = error_field(r.body)
        c.req = -1
        self.busy.discard(c)
        if r.keep_alive and c.transport is not None and not c.transport.is_closing():
            self.idle.append(c)
        elif c.transport is not None:
            c.transport.close()
        self.check_done()

    def fail(self, c: _Conn, t: float) -> None:
        """No (usable) answer on ``c``: its request is a connection error, ``c`` is dropped."""
        i = c.req
        if i >= 0:
            self.status[i] = _NO_ANSWER
            self.t_done[i] = t
            c.req = -1
        self.busy.discard(c)
        if c.transport is not None:
            c.transport.abort()
        self.check_done()

    def on_lost(self, c: _Conn) -> None:
        if c.lost:
            return
        c.lost = True
        self.n_open -= 1
        self.conns.discard(c)
        if c in self.idle:
            self.idle.remove(c)
        if c.req >= 0:
            self.fail(c, _monotonic())

    def sweep(self) -> None:
        """Fail requests older than the timeout (counted from their arrival time)."""
        limit = _monotonic() - self.timeout_s
        for c in [c for c in self.busy if c.req >= 0 and self.due[c.req] < limit]:
            self.fail(c, _monotonic())

    def check_done(self) -> None:
        if self.scheduled_all and not self.busy:
            self.done.set()

    # results
    def result(self, t_end: float, per_request: bool) -> dict[str, Any]:
        stages: list[dict[str, dict[str, Any]]] = [{} for _ in self.schedule.stages]
        lags: list[float] = []
        rows: dict[str, list[Any]] = {k: [] for k in ("stage", "status", "kind", "error",
                                                      "latency_ms", "send_latency_ms", "lag_ms")}
        for i in range(self.n):
            st = self.status[i]
            reason = self.reason.get(i)
            lat = send_lat = lag = None
            if st == _SENT_NOTHING:
                kind = OVERFLOW
            else:
                kind = outcome_kind(max(st, 0), reason)
                lat = round((self.t_done[i] - self.due[i]) * 1e3, 3)
                if not math.isnan(self.t_send[i]):
                    lag = self.t_send[i] - self.due[i]
                    lags.append(lag)
                    send_lat = round((self.t_done[i] - self.t_send[i]) * 1e3, 3)
            e = stages[self.stage[i]].setdefault(
                kind, {"count": 0, "rows": 0, "latency_ms": [], "send_latency_ms": []})
            e["count"] += 1
            e["rows"] += self.rows[self.pick[i]]
            if lat is not None:
                e["latency_ms"].append(lat)
            if send_lat is not None:
                e["send_latency_ms"].append(send_lat)
            if per_request:
                rows["stage"].append(self.stage[i])
                rows["status"].append(st if st > 0 else None)
                rows["kind"].append(kind)
                rows["error"].append(reason)
                rows["latency_ms"].append(lat)
                rows["send_latency_ms"].append(send_lat)
                rows["lag_ms"].append(None if lag is None else round(lag * 1e3, 3))
        out: dict[str, Any] = {
            "schedule": [list(s) for s in self.schedule.stages],
            "stages": stages,
            "max_lag_s": round(max(lags), 6) if lags else 0.0,
            "p99_lag_s": round(percentile(lags, 99) or 0.0, 6),
            "p50_lag_s": round(percentile(lags, 50) or 0.0, 6),
            "elapsed_s": t_end - self.t0,
            "client": "openloop",
            "requests_scheduled": self.n,
            "requests_sent": len(lags),
            "connections_opened": self.opened,
            "peak_connections": self.peak_open,
            "max_connections": self.max_connections,
            "timeout_s": self.timeout_s,
            "timer": self.timer.name,
        }
        if per_request:
            out["requests"] = rows
        return out


def request_bytes(netloc: str, prefix: str, r: RequestSpec) -> bytes:
    """The whole HTTP/1.1 request (head and body) as sent on the wire."""
    lines = [f"POST {prefix}{r.path} HTTP/1.1", f"Host: {netloc}",
             f"Content-Length: {len(r.body)}"]
    for k, v in r.headers.items():
        if any(ch in f"{k}{v}" for ch in "\r\n") or ":" in k:
            raise ValueError(f"bad header {k!r}: {v!r}")
        if k.lower() not in ("host", "content-length"):
            lines.append(f"{k}: {v}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + r.body


def address(url: str) -> tuple[tuple[str, int], str, str]:
    """((ip, port), Host header, path prefix) of an ``http://`` URL."""
    u = urlsplit(url)
    if u.scheme != "http" or not u.hostname:
        raise ValueError(f"expected an http://HOST[:PORT] URL, got {url!r}")
    port = u.port or 80
    try:
        info = socket.getaddrinfo(u.hostname, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise ConnectionError(f"cannot resolve {u.hostname!r}: {e}") from None
    ip, port = info[0][4][:2]
    return (str(ip), int(port)), u.netloc, u.path.rstrip("/")


async def run_open_loop_async(url: str, requests: Sequence[RequestSpec],
                              schedule: ArrivalSchedule, *, seed: int = 0,
                              max_connections: int = 256, timeout_s: float = 10.0,
                              warm_connections: int = 8, order: str = "random",
                              timer: str = "auto", per_request: bool = False) -> dict[str, Any]:
    """:func:`run_open_loop` on the running event loop."""
    if not requests:
        raise ValueError("the request pool is empty")
    if max_connections < 1 or not timeout_s > 0:
        raise ValueError("need max_connections >= 1 and timeout_s > 0")
    loop = asyncio.get_running_loop()
    addr, netloc, prefix = address(url)
    run = _Run(loop, addr, netloc, prefix, requests, schedule, seed, max_connections,
               timeout_s, order, timer)
    old_handler = loop.get_exception_handler()

    def on_error(lp: asyncio.AbstractEventLoop, ctx: dict[str, Any]) -> None:
        """A bug in a callback ends the run with that error (socket errors do not)."""
        exc = ctx.get("exception")
        if run.error is None and isinstance(exc, Exception) and not isinstance(exc, OSError):
            run.error = ctx["exception"]
            run.done.set()
        lp.default_exception_handler(ctx)

    loop.set_exception_handler(on_error)
    sweeper: asyncio.Handle | None = None
    sweep_s = min(0.05, timeout_s / 4)
    gc_was_enabled = gc.isenabled()

    def sweep() -> None:
        nonlocal sweeper
        run.sweep()
        sweeper = loop.call_later(sweep_s, sweep)

    try:
        for _ in range(min(max(0, warm_connections), max_connections)):
            run.n_open += 1
            run.opened += 1
            try:
                await asyncio.wait_for(loop.create_connection(lambda: _Conn(run), *addr),
                                       min(timeout_s, 5.0))
            except (OSError, asyncio.TimeoutError) as e:
                raise ConnectionError(f"cannot connect to {url}: {e or type(e).__name__}"
                                      ) from None
        run.peak_open = run.n_open
        gc.collect()
        gc.freeze()  # no collector pauses in the middle of the schedule
        gc.disable()
        sweeper = loop.call_later(sweep_s, sweep)
        run.start(_monotonic() + 0.01)
        deadline = run.t0 + schedule.total_s + timeout_s + 2 * sweep_s + 0.5
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(run.done.wait(), max(0.0, deadline - _monotonic()))
        t_end = _monotonic()
        if run.error is not None:
            raise run.error
        for i in range(run.next, run.n):  # starved of CPU past the deadline: never sent
            run.status[i] = _SENT_NOTHING
        for c in list(run.busy):
            run.fail(c, t_end)
        return run.result(t_end, per_request)
    finally:
        if gc_was_enabled:
            gc.enable()
        gc.unfreeze()
        if sweeper is not None:
            sweeper.cancel()
        run.timer.close()
        for task in list(run.connecting):
            task.cancel()
        for c in list(run.conns):
            if c.transport is not None:
                c.transport.abort()
        await asyncio.sleep(0)
        loop.set_exception_handler(old_handler)


def new_event_loop() -> tuple[asyncio.AbstractEventLoop, str]:
    """(a fresh uvloop loop if uvloop imports, else asyncio's; its name)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop(), "asyncio"
    return uvloop.new_event_loop(), "uvloop"


def run_open_loop(url: str, requests: Sequence[RequestSpec], schedule: ArrivalSchedule, *,
                  seed: int = 0, max_connections: int = 256, timeout_s: float = 10.0,
                  warm_connections: int = 8, order: str = "random", timer: str = "auto",
                  per_request: bool = False, use_uvloop: bool = True) -> dict[str, Any]:
    """Send ``schedule``'s Poisson arrivals to ``url`` (``http://HOST:PORT[/prefix]``).

    ``warm_connections`` are opened before the clock starts (ConnectionError if the server
    does not accept them); more are opened on demand up to ``max_connections``. ``order``:
    ``random`` (seeded) or ``round_robin`` over ``requests``. Returns the Recorder-shaped
    result: ``schedule``, ``stages`` (per stage ``{kind: {"count", "rows", "latency_ms",
    "send_latency_ms"}}``; ``latency_ms`` from the scheduled arrival to the end of the answer
    for every request but overflow, ``send_latency_ms`` from the send, for those sent),
    ``max_lag_s``, ``p99_lag_s``, ``p50_lag_s`` (send time minus arrival time), ``elapsed_s``,
    ``client``, ``event_loop``, ``timer``, ``requests_scheduled``, ``requests_sent``,
    ``connections_opened``, ``peak_connections``, ``max_connections``, ``timeout_s``,
    ``cpu_s`` (this process's CPU time during the run); with ``per_request`` also
    ``requests``: columns ``stage``, ``status`` (None: no answer), ``kind``, ``error`` (the
    503/504 body's ``error``), ``latency_ms``, ``send_latency_ms``, ``lag_ms``.
    """
    if use_uvloop:
        loop, loop_name = new_event_loop()
    else:
        loop, loop_name = asyncio.new_event_loop(), "asyncio"
    cpu0 = time.process_time()
    try:
        result = loop.run_until_complete(run_open_loop_async(
            url, requests, schedule, seed=seed, max_connections=max_connections,
            timeout_s=timeout_s, warm_connections=warm_connections, order=order, timer=timer,
            per_request=per_request))
    finally:
        loop.close()
    result["event_loop"] = loop_name
    result["cpu_s"] = round(time.process_time() - cpu0, 3)
    return result


def summary_lines(result: Mapping[str, Any]) -> list[str]:
    """One line per stage (offered and achieved rate, p50/p99, outcomes) and one for the lag."""
    lines = []
    for k, ((duration_s, rate), stage) in enumerate(zip(result["schedule"], result["stages"],
                                                        strict=True)):
        s = summarize(stage, duration_s)

        def ms(v: float | None) -> str:
            return "-" if v is None else f"{v:.3f}"

        lines.append(f"stage {k}: offered {rate:g} rps, achieved {s['achieved_rps']:.1f} rps, "
                     f"p50 {ms(s['p50_ms'])} ms, p99 {ms(s['p99_ms'])} ms, {s['outcomes']}")
    lines.append(f"send lag p50 {result['p50_lag_s'] * 1e3:.3f} ms, p99 "
                 f"{result['p99_lag_s'] * 1e3:.3f} ms, max {result['max_lag_s'] * 1e3:.3f} ms; "
                 f"{result['peak_connections']} connections at most; "
                 f"{result.get('cpu_s', 0):.2f} s CPU in {result['elapsed_s']:.2f} s")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    """The command line (see the module docstring); 2 and one line on an expected problem."""
    p = argparse.ArgumentParser(
        prog="python -m loadtest.openloop",
        description="Open-loop Poisson HTTP/1.1 load; writes Recorder-shaped results.")
    p.add_argument("--url", required=True, help="http://HOST:PORT of the server")
    p.add_argument("--pool", required=True, type=Path,
                   help='JSON lines {"path", "headers", "body_b64", "n"}')
    p.add_argument("--schedule", required=True,
                   help="JSON stages [[duration_s, rate_rps], ...]")
    p.add_argument("--out", type=Path, help="where to write the result JSON")
    p.add_argument("--seed", type=int, default=0, help="arrival times and request order (0)")
    p.add_argument("--max-connections", type=int, default=256,
                   help="open connections at most; arrivals beyond: client_overflow (256)")
    p.add_argument("--warm-connections", type=int, default=8,
                   help="connections opened before the clock starts (8)")
    p.add_argument("--timeout-s", type=float, default=10.0,
                   help="per request, from its arrival time; also the longest drain (10)")
    p.add_argument("--order", default="random", choices=("random", "round_robin"),
                   help="how requests are picked from the pool (random)")
    p.add_argument("--timer", default="auto", choices=("auto", "timerfd", "loop"))
    p.add_argument("--cpu", type=int, help="pin this process to one CPU core")
    p.add_argument("--per-request", action="store_true",
                   help="also write per-request columns")
    p.add_argument("--quiet", action="store_true", help="no summary on stdout")
    a = p.parse_args(argv)
    try:
        if a.cpu is not None:
            os.sched_setaffinity(0, {a.cpu})
        schedule = ArrivalSchedule.from_json(a.schedule)
        requests = read_request_pool(a.pool)
        result = run_open_loop(a.url, requests, schedule, seed=a.seed,
                               max_connections=a.max_connections, timeout_s=a.timeout_s,
                               warm_connections=a.warm_connections, order=a.order,
                               timer=a.timer, per_request=a.per_request)
    except (ValueError, OSError) as e:
        print(f"openloop: error: {e}", file=sys.stderr)
        return 2
    if a.out is not None:
        a.out.write_text(json.dumps(result))
    if not a.quiet:
        print("\n".join(summary_lines(result)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
