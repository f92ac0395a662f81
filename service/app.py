"""The HTTP layer: FastAPI routes, the request-edge middleware, error bodies, lifespan.

Routes:
  POST /v1/score                    score candidates (:mod:`service.scoring`)
  GET  /v2                          KServe v2 server metadata
  GET  /v2/health/live              200 while the process runs
  GET  /v2/health/ready             200 once every model is loaded and warmed up, else 503
  GET  /v2/models/{name}[/versions/{v}]        model metadata (KServe v2 + serving details)
  GET  /v2/models/{name}[/versions/{v}]/ready  200 / 503 / 404
  POST /v2/models/{name}[/versions/{v}]/infer  KServe v2 inference (:mod:`service.kserve`)
  POST /admin/models/{name}/load|reload|unload, GET /admin/models   (:mod:`service.admin`;
                                    only with an admin token configured)
  GET  /metrics                     Prometheus text format

Requests that name no model are routed by the A/B split (:mod:`service.routing`); after a
scored response has been sent, the edge middleware starts its shadow copy
(:mod:`service.shadow`). While draining (SIGTERM, :mod:`service.server`) scoring requests are
answered 503 ``draining`` before their body is read.

Every error body is an :class:`~service.schemas.ErrorResponse` naming the field and the reason;
bad input is a 4xx, never a 500 or a stack trace. The edge middleware stamps the arrival time
(the deadline's origin), enforces ``max_body_bytes`` (413) before the body is parsed, and counts
``/v1/score`` requests by model and status code.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from export.repository import INPUT_NAMES
from service import kserve
from service.admin import get_service, make_admin_router
from service.metrics import UNKNOWN_MODEL, Metrics
from service.models import ServedModel
from service.schemas import (
    UNION_TAGS,
    ErrorDetail,
    ErrorResponse,
    ModelMetadata,
    ScoreRequest,
    ScoreResponse,
)
from service.scoring import ClientDisconnected, ScoringService, ServiceError
from service.settings import Settings, get_settings

log = logging.getLogger("uvicorn.error")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]],
                   Awaitable[None]]
SCORE_PATH = "/v1/score"
TIMEOUT_HEADER = "x-request-timeout-ms"
INFER_PATH = re.compile(r"/v2/models/[^/]+(/versions/[^/]+)?/infer")
CLIENT_CLOSED = 499  # nginx's code for "client closed the request"; never reaches the client
_UNION_MEMBERS = {"constrained-str", "str", "bool", "int", "float", "none"}


def is_scoring_path(path: str) -> bool:
    """``/v1/score`` and ``/v2/models/{name}[/versions/{v}]/infer``: the requests that are
    counted, shed under overload and waited for when draining."""
    return path == SCORE_PATH or INFER_PATH.fullmatch(path) is not None


def error_body(status: int, error: str, message: str, errors: list[ErrorDetail] | None = None,
               headers: dict[str, str] | None = None) -> JSONResponse:
    """A JSON error response with an ErrorResponse body."""
    body = ErrorResponse(error=error, message=message, errors=errors or [])
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def field_path(loc: tuple[Any, ...] | list[Any]) -> str:
    """pydantic's error location as a dotted path: ``candidates[3].price``, ``user.age``."""
    parts = list(loc)
    if parts and parts[0] in ("body", "header", "query", "path") and len(parts) > 1:
        parts.pop(0)
    if len(parts) >= 2 and parts[0] == "candidates" and parts[1] in UNION_TAGS:
        del parts[1]
    if len(parts) > 1 and parts[-1] in _UNION_MEMBERS:
        parts.pop()
    path = ""
    for p in parts:
        path += f"[{p}]" if isinstance(p, int) else ("." if path else "") + str(p)
    return path


