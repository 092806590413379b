"""Dynamic batching: the persons of many concurrent calls computed together, like Triton's dynamic batcher.

Glossary: a call is one image and its P persons, poses (P, K, 3) = (x, y, score) in that image's pixels,
K = 17 COCO joints. Calls wait in a queue bounded in persons; one worker takes the oldest call, then
the calls behind it until the batch holds ``max_batch_size`` persons or the first call has waited
``max_queue_delay_ms``, and runs the refiner on the whole batch in a single thread off the event loop.

Admission, as Triton's queue policy (max queue size, default timeout, reject) and deadline-aware: the
batcher keeps a cost model of its batches (compute seconds ≈ a + b · persons, fitted to the last
batches it ran) and refuses at once, with :class:`QueueFull`, a call that would overflow the queue,
whose estimated finish (the batch in progress, the persons ahead of it, its own batch) falls after its
deadline, or that would wait longer than ``max_queue_wait_s`` before its batch starts. A call is never
computed when, by the time its batch starts, it was cancelled (its client is gone: its future is
done), its deadline has passed or would pass before the batch's estimated end (it fails with
:class:`DeadlineExpired`), or it waited longer than ``max_queue_wait_s`` (:class:`QueueTimeout`).
Everything but the refiner and :meth:`DynamicBatcher.admit` runs on the event loop; ``refine`` must
be awaited on the loop the batcher was started on.
"""
from __future__ import annotations

import asyncio
import collections
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from .errors import PosefixError

# refine(images, image_index (P,), poses (P, K, 3)[, crop_poses (P, K, 3)]) -> (xy (P, K, 2), confidence (P, K)),
# as Refiner.refine; crop_poses is passed only for a batch in which a call has crop poses (the others' own poses).
RefineFn = Callable[..., tuple[np.ndarray, np.ndarray]]


class QueueFull(PosefixError):
    """The queue cannot take the call's persons now."""


class QueueTimeout(QueueFull):
    """The call waited longer than the queue's time bound before its batch started; it was not computed."""


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
    rejected: int = 0  # calls refused with QueueFull (its subclass QueueTimeout included)
    refused_for_deadline: int = 0  # of those: refused at once, their estimated finish after their deadline
    timed_out: int = 0  # of those: QueueTimeout, by the queue's time bound
    expired: int = 0  # calls dropped with DeadlineExpired
    cancelled: int = 0  # calls cancelled before their batch started


@dataclass(eq=False)
class _Call:
    image: torch.Tensor  # (3, H, W) uint8
    poses: np.ndarray  # (P, K, 3)
    crop_poses: np.ndarray | None  # (P, K, 3) the poses to crop around; None: poses
    deadline: float | None  # loop time
    enqueued: float  # loop time
    future: asyncio.Future = field(repr=False)

    @property
    def persons(self) -> int:
        return len(self.poses)


class CostModel:
    """Compute seconds of a batch of n persons, a + b · n, fitted by least squares to the last ``window``
    batches (a single batch size seen: proportional). ``None`` until a batch was seen."""

    def __init__(self, window: int = 64):
        self._records: collections.deque[tuple[int, float]] = collections.deque(maxlen=window)
        self._fit: tuple[float, float] | None = None

    def add(self, persons: int, seconds: float) -> None:
        self._records.append((persons, seconds))
        n, t = np.array(self._records, dtype=np.float64).T
        if np.ptp(n) > 0:
            b, a = np.polyfit(n, t, 1)
            if a < 0 or b < 0:  # noise: fall back to proportional
                a, b = 0.0, float(t.sum() / n.sum())
        else:
            a, b = 0.0, float(t.sum() / n.sum())
        self._fit = (float(a), float(b))

    def __call__(self, persons: int) -> float | None:
        if self._fit is None:
            return None
        a, b = self._fit
        return a + b * persons if persons > 0 else 0.0


