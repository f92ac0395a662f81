"""The application: the request edge in front of FastAPI, error bodies, lifespan, OpenAPI.

Routes:
  POST /v1/score                    score candidates (answered by :mod:`service.edge`)
  POST /v2/models/{name}[/versions/{v}]/infer  KServe v2 inference (:mod:`service.edge`,
                                    :mod:`service.kserve`)
  GET  /v2                          KServe v2 server metadata
  GET  /v2/health/live              200 while the process runs
  GET  /v2/health/ready             200 once every model is loaded and warmed up, else 503
  GET  /v2/models/{name}[/versions/{v}]        model metadata (KServe v2 + serving details)
  GET  /v2/models/{name}[/versions/{v}]/ready  200 / 503 / 404
  POST /admin/models/{name}/load|reload|unload, GET /admin/models   (:mod:`service.admin`;
                                    only with an admin token configured)
  GET  /metrics                     Prometheus text format

:class:`ScoringApp` is a FastAPI app whose outermost layer is the :class:`~service.edge.Edge`:
the two scoring routes never enter FastAPI's routing, dependency injection or pydantic
validation (the edge decodes them with msgspec), while everything else is plain FastAPI. The
scoring routes are in the OpenAPI schema all the same, described by the pydantic models of
:mod:`service.schemas` (:func:`scoring_routes`).

Every error body is an :class:`~service.schemas.ErrorResponse` naming the field and the reason
(``/v2`` routes: :class:`~service.schemas.V2ErrorResponse`); bad input is a 4xx, never a 500 or
a stack trace.
"""

from __future__ import annotations

import dataclasses
import gc
import inspect
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Body, Depends, FastAPI, Header, Path, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from export.meta import INPUT_NAMES
from model.schema import FieldSpec
from service.admin import get_service, make_admin_router
from service.edge import Edge, warm_route
from service.errors import ClientDisconnected, ServiceError, error_body, invalid_request, v2_body
from service.metrics import Metrics
from service.models import ServedModel
from service.schemas import (
    MAX_STRING_LENGTH,
    ErrorResponse,
    InferRequestBody,
    InferResponseBody,
    ModelMetadata,
    ScoreRequest,
    ScoreResponse,
    V2ErrorResponse,
)
from service.scoring import ScoringService
from service.settings import Settings, get_settings

log = logging.getLogger("uvicorn.error")
ServiceDep = Annotated[ScoringService, Depends(get_service)]
TIMEOUT_HEADER_DOC = "latency budget in milliseconds; capped by the server's default_timeout_ms"
BODY_PARSE_ERROR = "There was an error parsing the body"  # FastAPI's 400 for unreadable JSON


def _responses(model: type, codes: dict[int, str]) -> dict[int | str, dict[str, Any]]:
    return {code: {"model": model, "description": what} for code, what in codes.items()}


SCORE_ERRORS = _responses(ErrorResponse, {
    404: "unknown model", 405: "only POST", 413: "body too large",
    422: "invalid request (names the field)",
    503: "rejected: queue full, predicted deadline miss (Retry-After), draining or not ready",
    504: "deadline exceeded before the request was scored",
})
V2_ERRORS = _responses(V2ErrorResponse, {404: "unknown model or version"})
INFER_ERRORS = _responses(V2ErrorResponse, {
    400: "the request does not fit the protocol or the model's inputs (names the tensor)",
    404: "unknown model or version", 405: "only POST", 413: "body too large",
    422: "invalid X-Request-Timeout-Ms header, or more rows than max_candidates",
    503: "rejected: queue full, predicted deadline miss (Retry-After), draining or not ready",
    504: "deadline exceeded before the request was scored",
})


# a number > 0 when present (never null): the header is optional, its value is not
TimeoutHeader = Annotated[float, Header(alias="X-Request-Timeout-Ms", gt=0,
                                        description=TIMEOUT_HEADER_DOC)]


