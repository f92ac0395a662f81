"""The dynamic batcher: requests' rows → ONNX Runtime batches, run off the event loop.

The batcher never touches HTTP and never touches the model: it gets encoded rows, a deadline
and a future per request (:class:`WorkItem`), and a ``run(cat_ids, dense) -> probabilities``
function. Each request's rows go into one batch, split into chunks of at most
``max_batch_size`` rows when it is larger; with ``dynamic_batching``, concurrent requests are
merged into one batch up to ``max_batch_size`` rows, waiting at most ``max_queue_delay_s`` for
more rows (0: merge what is queued when an ONNX Runtime instance becomes free, Triton's
recommended starting point). Batches run in a thread pool of ``instance_count`` threads; ONNX
Runtime releases the GIL, so the event loop keeps parsing and encoding meanwhile.

Before a request's first rows are computed, the batcher drops it if it can no longer finish by
its deadline (:class:`DeadlineExceeded`, answered 504) or if its client went away (its future
was cancelled): neither is ever computed.

Example:
    >>> import asyncio
    >>> async def demo():
    ...     b = Batcher(lambda cat, dense: dense[:, 0] * 2, max_batch_size=4)
    ...     b.start()
    ...     now = time.monotonic()
    ...     items = [b.submit(np.zeros((n, 0), np.int64), np.ones((n, 1), np.float32), now + 5)
    ...              for n in (3, 6)]
    ...     out = await asyncio.gather(*(i.future for i in items))
    ...     await b.stop()
    ...     return [o.tolist() for o in out]
    >>> asyncio.run(demo())
    [[2.0, 2.0, 2.0], [2.0, 2.0, 2.0, 2.0, 2.0, 2.0]]
"""

from __future__ import annotations

import asyncio
import itertools
import math
import os
import sys
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from service.budget import LatencyModel

RunFn = Callable[[np.ndarray, np.ndarray], np.ndarray]


def lower_thread_priority(nice: int) -> None:
    """Raise the calling thread's nice value by ``nice``; threads it starts later inherit it.

    On Linux the nice value belongs to the thread, not the process: the threads that run
    ONNX Runtime get a lower priority than the event loop, which then takes the core
    whenever it has work (admission decisions, 503s, responses) instead of sharing it in
    time slices with a batch that runs for milliseconds. A no-op for 0 and off Linux (where
    the nice value belongs to the whole process); an error is ignored (the thread keeps its
    priority).
    """
    if nice <= 0 or not sys.platform.startswith("linux"):
        return
    try:
        os.setpriority(os.PRIO_PROCESS, 0, os.getpriority(os.PRIO_PROCESS, 0) + nice)
    except OSError:
        pass


class QueueFull(Exception):
    """The model's queue holds ``max_queue_size`` requests already."""


class DeadlineExceeded(Exception):
    """The request's deadline passed (or can no longer be met) before it was computed."""


@dataclass(eq=False)
class WorkItem:
    """One request's encoded rows on their way through the batcher."""

    cat: np.ndarray  # (N, F_cat) int64
    dense: np.ndarray  # (N, F_num) float32
    deadline_s: float  # time.monotonic() deadline
    future: asyncio.Future[np.ndarray]
    enqueued_s: float
    taken: int = 0  # rows handed to batches so far
    done: int = 0  # rows scored
    started_s: float | None = None  # when its first batch started
    compute_s: float = 0.0  # ONNX Runtime time of the batches it was in
    out: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.out = np.empty(len(self.cat), dtype=np.float32)

    @property
    def rows(self) -> int:
        return len(self.cat)

    @property
    def queue_s(self) -> float:
        """Seconds from enqueueing to its first batch."""
        return (self.started_s or self.enqueued_s) - self.enqueued_s


Part = tuple[WorkItem, int, int]  # (item, first row, end row)


