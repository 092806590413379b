"""The gRPC service (proto/posefix/v1/posefix.proto): estimators anywhere send an image and the poses
they found in it, and get the poses back refined.

Glossary: P persons of a request, Kf keypoints of its format, K = 17 COCO joints (the model's own);
poses are (x, y, score) in pixels of the image as sent. The servicer is thin: validate the request
(an :class:`InputError` naming the field) → the :class:`~posefix.batcher.DynamicBatcher`, which runs
the :class:`~posefix.engine.Refiner` on the persons of many concurrent calls at once → the response.
Errors become status codes in one table, :data:`STATUS`.

:func:`create_server` builds a server bound to a port (port 0: any free one); :func:`serve` runs one
until SIGTERM or SIGINT and then stops gracefully; :func:`serve_main` is ``posefix serve``.
"""
from __future__ import annotations

import argparse
import asyncio
import hashlib
import logging
import math
import signal
import threading
import time
import weakref
from fractions import Fraction
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import torch
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from .errors import InputError

from . import __version__
from ._proto import FORMAT_LAYOUT, SERVICE_NAME, pb2, pb2_grpc
from .batcher import BatcherStopped, BatchRecord, DeadlineExpired, DynamicBatcher, QueueFull
from .engine import kept_input
from .formats import LAYOUTS, Layout, from_coco17, to_coco17
from .images import PNG_SIGNATURE, check_png, decode_encoded, encoded_size  # noqa: F401 (part of this module's API)
from .search_service import NoIndex, search_poses
from .tracking import OneEuroFilter, OneEuroParams, Tracks  # noqa: F401 (OneEuroFilter: API)

log = logging.getLogger(__name__)

# Typed errors → gRPC status codes; the first class in an error's MRO that is listed decides.
STATUS: dict[type[BaseException], grpc.StatusCode] = {
    InputError: grpc.StatusCode.INVALID_ARGUMENT,
    QueueFull: grpc.StatusCode.RESOURCE_EXHAUSTED,
    DeadlineExpired: grpc.StatusCode.DEADLINE_EXCEEDED,
    BatcherStopped: grpc.StatusCode.UNAVAILABLE,
    NoIndex: grpc.StatusCode.FAILED_PRECONDITION,
}
FRAME_RATE_HZ = (1e-3, 1e6)  # StreamOptions.frame_rate_hz's range
FIELD_METADATA_KEY = "posefix-field"  # trailing metadata naming the offending field of an INVALID_ARGUMENT


def status_of(error: BaseException) -> grpc.StatusCode:
    for cls in type(error).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return grpc.StatusCode.INTERNAL


@dataclass(frozen=True)
class Limits:
    """What one request may hold; beyond: INVALID_ARGUMENT (the message size: RESOURCE_EXHAUSTED)."""
    max_persons_per_image: int = 256
    max_image_side: int = 8192  # pixels, height and width each
    max_image_pixels: int = 4096 * 4096  # height × width; 48 MiB as raw RGB
    max_message_bytes: int = 64 * 1024 * 1024  # a request message, image included


# Images: a header check before any decoding, then decoding (in a worker thread), in posefix.images.

def _check_image_size(height: int, width: int, limits: Limits, field: str) -> None:
    if height == 0 or width == 0:
        raise InputError(field, f"has no pixels ({height}×{width})")
    if max(height, width) > limits.max_image_side or height * width > limits.max_image_pixels:
        raise InputError(field, f"{height}×{width} pixels exceed the limit of {limits.max_image_side} pixels a "
                         f"side and {limits.max_image_pixels} pixels in all")


def raw_to_tensor(raw: pb2.RawImage) -> torch.Tensor:
    """RawImage (validated) → (3, H, W) uint8 RGB."""
    hwc = np.frombuffer(raw.pixels, dtype=np.uint8).reshape(raw.height, raw.width, raw.channels)
    rgb = np.repeat(hwc, 3, axis=2) if raw.channels == 1 else hwc[..., :3]
    return torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1)))


