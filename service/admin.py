"""Admin endpoints: load, unload and reload model versions while the server takes traffic.

Routes (all ``POST``, JSON in and out)::

  /admin/models/{name}/load    {"version": 3}?  load a version (default: the latest) of any
                                                model in the repository; replaces the version
                                                serving if the model is loaded
  /admin/models/{name}/reload  {"version": 3}?  the same for a model that is loaded (404 if
                                                not): re-reads and re-validates it
  /admin/models/{name}/unload                   take a model out of service
  GET /admin/models                             what is serving: name, version, roles, and
                                                the pid of the worker that answered

Answer: ``{"name", "version", "previous_version", "load_s"}`` (200). A version that fails
validation (content hash, model.json, graph inputs/outputs, encoders against the schema, a test
inference; :func:`service.models.validate_served`) is refused with 422 ``version_rejected`` and
the old version keeps serving; an unknown model or version is 404; a model the configuration
needs (default, fallback, shadow, A/B arm) or the last one cannot be unloaded (409
``model_in_use``); a second admin call while one is running is 409 ``busy``. The swap itself
is atomic (see :meth:`service.control.ModelControl.load`): requests already queued finish
on the old version, later ones use the new one, none is dropped.

Authentication: ``Authorization: Bearer <token>`` where the token is ``admin_token``
(``MLDCN_ADMIN_TOKEN``) or the content of ``admin_token_file`` (``MLDCN_ADMIN_TOKEN_FILE``,
read once at start-up, surrounding whitespace stripped). A missing or wrong token is 401 with
``WWW-Authenticate: Bearer``; the comparison is constant-time (``hmac.compare_digest``). With
no token configured the admin endpoints do not exist: every ``/admin`` path is 404, exactly as
for an unknown path, so that an unprotected server cannot be reconfigured from the network.

With ``workers > 1`` an admin load/reload/unload is applied by the worker that answered it
and then by every other worker (:mod:`service.broadcast`); the answer carries each worker's
result under ``workers``.
"""

from __future__ import annotations

import hmac
import os
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Header, Request
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from service.errors import ServiceError
from service.schemas import ErrorResponse
from service.scoring import ScoringService


def _json_integer(v: Any) -> Any:
    """A JSON Schema integer: ``3`` or ``3.0``, never ``true`` or ``"3"``."""
    if isinstance(v, bool | str):
        raise ValueError("must be an integer")
    return v


Version = Annotated[int, Field(ge=1), BeforeValidator(_json_integer)]


class LoadRequest(BaseModel):
    """Body of load/reload (optional)."""

    model_config = ConfigDict(extra="forbid")

    version: Version | None = Field(
        default=None, description="version; default: the latest")


class LoadResponse(BaseModel):
    """What serves after an admin call."""

    name: str
    version: int | None = Field(description="the version now serving (null after unload)")
    previous_version: int | None = Field(description="the version serving before")
    load_s: float | None = Field(default=None, description="open + validate + warm up")
    workers: dict[str, dict[str, Any]] | None = Field(
        default=None, description="with several workers: each worker's result, by pid")


async def get_service(request: Request) -> ScoringService:
    """The app's ScoringService. ``async`` on purpose: FastAPI runs a plain ``def`` dependency
    in its thread pool, a thread hop per request that costs a scheduling delay on a busy core."""
    return request.app.state.service


Service = Annotated[ScoringService, Depends(get_service)]


def make_admin_router(token: bytes | None) -> APIRouter:
    """The ``/admin`` routes, guarded by ``token`` (None: every route answers 404)."""

    async def authorize(authorization: Annotated[str | None, Header()] = None) -> None:
        if token is None:
            raise ServiceError(404, "http_error", "Not Found")
        scheme, _, given = (authorization or "").partition(" ")
        ok = scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token)
        if not ok:
            raise ServiceError(401, "unauthorized",
                               "admin endpoints need Authorization: Bearer <admin token>",
                               headers={"WWW-Authenticate": 'Bearer realm="mldcn-admin"'})

    router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[Depends(authorize)])
    responses: dict[int | str, dict[str, Any]] = {
        code: {"model": ErrorResponse, "description": what} for code, what in {
            401: "missing or wrong bearer token",
            404: "unknown model or version (or no admin token configured)",
            409: "model in use, or another admin call running",
            422: "an invalid body, or the version failed validation (the old one keeps "
                 "serving)",
        }.items()}

    @router.post("/models/{name}/load", response_model=LoadResponse, responses=responses)
    async def load(name: str, svc: Service,
                   body: Annotated[LoadRequest | None, Body()] = None) -> dict[str, Any]:
        """Load a version (default: the latest) of a model, replacing the one serving."""
        return await svc.control.load(name, body.version if body else None)

    @router.post("/models/{name}/reload", response_model=LoadResponse, responses=responses)
    async def reload(name: str, svc: Service,
                     body: Annotated[LoadRequest | None, Body()] = None) -> dict[str, Any]:
        """Re-load a loaded model at a version (default: the latest), validated first."""
        return await svc.control.load(name, body.version if body else None,
                                      require_loaded=True)

    @router.post("/models/{name}/unload", response_model=LoadResponse, responses=responses)
    async def unload(name: str, svc: Service) -> dict[str, Any]:
        """Take a model out of service; its queued requests finish first."""
        return await svc.control.unload(name)

    @router.get("/models", responses=responses)
    async def serving(svc: Service) -> dict[str, Any]:
        """The versions serving and the traffic configuration."""
        s = svc.settings
        return {"models": [{"name": m.name, "version": m.version, "arch": m.arch,
                            "provider": m.provider} for m in svc.models.values()],
                "default_model": svc.registry.resolve(None).name,
                "fallback_model": s.fallback_model,
                "shadow_model": s.shadow_model, "ab": [list(a) for a in svc.arms],
                "draining": svc.draining, "worker": os.getpid()}

    return router