# The routes service.edge answers, declared for the OpenAPI schema only (never mounted).
def score(body: ScoreRequest,
          x_request_timeout_ms: TimeoutHeader = None) -> ScoreResponse:  # type: ignore[assignment]
    """Score the candidates for one user and context; scores come back in candidate order.
    The body is read as JSON whatever its Content-Type."""
    raise AssertionError("answered by service.edge")


def infer(name: Annotated[str, Path()], body: Annotated[InferRequestBody, Body()],
          x_request_timeout_ms: TimeoutHeader = None,  # type: ignore[assignment]
          ) -> InferResponseBody:
    """KServe v2 inference: raw feature tensors (one per schema field) or the encoded
    ``cat_ids``/``dense``, in JSON or with the binary tensor data extension; ``probability``
    out, through the same admission control and batcher as /v1/score."""
    raise AssertionError("answered by service.edge")


def infer_version(name: Annotated[str, Path()], version: Annotated[str, Path()],
                  body: Annotated[InferRequestBody, Body()],
                  x_request_timeout_ms: TimeoutHeader = None,  # type: ignore[assignment]
                  ) -> InferResponseBody:
    """KServe v2 inference on a given version (404 unless it is the one serving)."""
    raise AssertionError("answered by service.edge")


def scoring_routes(max_body_bytes: int) -> list[APIRoute]:
    """The OpenAPI description of the routes :mod:`service.edge` answers (they are not
    mounted: the edge answers them before FastAPI routes anything)."""
    binary = {"requestBody": {"content": {"application/octet-stream": {
        "schema": {"type": "string", "format": "binary"}}}}}
    limit = f" Bodies over {max_body_bytes} bytes are refused (413)."
    return [
        APIRoute("/v1/score", score, methods=["POST"], response_model=ScoreResponse,
                 responses=SCORE_ERRORS, tags=["scoring"],
                 description=inspect.cleandoc(str(score.__doc__)) + limit),
        APIRoute("/v2/models/{name}/infer", infer, methods=["POST"],
                 response_model=InferResponseBody, responses=INFER_ERRORS, tags=["kserve-v2"],
                 openapi_extra=binary,
                 description=inspect.cleandoc(str(infer.__doc__)) + limit),
        APIRoute("/v2/models/{name}/versions/{version}/infer", infer_version, methods=["POST"],
                 response_model=InferResponseBody, responses=INFER_ERRORS, tags=["kserve-v2"],
                 openapi_extra=binary,
                 description=inspect.cleandoc(str(infer_version.__doc__)) + limit),
    ]