def _check_image(image: pb2.Image, limits: Limits) -> tuple[tuple[int, int], bytes | pb2.RawImage]:
    """Validate an Image message without decoding it; its (height, width) in pixels and its data (the
    encoded bytes, read once: each read of a bytes field copies it, holding the GIL, or the RawImage)."""
    kind = image.WhichOneof("data")
    if kind is None:
        raise InputError("image", "is empty: set image.encoded (JPEG or PNG bytes) or image.raw")
    if kind == "encoded":
        data = image.encoded
        if not data:
            raise InputError("image.encoded", "is empty")
        height, width = encoded_size(data)
        _check_image_size(height, width, limits, "image.encoded")
        return (height, width), data
    raw = image.raw
    if raw.channels not in (1, 3, 4):
        raise InputError("image.raw.channels", f"must be 1 (grey), 3 (RGB) or 4 (RGBA), got {raw.channels}")
    _check_image_size(raw.height, raw.width, limits, "image.raw")
    expected = raw.height * raw.width * raw.channels
    if len(raw.pixels) != expected:
        raise InputError("image.raw.pixels", f"holds {len(raw.pixels)} bytes; height × width × channels = "
                         f"{raw.height} × {raw.width} × {raw.channels} = {expected}")
    return (raw.height, raw.width), raw


# Persons.

def layout_of(fmt: int) -> Layout:
    """The layout of a KeypointFormat value; InputError("format") for UNSPECIFIED or an unknown value."""
    if fmt not in FORMAT_LAYOUT:
        known = ", ".join(pb2.KeypointFormat.Name(f) for f in FORMAT_LAYOUT)
        what = "is not set" if fmt == pb2.KEYPOINT_FORMAT_UNSPECIFIED else f"{fmt} is not a known format"
        raise InputError("format", f"{what}; one of {known}")
    return LAYOUTS[FORMAT_LAYOUT[fmt]]


def persons_array(persons, fmt: int, image_size: tuple[int, int], limits: Limits) -> np.ndarray:
    """Validate the persons of a request; their keypoints (P, Kf, 3) as (x, y, score) in image pixels.

    Each must have exactly Kf keypoints, finite values, and every present keypoint (score > 0) within
    the image extended by its own width and height on each side; boxes finite with width, height >= 0.
    """
    layout = layout_of(fmt)
    kf = len(layout.names)
    if len(persons) > limits.max_persons_per_image:
        raise InputError("persons", f"{len(persons)} persons exceed the limit of {limits.max_persons_per_image}")
    out = np.zeros((len(persons), kf, 3))
    for i, person in enumerate(persons):
        if len(person.keypoints) != kf:
            raise InputError(f"persons[{i}].keypoints", f"expected {kf} keypoints for "
                             f"{pb2.KeypointFormat.Name(fmt)}, got {len(person.keypoints)}")
        out[i] = [(k.x, k.y, k.score) for k in person.keypoints]
        if person.HasField("box"):
            box = person.box
            values = (box.x, box.y, box.width, box.height)
            if not all(math.isfinite(v) for v in values) or box.width < 0 or box.height < 0:
                raise InputError(f"persons[{i}].box", f"must be finite with width, height >= 0, got {values}")
        if person.HasField("score") and not math.isfinite(person.score):
            raise InputError(f"persons[{i}].score", f"must be finite, got {person.score}")
    bad = np.argwhere(~np.isfinite(out))
    if len(bad):
        i, j, c = bad[0]
        raise InputError(f"persons[{i}].keypoints[{j}].{('x', 'y', 'score')[c]}", f"must be finite, got {out[i, j, c]}")
    height, width = image_size
    present = out[..., 2] > 0
    outside = present & ((out[..., 0] < -width) | (out[..., 0] > 2 * width)
                         | (out[..., 1] < -height) | (out[..., 1] > 2 * height))
    if outside.any():
        i, j = np.argwhere(outside)[0]
        raise InputError(f"persons[{i}].keypoints[{j}]", f"({out[i, j, 0]:g}, {out[i, j, 1]:g}) is more than the "
                         f"image's own size outside the {width}×{height} image (x, y in pixels?)")
    return out


class NonFiniteResult(RuntimeError):
    """A response would carry a non-finite number (a fault of the server's, not of the request)."""


@dataclass
class _Request:
    """A validated RefinePoseRequest: its image (3, H, W) uint8 (None when it has no person), layout,
    keypoints (P, Kf, 3) as sent and their COCO joints (P, 17, 3)."""
    image: torch.Tensor | None
    layout: Layout
    native: np.ndarray
    coco: np.ndarray


