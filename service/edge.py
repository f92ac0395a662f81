"""The request edge: the ASGI front door, and the whole HTTP side of the scoring routes.

:class:`Edge` wraps the FastAPI app. ``POST /v1/score`` and ``POST /v2/models/{name}
[/versions/{v}]/infer`` never reach FastAPI: the edge stamps the arrival time (the deadline's
origin), reads the headers once, asks admission on arrival (:meth:`ScoringService.at_arrival
<service.scoring.ScoringService.at_arrival>`: 503 before the body is read when nothing could
serve it), reads the body (413 above ``max_body_bytes``), decodes it (msgspec;
:func:`service.schemas.decode_score`, :mod:`service.kserve`), hands a typed
:class:`~service.scoring.RequestContext` to the scoring service, writes the answer (msgspec),
counts it in the request metrics, and starts the shadow copy once the answer is sent. Their
OpenAPI description comes from pydantic models (:mod:`service.app`), so ``/docs`` shows them
like any other route. Every other request goes to FastAPI, after the body-size limit.

Error answers: an :class:`~service.schemas.ErrorResponse` body naming the field and the reason
(``/v2`` infer: the protocol's ``{"error": message}``, with our reason beside it); a method
other than POST is 405; an unexpected exception is a logged 500 ``internal_error`` without a
stack trace; a client that went away gets nothing and is counted as 499.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from export.meta import INPUT_NAMES
from service import kserve
from service.errors import CLIENT_CLOSED, ClientDisconnected, ServiceError, error_body, v2_body
from service.metrics import Metrics
from service.schemas import ScoreReply, TimingReply, decode_score, encode_reply
from service.scoring import RequestContext, Scored, ScoringService

log = logging.getLogger("uvicorn.error")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

SCORE_PATH = "/v1/score"
INFER_PATH = re.compile(r"/v2/models/([^/]+)(?:/versions/([^/]+))?/infer")
JSON = b"application/json"


def timeout_header(value: bytes | str | None) -> float | None:
    """The ``X-Request-Timeout-Ms`` header in milliseconds (None when absent); ServiceError 422
    naming the header when it is not a positive, finite number.

    Example:
        >>> timeout_header(b"25"), timeout_header(None)
        (25.0, None)
        >>> timeout_header("soon")
        Traceback (most recent call last):
        ...
        service.errors.ServiceError: must be a positive, finite number of milliseconds, got 'soon'
    """
    if value is None:
        return None
    text = value.decode("latin-1") if isinstance(value, bytes) else value
    try:
        ms = float(text)
    except ValueError:
        ms = math.nan
    if not 0 < ms < math.inf:
        raise ServiceError(422, "invalid_request", "must be a positive, finite number of "
                           f"milliseconds, got {text[:40]!r}", field="x-request-timeout-ms")
    return ms


async def read_body(receive: Receive, limit: float = math.inf) -> tuple[bytes, int]:
    """(body, bytes received) from the ASGI ``receive``; stops early, with a partial body,
    once more than ``limit`` bytes came. ClientDisconnected if the client goes away."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            raise ClientDisconnected  # never computed
        chunk = message.get("body", b"")
        chunks.append(chunk)
        size += len(chunk)
        if size > limit or not message.get("more_body", False):
            return (chunks[0] if len(chunks) == 1 else b"".join(chunks)), size


def replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that hands the app ``body`` (already read) first, then the real one
    (for the disconnect)."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replay_receive() -> Message:
        return pending.pop() if pending else await receive()

    return replay_receive


async def respond(send: Send, status: int, body: bytes, content_type: bytes = JSON,
                  headers: dict[str, str] | None = None) -> None:
    """Send a whole response."""
    raw = [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]
    if headers:
        raw += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