class ScoringApp(FastAPI):
    """FastAPI with :class:`~service.edge.Edge` in front (module docstring): the scoring
    routes go to the edge before anything of FastAPI's runs (not even its telemetry hooks);
    every other request goes through FastAPI, whose middleware stack starts with the edge's
    body-size limit."""

    def __init__(self, service: ScoringService, max_body_bytes: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.state.service = service
        self._max_body_bytes = max_body_bytes
        self.edge = Edge(None, service, max_body_bytes)
        service.registry.on_change.append(self._forget_openapi)

    def _forget_openapi(self) -> None:
        self.openapi_schema = None  # the features of the models serving are in it

    def build_middleware_stack(self) -> ASGIApp:
        self.edge.app = super().build_middleware_stack()
        return self.edge

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = self.edge.scoring_route(scope)
        if route is not None:
            await self.edge.handle(scope, receive, send, route)
        else:
            await super().__call__(scope, receive, send)

    def openapi(self) -> dict[str, Any]:
        if self.openapi_schema is None:
            schema = get_openapi(
                title=self.title, version=self.version, description=self.description,
                routes=[*scoring_routes(self._max_body_bytes), *self.routes])
            service: ScoringService = self.state.service
            describe_features(schema, list(service.models.values()),
                              service.settings.max_candidates)
            self.openapi_schema = schema
        return self.openapi_schema


def _value_schema(field: FieldSpec) -> dict[str, Any]:
    if field.type == "numeric":
        return {"anyOf": [{"type": "number"}, {"type": "null"}]}
    return {"anyOf": [{"type": "string", "maxLength": MAX_STRING_LENGTH}, {"type": "boolean"},
                      {"type": "integer"}, {"type": "number"}, {"type": "null"}]}


def describe_features(schema: dict[str, Any], models: list[ServedModel],
                      max_candidates: int) -> None:
    """Name the features of the models serving in the OpenAPI schema (in place): which fields
    ``user``, ``context`` and ``candidates`` take, their JSON types, and the candidate limits;
    the ``/v2`` infer tensors' names. Fields of every model serving (the first model's
    definition where two disagree); nothing changes while none is loaded."""
    fields: dict[str, FieldSpec] = {}
    for m in models:
        for f in m.encoder.encoders.schema.fields:
            fields.setdefault(f.name, f)
    if not fields:
        return
    defs = schema.get("components", {}).get("schemas", {})

    def side(name: str) -> dict[str, Any]:
        props = {f.name: _value_schema(f) for f in fields.values() if f.side == name}
        return {"type": "object", "properties": props, "additionalProperties": False}

    request = defs.get("ScoreRequest", {}).get("properties", {})
    for name in ("user", "context"):
        if name in request:
            kept = {k: request[name][k] for k in ("description", "default") if k in request[name]}
            request[name] = {**side(name), **kept}
    if "candidates" in request:
        row = side("candidate")
        columns = {"type": "object", "minProperties": 1, "additionalProperties": False,
                   "properties": {k: {"type": "array", "items": v, "minItems": 1,
                                      "maxItems": max_candidates}
                                  for k, v in row["properties"].items()}}
        rows = {"type": "array", "items": row, "minItems": 1, "maxItems": max_candidates}
        request["candidates"] = {"anyOf": [columns, rows],
                                 "description": request["candidates"].get("description", "")}
    tensor = defs.get("InferTensor", {}).get("properties", {})
    if "name" in tensor:
        tensor["name"] = {"type": "string", "enum": [*fields, *INPUT_NAMES],
                          "description": tensor["name"].get("description", "")}


def create_app(settings: Settings | None = None) -> FastAPI:
    """The ASGI app; models load and warm up in its lifespan (uvicorn's start-up)."""
    settings = settings or get_settings()
    metrics = Metrics()
    service = ScoringService(settings, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await service.start()
        await warm_route(app, service)
        gc.collect()
        gc.freeze()  # start-up's objects (sessions, vocabularies) leave the collector's scans
        try:
            yield
        finally:
            await service.stop()
            metrics.process_exit()

    app = ScoringApp(service, settings.max_body_bytes, title="mldcn scoring service",
                     version="1", lifespan=lifespan,
                     description="Scores ad candidates with ML-DCN / DCNv2 ONNX models under a "
                                 "latency budget.")
    token = settings.admin_secret()
    if token is not None:  # no token: no admin routes at all (404 like any unknown path)
        app.include_router(make_admin_router(token))

    def answer(request: Request, e: ServiceError) -> Response:
        v2 = request.url.path.startswith("/v2/")
        return Response(v2_body(e) if v2 else error_body(e), status_code=e.status,
                        headers=e.headers, media_type="application/json")

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, e: ServiceError) -> Response:
        return answer(request, e)

    @app.exception_handler(ClientDisconnected)
    async def _gone(request: Request, e: ClientDisconnected) -> Response:
        return Response(status_code=499)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError) -> Response:
        return answer(request, invalid_request([dict(err) for err in e.errors()]))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException) -> Response:
        if e.status_code == 400 and e.detail == BODY_PARSE_ERROR:  # e.g. not UTF-8
            return answer(request, ServiceError(422, "invalid_request", "the body is not "
                                                "valid JSON (UTF-8)", field="body"))
        return answer(request, ServiceError(e.status_code, "http_error", str(e.detail),
                                            headers=getattr(e, "headers", None)))

    @app.exception_handler(Exception)
    async def _bug(request: Request, e: Exception) -> Response:
        log.exception("unhandled error on %s", request.url.path)
        return answer(request, ServiceError(500, "internal_error", "internal server error"))

    @app.get("/v2", tags=["kserve-v2"])
    async def server_metadata() -> dict[str, Any]:
        return {"name": "mldcn", "version": app.version,
                "extensions": ["binary_tensor_data", "schedule_policy"]}

    @app.get("/v2/health/live", tags=["kserve-v2"])
    async def live() -> dict[str, bool]:
        return {"live": True}

    @app.get("/v2/health/ready", tags=["kserve-v2"],
             responses={503: {"model": V2ErrorResponse, "description": "not ready/draining"}})
    async def ready(service: ServiceDep) -> dict[str, bool]:
        if service.draining:
            raise ServiceError(503, "draining", "the server is shutting down")
        if not service.ready:
            raise ServiceError(503, "not_ready", "models are loading")
        return {"ready": True}

    def metadata(svc: ScoringService, name: str, version: str | None) -> ModelMetadata:
        m = svc.registry.lookup(name, version)
        shape = [{"name": t.name, "datatype": t.datatype,
                  "shape": [-1 if d == "batch" else d for d in t.shape]}
                 for t in m.meta.inputs]
        outputs = [{"name": t.name, "datatype": t.datatype, "shape": [-1]}
                   for t in m.meta.outputs]
        schema = m.encoder.encoders.schema
        return ModelMetadata(
            name=m.name, versions=[str(m.version)], inputs=shape, outputs=outputs,
            parameters={
                "version": m.version, "arch": m.arch, "precision": m.precision,
                "provider": m.provider, "flops_per_example": m.flops_per_example,
                "default": m.name == svc.registry.resolve(None).name,
                "fallback": m.name == svc.settings.fallback_model,
                "features": {side: [f.name for f in schema.fields_on([side])]
                             for side in ("user", "context", "candidate")},
                "feature_inputs": [
                    {"name": f.name, "side": f.side, "shape": [-1],
                     "datatype": "BYTES" if f.type == "categorical" else "FP32"}
                    for f in schema.fields],
                "arm": m.name in dict(svc.arms),
                "shadow": m.name == svc.settings.shadow_model,
                "metrics": m.meta.metrics,
                "serving": dataclasses.asdict(svc.registry.get(m.name).config),
            })

    @app.get("/v2/models/{name}", response_model=ModelMetadata, tags=["kserve-v2"],
             responses=V2_ERRORS)
    async def model_metadata(name: str, svc: ServiceDep) -> ModelMetadata:
        return metadata(svc, name, None)

    @app.get("/v2/models/{name}/versions/{version}", response_model=ModelMetadata,
             tags=["kserve-v2"], responses=V2_ERRORS)
    async def version_metadata(name: str, version: str, svc: ServiceDep) -> ModelMetadata:
        return metadata(svc, name, version)

    def readiness(svc: ScoringService, name: str, version: str | None) -> dict[str, Any]:
        m = svc.registry.lookup(name, version)
        if not svc.ready:
            raise ServiceError(503, "not_ready", f"model {name!r} is not ready")
        return {"name": m.name, "version": str(m.version), "ready": True}

    ready_errors = {**V2_ERRORS, 503: {"model": V2ErrorResponse, "description": "not ready"}}

    @app.get("/v2/models/{name}/ready", tags=["kserve-v2"], responses=ready_errors)
    async def model_ready(name: str, svc: ServiceDep) -> dict[str, Any]:
        return readiness(svc, name, None)

    @app.get("/v2/models/{name}/versions/{version}/ready", tags=["kserve-v2"],
             responses=ready_errors)
    async def version_ready(name: str, version: str, svc: ServiceDep) -> dict[str, Any]:
        return readiness(svc, name, version)

    @app.get("/metrics", tags=["monitoring"], response_class=Response)
    async def metrics_endpoint() -> Response:
        body, content_type = metrics.exposition()
        return Response(body, media_type=content_type)

    return app