def build_response(request: pb2.RefinePoseRequest, layout: Layout, native: np.ndarray, xy: np.ndarray,
                   conf: np.ndarray, kept: np.ndarray | None = None) -> pb2.RefinePoseResponse:
    """The response: ``native`` (P, Kf, 3) with its COCO joints replaced by xy (P, 17, 2) pixels and
    confidence (P, 17); each person's box, score and track id as sent. ``kept`` (P, 17) bool: where the
    COCO joint is the input's (``kept_input``; keypoints without a COCO counterpart are always kept)."""
    refined = from_coco17(np.concatenate([xy, conf[..., None]], axis=-1), native, layout)  # (P, Kf, 3)
    if not np.isfinite(refined).all():  # never sent: the call ends INTERNAL, logged
        raise NonFiniteResult(f"{int((~np.isfinite(refined)).sum())} non-finite refined values")
    is_refined = np.zeros(len(layout.names), dtype=bool)
    is_refined[list(layout.coco_index)] = True
    as_sent = np.broadcast_to(~is_refined, refined.shape[:2]).copy()  # (P, Kf)
    if kept is not None and len(kept):
        as_sent[:, list(layout.coco_index)] = kept
    response = pb2.RefinePoseResponse()
    for person, values, same in zip(request.persons, refined.tolist(), as_sent.tolist()):
        out = response.persons.add(track_id=person.track_id)
        if person.HasField("box"):
            out.box.CopyFrom(person.box)
        if person.HasField("score"):
            out.score = person.score
        for (x, y, c), r, k in zip(values, is_refined.tolist(), same):
            out.keypoints.add(x=x, y=y, confidence=c, refined=r, kept_input=k)
    return response


# Video streams: tracks and smoothing.

class VideoState:
    """What a RefinePoseStream carries from frame to frame: its clock and, per track id, the state of
    :class:`posefix.tracking.Tracks` (previous refined pose for follow_tracks, One-Euro smoothing)."""

    def __init__(self, options: pb2.StreamOptions | None):
        options = options or pb2.StreamOptions()
        self.frame_rate = options.frame_rate_hz if options.HasField("frame_rate_hz") else 30.0
        lo, hi = FRAME_RATE_HZ
        if not lo <= self.frame_rate <= hi:  # NaN included
            raise InputError("options.frame_rate_hz", f"must be in [{lo:g}, {hi:g}] Hz, got {self.frame_rate}")
        smoothing = None
        if options.HasField("smoothing"):
            s, d = options.smoothing, OneEuroParams()
            try:
                smoothing = OneEuroParams(*(getattr(s, n) if s.HasField(n) else getattr(d, n)
                                            for n in ("min_cutoff_hz", "beta", "d_cutoff_hz")))
            except InputError as e:
                raise InputError(f"options.{e.field}", e.problem) from None
        self.tracks = Tracks(options.follow_tracks, smoothing)
        self.follow, self.smoothing = self.tracks.follow, self.tracks.smoothing
        self.period = Fraction(1 / self.frame_rate)
        self.t: Fraction | None = None  # the previous frame's time, seconds, exact

    def clock(self, timestamp_us: int) -> Fraction:
        """The frame's time in seconds, exact (a Fraction, so that 1 µs steps stay steps at any timestamp):
        its timestamp, or one frame period after the previous frame."""
        if timestamp_us == 0:
            t = Fraction(0) if self.t is None else self.t + self.period
        else:
            t = Fraction(timestamp_us, 1_000_000)
            if self.t is not None and t <= self.t:
                raise InputError("timestamp_us", f"{timestamp_us} does not increase on the previous frame's "
                                 f"{round(self.t * 1_000_000)}")
        self.t = t
        return t

    @staticmethod
    def track_ids(persons) -> list[int]:
        return Tracks.check_ids([p.track_id for p in persons])

    def fill(self, tracks: list[int], coco: np.ndarray) -> np.ndarray:
        """follow_tracks: coco (P, 17, 3) with each tracked person's absent joints taken from its track's
        refined pose of the previous frame (score: the refined confidence)."""
        return self.tracks.prepare(tracks, coco)[0]

    def update(self, tracks: list[int], coco: np.ndarray, xy: np.ndarray, conf: np.ndarray, t: float) -> np.ndarray:
        """After refinement: smooth each tracked person's refined xy (P, 17, 2), remember the frame's
        tracks, forget the others; the (smoothed) xy."""
        return self.tracks.update(tracks, coco, xy, conf, t)


# Metrics.

