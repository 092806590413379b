"""The PoseRefiner servicer: each method orchestrates — parse and validate the request (:mod:`.validation`),
decode its image in a worker thread, refine its persons through the
:class:`~posefix.batcher.DynamicBatcher`, answer (:mod:`.responses`) — and every error becomes a status
through :data:`~posefix.serve.validation.STATUS`.

Glossary: P persons of a request, Kf keypoints of its format, K = 17 COCO joints (the model's own).
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
import numpy as np
import torch

from .._proto import pb2, pb2_grpc
from ..batcher import DynamicBatcher
from ..choice import kept_input
from ..errors import InputError
from ..formats import Layout, to_coco17
from ..images import decode_encoded, raw_to_tensor
from .metrics import Metrics
from .responses import build_response
from .search import search_poses
from .staging import PinnedBudget
from .stream import VideoState
from .validation import FIELD_METADATA_KEY, Limits, check_request, parse, status_of

log = logging.getLogger(__name__)


@dataclass
class _Request:
    """A validated RefinePoseRequest: its image (3, H, W) uint8 (None when it has no person), layout,
    keypoints (P, Kf, 3) as sent and their COCO joints (P, 17, 3)."""
    image: torch.Tensor | None
    layout: Layout
    native: np.ndarray
    coco: np.ndarray


class PoseRefinerServicer(pb2_grpc.PoseRefinerServicer):
    """Request → batcher → response; every error becomes a status through
    :data:`~posefix.serve.validation.STATUS`.

    ``stage``: a decoded image → ready for the model's device (``Refiner.stage``), called in the decoder's
    threads within ``max_pinned_bytes`` (None: images stay as decoded); ``index``: the
    :class:`~posefix.search.PoseIndex` SearchPoses searches, or None."""

    def __init__(self, batcher: DynamicBatcher, model_info: pb2.ModelInfo, limits: Limits, metrics: Metrics,
                 decoder: ThreadPoolExecutor, stage: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 max_pinned_bytes: int = 0, index=None, temporal_by_default: bool = False, learned=None):
        self.temporal_by_default = temporal_by_default  # a server without a refiner: streams refine over time
        self.learned = learned  # the learned smoother, shared by the streams that ask for it (None: none)
        self.stage = stage
        self.pinned = PinnedBudget(max_pinned_bytes)
        self.batcher = batcher
        self.model_info = model_info
        self.limits = limits
        self.metrics = metrics
        self.decoder = decoder
        self.index = index

    # The steps of a call.

    async def decode_request(self, request: pb2.RefinePoseRequest, timeout: float | None) -> _Request:
        """Validate and decode the request in a decoder thread (nothing a client sends is scanned on the
        event loop); a call the batcher cannot finish within ``timeout`` is refused before its decoding."""
        return await asyncio.get_running_loop().run_in_executor(
            self.decoder, self._decode_request_sync, request, timeout)

    def _decode_request_sync(self, request: pb2.RefinePoseRequest, timeout: float | None) -> _Request:
        layout, data, native = check_request(request, self.limits)
        image = None
        if len(native):
            self.batcher.admit(len(native), timeout)
            image = decode_encoded(data) if isinstance(data, bytes) else raw_to_tensor(data)
            if self.stage is not None:
                image = self.pinned.stage(self.stage, image)
        return _Request(image, layout, native, to_coco17(native, layout))

    async def refine(self, image, coco: np.ndarray, context, crop_poses: np.ndarray | None = None):
        """The persons coco (P, 17, 3) of ``image`` refined by the batcher within the call's deadline, cropped
        around ``crop_poses`` (P, 17, 3) where given: xy (P, 17, 2), confidence (P, 17)."""
        return await self.batcher.refine(image, coco, timeout=context.time_remaining(), crop_poses=crop_poses)

    async def _parse(self, message_type, data):
        """:func:`~posefix.serve.validation.parse`, in a decoder thread for messages of over 64 KiB."""
        if isinstance(data, bytes) and len(data) > 1 << 16:
            return await asyncio.get_running_loop().run_in_executor(self.decoder, parse, message_type, data)
        return parse(message_type, data)

    # How a call ends.

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

    # The methods of proto/posefix/v1/posefix.proto.

    async def _unary(self, method: str, request_type, response_type, request, context, answer):
        """A unary call: the request parsed, ``answer(request)`` awaited, the call counted and timed; any error
        answered with its status (and an empty ``response_type``)."""
        t0 = time.perf_counter()
        try:
            response = await answer(await self._parse(request_type, request))
        except asyncio.CancelledError:
            self._cancelled(method, context)
            raise
        except Exception as e:  # noqa: BLE001 — every error is answered with its status
            self._fail(method, context, e)
            return response_type()
        self._succeeded(method, t0)
        return response

    async def RefinePose(self, request: pb2.RefinePoseRequest | bytes, context) -> pb2.RefinePoseResponse:
        async def answer(request: pb2.RefinePoseRequest) -> pb2.RefinePoseResponse:
            job = await self.decode_request(request, context.time_remaining())
            xy, conf = await self.refine(job.image, job.coco, context)
            return build_response(request, job.layout, job.native, xy, conf, kept_input(job.coco, xy))

        return await self._unary("RefinePose", pb2.RefinePoseRequest, pb2.RefinePoseResponse, request, context, answer)

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
                        video = VideoState(message.options if message.HasField("options") else None,
                                           self.temporal_by_default, self.learned)
                    elif message.HasField("options"):
                        raise InputError("options", "only the stream's first message may carry options")
                    t = video.clock(message.timestamp_us)
                    try:
                        tracks = video.track_ids(message.frame.persons)
                        job = await self.decode_request(message.frame, context.time_remaining())
                    except InputError as e:
                        raise InputError(f"frame.{e.field}", e.problem) from None
                except InputError as e:
                    raise InputError(e.field, e.problem, f"stream message {index}") from None
                coco, crop = video.tracks.follow_inputs(tracks, job.coco)
                xy, conf = await self.refine(job.image, coco, context, crop)
                kept = kept_input(job.coco, xy)  # before smoothing, which moves kept joints too
                xy = video.tracks.update(tracks, coco, xy, conf, t)
                if video.temporal is not None:  # over time, causally: what refine-video --causal gives
                    step = video.temporal.step(np.concatenate([xy, conf[..., None]], -1), tracks)
                    xy, conf = step.xy, step.score
                    kept = kept_input(job.coco, xy)
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
        async def answer(request: pb2.SearchPosesRequest) -> pb2.SearchPosesResponse:
            return await search_poses(self, request, context)

        return await self._unary("SearchPoses", pb2.SearchPosesRequest, pb2.SearchPosesResponse, request, context,
                                 answer)

    async def GetModelInfo(self, request: pb2.GetModelInfoRequest | bytes, context) -> pb2.ModelInfo:
        try:
            parse(pb2.GetModelInfoRequest, request)
        except InputError as e:
            self._fail("GetModelInfo", context, e)
            return pb2.ModelInfo()
        self._succeeded("GetModelInfo")
        return self.model_info