def validation_details(errors: list[dict[str, Any]]) -> list[ErrorDetail]:
    """One detail per field; a value that matches no allowed type gets one clear message."""
    grouped: dict[str, list[dict[str, Any]]] = {}
    for e in errors:
        if e.get("type") == "json_invalid":  # loc is ("body", character position)
            where = e.get("loc", ())[-1]
            why = (e.get("ctx") or {}).get("error", "")
            e = {**e, "msg": f"invalid JSON at character {where}: {why}".rstrip(": ")}
            grouped.setdefault("body", []).append(e)
            continue
        if (e.get("type") in ("model_attributes_type", "model_type")
                and tuple(e.get("loc", ())) == ("body",)):
            e = {**e, "msg": "the body must be a JSON object (Content-Type: application/json)"}
        grouped.setdefault(field_path(e.get("loc", ())), []).append(e)
    out = []
    for path, errs in grouped.items():
        specific = [e for e in errs if e.get("type") in ("string_too_long", "finite_number")]
        if specific:
            msg = specific[0]["msg"]
        elif len(errs) > 1:
            msg = "must be a string, integer, boolean, finite number or null"
        else:
            msg = errs[0]["msg"]
        out.append(ErrorDetail(field=path or None, message=msg))
    return out


async def _read_body(receive: Any, limit: float = math.inf) -> tuple[bytes, int]:
    """(body, bytes received) from the ASGI ``receive``; stops early, with a partial body,
    once more than ``limit`` bytes came. ClientDisconnected if the client goes away."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            raise ClientDisconnected  # never computed
        chunks.append(message.get("body", b""))
        size += len(chunks[-1])
        if size > limit or not message.get("more_body", False):
            return b"".join(chunks), size


def _replay(body: bytes, receive: Any) -> Any:
    """A ``receive`` that hands the app ``body`` (already read) first, then the real one
    (for the disconnect)."""
    replay = [{"type": "http.request", "body": body, "more_body": False}]

    async def replay_receive() -> Message:
        return replay.pop() if replay else await receive()

    return replay_receive


class EdgeMiddleware:
    """Arrival time, body-size limit (413) and request metrics, as plain ASGI."""

    def __init__(self, app: ASGIApp, max_body_bytes: int, metrics: Metrics,
                 service: ScoringService) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.metrics = metrics
        self.service = service

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        arrival_s = time.monotonic()
        state = scope.setdefault("state", {})
        state["arrival_s"] = arrival_s
        counted = is_scoring_path(scope["path"]) and not state.get("warmup")
        status = [500]

        async def send_status(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        if counted:
            self.metrics.in_flight.inc()
            self.service.in_flight += 1
        try:
            if counted and await self._shed(scope, receive, send_status, state):
                return
            receive = await self._limit_body(scope, receive, send_status)
            if receive is not None and counted and scope["path"] == SCORE_PATH:
                receive = await self._admit_parsed(scope, receive, send_status, state)
            if receive is not None:
                await self.app(scope, receive, send_status)
        except ClientDisconnected:  # gone while sending its body: nothing to answer
            status[0] = CLIENT_CLOSED
            if counted:
                self.metrics.rejected.labels(model=state.get("model", UNKNOWN_MODEL),
                                             reason="client_disconnected").inc()
        finally:
            if counted:
                self.service.in_flight -= 1
                self.metrics.in_flight.dec()
                model, code = state.get("model", UNKNOWN_MODEL), str(status[0])
                took_s = time.monotonic() - arrival_s
                self.metrics.requests.labels(model=model, code=code).inc()
                self.metrics.request_duration.labels(model=model, code=code).observe(took_s)
                arm = state.get("arm")
                if arm is not None:
                    self.metrics.arm_requests.labels(arm=arm, code=code).inc()
                    self.metrics.arm_duration.labels(arm=arm, code=code).observe(took_s)
        after = state.get("after_response")
        if after is not None and status[0] == 200 and not state.get("warmup"):
            after()  # the shadow copy: the response has been handed to the server already

    async def _shed(self, scope: Scope, receive: Any, send: Any, state: dict[str, Any]) -> bool:
        """Answer 503 at once, without reading the body, when the server is draining or
        overloaded."""
        if self.service.draining:
            error = self.service.not_serving(None)
            assert error is not None
            await error_body(error.status, error.error, error.message, headers=error.headers)(
                scope, receive, send)
            return True
        header = None
        for key, value in scope.get("headers", ()):
            if key == b"x-request-timeout-ms":  # the first one, as the route reads it
                try:
                    header = timeout_header(value)
                except ServiceError:
                    return False  # the route answers 422
                break
        state["header_timeout_ms"] = header
        error = self.service.shed_early(state["arrival_s"], header)
        if error is None:
            return False
        state["model"] = self.service.resolve(None).name
        await error_body(error.status, error.error, error.message, headers=error.headers)(
            scope, receive, send)
        return True

    async def _admit_parsed(self, scope: Scope, receive: Any, send: Any,
                            state: dict[str, Any]) -> Any:
        """Admission control for ``/v1/score`` on the parsed body, before FastAPI validates it
        (:func:`peek_admission`): under overload most requests are rejected, and here a
        rejection costs the JSON parse and little else. The parsed body goes on to the route
        (``state["json_body"]``). Returns ``receive`` to pass on, or None when answered."""
        body, _ = await _read_body(receive)
        try:
            raw = json.loads(body)
        except (ValueError, RecursionError):
            raw = None  # the route answers 422, naming the character
        if "header_timeout_ms" in state:  # a valid header (or none); else the route's 422
            peek = peek_admission(self.service, raw)
            try:
                if peek is not None:
                    model, arm, rows, timeout_ms = peek
                    self.service.admit_early(model, rows, state["arrival_s"],
                                             (timeout_ms, state["header_timeout_ms"]))
            except ServiceError as error:
                state["model"], state["arm"] = model.name, arm
                await error_body(error.status, error.error, error.message,
                                 headers=error.headers)(scope, receive, send)
                return None
        state["json_body"] = raw
        return _replay(body, receive)

    async def _limit_body(self, scope: Scope, receive: Any, send: Any) -> Any:
        """``receive`` to pass on, or None when an error was answered already."""
        length = None
        for key, value in scope.get("headers", ()):
            if key == b"content-length":
                length = value
        limit = self.max_body_bytes
        if length is not None:
            if not length.isdigit():
                await error_body(400, "invalid_request", "Content-Length is not a number")(
                    scope, receive, send)
                return None
            if int(length) > limit:
                await self._too_large(scope, receive, send, int(length))
                return None
            return receive  # the HTTP server stops reading at Content-Length
        if scope.get("method") not in ("POST", "PUT", "PATCH"):
            return receive
        body, size = await _read_body(receive, limit)  # chunked upload: read it here
        if size > limit:
            await self._too_large(scope, receive, send, size)
            return None
        return _replay(body, receive)

    async def _too_large(self, scope: Scope, receive: Any, send: Any, size: int) -> None:
        await error_body(413, "body_too_large",
                         f"request body of {size} bytes exceeds max_body_bytes "
                         f"({self.max_body_bytes})")(scope, receive, send)


TIMEOUT_PARAMETER = {
    "name": "X-Request-Timeout-Ms", "in": "header", "required": False,
    "schema": {"type": "number", "exclusiveMinimum": 0},
    "description": "latency budget in milliseconds; capped by the server's default_timeout_ms",
}


def _document_body(app: FastAPI, model: type[ScoreRequest]) -> None:
    """Put ``model`` (and the schemas it refers to) into the OpenAPI components: a route that
    parses its own body declares it through ``openapi_extra`` only."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = generate()
            own = model.model_json_schema(ref_template="#/components/schemas/{model}")
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            components.update(own.pop("$defs", {}))
            components[model.__name__] = own
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