def take_batch(
    queue: deque[WorkItem],
    max_rows: int,
    now_s: float,
    merge: bool = True,
    estimate_s: Callable[[int], float] = lambda rows: 0.0,
    batch: tuple[int, float] = (0, math.inf),
) -> tuple[list[Part], list[WorkItem]]:
    """Move up to ``max_rows`` rows from the head of ``queue`` into one batch.

    Returns (parts, expired). A request larger than the room left contributes a chunk and stays
    at the head with its remaining rows. Cancelled requests are dropped; requests not yet started
    whose deadline cannot be met (``now_s + estimate_s(rows) > deadline``), and started ones
    whose deadline has passed, are removed and returned as ``expired``. Without ``merge`` the
    batch holds one request (or one chunk of it). With it, the next request joins only when
    that pays and harms no one (:func:`worth_merging`: the compute it saves, one batch's fixed
    cost, is at least the time it adds to the batch, and the batch still ends before the
    earliest deadline in it); else it waits for the next batch. ``batch`` is (rows, earliest
    deadline) of a batch being filled already.

    Example:
        >>> loop = asyncio.new_event_loop()
        >>> def item(n, deadline=10.0):
        ...     return WorkItem(np.zeros((n, 1), np.int64), np.zeros((n, 0), np.float32),
        ...                     deadline, loop.create_future(), 0.0)
        >>> q = deque([item(3), item(1, deadline=0.5), item(4)])
        >>> parts, expired = take_batch(q, 5, now_s=1.0)
        >>> [(p[0].rows, p[1], p[2]) for p in parts], [e.rows for e in expired], len(q)
        ([(3, 0, 3), (4, 0, 2)], [1], 1)
        >>> q = deque([item(3), item(4)])  # 1 ms per row, no fixed cost: merging never pays
        >>> parts, _ = take_batch(q, 10, now_s=1.0, estimate_s=lambda rows: 0.001 * rows)
        >>> [p[0].rows for p in parts], len(q)
        ([3], 1)
        >>> loop.close()
    """
    parts: list[Part] = []
    expired: list[WorkItem] = []
    room = max_rows
    rows, earliest = batch
    while queue and room > 0:
        item = queue[0]
        if item.future.done():  # cancelled by its client (or failed)
            queue.popleft()
            continue
        left = item.rows - item.taken
        late = now_s >= item.deadline_s or (
            not item.taken and now_s + estimate_s(left) > item.deadline_s)
        if late:
            queue.popleft()
            expired.append(item)
            continue
        k = min(left, room)
        if rows and not worth_merging(rows, k, now_s, min(earliest, item.deadline_s),
                                      estimate_s):
            break
        parts.append((item, item.taken, item.taken + k))
        item.taken += k
        room -= k
        rows += k
        earliest = min(earliest, item.deadline_s)
        if item.taken == item.rows:
            queue.popleft()
        if not merge:
            break
    return parts, expired


def worth_merging(rows: int, more: int, now_s: float, deadline_s: float,
                  estimate_s: Callable[[int], float]) -> bool:
    """Should ``more`` rows join a batch of ``rows``? When running them alone would cost at
    least twice what they add to the batch (what merging saves, a batch's fixed cost, is at
    least the delay it imposes on the rows already in it), and the grown batch still ends by
    ``deadline_s``. On a GPU (a large fixed cost per call) requests merge; on a CPU, where
    the cost is per row, a 300-row request waits for the next batch instead of delaying this
    one by its whole compute time.

    Example:
        >>> gpu = lambda n: 0.002 + 1e-7 * n  # 2 ms per call, 0.1 us per row
        >>> cpu = lambda n: 0.00002 + 3e-6 * n  # 20 us per call, 3 us per row
        >>> worth_merging(300, 300, 0.0, 1.0, gpu), worth_merging(300, 300, 0.0, 1.0, cpu)
        (True, False)
        >>> worth_merging(300, 2, 0.0, 1.0, cpu), worth_merging(300, 300, 0.0, 0.002, gpu)
        (True, False)
    """
    added = estimate_s(rows + more) - estimate_s(rows)
    return estimate_s(more) >= 2 * added and now_s + estimate_s(rows + more) <= deadline_s