class Metrics:
    """Prometheus metrics of one server, in their own registry (so one process can run several servers)."""

    def __init__(self, registry: CollectorRegistry | None = None):
        r = self.registry = registry or CollectorRegistry()
        seconds = (.001, .002, .005, .01, .02, .05, .1, .2, .5, 1, 2, 5, 10)
        self.requests = Counter("posefix_requests", "Finished calls by method and status code",
                                ["method", "code"], registry=r)
        self.latency = Histogram("posefix_request_seconds", "Time from a call's arrival to its answer (streams: "
                                 "per frame)", ["method"], buckets=seconds, registry=r)
        self.queue = Histogram("posefix_queue_seconds", "Time a call waited in the batcher's queue",
                               buckets=seconds, registry=r)
        self.compute = Histogram("posefix_compute_seconds", "Model time per batch", buckets=seconds, registry=r)
        self.batch_persons = Histogram("posefix_batch_persons", "Persons per batch",
                                       buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024), registry=r)
        self.batch_calls = Histogram("posefix_batch_calls", "Calls (images) per batch",
                                     buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64), registry=r)
        self.queued = Gauge("posefix_queued_persons", "Persons waiting in the batcher's queue", registry=r)
        self.frames = Counter("posefix_stream_frames", "Frames answered on RefinePoseStream", registry=r)

    def on_batch(self, record: BatchRecord) -> None:
        self.batch_persons.observe(record.persons)
        self.batch_calls.observe(record.calls)
        self.compute.observe(record.compute_seconds)
        for q in record.queue_seconds:
            self.queue.observe(q)


# The servicer.

class PinnedBudget:
    """At most ``limit`` bytes of the images of calls in flight staged in pinned (page-locked) host memory, for
    asynchronous copies to a GPU; past it an image stays in ordinary memory (its copy then waits for the
    device). The bytes of an image come back when its tensor is freed."""

    def __init__(self, limit: int):
        self.limit, self.used = limit, 0
        self._lock = threading.Lock()

    def stage(self, stage, image: torch.Tensor) -> torch.Tensor:
        size = image.numel() * image.element_size()
        with self._lock:
            if self.used + size > self.limit:
                return image
            self.used += size
        try:
            staged = stage(image)
        except BaseException:
            self._release(size)
            raise
        if staged is image:  # nothing was pinned (a CPU refiner)
            self._release(size)
        else:
            weakref.finalize(staged, self._release, size)
        return staged

    def _release(self, size: int) -> None:
        with self._lock:
            self.used -= size