ServiceDep = Annotated[ScoringService, Depends(get_service)]
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": what} for code, what in {
        404: "unknown model", 413: "body too large", 422: "invalid request (names the field)",
        503: "rejected: queue full or predicted deadline miss (Retry-After)",
        504: "deadline exceeded before the request was scored",
    }.items()
}


async def score(request: Request, service: ServiceDep) -> Response:
    """Score the candidates for one user and context; scores come back in candidate order.

    The body is not a ``ScoreRequest`` parameter: the edge middleware has parsed it and run
    admission control on it already (:func:`peek_admission`), so that under overload a
    rejection costs a JSON parse rather than a validation; the route validates it.
    """
    state = request.state
    header_ms = timeout_header(request.headers.get(TIMEOUT_HEADER))
    raw = getattr(state, "json_body", None)  # parsed by the edge middleware
    if raw is None:
        raw = parse_json_body(await request.body())
    body = validate_body(ScoreRequest, raw)
    model, arm = service.route(body.model, body.user_id, body.user)
    state.model = model.name
    state.arm = arm
    result, done = await service.score(model, body, state.arrival_s, header_ms,
                                       request.receive, arm)
    if arm is not None:
        service.metrics.arm_score.labels(arm=arm).observe(float(done.probs.mean()))
    state.after_response = service.shadow.plan(done, body.request_id)
    return Response(result.model_dump_json(), media_type="application/json")


