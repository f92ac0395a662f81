"""The server process: uvicorn, with a graceful drain on SIGTERM that ends in exit code 0.

uvicorn's own SIGTERM handling closes the listening socket at once (new clients get
"connection refused", readiness probes fail to connect instead of answering 503), waits for
open connections up to ``timeout_graceful_shutdown``, runs the lifespan shutdown, and then
re-raises the signal, so the process ends killed by SIGTERM rather than with exit code 0.

:class:`DrainingServer` changes the first SIGTERM (or SIGINT) into a drain:

1. The service starts draining (:meth:`~service.scoring.ScoringService.begin_drain`):
   ``/v2/health/ready`` answers 503 ``draining``, new ``/v1/score`` and ``/v2/.../infer``
   requests get 503 ``draining`` with ``Connection: close`` (so load balancers and clients
   move on), everything else (health, metrics, metadata) still answers.
2. Requests already admitted are scored as usual, within their own deadlines.
3. When none is left in flight, or after ``drain_grace_s``, uvicorn's shutdown runs: it stops
   accepting connections, closes idle keep-alive ones, gives the rest at most
   ``SHUTDOWN_TIMEOUT_S``, then the lifespan shutdown stops the batchers.
4. The process exits with code 0.

A second signal during the drain exits at once (uvicorn's forced shutdown). Set Kubernetes'
``terminationGracePeriodSeconds`` above ``drain_grace_s`` plus a few seconds.

With ``workers > 1`` every worker is a DrainingServer on one shared socket, under the
supervisor of :mod:`service.workers`, which forwards the signal to each: the behaviour above
holds for every worker, and the supervisor exits 0 once all of them have.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import time
from types import FrameType
from typing import Any

import uvicorn

from service.settings import Settings

log = logging.getLogger("uvicorn.error")
SHUTDOWN_TIMEOUT_S = 2.0
DRAIN_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _find_service(app: Any) -> Any:
    """The ScoringService behind uvicorn's loaded app (through its middleware wrappers)."""
    for _ in range(16):
        state = getattr(app, "state", None)
        service = getattr(state, "service", None) if state is not None else None
        if service is not None:
            return service
        app = getattr(app, "app", None)
        if app is None:
            return None
    return None


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose first SIGTERM/SIGINT drains (see the module docstring)."""

    def __init__(self, config: uvicorn.Config, drain_grace_s: float) -> None:
        super().__init__(config)
        self.drain_grace_s = drain_grace_s
        self.drain_requested_s: float | None = None
        self._drain_started = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.drain_requested_s is None and sig in DRAIN_SIGNALS:
            self.drain_requested_s = time.monotonic()
            try:  # start draining now rather than at the next tick (0.1 s)
                asyncio.get_running_loop().call_soon_threadsafe(self._begin_drain)
            except RuntimeError:
                pass  # no loop running: on_tick will
            return
        self.should_exit = True  # a second signal: now (not re-raised: exit code 0)
        self.force_exit = True

    def _begin_drain(self) -> Any:
        """The service, now draining (None if there is none yet)."""
        service = _find_service(self.config.loaded_app)
        if service is not None and not self._drain_started:
            self._drain_started = True
            service.begin_drain()
        return service

    async def on_tick(self, counter: int) -> bool:
        if self.drain_requested_s is not None and not self.should_exit:
            service = self._begin_drain()
            if service is None:
                self.should_exit = True
            else:
                waited_s = time.monotonic() - self.drain_requested_s
                if service.idle or waited_s >= self.drain_grace_s:
                    if not service.idle:
                        log.warning("drain grace of %.1fs over with %d requests in flight",
                                    self.drain_grace_s, service.in_flight)
                    else:
                        log.info("drained in %.2fs", waited_s)
                    self.should_exit = True
        return await super().on_tick(counter)


def _config(settings: Settings, access_log: bool) -> uvicorn.Config:
    """uvicorn's settings: no X-Forwarded-* rewriting and no ``server`` header (the service
    reads neither; each costs a little on every request)."""
    return uvicorn.Config("service.app:create_app", factory=True, host=settings.host,
                          port=settings.port, log_level=settings.log_level,
                          access_log=access_log, timeout_graceful_shutdown=SHUTDOWN_TIMEOUT_S,
                          proxy_headers=False, server_header=False)


def run(settings: Settings, access_log: bool = False) -> int:
    """Serve ``service.app:create_app`` in this process (one worker; ``--workers N`` is
    :func:`service.workers.run`); the process's exit code."""
    server = DrainingServer(_config(settings, access_log), settings.drain_grace_s)
    server.run()
    return 0 if server.started else 3


def serve_socket(settings: Settings, sock: socket.socket, access_log: bool = False) -> int:
    """One worker of :mod:`service.workers`: a DrainingServer on a socket bound already."""
    config = _config(settings, access_log)
    config.configure_logging()
    server = DrainingServer(config, settings.drain_grace_s)
    server.run(sockets=[sock])
    return 0 if server.started else 3
