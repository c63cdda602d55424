"""Collects requests that arrive close together and hands them to one worker thread as a batch.

The first request opens a window of ``max_wait_s``; requests arriving within it join until ``max_batch_size``.
With ``active_s`` the window closes as soon as the batch holds every key that submitted within the last ``active_s``
seconds: a key's requests are serialised, so nobody else can join, and a lone robot never waits the window out
(measured: the window was 5 of the ~9 ms a single robot's request cost beyond the model).
Requests with the same key (session id) are serialised: a second one waits for the next batch, in arrival order,
so one session's steps never run concurrently or out of order. With ``batching=False`` every batch is a single
request (the baseline the benchmark compares cross-robot batching against). All model work runs on the worker
thread, never on the server's event loop.
"""

from __future__ import annotations

import concurrent.futures
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Job:
    """One queued request: ``key`` serialises, ``payload`` is the processor's, ``future`` gets the result."""

    key: str
    payload: Any
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    queued_at: float = field(default_factory=time.perf_counter)
    started_at: float | None = None  # when its batch began (perf_counter)


class Batcher:
    """Runs ``process(jobs)`` on a worker thread for batches of submitted jobs.

    ``process`` resolves each job's future (result or exception); futures it leaves unresolved, or all of them if it
    raises, fail with its exception. ``on_idle`` runs on the worker between batches, at least every ``idle_s``.
    """

    def __init__(self, process: Callable[[list[Job]], None], *, max_batch_size: int = 8, max_wait_s: float = 0.005,
                 batching: bool = True, on_idle: Callable[[], None] | None = None, idle_s: float = 1.0,
                 active_s: float | None = None, name: str = "batcher"):
        if max_batch_size < 1 or max_wait_s < 0:
            raise ValueError(f"max_batch_size must be >= 1 and max_wait_s >= 0, got {max_batch_size}, {max_wait_s}")
        self.max_batch_size = max_batch_size if batching else 1
        self.max_wait_s = max_wait_s if batching else 0.0
        self._process, self._on_idle, self._idle_s = process, on_idle, idle_s
        self._active_s = active_s
        self._seen: dict[str, float] = {}  # key -> when it last submitted (for active_s)
        self._seen_lock = threading.Lock()
        self._queue: queue.Queue[Job | None] = queue.Queue()  # None wakes the worker to stop
        self._deferred: deque[Job] = deque()  # same-key jobs waiting for a later batch, in arrival order
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._last_idle = time.monotonic()

    def start(self) -> Batcher:
        self._thread.start()
        return self

    @property
    def alive(self) -> bool:
        """Whether the worker runs and takes jobs."""
        return self._thread.is_alive() and not self._stop.is_set()

    def submit(self, key: str, payload: Any) -> concurrent.futures.Future:
        """Queue a job; the returned future resolves when its batch ran."""
        if self._stop.is_set():
            raise RuntimeError("the batcher is stopped")
        job = Job(key, payload)
        if self._active_s is not None:
            with self._seen_lock:
                self._seen[key] = job.queued_at
        self._queue.put(job)
        return job.future

    def _active_keys(self) -> int:
        """Keys that submitted within the last ``active_s`` (forgetting older ones)."""
        cutoff = time.perf_counter() - self._active_s
        with self._seen_lock:
            for key in [k for k, t in self._seen.items() if t < cutoff]:
                del self._seen[key]
            return len(self._seen)

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the running batch, fail the queued jobs, join the worker."""
        self._stop.set()
        self._queue.put(None)  # an idle worker waits on the queue for up to idle_s: stop now, not then
        if self._thread.is_alive():
            self._thread.join(timeout)
        leftovers = list(self._deferred)
        while True:
            try:
                leftovers.append(self._queue.get_nowait())
            except queue.Empty:
                break
        for job in leftovers:
            if job is not None and not job.future.done():
                job.future.set_exception(RuntimeError("the policy server is shutting down"))

    # ------------------------------------------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            batch = self._collect()
            if batch:
                self._run_batch(batch)
            if self._on_idle and (not batch or time.monotonic() - self._last_idle >= self._idle_s):
                self._last_idle = time.monotonic()
                try:
                    self._on_idle()
                except Exception:  # housekeeping must not kill the worker
                    log.exception("batcher idle hook failed")

    def _collect(self) -> list[Job]:
        batch: list[Job] = []
        keys: set[str] = set()
        # deferred jobs first, in order; a key already in the batch keeps its later jobs deferred
        still: deque[Job] = deque()
        while self._deferred:
            job = self._deferred.popleft()
            if job.key in keys or len(batch) >= self.max_batch_size:
                still.append(job)
            else:
                batch.append(job)
                keys.add(job.key)
        self._deferred = still
        blocked = keys | {j.key for j in still}
        deadline = None
        while len(batch) < self.max_batch_size:
            if not batch:
                timeout = self._idle_s
            elif self._active_s is not None and len(batch) >= self._active_keys() and self._queue.empty():
                break  # every active session is in the batch: nobody else will come within the window
            else:
                deadline = deadline or time.perf_counter() + self.max_wait_s
                timeout = deadline - time.perf_counter()
                if timeout <= 0:
                    break
            try:
                job = self._queue.get(timeout=timeout)
            except queue.Empty:
                break
            if job is None:  # stop() woke the worker
                break
            if job.key in blocked:
                self._deferred.append(job)
                continue
            batch.append(job)
            blocked.add(job.key)
        return batch

    def _run_batch(self, batch: list[Job]) -> None:
        # a caller that gave up (the client went away: its gRPC call cancels the future) is dropped here; every
        # future that stays is RUNNING, so resolving it can no longer raise InvalidStateError mid-batch
        batch = [job for job in batch if job.future.set_running_or_notify_cancel()]
        if not batch:
            return
        started = time.perf_counter()
        for job in batch:
            job.started_at = started
        try:
            self._process(batch)
        except Exception as err:
            log.exception("batch of %d failed", len(batch))
            for job in batch:
                if not job.future.done():
                    job.future.set_exception(err)
        for job in batch:
            if not job.future.done():
                job.future.set_exception(RuntimeError("the batch left this request unanswered"))
