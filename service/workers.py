"""``--workers N``: one listening socket, N worker processes that each drain on SIGTERM.

Python runs one event loop per process, so past one core the server runs several worker
processes (each with its own models, batchers and event loop) that share one listening socket:
the kernel hands each new connection to one of them. :class:`Supervisor` binds the socket,
starts the workers (``multiprocessing`` spawn, each in its own session so that a terminal's
Ctrl-C reaches only the supervisor), and

- forwards SIGTERM/SIGINT to every worker, each of which drains exactly like a single server
  (:class:`service.server.DrainingServer`: readiness 503, new scoring requests 503
  ``draining``, admitted ones finish, exit 0); the supervisor exits 0 once all have (a second
  signal makes them exit at once);
- restarts a worker that dies while serving (its replacement replays the admin actions so far,
  :mod:`service.broadcast`; a replacement that fails before it serves is retried after a
  pause); a first worker that dies before it ever served (a model that does not load, a port
  in use) stops the whole server with exit code 3, as a single server would;
- gives the workers a shared ``control_dir`` (admin calls reach every worker), a
  ``PROMETHEUS_MULTIPROC_DIR`` unless one is set (``/metrics`` adds up every worker, whichever
  answers), and each its ``worker_index`` (``device_ids`` spreads them over GPUs).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from multiprocessing.process import BaseProcess
from pathlib import Path
from types import FrameType
from typing import Any

from service.metrics import MULTIPROC_ENV
from service.settings import ENV_PREFIX, Settings

log = logging.getLogger("uvicorn.error")
RESTART_BACKOFF_S = 1.0
PR_SET_PDEATHSIG = 1
EXIT_MARGIN_S = 10.0  # on top of drain_grace_s before a worker that does not exit is killed


def _worker_main(env: dict[str, str], sock: socket.socket, access_log: bool,
                 supervisor: int) -> None:
    """A worker process: the settings from ``env``, a DrainingServer on the shared socket."""
    os.setsid()  # not in the terminal's process group: signals come from the supervisor
    _drain_when_orphaned(supervisor)
    os.environ.update(env)
    from service.server import serve_socket
    from service.settings import get_settings

    get_settings.cache_clear()
    raise SystemExit(serve_socket(get_settings(), sock, access_log))


def _drain_when_orphaned(supervisor: int) -> None:
    """Linux: get SIGTERM (a drain) if the supervisor dies, even by SIGKILL, so that no worker
    keeps serving on the shared socket without it."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        return
    if os.getppid() != supervisor:  # it died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