class PoseRefinerServicer(pb2_grpc.PoseRefinerServicer):
    """Request → batcher → response; every error becomes a status through :data:`STATUS`."""

    def __init__(self, batcher: DynamicBatcher, model_info: pb2.ModelInfo, limits: Limits, metrics: Metrics,
                 decoder: ThreadPoolExecutor, stage=None, max_pinned_bytes: int = 0, index=None):
        self.stage = stage  # a decoded image → ready for the model's device (Refiner.stage), in the decoder's thread
        self.pinned = PinnedBudget(max_pinned_bytes)
        self.batcher = batcher
        self.model_info = model_info
        self.limits = limits
        self.metrics = metrics
        self.decoder = decoder
        self.index = index  # a posefix.search.PoseIndex for SearchPoses, or None

    async def _prepare(self, request: pb2.RefinePoseRequest, timeout: float | None) -> _Request:
        """Validate and decode the request in a decoder thread (nothing a client sends is scanned on the
        event loop); a call the batcher cannot finish within ``timeout`` is refused before its decoding."""
        return await asyncio.get_running_loop().run_in_executor(self.decoder, self._prepare_sync, request, timeout)

    async def _parse(self, message_type, data):
        """:func:`parse`, in a decoder thread for messages of over 64 KiB."""
        if isinstance(data, bytes) and len(data) > 1 << 16:
            return await asyncio.get_running_loop().run_in_executor(self.decoder, parse, message_type, data)
        return parse(message_type, data)

    def _prepare_sync(self, request: pb2.RefinePoseRequest, timeout: float | None) -> _Request:
        layout = layout_of(request.format)
        size, data = _check_image(request.image, self.limits)
        native = persons_array(request.persons, request.format, size, self.limits)
        image = None
        if len(native):
            self.batcher.admit(len(native), timeout)
            image = decode_encoded(data) if isinstance(data, bytes) else raw_to_tensor(data)
            if self.stage is not None:
                image = self.pinned.stage(self.stage, image)
        return _Request(image, layout, native, to_coco17(native, layout))

    async def _refine(self, image, coco: np.ndarray, context) -> tuple[np.ndarray, np.ndarray]:
        return await self.batcher.refine(image, coco, timeout=context.time_remaining())

    def _succeeded(self, method: str, t0: float | None = None) -> None:
        self.metrics.requests.labels(method, grpc.StatusCode.OK.name).inc()
        if t0 is not None:
            self.metrics.latency.labels(method).observe(time.perf_counter() - t0)

    def _fail(self, method: str, context, error: Exception) -> None:
        """Count the call and set its status, message and trailing metadata from the error; the handler
        then returns (a unary one any response: gRPC discards it under a status other than OK).

        Not ``context.abort``: its AbortError stays on the call's state while its traceback holds the
        handler's frame, which holds the context and the request — a reference cycle that keeps each
        refused request's memory (up to the message limit) until a full garbage collection, which a
        process holding torch's many long-lived objects runs rarely."""
        code = status_of(error)
        self.metrics.requests.labels(method, code.name).inc()
        context.set_code(code)
        if code == grpc.StatusCode.INTERNAL:
            log.error("%s failed", method, exc_info=error)
            context.set_details(f"internal error: {type(error).__name__}")
            return
        context.set_details(str(error))
        if isinstance(error, InputError):
            context.set_trailing_metadata(((FIELD_METADATA_KEY, error.field),))

    def _cancelled(self, method: str, context) -> None:
        remaining = context.time_remaining()
        code = grpc.StatusCode.DEADLINE_EXCEEDED if remaining is not None and remaining <= 0 \
            else grpc.StatusCode.CANCELLED
        self.metrics.requests.labels(method, code.name).inc()

    async def RefinePose(self, request: pb2.RefinePoseRequest | bytes, context) -> pb2.RefinePoseResponse:
        t0 = time.perf_counter()
        try:
            request = await self._parse(pb2.RefinePoseRequest, request)
            job = await self._prepare(request, context.time_remaining())
            xy, conf = await self._refine(job.image, job.coco, context)
            response = build_response(request, job.layout, job.native, xy, conf, kept_input(job.coco, xy))
        except asyncio.CancelledError:
            self._cancelled("RefinePose", context)
            raise
        except Exception as e:  # noqa: BLE001 — every error is answered with its status
            self._fail("RefinePose", context, e)
            return pb2.RefinePoseResponse()
        self._succeeded("RefinePose", t0)
        return response

    async def RefinePoseStream(self, request_iterator: AsyncIterator[pb2.RefinePoseStreamRequest],
                               context) -> AsyncIterator[pb2.RefinePoseStreamResponse]:
        method = "RefinePoseStream"
        video = None
        index = 0
        try:
            async for message in request_iterator:
                t0 = time.perf_counter()
                try:
                    message = await self._parse(pb2.RefinePoseStreamRequest, message)
                    if index == 0:
                        video = VideoState(message.options if message.HasField("options") else None)
                    elif message.HasField("options"):
                        raise InputError("options", "only the stream's first message may carry options")
                    t = video.clock(message.timestamp_us)
                    try:
                        tracks = video.track_ids(message.frame.persons)
                        job = await self._prepare(message.frame, context.time_remaining())
                    except InputError as e:
                        raise InputError(f"frame.{e.field}", e.problem) from None
                except InputError as e:
                    raise InputError(e.field, e.problem, f"stream message {index}") from None
                coco = video.fill(tracks, job.coco)
                xy, conf = await self._refine(job.image, coco, context)
                kept = kept_input(job.coco, xy)  # before smoothing, which moves kept joints too
                xy = video.update(tracks, coco, xy, conf, t)
                result = build_response(message.frame, job.layout, job.native, xy, conf, kept)
                self.metrics.frames.inc()
                self.metrics.latency.labels(method).observe(time.perf_counter() - t0)
                yield pb2.RefinePoseStreamResponse(frame_index=index, result=result)
                index += 1
        except asyncio.CancelledError:
            self._cancelled(method, context)
            raise
        except Exception as e:  # noqa: BLE001 — every error is answered with its status
            self._fail(method, context, e)
            return
        self._succeeded(method)

    async def SearchPoses(self, request: pb2.SearchPosesRequest | bytes, context) -> pb2.SearchPosesResponse:
        t0 = time.perf_counter()
        try:
            request = await self._parse(pb2.SearchPosesRequest, request)
            response = await search_poses(self, request, context)
        except asyncio.CancelledError:
            self._cancelled("SearchPoses", context)
            raise
        except Exception as e:  # noqa: BLE001 — every error is answered with its status
            self._fail("SearchPoses", context, e)
            return pb2.SearchPosesResponse()
        self._succeeded("SearchPoses", t0)
        return response

    async def GetModelInfo(self, request: pb2.GetModelInfoRequest | bytes, context) -> pb2.ModelInfo:
        try:
            parse(pb2.GetModelInfoRequest, request)
        except InputError as e:
            self._fail("GetModelInfo", context, e)
            return pb2.ModelInfo()
        self._succeeded("GetModelInfo")
        return self.model_info