class Edge:
    """The ASGI front door (see the module docstring).

    Args:
        app: the FastAPI app (every route but the scoring ones).
        service: the scoring service.
        max_body_bytes: the largest request body; larger is 413 before it is parsed.
    """

    def __init__(self, app: ASGIApp | None, service: ScoringService,
                 max_body_bytes: int) -> None:
        self.app = app
        self.service = service
        self.metrics: Metrics = service.metrics
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = self.scoring_route(scope)
        if route is not None:
            await self.handle(scope, receive, send, route)
            return
        if scope["type"] == "http":
            receive = await self._limit_body(scope, receive, send)
            if receive is None:
                return
        assert self.app is not None
        await self.app(scope, receive, send)

    @staticmethod
    def scoring_route(scope: Scope) -> tuple[str, str | None] | None:
        """``("", None)`` for ``/v1/score``, ``(name, version)`` for a ``/v2`` infer path,
        None for every other request."""
        if scope["type"] != "http":
            return None
        path = scope["path"]
        if path == SCORE_PATH:
            return "", None
        if path.endswith("/infer") and (m := INFER_PATH.fullmatch(path)) is not None:
            return m.group(1), m.group(2)
        return None

    # -- the scoring routes --------------------------------------------------------------------
    async def handle(self, scope: Scope, receive: Receive, send: Send,
                     route: tuple[str, str | None]) -> None:
        """One scoring request (``route`` from :meth:`scoring_route`), counted from arrival to
        the last byte of its answer."""
        infer = route if route[0] else None
        ctx = RequestContext(arrival_s=time.monotonic(), route="score" if infer is None
                             else "infer", warmup=bool(scope.get("state", {}).get("warmup")))
        svc, metrics = self.service, self.metrics
        if not ctx.warmup:
            metrics.in_flight.inc()
            svc.in_flight += 1
        try:
            try:
                if infer is None:
                    body = await self._score(ctx, scope, receive)
                    await respond(send, 200, body)
                else:
                    body, content_type, headers = await self._infer(ctx, scope, receive, *infer)
                    await respond(send, 200, body, content_type, headers)
                ctx.status = 200
            except ServiceError as e:
                ctx.status = e.status
                answer = v2_body(e) if infer is not None else error_body(e, ctx.request_id)
                await respond(send, e.status, answer, headers=e.headers)
            except ClientDisconnected:
                ctx.status = CLIENT_CLOSED
            except Exception:
                log.exception("unhandled error on %s", scope["path"])
                ctx.status = 500
                e = ServiceError(500, "internal_error", "internal server error")
                await respond(send, 500, v2_body(e) if infer is not None else error_body(e))
        except OSError:  # the connection broke while answering
            ctx.status = CLIENT_CLOSED
        finally:
            if not ctx.warmup:
                svc.in_flight -= 1
                metrics.in_flight.dec()
                self._count(ctx)
        if ctx.status == 200 and ctx.after_response is not None and not ctx.warmup:
            ctx.after_response()  # the shadow copy: the answer has been handed over already

    def _count(self, ctx: RequestContext) -> None:
        code, took_s = str(ctx.status), time.monotonic() - ctx.arrival_s
        m = self.metrics
        m.child(m.requests, ctx.model, code).inc()
        m.child(m.request_duration, ctx.model, code).observe(took_s)
        if ctx.status == CLIENT_CLOSED and ctx.rows == 0:  # gone before its body was read
            m.child(m.rejected, ctx.model, "client_disconnected").inc()
        if ctx.arm is not None:
            m.child(m.arm_requests, ctx.arm, code).inc()
            m.child(m.arm_duration, ctx.arm, code).observe(took_s)

    def _arrive(self, ctx: RequestContext, scope: Scope) -> str | None:
        """Method, headers (read once) and admission on arrival; the
        Inference-Header-Content-Length header (``/v2`` binary data)."""
        if scope["method"] != "POST":
            raise ServiceError(405, "method_not_allowed",
                               f"{scope['method']} is not allowed here; use POST",
                               headers={"Allow": "POST"})
        length = header_length = timeout = None
        for key, value in scope["headers"]:
            if key == b"content-length":
                length = value
            elif key == b"x-request-timeout-ms":
                if timeout is None:  # the first one counts
                    timeout = value
            elif key == b"inference-header-content-length":
                header_length = value.decode("latin-1")
        if length is not None:
            if not length.isdigit():
                raise ServiceError(400, "invalid_request", "Content-Length is not a number")
            ctx.body_bytes = int(length)
        ctx.header_timeout_ms = timeout_header(timeout)
        self.service.at_arrival(ctx)
        return header_length

    async def _body(self, ctx: RequestContext, receive: Receive) -> bytes:
        limit = self.max_body_bytes
        if ctx.body_bytes is not None and ctx.body_bytes > limit:
            raise self._too_large(ctx.body_bytes)
        body, size = await read_body(receive, limit)
        if size > limit:
            raise self._too_large(size)
        ctx.body_bytes = size
        return body

    def _too_large(self, size: int) -> ServiceError:
        return ServiceError(413, "body_too_large", f"request body of {size} bytes exceeds "
                            f"max_body_bytes ({self.max_body_bytes})")

    async def _score(self, ctx: RequestContext, scope: Scope, receive: Receive) -> bytes:
        self._arrive(ctx, scope)
        req = decode_score(await self._body(ctx, receive))
        ctx.request_id = req.request_id
        done = await self.service.score(ctx, req, receive)
        self._after(ctx, done, req.request_id)
        return encode_reply(ScoreReply(
            request_id=req.request_id, model=done.model.name, version=done.model.version,
            degraded=done.degraded, arm=ctx.arm, scores=done.probs.tolist(),
            timing=_timing(ctx, done)))

    async def _infer(self, ctx: RequestContext, scope: Scope, receive: Receive, name: str,
                     version: str | None) -> tuple[bytes, bytes, dict[str, str]]:
        header_length = self._arrive(ctx, scope)
        ctx.model = self.service.registry.lookup(name, version).name  # 404 before the body
        req = kserve.parse_request(await self._body(ctx, receive), header_length)
        # the version serving now (a reload may have swapped it while the body came in):
        # from here to the batcher nothing awaits, so one version encodes and scores
        model = self.service.registry.lookup(name, version)
        encoded = any(t.name in INPUT_NAMES for t in req.inputs)
        n, encode = (kserve.encoded_inputs if encoded else kserve.raw_inputs)(model, req.inputs)
        if n == 0:
            raise kserve.bad("no rows to score (inputs have 0 rows)", "inputs")
        done = await self.service.infer(ctx, model, n, req.timeout_ms, encode, receive,
                                        can_degrade=not encoded)
        if not encoded:
            self._after(ctx, done, req.id)
        t = _timing(ctx, done)
        body, headers = kserve.response_body(req, done.model, done.probs, {
            "degraded": done.degraded, "queue_ms": t.queue_ms, "compute_ms": t.compute_ms,
            "total_ms": t.total_ms, "predicted_ms": t.predicted_ms})
        content_type = headers.pop("Content-Type").encode()
        return body, content_type, headers

    def _after(self, ctx: RequestContext, done: Scored, request_id: str | None) -> None:
        if ctx.warmup:
            return
        if ctx.arm is not None:
            m = self.metrics
            m.child(m.arm_score, ctx.arm).observe(float(done.probs.mean()))
        ctx.after_response = self.service.shadow.plan(done.model, done.probs, done.encode,
                                                      request_id)

    # -- every other route ---------------------------------------------------------------------
    async def _limit_body(self, scope: Scope, receive: Receive, send: Send) -> Receive | None:
        """``receive`` to pass on, or None when a 413/400 was answered already."""
        length = None
        for key, value in scope.get("headers", ()):
            if key == b"content-length":
                length = value
        limit = self.max_body_bytes
        try:
            if length is not None:
                if not length.isdigit():
                    raise ServiceError(400, "invalid_request", "Content-Length is not a number")
                if int(length) > limit:
                    raise self._too_large(int(length))
                return receive  # the HTTP server stops reading at Content-Length
            if scope.get("method") not in ("POST", "PUT", "PATCH"):
                return receive
            body, size = await read_body(receive, limit)  # chunked upload: read it here
            if size > limit:
                raise self._too_large(size)
        except ServiceError as e:
            await respond(send, e.status, error_body(e), headers=e.headers)
            return None
        except ClientDisconnected:
            return None
        return replay(body, receive)


