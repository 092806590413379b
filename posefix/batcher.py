"""Dynamic batching: the persons of many concurrent calls computed together, like Triton's dynamic batcher.

Glossary: a call is one image and its P persons, poses (P, K, 3) = (x, y, score) in that image's pixels,
K = 17 COCO joints. Calls wait in a queue bounded in persons; one worker takes the oldest call, then
the calls behind it until the batch holds ``max_batch_size`` persons or the first call has waited
``max_queue_delay_ms``, and runs the refiner on the whole batch in a single thread off the event loop.

A call is never computed when, by the time its batch starts, it was cancelled (its future is done) or
its deadline has passed (it fails with :class:`DeadlineExpired`). A call that would overflow the
queue fails at once with :class:`QueueFull`. Everything but the refiner runs on the event loop, so
the batcher needs no locks; ``refine`` must be awaited on the loop the batcher was started on.
"""
from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from synth.exceptions import PosefixError

# refine(images, image_index (P,), poses (P, K, 3)) -> (xy (P, K, 2), confidence (P, K)), as Refiner.refine.
RefineFn = Callable[[list[torch.Tensor], np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


class QueueFull(PosefixError):
    """The queue cannot take the call's persons now."""


class DeadlineExpired(PosefixError):
    """The call's deadline passed before its batch started; it was not computed."""


class BatcherStopped(PosefixError):
    """The batcher was stopped before the call was computed."""


@dataclass(frozen=True)
class BatchRecord:
    """One batch that ran: persons and calls in it, each call's time in the queue and the batch's compute
    time, in seconds."""
    persons: int
    calls: int
    queue_seconds: tuple[float, ...]
    compute_seconds: float


@dataclass
class BatcherStats:
    """Running totals since the batcher was made; times in seconds."""
    batches: int = 0
    calls: int = 0
    persons: int = 0
    largest_batch: int = 0  # persons
    queue_seconds: float = 0.0
    compute_seconds: float = 0.0
    rejected: int = 0  # calls refused with QueueFull
    expired: int = 0  # calls dropped with DeadlineExpired
    cancelled: int = 0  # calls cancelled before their batch started


@dataclass(eq=False)
class _Call:
    image: torch.Tensor  # (3, H, W) uint8
    poses: np.ndarray  # (P, K, 3)
    deadline: float | None  # loop time
    enqueued: float  # loop time
    future: asyncio.Future = field(repr=False)

    @property
    def persons(self) -> int:
        return len(self.poses)


class DynamicBatcher:
    """Groups concurrent calls into batches of up to ``max_batch_size`` persons.

    ``refine``: the model, called in one worker thread with the batch's images, image index (P,) and
    poses (P, K, 3). ``max_queue_delay_ms``: how long the oldest call waits for others to join its
    batch. ``max_queue_size``: persons that may wait (not counting the batch being computed); a call
    with more persons than this is always refused. A call with more than ``max_batch_size`` persons
    runs as a batch of its own. ``on_batch`` is called on the event loop with a :class:`BatchRecord`
    after each batch.
    """

    def __init__(self, refine: RefineFn, *, max_batch_size: int = 64, max_queue_delay_ms: float = 5.0,
                 max_queue_size: int = 1024, on_batch: Callable[[BatchRecord], None] | None = None):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if not max_queue_delay_ms >= 0:
            raise ValueError(f"max_queue_delay_ms must be >= 0, got {max_queue_delay_ms}")
        if max_queue_size < 1:
            raise ValueError(f"max_queue_size must be >= 1, got {max_queue_size}")
        self._refine = refine
        self.max_batch_size = max_batch_size
        self.max_queue_delay_ms = max_queue_delay_ms
        self.max_queue_size = max_queue_size
        self._on_batch = on_batch
        self.stats = BatcherStats()
        self._pending: collections.deque[_Call] = collections.deque()
        self._queued = 0  # persons in _pending
        self._taken: list[_Call] = []  # calls out of _pending whose batch has not finished
        self._arrived = asyncio.Event()
        self._executor: ThreadPoolExecutor | None = None
        self._worker: asyncio.Task | None = None

    @property
    def queued_persons(self) -> int:
        return self._queued

    async def start(self) -> None:
        if self._worker is not None:
            return
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="posefix-model")
        self._worker = asyncio.get_running_loop().create_task(self._run(), name="posefix-batcher")

    async def stop(self) -> None:
        """Stop the worker after its current batch; calls still queued fail with :class:`BatcherStopped`."""
        if self._worker is None:
            return
        self._worker.cancel()
        try:
            await self._worker
        except asyncio.CancelledError:
            pass
        self._worker = None
        for call in [*self._taken, *self._pending]:
            if not call.future.done():
                call.future.set_exception(BatcherStopped("the server is shutting down"))
        self._taken, self._queued = [], 0
        self._pending.clear()
        executor, self._executor = self._executor, None
        await asyncio.to_thread(executor.shutdown, wait=True)

    async def refine(self, image: torch.Tensor, poses: np.ndarray,
                     timeout: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Refine the persons of one image: image (3, H, W) uint8, poses (P, K, 3) image pixels.

        Returns xy (P, K, 2) in image pixels and confidence (P, K), as ``Refiner.refine``. ``timeout``:
        seconds from now after which the call is no longer worth computing (None: no deadline).
        Raises :class:`QueueFull`, :class:`DeadlineExpired` or :class:`BatcherStopped`.
        """
        poses = np.asarray(poses, dtype=np.float64)
        if len(poses) == 0:
            return np.zeros(poses.shape[:2] + (2,)), np.zeros(poses.shape[:2])
        if self._worker is None:
            raise BatcherStopped("the server is not running")
        if self._queued + len(poses) > self.max_queue_size:
            self.stats.rejected += 1
            busy = "" if len(poses) > self.max_queue_size else f"{self._queued} persons already waiting; "
            raise QueueFull(f"queue full: {busy}{len(poses)} more exceed its limit of {self.max_queue_size} persons")
        loop = asyncio.get_running_loop()
        now = loop.time()
        call = _Call(image, poses, None if timeout is None else now + timeout, now, loop.create_future())
        self._pending.append(call)
        self._queued += call.persons
        self._arrived.set()
        try:
            return await call.future
        except asyncio.CancelledError:
            if call in self._pending:
                self._pending.remove(call)
                self._queued -= call.persons
                self.stats.cancelled += 1
            raise
        finally:
            # A failed call's future holds its exception, whose traceback holds this frame: without
            # this, frame → call → future → exception → frame would keep the image until a full GC.
            del call

    async def _wait_for_call(self, until: float | None) -> bool:
        """Wait until a call is queued (True) or the loop time passes ``until`` (False)."""
        loop = asyncio.get_running_loop()
        while not self._pending:
            self._arrived.clear()
            if until is None:
                await self._arrived.wait()
                continue
            remaining = until - loop.time()
            if remaining <= 0:
                return False
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except TimeoutError:
                return bool(self._pending)
        return True

    async def _collect(self) -> list[_Call]:
        """The next batch: the oldest call and those behind it that fit, within the queue delay."""
        loop = asyncio.get_running_loop()
        await self._wait_for_call(None)
        first = self._pending.popleft()
        self._queued -= first.persons
        self._taken = batch = [first]
        persons = first.persons
        until = first.enqueued + self.max_queue_delay_ms / 1000
        while persons < self.max_batch_size and await self._wait_for_call(until):
            if persons + self._pending[0].persons > self.max_batch_size:
                break
            call = self._pending.popleft()
            self._queued -= call.persons
            batch.append(call)
            persons += call.persons
        now = loop.time()
        for call in batch:
            if call.future.done():
                self.stats.cancelled += 1
            elif call.deadline is not None and now >= call.deadline:
                self.stats.expired += 1
                call.future.set_exception(DeadlineExpired("the deadline passed before the call was computed"))
        self._taken = [call for call in batch if not call.future.done()]
        return self._taken

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect()
            if not batch:
                continue
            start = loop.time()
            images = [call.image for call in batch]
            index = np.concatenate([np.full(call.persons, n, dtype=np.int64) for n, call in enumerate(batch)])
            poses = np.concatenate([call.poses for call in batch])  # (P, K, 3)
            t0 = time.perf_counter()
            try:
                xy, conf = await loop.run_in_executor(self._executor, self._refine, images, index, poses)
            except Exception as e:  # noqa: BLE001 — the model failed: every call of the batch gets the error
                for call in batch:
                    if not call.future.done():
                        call.future.set_exception(e)
                continue
            compute = time.perf_counter() - t0
            lo = 0
            for call in batch:
                hi = lo + call.persons
                if not call.future.done():
                    call.future.set_result((xy[lo:hi], conf[lo:hi]))
                lo = hi
            self._taken = []
            record = BatchRecord(len(poses), len(batch), tuple(start - c.enqueued for c in batch), compute)
            s = self.stats
            s.batches += 1
            s.calls += record.calls
            s.persons += record.persons
            s.largest_batch = max(s.largest_batch, record.persons)
            s.queue_seconds += sum(record.queue_seconds)
            s.compute_seconds += compute
            if self._on_batch is not None:
                self._on_batch(record)