def parse(message_type, data):
    """A request as received: its bytes (the server registers its methods without a deserializer, so
    that bytes that do not parse are answered INVALID_ARGUMENT by posefix, not UNKNOWN by gRPC) or an
    already parsed message. An InputError("request") when the bytes are not a ``message_type``."""
    if not isinstance(data, bytes):
        return data
    try:
        return message_type.FromString(data)
    except DecodeError as e:
        raise InputError("request", f"is not a valid {message_type.DESCRIPTOR.name} message "
                         f"({len(data)} bytes): {e}") from None


def add_servicer(servicer: PoseRefinerServicer, server) -> None:
    """Register the servicer's methods on ``server`` as ``pb2_grpc.add_PoseRefinerServicer_to_server``
    does, but taking the request bytes as they came (see :func:`parse`)."""
    handlers = {}
    for method in pb2.DESCRIPTOR.services_by_name["PoseRefiner"].methods:
        output = getattr(pb2, method.output_type.name)
        handler = getattr(servicer, method.name)
        kind = grpc.stream_stream_rpc_method_handler if method.client_streaming else grpc.unary_unary_rpc_method_handler
        handlers[method.name] = kind(handler, request_deserializer=None, response_serializer=output.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))


# The server.

def model_info(refiner, limits: Limits, batcher: DynamicBatcher, model_version: str = "", index=None) -> pb2.ModelInfo:
    cfg = refiner.cfg
    return pb2.ModelInfo(
        keypoint_format=pb2.KEYPOINT_FORMAT_COCO_17, input_height=cfg.input_size[0], input_width=cfg.input_size[1],
        model_variant=cfg.backbone, model_version=model_version, server_version=__version__,
        flip_test=bool(getattr(refiner, "flip_test", False)), index_loaded=index is not None,
        index_size=0 if index is None else len(index),
        backend=_backend(refiner),
        limits=pb2.Limits(max_persons_per_image=limits.max_persons_per_image, max_image_side=limits.max_image_side,
                          max_image_pixels=limits.max_image_pixels, max_message_bytes=limits.max_message_bytes,
                          max_batch_size=batcher.max_batch_size, max_queue_delay_ms=batcher.max_queue_delay_ms,
                          max_queue_size=batcher.max_queue_size),
        formats=[pb2.FormatInfo(format=f, keypoint_names=LAYOUTS[name].names) for f, name in FORMAT_LAYOUT.items()])


def _backend(refiner) -> str:
    """What executes the refiner's model: "torch", or its ONNX Runtime model's description."""
    describe = getattr(getattr(refiner, "model", None), "describe", None)
    return describe() if describe else getattr(refiner, "backend", "torch")


class PoseRefinerServer:
    """A server made by :func:`create_server`: the grpc.aio ``server`` bound to ``port`` on ``host``, its
    ``batcher``, ``health`` servicer and ``metrics``. ``await start()``, later ``await stop()``;
    ``metrics_port`` is the port of the Prometheus endpoint once started (None without one)."""

    def __init__(self, server: grpc.aio.Server, host: str, port: int, batcher: DynamicBatcher,
                 health_servicer: health.aio.HealthServicer, metrics: Metrics, decoder: ThreadPoolExecutor,
                 metrics_port: int | None):
        self.server, self.host, self.port = server, host, port
        self.batcher, self.health, self.metrics = batcher, health_servicer, metrics
        self._decoder = decoder
        self._want_metrics_port = metrics_port
        self.metrics_port: int | None = None
        self._http = None

    async def start(self) -> None:
        if self._want_metrics_port is not None:
            try:
                self._http, _ = start_http_server(self._want_metrics_port, addr=self.host,
                                                  registry=self.metrics.registry)
            except OSError as e:
                raise InputError("metrics_port", f"cannot listen on {self.host}:{self._want_metrics_port}: "
                                 f"{e.strerror or e}") from None
            self.metrics_port = self._http.server_port
        await self.batcher.start()
        await self.server.start()
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    async def stop(self, grace_s: float = 10.0, drain_s: float = 0.0) -> None:
        """Stop gracefully: health turns NOT_SERVING; for ``drain_s`` seconds calls are still accepted
        (so load balancers can notice); then new calls are refused and calls in flight have ``grace_s``
        seconds to finish before they are cancelled."""
        await self.health.enter_graceful_shutdown()
        if drain_s > 0:
            await asyncio.sleep(drain_s)
        await self.server.stop(grace_s)
        await self.batcher.stop()
        self._decoder.shutdown(wait=False, cancel_futures=True)
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None

    async def wait_for_termination(self) -> None:
        await self.server.wait_for_termination()