class DynamicBatcher:
    """Groups concurrent calls into batches of up to ``max_batch_size`` persons.

    ``refine``: the model, called in one worker thread with the batch's images, image index (P,) and
    poses (P, K, 3) and, where a call of the batch has them, the poses to crop around (P, K, 3)
    (:data:`RefineFn`). ``max_queue_delay_ms``: how long the oldest call waits for others to join its
    batch. ``max_queue_size``: persons that may wait (not counting the batch being computed); a call
    with more persons than this is always refused. A call with more than ``max_batch_size`` persons
    runs as a batch of its own. ``max_queue_wait_s``: the longest a call may wait before its batch
    starts (None: no bound but its deadline); a call estimated to wait longer is refused at once.
    ``admission``: refuse at once the calls estimated to finish after their deadline, and drop those
    whose deadline passes before their batch's estimated end (False: deadlines checked only when a
    batch starts, first in first out). ``on_batch`` is called on the event loop with a
    :class:`BatchRecord` after each batch.
    """

    def __init__(self, refine: RefineFn, *, max_batch_size: int = 64, max_queue_delay_ms: float = 5.0,
                 max_queue_size: int = 1024, max_queue_wait_s: float | None = None, admission: bool = True,
                 on_batch: Callable[[BatchRecord], None] | None = None):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if not max_queue_delay_ms >= 0:
            raise ValueError(f"max_queue_delay_ms must be >= 0, got {max_queue_delay_ms}")
        if max_queue_size < 1:
            raise ValueError(f"max_queue_size must be >= 1, got {max_queue_size}")
        if max_queue_wait_s is not None and not max_queue_wait_s > 0:
            raise ValueError(f"max_queue_wait_s must be > 0 or None, got {max_queue_wait_s}")
        self._refine = refine
        self.max_queue_wait_s = max_queue_wait_s
        self.admission = admission
        self.cost = CostModel()
        self._lock = threading.Lock()  # stats.rejected and its parts: admit runs in other threads too
        self._running: tuple[float, float] | None = None  # the batch in progress: (start, estimated seconds)
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

    def _refuse(self, error: QueueFull, kind: str | None = None) -> QueueFull:
        with self._lock:
            self.stats.rejected += 1
            if kind is not None:
                setattr(self.stats, kind, getattr(self.stats, kind) + 1)
        return error

    def _wait_estimate(self, persons: int) -> tuple[float | None, float | None]:
        """Estimated seconds, from now, until a call of ``persons`` joining the queue now starts its batch,
        and until that batch ends (None, None before any batch was measured)."""
        one = self.cost(self.max_batch_size)
        if one is None:
            return None, None
        ahead = 0.0
        running = self._running
        if running is not None:
            ahead = max(running[0] + running[1] - time.monotonic(), 0.0)
        queued = self._queued
        full, rest = divmod(queued, self.max_batch_size)
        start = ahead + full * one + self.max_queue_delay_ms / 1000
        own = rest + persons
        if own > self.max_batch_size:  # the partial batch ahead closes; the call starts the next one
            start += self.cost(rest)
            own = persons
        return start, start + self.cost(own)

    def admit(self, persons: int, timeout: float | None = None) -> None:
        """Raise :class:`QueueFull` if a call of ``persons`` arriving now would be refused (the queue
        full, its estimated finish after ``timeout`` seconds, its estimated wait over the queue's time
        bound); counted in ``stats``. Safe from any thread (it only reads the queue)."""
        if persons == 0:
            return
        if self._queued + persons > self.max_queue_size:
            busy = "" if persons > self.max_queue_size else f"{self._queued} persons already waiting; "
            raise self._refuse(QueueFull(f"queue full: {busy}{persons} more exceed its limit of "
                                         f"{self.max_queue_size} persons"))
        if not self.admission and self.max_queue_wait_s is None:
            return
        start, end = self._wait_estimate(persons)
        if start is None:
            return
        if self.max_queue_wait_s is not None and start > self.max_queue_wait_s:
            raise self._refuse(QueueFull(f"queue full: an estimated {start:.3f} s of work ahead of the call exceeds "
                                         f"the queue's limit of {self.max_queue_wait_s:g} s"), "timed_out")
        if self.admission and timeout is not None and end > timeout:
            raise self._refuse(QueueFull(f"overloaded: the call would finish in an estimated {end:.3f} s, after "
                                         f"its deadline ({max(timeout, 0):.3f} s from now)"), "refused_for_deadline")

    async def refine(self, image: torch.Tensor, poses: np.ndarray, timeout: float | None = None,
                     crop_poses: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Refine the persons of one image: image (3, H, W) uint8, poses (P, K, 3) image pixels.

        Returns xy (P, K, 2) in image pixels and confidence (P, K), as ``Refiner.refine``. ``timeout``:
        seconds from now after which the call is no longer worth computing (None: no deadline).
        ``crop_poses`` (P, K, 3): crop around these instead (a track's previous refined pose; None: the
        poses). Raises :class:`QueueFull`, :class:`DeadlineExpired` or :class:`BatcherStopped`.
        """
        poses = np.asarray(poses, dtype=np.float64)
        if crop_poses is not None:
            crop_poses = np.asarray(crop_poses, dtype=np.float64)
            if crop_poses.shape != poses.shape:
                raise ValueError(f"crop_poses {crop_poses.shape} do not match poses {poses.shape}")
        if len(poses) == 0:
            return np.zeros(poses.shape[:2] + (2,)), np.zeros(poses.shape[:2])
        if self._worker is None:
            raise BatcherStopped("the server is not running")
        if timeout is not None and timeout <= 0:
            self.stats.expired += 1
            raise DeadlineExpired("the deadline passed before the call was computed")
        self.admit(len(poses), timeout)
        loop = asyncio.get_running_loop()
        now = loop.time()
        call = _Call(image, poses, crop_poses, None if timeout is None else now + timeout, now, loop.create_future())
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
        estimate = self.cost(persons) if self.admission else None
        end = now + (estimate or 0.0)
        for call in batch:
            if call.future.done():
                self.stats.cancelled += 1
            elif call.deadline is not None and (now >= call.deadline or end > call.deadline):
                self.stats.expired += 1
                call.future.set_exception(DeadlineExpired("the deadline passed before the call was computed" if
                                                          now >= call.deadline else "the deadline would pass before "
                                                          "the call's batch ends; it was not computed"))
            elif self.max_queue_wait_s is not None and now - call.enqueued > self.max_queue_wait_s:
                self._refuse(QueueFull(""), "timed_out")
                call.future.set_exception(QueueTimeout(f"queue timeout: the call waited {now - call.enqueued:.3f} s, "
                                                       f"over the queue's limit of {self.max_queue_wait_s:g} s"))
        self._taken = [call for call in batch if not call.future.done()]
        if self._taken:
            self._running = (time.monotonic(), self.cost(sum(c.persons for c in self._taken)) or 0.0)
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
            crops = () if all(call.crop_poses is None for call in batch) else (
                np.concatenate([call.poses if call.crop_poses is None else call.crop_poses for call in batch]),)
            t0 = time.perf_counter()
            try:
                xy, conf = await loop.run_in_executor(self._executor, self._refine, images, index, poses, *crops)
            except Exception as e:  # noqa: BLE001 — the model failed: every call of the batch gets the error
                self._running = None
                for call in batch:
                    if not call.future.done():
                        call.future.set_exception(e)
                continue
            compute = time.perf_counter() - t0
            self._running = None
            self.cost.add(len(poses), compute)
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
