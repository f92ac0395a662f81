"""Admin calls that reach every worker process: a shared folder of numbered actions.

With ``mldcn serve --workers N`` each worker holds its own models; an admin call lands on one
of them. That worker applies it (a load is validated and warmed up first: a version that fails
is refused and published nowhere), then publishes it here; every other worker follows the
folder and applies the same action (the same version number, never "latest" again), then
acknowledges it; the worker that took the call waits for every live worker's acknowledgement
and answers with all of them. A worker that starts later (a restart) replays the folder's
actions, so it serves what the others serve.

The folder (``control_dir``, made by the supervisor)::

    lock                 flock: one admin call at a time across the workers (else 409 busy)
    action-000001.json   {"seq": 1, "op": "load", "name": "mldcn", "version": 3, "pid": 123}
    worker-123.json      {"pid": 123, "seq": 1, "results": {"1": {"ok": true, ...}}}

Files are written whole and renamed into place, so a reader never sees half of one.

Example:
    >>> import tempfile
    >>> folder = Path(tempfile.mkdtemp())
    >>> a, b = Broadcast(folder, pid=1), Broadcast(folder, pid=2)
    >>> a.register(a.last_seq()); b.register(b.last_seq())
    >>> with a.exclusive():
    ...     seq = a.publish("load", "mldcn", 3)
    >>> [(x.seq, x.op, x.version) for x in b.pending()]
    [(1, 'load', 3)]
    >>> b.ack(1, {"ok": True, "version": 3})
    >>> a.acks(1)
    {2: {'ok': True, 'version': 3}}
    >>> a.desired()
    {'mldcn': 3}
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FOLLOW_INTERVAL_S = 0.1  # how often a worker looks for new actions


class Busy(Exception):
    """Another admin call holds the lock."""


@dataclass(frozen=True)
class Action:
    """One published admin action: ``op`` is ``load`` (``version`` set) or ``unload``."""

    seq: int
    op: str
    name: str
    version: int | None
    pid: int


def _write(path: Path, doc: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(doc))
    os.replace(tmp, path)


def _read(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def alive(pid: int) -> bool:
    """True while process ``pid`` exists."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Broadcast:
    """One worker's end of the control folder (see the module docstring)."""

    def __init__(self, folder: Path, pid: int | None = None) -> None:
        self.folder = Path(folder)
        self.pid = os.getpid() if pid is None else pid
        self.applied = 0  # the last action this worker applied (or published)
        self._results: dict[str, Any] = {}

    # -- membership ----------------------------------------------------------------------------
    def register(self, applied: int) -> None:
        """Announce this worker, which serves what the actions up to ``applied`` leave (it
        acknowledges the later ones as it applies them)."""
        self.applied = applied
        self._write_ack()

    def unregister(self) -> None:
        with contextlib.suppress(OSError):
            (self.folder / f"worker-{self.pid}.json").unlink()

    def workers(self) -> set[int]:
        """The live workers that announced themselves (a dead one's file is removed)."""
        out = set()
        for p in self.folder.glob("worker-*.json"):
            try:
                pid = int(p.stem.split("-", 1)[1])
            except ValueError:
                continue
            if alive(pid):
                out.add(pid)
            else:
                with contextlib.suppress(OSError):
                    p.unlink()
        return out

    # -- publishing ----------------------------------------------------------------------------
    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold the admin lock for the block; Busy at once if another worker holds it."""
        fd = os.open(self.folder / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise Busy from None
            yield
        finally:
            os.close(fd)  # releases the lock

    def last_seq(self) -> int:
        seqs = [int(p.stem.split("-", 1)[1]) for p in self.folder.glob("action-*.json")]
        return max(seqs, default=0)

    def publish(self, op: str, name: str, version: int | None) -> int:
        """Publish an action this worker applied already, after every earlier one (hold
        :meth:`exclusive`, and apply :meth:`pending` first)."""
        seq = self.last_seq() + 1
        _write(self.folder / f"action-{seq:06d}.json",
               {"seq": seq, "op": op, "name": name, "version": version, "pid": self.pid})
        self.applied = seq
        return seq

    def actions(self, after: int = 0) -> list[Action]:
        """Every published action with a sequence number above ``after``, in order (only
        those files are read: the name carries the number)."""
        out = []
        for p in sorted(self.folder.glob("action-*.json")):
            if int(p.stem.split("-", 1)[1]) <= after:
                continue
            d = _read(p)
            if d is not None:
                out.append(Action(int(d["seq"]), d["op"], d["name"], d.get("version"),
                                  int(d["pid"])))
        return out

    def desired(self, upto: int | None = None) -> dict[str, int | None]:
        """Model name -> the version the actions (up to ``upto``) leave serving (None:
        unloaded)."""
        state: dict[str, int | None] = {}
        for a in self.actions():
            if upto is None or a.seq <= upto:
                state[a.name] = a.version if a.op == "load" else None
        return state

    # -- following -----------------------------------------------------------------------------
    def pending(self) -> list[Action]:
        """Actions published since this worker last applied one, in order."""
        return self.actions(after=self.applied)

    def ack(self, seq: int, result: dict[str, Any]) -> None:
        """Record that this worker applied action ``seq`` with ``result``."""
        self.applied = max(self.applied, seq)
        self._results[str(seq)] = result
        self._results = dict(list(self._results.items())[-32:])  # the recent ones suffice
        self._write_ack()

    def _write_ack(self) -> None:
        _write(self.folder / f"worker-{self.pid}.json",
               {"pid": self.pid, "seq": self.applied, "results": self._results})

    def acks(self, seq: int) -> dict[int, dict[str, Any]]:
        """The other live workers' results for action ``seq`` (those that applied it; a
        worker that started after it replayed it and says so)."""
        out = {}
        for pid in self.workers() - {self.pid}:
            d = _read(self.folder / f"worker-{pid}.json") or {}
            result = d.get("results", {}).get(str(seq))
            if result is None and int(d.get("seq", 0)) >= seq:
                result = {"ok": True, "replayed": True}
            if result is not None:
                out[pid] = result
        return out

    async def wait_acks(self, seq: int, timeout_s: float) -> dict[int, dict[str, Any]]:
        """The other live workers' results for ``seq``, once every one has given its own (or
        at ``timeout_s``: the missing ones are reported as such)."""
        end = time.monotonic() + timeout_s
        while True:
            others = self.workers() - {self.pid}
            got = self.acks(seq)
            if set(got) >= others or time.monotonic() >= end:
                for pid in others - set(got):
                    got[pid] = {"ok": False, "error": f"no answer within {timeout_s:g} s"}
                return got
            await asyncio.sleep(FOLLOW_INTERVAL_S / 2)