def create_server(refiner, host: str = "127.0.0.1", port: int = 0, *, max_batch_size: int = 64,
                  max_queue_delay_ms: float = 5.0, max_queue_size: int = 1024, metrics_port: int | None = None,
                  limits: Limits = Limits(), model_version: str = "", decode_workers: int = 4,
                  max_pinned_bytes: int = 512 * 1024 * 1024, max_queue_wait_s: float | None = None,
                  admission: bool = True, index=None) -> PoseRefinerServer:
    """A PoseRefiner server for ``refiner`` (a :class:`~posefix.engine.Refiner`, or anything with its
    ``refine`` and ``cfg``), bound to ``host:port`` (port 0: a free port, see ``.port``), not started.

    Batching: up to ``max_batch_size`` persons per model call; the oldest waiting call waits at most
    ``max_queue_delay_ms`` for others; at most ``max_queue_size`` persons wait (more: RESOURCE_EXHAUSTED).
    Admission (see :mod:`posefix.batcher`): a call estimated to finish after its deadline, or to wait over
    ``max_queue_wait_s`` seconds before its batch starts, is refused at once with RESOURCE_EXHAUSTED
    (``admission`` False: deadlines checked only when a batch starts, first in first out).
    ``metrics_port``: serve Prometheus metrics over HTTP on ``host`` at this port (0: a free one).
    ``max_pinned_bytes``: on a GPU, decoded images of calls in flight are staged in pinned host memory, so that
    their copies to the device wait for nothing, up to this many bytes (page-locked memory is the machine's).
    ``index``: a :class:`~posefix.search.PoseIndex` that SearchPoses searches (None: FAILED_PRECONDITION).
    Call it from the event loop that will run the server.
    """
    if max_batch_size < 1:
        raise InputError("max_batch_size", f"must be >= 1, got {max_batch_size}")
    if not (max_queue_delay_ms >= 0 and math.isfinite(max_queue_delay_ms)):
        raise InputError("max_queue_delay_ms", f"must be >= 0, got {max_queue_delay_ms}")
    if max_queue_size < limits.max_persons_per_image:
        raise InputError("max_queue_size", f"{max_queue_size} cannot hold one image's persons "
                         f"(up to {limits.max_persons_per_image})")
    if not 0 <= port <= 65535:
        raise InputError("port", f"must be in 0..65535, got {port}")
    if metrics_port is not None and not 0 <= metrics_port <= 65535:
        raise InputError("metrics_port", f"must be in 0..65535, got {metrics_port}")
    metrics = Metrics()
    if max_queue_wait_s is not None and not (math.isfinite(max_queue_wait_s) and max_queue_wait_s > 0):
        raise InputError("max_queue_wait_s", f"must be > 0 seconds, got {max_queue_wait_s}")
    batcher = DynamicBatcher(refiner.refine, max_batch_size=max_batch_size, max_queue_delay_ms=max_queue_delay_ms,
                             max_queue_size=max_queue_size, max_queue_wait_s=max_queue_wait_s, admission=admission,
                             on_batch=metrics.on_batch)
    metrics.queued.set_function(lambda: batcher.queued_persons)
    decoder = ThreadPoolExecutor(max_workers=max(decode_workers, 1), thread_name_prefix="posefix-decode")
    server = grpc.aio.server(options=[
        ("grpc.max_receive_message_length", limits.max_message_bytes),
        ("grpc.max_send_message_length", limits.max_message_bytes),
        ("grpc.so_reuseport", 0),
    ])
    info = model_info(refiner, limits, batcher, model_version, index)
    add_servicer(PoseRefinerServicer(batcher, info, limits, metrics, decoder, getattr(refiner, "stage", None),
                                     max_pinned_bytes, index), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError as e:
        raise InputError("port", f"cannot listen on {address}: {e}") from None
    if bound == 0:
        raise InputError("port", f"cannot listen on {address}")
    return PoseRefinerServer(server, host, bound, batcher, health_servicer, metrics, decoder, metrics_port)


def serve(refiner, host: str = "127.0.0.1", port: int = 50051, *, grace_s: float = 10.0, drain_s: float = 0.0,
          **options) -> None:
    """Run a server (see :func:`create_server` for ``options``) until SIGTERM or SIGINT, then stop it
    gracefully (:meth:`PoseRefinerServer.stop`). Prints where it listens, and when it stops, on stdout."""

    async def run():
        handle = create_server(refiner, host, port, **options)
        await handle.start()
        metrics = f"; metrics on http://{host}:{handle.metrics_port}/metrics" if handle.metrics_port else ""
        print(f"posefix serve: listening on {host}:{handle.port}{metrics}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        print(f"posefix serve: stopping (calls in flight have {grace_s:g} s to finish)", flush=True)
        await handle.stop(grace_s, drain_s)
        print("posefix serve: stopped", flush=True)

    asyncio.run(run())


def checkpoint_version(path: str | Path) -> str:
    """"sha256:" and the first 16 hex digits of the file's SHA-256."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return f"sha256:{digest.hexdigest()[:16]}"


def serve_main(args: argparse.Namespace) -> int:
    """``posefix serve``: load the checkpoint, warm the model up and serve until SIGTERM/SIGINT.

    ``args``: checkpoint (a model.safetensors from posefix train), host, port (0: any free port), device
    ("auto": cuda if available, else cpu; "cpu", "cuda", "cuda:N"), max_batch_size (persons),
    max_queue_delay_ms, max_queue_size (persons), metrics_port (None: no metrics endpoint) and, optional,
    flip_test (False: refine each crop with its mirror too), precision ("fp32" or "bf16") and channels_last
    (False), grace_s (10: seconds calls in flight have to
    finish once stopping) and drain_s (0: seconds to go on taking calls with health NOT_SERVING before
    that), index (None: no pose index; else a file of posefix index build, for SearchPoses). Bad values raise
    InputError naming the option.
    """
    from .devices import resolve_device
    from .engine import Refiner
    from .search import PoseIndex

    grace_s, drain_s = getattr(args, "grace_s", 10.0), getattr(args, "drain_s", 0.0)
    flip_test = bool(getattr(args, "flip_test", False))
    device = resolve_device(args.device)
    if args.max_batch_size < 1:
        raise InputError("--max-batch-size", f"must be >= 1, got {args.max_batch_size}")
    for name, value in (("--grace-s", grace_s), ("--drain-s", drain_s)):
        if not (math.isfinite(value) and value >= 0):
            raise InputError(name, f"must be >= 0 seconds, got {value}")
    index = PoseIndex.load(args.index, "--index") if getattr(args, "index", None) else None
    refiner = Refiner.from_checkpoint(args.checkpoint, device, batch_size=args.max_batch_size, flip_test=flip_test,
                                      precision=getattr(args, "precision", "fp32"),
                                      channels_last=bool(getattr(args, "channels_last", False)),
                                      output=getattr(args, "output", "choice"),
                                      choice_margin=getattr(args, "choice_margin", None),
                                      backend=getattr(args, "backend", None), onnx=getattr(args, "onnx", None),
                                      provider=getattr(args, "provider", None))
    h, w = refiner.cfg.input_size
    warm = np.zeros((1, 17, 3))
    warm[0, :, :2], warm[0, :, 2] = (w / 2, h / 2), 1.0
    refiner.refine([torch.zeros((3, h, w), dtype=torch.uint8)], np.zeros(1, dtype=np.int64), warm)
    serve(refiner, args.host, args.port, grace_s=grace_s, drain_s=drain_s, max_batch_size=args.max_batch_size,
          max_queue_delay_ms=args.max_queue_delay_ms, max_queue_size=args.max_queue_size,
          metrics_port=args.metrics_port, index=index,
          model_version=checkpoint_version(getattr(args, "onnx", None) or args.checkpoint),
          max_queue_wait_s=getattr(args, "max_queue_wait_s", None))
    return 0