def _timing(ctx: RequestContext, done: Scored) -> TimingReply:
    return TimingReply(queue_ms=done.queue_s * 1e3, compute_ms=done.compute_s * 1e3,
                       total_ms=(done.done_s - ctx.arrival_s) * 1e3,
                       predicted_ms=done.predicted_s * 1e3)


async def warm_route(app: ASGIApp, service: ScoringService) -> None:
    """Send one request per model through the whole ASGI stack before the server takes traffic.

    The first request through the edge, the decoders and the batcher pays one-off costs that
    the ONNX Runtime warmup does not cover; paid here, they cannot push a real first request
    past its deadline. Not counted in metrics.
    """
    for name, m in service.models.items():
        schema = m.encoder.encoders.schema
        body = json.dumps({
            "model": name,
            "user": {f.name: 0 for f in schema.fields_on(["user"])},
            "context": {f.name: 0 for f in schema.fields_on(["context"])},
            "candidates": {f.name: [0] for f in schema.fields_on(["candidate"])} or [{}],
        }).encode()
        status = await internal_post(app, SCORE_PATH, body)
        log.info("route warmup for %s: HTTP %s", name, status)


async def internal_post(app: ASGIApp, path: str, body: bytes) -> int | None:
    """POST ``body`` to ``path`` through ``app`` in-process (scope state ``warmup``)."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": path, "raw_path": path.encode(),
             "root_path": "", "query_string": b"", "server": ("127.0.0.1", 0),
             "client": ("127.0.0.1", 0), "state": {"warmup": True},
             "headers": [(b"content-type", b"application/json"),
                         (b"content-length", str(len(body)).encode())]}
    chunks = [{"type": "http.request", "body": body, "more_body": False}]
    status: list[int] = []

    async def receive() -> Message:
        if chunks:
            return chunks.pop()
        await asyncio.sleep(3600)  # the client never disconnects
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        if message["type"] == "http.response.start":
            status.append(message["status"])

    await app(scope, receive, send)
    return status[0] if status else None