class Supervisor:
    """Runs ``settings.workers`` workers on one socket (see the module docstring)."""

    def __init__(self, settings: Settings, access_log: bool = False) -> None:
        self.settings = settings
        self.access_log = access_log
        self.workers: dict[int, BaseProcess] = {}  # worker index -> process
        self.served: set[int] = set()  # pids of the workers that became ready
        self.replaced: set[int] = set()  # indices whose first process died while serving
        self.stopping_s: float | None = None
        self.signals = 0
        self._spawn = multiprocessing.get_context("spawn")

    def _bind(self) -> socket.socket:
        s = self.settings
        family = socket.AF_INET6 if ":" in s.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((s.host, s.port))
        sock.listen(2048)
        sock.set_inheritable(True)
        return sock

    def _start(self, index: int, sock: socket.socket, control_dir: Path) -> None:
        env = {k: v for k, v in os.environ.items() if k.startswith(ENV_PREFIX)}
        env |= {f"{ENV_PREFIX}CONTROL_DIR": str(control_dir),
                f"{ENV_PREFIX}WORKER_INDEX": str(index)}
        p = self._spawn.Process(target=_worker_main,
                                args=(env, sock, self.access_log, os.getpid()),
                                name=f"mldcn-worker-{index}")
        self.workers[index] = p
        p.start()
        log.info("started worker %d (pid %s)", index, p.pid)
        if self.stopping_s is not None and p.pid is not None:  # a signal came meanwhile
            os.kill(p.pid, signal.SIGTERM)

    def _on_signal(self, sig: int, frame: FrameType | None) -> None:
        self.signals += 1
        if self.stopping_s is None:
            self.stopping_s = time.monotonic()
            log.info("supervisor: %s, draining %d workers", signal.Signals(sig).name,
                     len(self.workers))
        for p in self.workers.values():  # the first drains them, a second ends them at once
            if p.pid is not None and p.is_alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGTERM)

    def run(self) -> int:
        """Serve until signalled and every worker has exited; the exit code."""
        import uvicorn

        uvicorn.Config("service.app:create_app", log_level=self.settings.log_level
                       ).configure_logging()
        sock = self._bind()
        host, port = sock.getsockname()[:2]
        control_dir = Path(tempfile.mkdtemp(prefix="mldcn-control-"))
        metrics_dir = None  # the workers' metric files, unless the caller chose a folder
        if not os.environ.get(MULTIPROC_ENV):
            metrics_dir = tempfile.mkdtemp(prefix="mldcn-prometheus-")
            os.environ[MULTIPROC_ENV] = metrics_dir
        previous = {sig: signal.signal(sig, self._on_signal)
                    for sig in (signal.SIGTERM, signal.SIGINT)}
        log.info("supervisor %d: %d workers on http://%s:%d", os.getpid(),
                 self.settings.workers, host, port)
        codes: dict[int, int | None] = {}
        try:
            for i in range(self.settings.workers):
                self._start(i, sock, control_dir)
            codes = self._watch(sock, control_dir)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            for p in self.workers.values():
                if p.is_alive():
                    p.kill()
                    p.join(5)
            sock.close()
            shutil.rmtree(control_dir, ignore_errors=True)
            if metrics_dir is not None:
                os.environ.pop(MULTIPROC_ENV, None)
                shutil.rmtree(metrics_dir, ignore_errors=True)
        if any(c == 3 for c in codes.values()):
            return 3
        return 0 if all(c == 0 for c in codes.values()) else 1

    def _watch(self, sock: socket.socket, control_dir: Path) -> dict[int, int | None]:
        """Wait for the workers: restart the ones that die while serving, and end when
        every one has exited after a signal (killing those past drain_grace_s)."""
        codes: dict[int, int | None] = {}
        grace_s = self.settings.drain_grace_s + EXIT_MARGIN_S
        while True:
            time.sleep(0.1)
            for i, p in list(self.workers.items()):
                if p.pid not in self.served and (control_dir / f"worker-{p.pid}.json").exists():
                    self.served.add(p.pid)
                if p.is_alive():
                    if self.stopping_s is not None and time.monotonic() - self.stopping_s > grace_s:
                        log.error("worker %d (pid %s) did not exit: killed", i, p.pid)
                        p.kill()
                    continue
                codes[i] = p.exitcode
                _forget_metrics(p.pid)
                if self.stopping_s is None and p.pid not in self.served and i not in self.replaced:
                    log.error("worker %d (pid %s) exited with %s before it served: stopping",
                              i, p.pid, p.exitcode)
                    codes[i] = 3
                    self._on_signal(signal.SIGTERM, None)
                    del self.workers[i]
                elif self.stopping_s is None:
                    log.error("worker %d (pid %s) exited with %s; restarting it", i, p.pid,
                              p.exitcode)
                    self.replaced.add(i)
                    time.sleep(RESTART_BACKOFF_S)
                    if self.stopping_s is None:  # no signal during the pause
                        self._start(i, sock, control_dir)
                        codes.pop(i, None)
                    else:
                        del self.workers[i]
                else:
                    del self.workers[i]
            if self.stopping_s is not None and not self.workers:
                return codes


def _forget_metrics(pid: Any) -> None:
    """Drop a dead worker's live gauges from the multiprocess metrics files."""
    if pid is not None and os.environ.get(MULTIPROC_ENV):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)


def run(settings: Settings, access_log: bool = False) -> int:
    """``mldcn serve``: one server in this process, or a supervisor of ``settings.workers``."""
    if settings.workers > 1:
        return Supervisor(settings, access_log).run()
    from service.server import run as run_one

    return run_one(settings, access_log)