def timeout_header(value: str | bytes | None) -> float | None:
    """The ``X-Request-Timeout-Ms`` header in milliseconds (None when absent); ServiceError 422
    naming the header when it is not a positive, finite number.

    Example:
        >>> timeout_header("25"), timeout_header(None)
        (25.0, None)
        >>> timeout_header("soon")
        Traceback (most recent call last):
        ...
        service.scoring.ServiceError: must be a positive, finite number of milliseconds, got 'soon'
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
                           f"milliseconds, got {text[:40]!r}", field=TIMEOUT_HEADER)
    return ms


def parse_json_body(body: bytes) -> Any:
    """The request body as JSON, whatever its Content-Type; RequestValidationError (422) at
    the character where it stops being JSON. ``NaN``/``Infinity`` parse here and are refused
    by validation, naming the field."""
    if not body:
        raise RequestValidationError([{"type": "missing", "loc": ("body",),
                                       "msg": "a JSON body is required"}])
    try:
        return json.loads(body)
    except ValueError as e:  # JSONDecodeError, or bytes that are not UTF-8/16/32
        raise RequestValidationError([{
            "type": "json_invalid", "loc": ("body", getattr(e, "pos", 0)),
            "msg": "JSON decode error", "ctx": {"error": getattr(e, "msg", str(e))}}]) from None
    except RecursionError:
        raise RequestValidationError([{"type": "json_too_deep", "loc": ("body",),
                                       "msg": "JSON nested too deeply"}]) from None


def validate_body(model: type[ScoreRequest], raw: Any) -> ScoreRequest:
    """``raw`` validated as ``model``; RequestValidationError with locations under ``body``
    (what FastAPI raises for a body parameter, so errors read the same)."""
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        raise RequestValidationError(
            [{**err, "loc": ("body", *err["loc"])} for err in e.errors()]) from None


def peek_admission(service: ScoringService, raw: Any
                   ) -> tuple[ServedModel, str | None, int, float | None] | None:
    """(model, A/B arm, candidates, timeout_ms) of a parsed, not yet validated ``/v1/score``
    body: what admission control needs, read without validating the rest. None when the
    body's model, user, timeout or candidates are not of the right types (validation answers
    those, 422) or it names an unknown model (404 after validation). Anything else wrong with
    the body is found by validation only if the request is admitted: under overload a request
    that would be rejected is a 503 whatever else is wrong with it.

    Example:
        >>> peek_admission(None, {"user": {}, "candidates": "x"}) is None
        True
    """
    if not isinstance(raw, dict):
        return None
    cands = raw.get("candidates")
    if isinstance(cands, dict):
        first = next(iter(cands.values()), None)
        if not isinstance(first, list):
            return None
        rows = len(first)
    elif isinstance(cands, list):
        rows = len(cands)
    else:
        return None
    name, user_id, user = raw.get("model"), raw.get("user_id"), raw.get("user")
    timeout = raw.get("timeout_ms")
    if timeout is not None:
        try:  # bool is not a number here; an int too large for a float is refused too
            timeout = float(timeout) if type(timeout) in (int, float) else math.nan
        except OverflowError:
            timeout = math.nan
        if not 0 < timeout < math.inf:
            return None
    if (not isinstance(name, str | None) or not isinstance(user_id, str | None)
            or not isinstance(user, dict)):
        return None
    try:
        model, arm = service.route(name, user_id, user)
    except ServiceError:
        return None
    return model, arm, rows, timeout


def v2_model(service: ScoringService, name: str, version: str | None = None) -> ServedModel:
    """The model a ``/v2/models/{name}[/versions/{version}]`` URL names; 404 if it is not
    loaded or ``version`` is not the one serving."""
    m = service.models.get(name)
    if m is None:
        raise ServiceError(404, "model_not_found",
                           f"no model named {name!r} (models: {sorted(service.models)})",
                           field="name")
    if version is not None and version != str(m.version):
        raise ServiceError(404, "version_not_found", f"model {name!r} serves version "
                           f"{m.version}, not {version!r}", field="version")
    return m


async def infer(
    name: str,
    request: Request,
    service: ServiceDep,
    version: str | None = None,
) -> Response:
    """KServe v2 inference (see :mod:`service.kserve`): JSON or binary tensors in,
    ``probability`` out, through the same admission control and batcher as /v1/score."""
    header_ms = timeout_header(request.headers.get(TIMEOUT_HEADER))
    req = kserve.parse_request(await request.body(), request.headers.get(kserve.HEADER_LENGTH))
    model = v2_model(service, name, version)
    request.state.model = model.name
    encoded = any(t.name in INPUT_NAMES for t in req.inputs)
    n, encode = (kserve.encoded_inputs if encoded else kserve.raw_inputs)(model, req.inputs)
    if n == 0:
        raise kserve.bad("no rows to score (inputs have 0 rows)", "inputs")
    done = await service.infer(model, n, request.state.arrival_s,
                               (req.timeout_ms, header_ms), encode,
                               request.receive, can_degrade=not encoded)
    if not encoded:
        request.state.after_response = service.shadow.plan(done, req.id)
    body, headers = kserve.response_body(req, done.model, done.probs, {
        "degraded": done.degraded, "queue_ms": round(done.queue_s * 1e3, 3),
        "compute_ms": round(done.compute_s * 1e3, 3),
        "total_ms": round((done.done_s - request.state.arrival_s) * 1e3, 3)})
    return Response(body, headers=headers)


async def warm_route(app: ASGIApp, service: ScoringService) -> None:
    """Send one request per model through the whole ASGI stack before the server takes traffic.

    The first request through FastAPI, pydantic and the batcher pays one-off costs (about 10 ms
    here, several times that on a busy machine) that the ONNX Runtime warmup does not cover;
    paid here, they cannot push a real first request past its deadline. Not counted in metrics.
    """
    for name, m in service.models.items():
        schema = m.encoder.encoders.schema
        body = json.dumps({
            "model": name,
            "user": {f.name: 0 for f in schema.fields_on(["user"])},
            "context": {f.name: 0 for f in schema.fields_on(["context"])},
            "candidates": {f.name: [0] for f in schema.fields_on(["candidate"])},
        }).encode()
        status = await _internal_post(app, SCORE_PATH, body)
        log.info("route warmup for %s: HTTP %s", name, status)


async def _internal_post(app: ASGIApp, path: str, body: bytes) -> int | None:
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


def create_app(settings: Settings | None = None) -> FastAPI:
    """The ASGI app; models load and warm up in its lifespan (uvicorn's start-up)."""
    settings = settings or get_settings()
    metrics = Metrics()
    service = ScoringService(settings, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await service.start()
        await warm_route(app, service)
        try:
            yield
        finally:
            await service.stop()
            metrics.process_exit()

    app = FastAPI(title="mldcn scoring service", version="1", lifespan=lifespan,
                  description="Scores ad candidates with ML-DCN / DCNv2 ONNX models under a "
                              "latency budget.")
    app.state.service = service
    app.add_middleware(EdgeMiddleware, max_body_bytes=settings.max_body_bytes, metrics=metrics,
                       service=service)
    app.add_api_route(SCORE_PATH, score, methods=["POST"], response_model=ScoreResponse,
                      responses=ERROR_RESPONSES, tags=["scoring"], openapi_extra={
                          "requestBody": {"required": True, "content": {"application/json": {
                              "schema": {"$ref": "#/components/schemas/ScoreRequest"}}}},
                          "parameters": [TIMEOUT_PARAMETER]})
    for path in ("/v2/models/{name}/infer", "/v2/models/{name}/versions/{version}/infer"):
        app.add_api_route(path, infer, methods=["POST"], responses=ERROR_RESPONSES,
                          openapi_extra={"parameters": [TIMEOUT_PARAMETER]},
                          tags=["kserve-v2"], response_class=Response)
    _document_body(app, ScoreRequest)
    token = settings.admin_secret()
    if token is not None:  # no token: no admin routes at all (404 like any unknown path)
        app.include_router(make_admin_router(token))

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, e: ServiceError) -> Response:
        details = [ErrorDetail(field=e.field, message=e.message)] if e.field else []
        if request.url.path.startswith("/v2/"):  # the protocol's {"error": message}
            return JSONResponse({"error": e.message, "reason": e.error,
                                 "errors": [d.model_dump() for d in details]},
                                status_code=e.status, headers=e.headers)
        return error_body(e.status, e.error, e.message, details, e.headers)

    @app.exception_handler(ClientDisconnected)
    async def _gone(request: Request, e: ClientDisconnected) -> Response:
        return Response(status_code=CLIENT_CLOSED)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError) -> Response:
        details = validation_details(list(e.errors()))
        first = details[0] if details else ErrorDetail(message="invalid request")
        message = f"{first.field}: {first.message}" if first.field else first.message
        return error_body(422, "invalid_request", message, details)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException) -> Response:
        return error_body(e.status_code, "http_error", str(e.detail),
                          headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def _bug(request: Request, e: Exception) -> Response:
        log.exception("unhandled error on %s", request.url.path)
        return error_body(500, "internal_error", "internal server error")

    @app.get("/v2", tags=["kserve-v2"])
    async def server_metadata() -> dict[str, Any]:
        return {"name": "mldcn", "version": app.version,
                "extensions": ["binary_tensor_data", "schedule_policy"]}

    @app.get("/v2/health/live", tags=["kserve-v2"])
    async def live() -> dict[str, bool]:
        return {"live": True}

    @app.get("/v2/health/ready", tags=["kserve-v2"], responses={503: {"model": ErrorResponse}})
    async def ready(service: ServiceDep) -> Response:
        if service.draining:
            return error_body(503, "draining", "the server is shutting down")
        if not service.ready:
            return error_body(503, "not_ready", "models are loading")
        return JSONResponse({"ready": True})

    @app.get("/v2/models/{name}", response_model=ModelMetadata, tags=["kserve-v2"],
             responses={404: {"model": ErrorResponse}})
    @app.get("/v2/models/{name}/versions/{version}", response_model=ModelMetadata,
             tags=["kserve-v2"], responses={404: {"model": ErrorResponse}})
    async def model_metadata(name: str, service: ServiceDep,
                             version: str | None = None) -> ModelMetadata:
        m = v2_model(service, name, version)
        shape = [{"name": t["name"], "datatype": t["datatype"],
                  "shape": [-1 if d == "batch" else d for d in t["shape"]]}
                 for t in m.meta["inputs"]]
        outputs = [{"name": t["name"], "datatype": t["datatype"], "shape": [-1]}
                   for t in m.meta["outputs"]]
        schema = m.encoder.encoders.schema
        return ModelMetadata(
            name=m.name, versions=[str(m.version)], inputs=shape, outputs=outputs,
            parameters={
                "version": m.version, "arch": m.arch, "precision": m.precision,
                "provider": m.provider, "flops_per_example": m.flops_per_example,
                "default": m.name == service.resolve(None).name,
                "fallback": m.name == service.settings.fallback_model,
                "features": {side: [f.name for f in schema.fields_on([side])]
                             for side in ("user", "context", "candidate")},
                "feature_inputs": [
                    {"name": f.name, "side": f.side, "shape": [-1],
                     "datatype": "BYTES" if f.type == "categorical" else "FP32"}
                    for f in schema.fields],
                "arm": m.name in dict(service.arms),
                "shadow": m.name == service.settings.shadow_model,
                "metrics": m.meta.get("metrics", {}),
            })

    @app.get("/v2/models/{name}/ready", tags=["kserve-v2"],
             responses={404: {"model": ErrorResponse}, 503: {"model": ErrorResponse}})
    @app.get("/v2/models/{name}/versions/{version}/ready", tags=["kserve-v2"],
             responses={404: {"model": ErrorResponse}, 503: {"model": ErrorResponse}})
    async def model_ready(name: str, service: ServiceDep, version: str | None = None
                          ) -> Response:
        m = v2_model(service, name, version)
        if not service.ready:
            return error_body(503, "not_ready", f"model {name!r} is not ready")
        return JSONResponse({"name": m.name, "version": str(m.version), "ready": True})

    @app.get("/metrics", tags=["monitoring"], response_class=Response)
    async def metrics_endpoint() -> Response:
        body, content_type = metrics.exposition()
        return Response(body, media_type=content_type)

    return app
