"""Admin endpoints: load, unload and reload model versions while the server takes traffic.

Routes (all ``POST``, JSON in and out)::

  /admin/models/{name}/load    {"version": 3}?  load a version (default: the latest) of any
                                                model in the repository; replaces the version
                                                serving if the model is loaded
  /admin/models/{name}/reload  {"version": 3}?  the same for a model that is loaded (404 if
                                                not): re-reads and re-validates it
  /admin/models/{name}/unload                   take a model out of service
  GET /admin/models                             what is serving: name, version, roles

Answer: ``{"name", "version", "previous_version", "load_s"}`` (200). A version that fails
validation (content hash, model.json, graph inputs/outputs, encoders against the schema, a test
inference; :func:`service.models.validate_served`) is refused with 422 ``version_rejected`` and
the old version keeps serving; an unknown model or version is 404; a model the configuration
needs (default, fallback, shadow, A/B arm) or the last one cannot be unloaded (409
``model_in_use``); a second admin call while one is running is 409 ``busy``. The swap itself
is atomic (see :meth:`service.scoring.ScoringService.load`): requests already queued finish
on the old version, later ones use the new one, none is dropped.

Authentication: ``Authorization: Bearer <token>`` where the token is ``admin_token``
(``MLDCN_ADMIN_TOKEN``) or the content of ``admin_token_file`` (``MLDCN_ADMIN_TOKEN_FILE``,
read once at start-up, surrounding whitespace stripped). A missing or wrong token is 401 with
``WWW-Authenticate: Bearer``; the comparison is constant-time (``hmac.compare_digest``). With
no token configured the admin endpoints do not exist: every ``/admin`` path is 404, exactly as
for an unknown path, so that an unprotected server cannot be reconfigured from the network.

With ``workers > 1`` an admin call changes only the worker process that answered it; use
repository polling (``poll_interval_s``), which every worker does, to roll versions there.
"""

from __future__ import annotations

import hmac
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Header, Request
from pydantic import BaseModel, ConfigDict, Field

from service.scoring import ScoringService, ServiceError


class LoadRequest(BaseModel):
    """Body of load/reload (optional)."""

    model_config = ConfigDict(extra="forbid")

    version: int | None = Field(default=None, ge=1, description="version; default: the latest")


class LoadResponse(BaseModel):
    """What serves after an admin call."""

    name: str
    version: int | None = Field(description="the version now serving (null after unload)")
    previous_version: int | None = Field(description="the version serving before")
    load_s: float | None = Field(default=None, description="open + validate + warm up")


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
        401: {"description": "missing or wrong bearer token"},
        404: {"description": "unknown model or version (or no admin token configured)"},
        409: {"description": "model in use, or another admin call running"},
        422: {"description": "the version failed validation; the old one keeps serving"},
    }

    @router.post("/models/{name}/load", response_model=LoadResponse, responses=responses)
    async def load(name: str, svc: Service,
                   body: Annotated[LoadRequest | None, Body()] = None) -> dict[str, Any]:
        """Load a version (default: the latest) of a model, replacing the one serving."""
        return await svc.load(name, body.version if body else None)

    @router.post("/models/{name}/reload", response_model=LoadResponse, responses=responses)
    async def reload(name: str, svc: Service,
                     body: Annotated[LoadRequest | None, Body()] = None) -> dict[str, Any]:
        """Re-load a loaded model at a version (default: the latest), validated first."""
        return await svc.load(name, body.version if body else None, require_loaded=True)

    @router.post("/models/{name}/unload", response_model=LoadResponse, responses=responses)
    async def unload(name: str, svc: Service) -> dict[str, Any]:
        """Take a model out of service; its queued requests finish first."""
        return await svc.unload(name)

    @router.get("/models", responses=responses)
    async def serving(svc: Service) -> dict[str, Any]:
        """The versions serving and the traffic configuration."""
        s = svc.settings
        return {"models": [{"name": m.name, "version": m.version, "arch": m.arch,
                            "provider": m.provider} for m in svc.models.values()],
                "default_model": svc.resolve(None).name, "fallback_model": s.fallback_model,
                "shadow_model": s.shadow_model, "ab": [list(a) for a in svc.arms],
                "draining": svc.draining}

    return router