class Batcher:
    """Per-model request queue and batch loop (see the module docstring).

    Args:
        run: the model, ``run(cat_ids, dense) -> probabilities (B,)``; called in a worker thread.
        max_batch_size: most rows per call of ``run``.
        max_queue_delay_s: longest wait for more rows once a batch has some.
        max_queue_size: most requests waiting; :meth:`submit` raises QueueFull beyond it.
        dynamic_batching: merge concurrent requests into one batch.
        instance_count: batches run concurrently (threads).
        latency: the latency model to feed and ask (a fresh one by default).
        on_batch: called with (rows, compute seconds) after each batch, for metrics.
        nice: nice increment of the batch threads (:func:`lower_thread_priority`).
    """

    def __init__(
        self,
        run: RunFn,
        *,
        max_batch_size: int = 2048,
        max_queue_delay_s: float = 0.0,
        max_queue_size: int = 256,
        dynamic_batching: bool = True,
        instance_count: int = 1,
        latency: LatencyModel | None = None,
        on_batch: Callable[[int, float], None] | None = None,
        name: str = "model",
        nice: int = 0,
    ) -> None:
        if max_batch_size < 1 or max_queue_size < 1 or instance_count < 1:
            raise ValueError("max_batch_size, max_queue_size and instance_count must be >= 1, "
                             f"got {max_batch_size}, {max_queue_size}, {instance_count}")
        if max_queue_delay_s < 0:
            raise ValueError(f"max_queue_delay_s must be >= 0, got {max_queue_delay_s}")
        self.run = run
        self.max_batch_size = max_batch_size
        self.max_queue_delay_s = max_queue_delay_s
        self.max_queue_size = max_queue_size
        self.dynamic_batching = dynamic_batching
        self.instance_count = instance_count
        self.latency = latency or LatencyModel()
        self.on_batch = on_batch
        self._queue: deque[WorkItem] = deque()
        self._queued_rows = 0
        self._wake = asyncio.Event()
        self._slots = asyncio.Semaphore(instance_count)
        self._running: dict[int, float] = {}  # batch id -> predicted end (monotonic)
        self._ids = itertools.count()
        self._tasks: set[asyncio.Task[None]] = set()
        self._event_loop: asyncio.AbstractEventLoop | None = None  # set by start()
        self._inline_done = asyncio.Event()  # clear while a batch runs inside the loop task
        self._inline_done.set()
        self._holding = False  # rows taken from the queue, waiting for more (queue delay)
        self._loop_task: asyncio.Task[None] | None = None
        self._executor = ThreadPoolExecutor(instance_count, thread_name_prefix=f"ort-{name}",
                                            initializer=lower_thread_priority, initargs=(nice,))

    # -- state --------------------------------------------------------------------------------
    @property
    def queue_depth(self) -> int:
        """Requests waiting (including ones cancelled but not yet swept)."""
        return len(self._queue)

    def predict_s(self, rows: int, now_s: float | None = None) -> float:
        """Predicted seconds until a request of ``rows`` rows submitted now is scored.

        The batch still running (when every instance is busy), the rows queued ahead, this
        request's rows, each batch's fixed cost, and the queue delay. Concurrent instances are
        not assumed to speed anything up (on CPU they share the same cores). Requests count as
        merged into shared batches when merging pays for a request of this size
        (:func:`worth_merging`), else as a batch each.
        """
        now_s = time.monotonic() if now_s is None else now_s
        lm = self.latency
        lm.predict(0)  # refresh the fit
        busy = 0.0
        if len(self._running) >= self.instance_count:
            busy = max(0.0, min(self._running.values()) - now_s)
        total_rows = self._queued_rows + rows
        if self.dynamic_batching and lm.fixed_s >= lm.per_row_s * rows:
            batches = math.ceil(total_rows / self.max_batch_size)
            delay = self.max_queue_delay_s
        else:
            batches = len(self._queue) + math.ceil(rows / self.max_batch_size)
            delay = 0.0
        return busy + delay + batches * lm.fixed_s + lm.per_row_s * total_rows

    # -- requests -----------------------------------------------------------------------------
    def submit(self, cat: np.ndarray, dense: np.ndarray, deadline_s: float) -> WorkItem:
        """Queue a request's rows; await ``item.future`` for its probabilities (N,).

        The future raises DeadlineExceeded if the request was dropped; cancel it to withdraw
        the request (it is then never computed unless a batch already holds it).
        """
        if len(self._queue) >= self.max_queue_size:
            raise QueueFull(f"queue holds {len(self._queue)} requests (max_queue_size)")
        if len(cat) != len(dense):
            raise ValueError(f"cat_ids has {len(cat)} rows, dense has {len(dense)}")
        loop = self._event_loop or asyncio.get_running_loop()
        item = WorkItem(cat, dense, deadline_s, loop.create_future(), time.monotonic())
        if item.rows == 0:
            item.future.set_result(item.out)
            return item
        self._queue.append(item)
        self._queued_rows += item.rows
        self._wake.set()
        return item

    # -- the loop -----------------------------------------------------------------------------
    def start(self) -> None:
        """Start the batch loop on the running event loop."""
        if self._loop_task is None:
            self._event_loop = asyncio.get_running_loop()
            self._loop_task = self._event_loop.create_task(self._loop())

    async def stop(self) -> None:
        """Finish the running batches, fail what is still queued, stop the threads."""
        if self._loop_task is not None:
            # the batch running in the loop task, or being collected (max_queue_delay_s)
            while self._holding or not self._inline_done.is_set():
                if self._holding:
                    await asyncio.sleep(0.001)
                else:
                    await self._inline_done.wait()
            self._loop_task.cancel()
            try:
                await self._loop_task
            except asyncio.CancelledError:
                pass
            self._loop_task = None
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        while self._queue:
            item = self._queue.popleft()
            if not item.future.done():
                item.future.set_exception(DeadlineExceeded("the server is shutting down"))
        self._queued_rows = 0
        self._executor.shutdown(wait=True)

    @property
    def idle(self) -> bool:
        """Nothing queued and no batch running."""
        return (not self._queue and not self._tasks and not self._holding
                and self._inline_done.is_set())

    async def drain(self, timeout_s: float) -> bool:
        """Let the queued and running requests finish (at most ``timeout_s``), then stop.

        How a replaced model version retires: nothing new is submitted to it, and what it
        holds is scored. True if everything finished in time; what is left fails as
        :meth:`stop` fails it.
        """
        end = time.monotonic() + timeout_s
        while not self.idle and time.monotonic() < end:
            await asyncio.sleep(0.005)
        finished = self.idle
        await self.stop()
        return finished

    def _take(self, max_rows: int, batch: tuple[int, float] = (0, math.inf)) -> list[Part]:
        parts, expired = take_batch(self._queue, max_rows, time.monotonic(),
                                    self.dynamic_batching, self.latency.predict, batch)
        # what is left: rows not taken yet (once per batch, O(queue))
        self._queued_rows = sum(i.rows - i.taken for i in self._queue)
        for item in expired:
            if not item.future.done():
                item.future.set_exception(DeadlineExceeded("deadline passed while queued"))
        return parts

    async def _collect(self) -> list[Part]:
        while True:
            while not self._queue:
                self._wake.clear()
                await self._wake.wait()
            parts = self._take(self.max_batch_size)
            if parts:
                break
        if not (self.dynamic_batching and self.max_queue_delay_s > 0):
            return parts
        rows = sum(b - a for _, a, b in parts)
        earliest = min(item.deadline_s for item, _, _ in parts)
        until = time.monotonic() + self.max_queue_delay_s
        self._holding = True
        try:
            return await self._fill(parts, rows, earliest, until)
        finally:
            self._holding = False

    async def _fill(self, parts: list[Part], rows: int, earliest: float, until: float
                    ) -> list[Part]:
        """Add queued rows to ``parts`` until the batch is full or ``until``."""
        while rows < self.max_batch_size:
            remaining = until - time.monotonic()
            if remaining <= 0:
                break
            if not self._queue:
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), remaining)
                except TimeoutError:
                    break
            more = self._take(self.max_batch_size - rows, (rows, earliest))
            if not more:
                break  # the next request does not merge: run what there is
            parts += more
            rows += sum(b - a for _, a, b in more)
            earliest = min(earliest, *(item.deadline_s for item, _, _ in more))
        return parts

    async def _loop(self) -> None:
        while True:
            await self._slots.acquire()
            try:
                parts = await self._collect()
            except BaseException:
                self._slots.release()
                raise
            if self.instance_count == 1:  # one batch at a time: run it here, no task
                self._inline_done.clear()
                try:
                    await self._run_batch(parts)
                finally:
                    self._inline_done.set()
                continue
            task = asyncio.get_running_loop().create_task(self._run_batch(parts))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _timed_run(self, cat: np.ndarray, dense: np.ndarray) -> tuple[np.ndarray, float]:
        t0 = time.perf_counter()
        probs = self.run(cat, dense)
        return probs, time.perf_counter() - t0

    async def _run_batch(self, parts: list[Part]) -> None:
        batch_id = next(self._ids)
        parts = [p for p in parts if not p[0].future.done()]  # clients gone while collecting
        if not parts:
            self._slots.release()
            return
        try:
            start = time.monotonic()
            for item, _, _ in parts:
                if item.started_s is None:
                    item.started_s = start
            if len(parts) == 1 and parts[0][1] == 0 and parts[0][2] == parts[0][0].rows:
                cat, dense = parts[0][0].cat, parts[0][0].dense
            else:
                cat = np.concatenate([i.cat[a:b] for i, a, b in parts])
                dense = np.concatenate([i.dense[a:b] for i, a, b in parts])
            rows = len(cat)
            self._running[batch_id] = start + self.latency.predict(rows)
            loop = self._event_loop  # set by start(), before the loop that runs batches
            assert loop is not None
            probs, compute_s = await loop.run_in_executor(self._executor, self._timed_run,
                                                          cat, dense)
            self.latency.observe(rows, time.monotonic() - start)
            if self.on_batch is not None:
                self.on_batch(rows, compute_s)
            if probs.shape != (rows,):
                raise RuntimeError(f"model returned shape {probs.shape} for {rows} rows")
            offset = 0
            for item, a, b in parts:
                item.out[a:b] = probs[offset: offset + b - a]
                offset += b - a
                item.done += b - a
                item.compute_s += compute_s
                if item.done == item.rows and not item.future.done():
                    item.future.set_result(item.out)
        except Exception as e:  # delivered to every request of the batch
            for item, _, _ in parts:
                if not item.future.done():
                    item.future.set_exception(e)
        finally:
            self._running.pop(batch_id, None)
            self._slots.release()
