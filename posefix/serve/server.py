"""The server's lifecycle: :func:`create_server` builds a server bound to a port (port 0: any free one),
:class:`PoseRefinerServer` starts and stops it, :func:`serve` runs one until SIGTERM or SIGINT and then stops
gracefully; :func:`serve_main` is ``posefix serve`` (its options: :class:`ServeOptions`)."""
from __future__ import annotations

import asyncio
import hashlib
import math
import signal
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import grpc
import numpy as np
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from .. import __version__
from .._proto import FORMAT_LAYOUT, SERVICE_NAME, pb2
from ..batcher import DynamicBatcher
from ..choice import KEEPS_INPUT_NOTICE
from ..devices import resolve_device
from ..errors import InputError
from ..formats import LAYOUTS
from ..keypoints import NUM_KEYPOINTS
from ..options import RefineOptions
from ..protocols import RefinerLike
from ..refiner import Refiner
from ..search import PoseIndex
from ..temporal.files import temporal_setup
from .metrics import Metrics
from .servicer import PoseRefinerServicer
from .validation import Limits


def add_servicer(servicer: PoseRefinerServicer, server) -> None:
    """Register the servicer's methods on ``server`` as ``pb2_grpc.add_PoseRefinerServicer_to_server``
    does, but taking the request bytes as they came (see :func:`~posefix.serve.validation.parse`)."""
    handlers = {}
    for method in pb2.DESCRIPTOR.services_by_name["PoseRefiner"].methods:
        output = getattr(pb2, method.output_type.name)
        handler = getattr(servicer, method.name)
        kind = grpc.stream_stream_rpc_method_handler if method.client_streaming else grpc.unary_unary_rpc_method_handler
        handlers[method.name] = kind(handler, request_deserializer=None, response_serializer=output.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))


def model_info(refiner: RefinerLike, limits: Limits, batcher: DynamicBatcher, model_version: str = "",
               index=None) -> pb2.ModelInfo:
    """What GetModelInfo answers: the model, its backend, the limits, the formats and the index."""
    cfg = refiner.cfg
    return pb2.ModelInfo(
        keypoint_format=pb2.KEYPOINT_FORMAT_COCO_17, input_height=cfg.input_size[0], input_width=cfg.input_size[1],
        model_variant=cfg.backbone, model_version=model_version, server_version=__version__,
        flip_test=bool(refiner.flip_test), index_loaded=index is not None,
        index_size=0 if index is None else len(index),
        backend=refiner.describe(),
        limits=pb2.Limits(max_persons_per_image=limits.max_persons_per_image, max_image_side=limits.max_image_side,
                          max_image_pixels=limits.max_image_pixels, max_message_bytes=limits.max_message_bytes,
                          max_batch_size=batcher.max_batch_size, max_queue_delay_ms=batcher.max_queue_delay_ms,
                          max_queue_size=batcher.max_queue_size),
        formats=[pb2.FormatInfo(format=f, keypoint_names=LAYOUTS[name].names) for f, name in FORMAT_LAYOUT.items()])


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


def create_server(refiner: RefinerLike, host: str = "127.0.0.1", port: int = 0, *, max_batch_size: int = 64,
                  max_queue_delay_ms: float = 5.0, max_queue_size: int = 1024, metrics_port: int | None = None,
                  limits: Limits | None = None, model_version: str = "", decode_workers: int = 4,
                  max_pinned_bytes: int = 512 * 1024 * 1024, max_queue_wait_s: float | None = None,
                  admission: bool = True, index=None, temporal_weights=None) -> PoseRefinerServer:
    """A PoseRefiner server for ``refiner`` (a :class:`~posefix.refiner.Refiner`, or any
    :class:`~posefix.protocols.RefinerLike`), bound to ``host:port`` (port 0: a free port, see ``.port``), not
    started.

    Batching: up to ``max_batch_size`` persons per model call; the oldest waiting call waits at most
    ``max_queue_delay_ms`` for others; at most ``max_queue_size`` persons wait (more: RESOURCE_EXHAUSTED).
    Admission (see :mod:`posefix.batcher`): a call estimated to finish after its deadline, or to wait over
    ``max_queue_wait_s`` seconds before its batch starts, is refused at once with RESOURCE_EXHAUSTED
    (``admission`` False: deadlines checked only when a batch starts, first in first out).
    ``metrics_port``: serve Prometheus metrics over HTTP on ``host`` at this port (0: a free one).
    ``max_pinned_bytes``: on a GPU, decoded images of calls in flight are staged in pinned host memory, so that
    their copies to the device wait for nothing, up to this many bytes (page-locked memory is the machine's).
    ``index``: a :class:`~posefix.search.PoseIndex` that SearchPoses searches (None: FAILED_PRECONDITION).
    ``limits``: what one request may hold (None: :class:`~posefix.serve.validation.Limits`' defaults).
    ``temporal_weights``: a file of ``posefix train-temporal``, loaded once: streams may then ask for the
    ``learned`` smoother (None: asking for it is INVALID_ARGUMENT). Call it from the event loop that will run
    the server.
    """
    limits = Limits() if limits is None else limits
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
    learned = None if temporal_weights is None else temporal_setup("learned", temporal_weights)[0]
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
    add_servicer(PoseRefinerServicer(batcher, info, limits, metrics, decoder, refiner.stage, max_pinned_bytes, index,
                                     temporal_by_default=getattr(refiner, "temporal_only", False), learned=learned),
                 server)
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


def serve(refiner: RefinerLike, host: str = "127.0.0.1", port: int = 50051, *, grace_s: float = 10.0,
          drain_s: float = 0.0, **options) -> None:
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


# posefix serve.

@dataclass(frozen=True)
class ServeOptions:
    """The options of ``posefix serve``.

    checkpoint: a model.safetensors from posefix train (None: with ``refine.onnx`` an ONNX model, without one
    no refiner, see :class:`NoRefiner`); refine: how the refiner runs (:class:`~posefix.options.RefineOptions`;
    its ``batch_size`` is the most persons of one model call, the batcher's); port 0: any free port;
    max_queue_size: persons; max_queue_wait_s: None, no bound; metrics_port: None, no metrics endpoint;
    grace_s: seconds calls in flight have to finish once stopping; drain_s: seconds to go on taking calls
    with health NOT_SERVING before that; index: a file of posefix index build, for SearchPoses (None: no
    pose index); temporal_weights: a file of posefix train-temporal, for streams that ask for the learned
    smoother (None: they cannot)."""
    checkpoint: str | None = None
    refine: RefineOptions = field(default_factory=lambda: RefineOptions(device="auto"))
    host: str = "127.0.0.1"
    port: int = 50051
    max_queue_delay_ms: float = 5.0
    max_queue_size: int = 1024
    max_queue_wait_s: float | None = None
    metrics_port: int | None = None
    grace_s: float = 10.0
    drain_s: float = 0.0
    index: str | None = None
    temporal_weights: str | None = None


class NoRefiner:
    """What a server started without a checkpoint refines with: every joint as given, its score as confidence.
    Its streams refine over time (``temporal_only``: StreamOptions.temporal is on by default)."""

    temporal_only = True
    flip_test = False
    backend = "none"
    keeps_every_input = True

    def __init__(self, batch_size: int = 64):
        self.cfg = SimpleNamespace(input_size=(0, 0), backbone="none")  # what GetModelInfo reads
        self.device = torch.device("cpu")
        self.batch_size = batch_size

    def describe(self) -> str:
        return "none (no refiner: temporal refinement only)"

    def stage(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def decode_reduction(self, poses) -> int:
        return 1

    def refine(self, images, image_index, poses, crop_poses=None, reductions=None):
        poses = np.asarray(poses, dtype=np.float64)
        return poses[..., :2].copy(), poses[..., 2].copy()

    def refine_parts(self, images, image_index, poses, crop_poses=None, reductions=None):
        xy, conf = self.refine(images, image_index, poses, crop_poses)
        return xy, conf, conf.copy()


def serve_main(options: ServeOptions) -> int:
    """``posefix serve``: load the checkpoint, warm the model up and serve until SIGTERM/SIGINT. Bad values
    raise InputError naming the option."""
    o, r = options, options.refine
    device = resolve_device(r.device)
    for name, value in (("grace_s", o.grace_s), ("drain_s", o.drain_s)):
        if not (math.isfinite(value) and value >= 0):
            raise InputError(name, f"must be >= 0 seconds, got {value}")
    index = PoseIndex.load(o.index, "index") if o.index else None
    queue = {"max_batch_size": r.batch_size, "max_queue_delay_ms": o.max_queue_delay_ms,
             "max_queue_size": o.max_queue_size, "metrics_port": o.metrics_port, "index": index,
             "max_queue_wait_s": o.max_queue_wait_s, "temporal_weights": o.temporal_weights}
    if o.checkpoint is None and r.onnx is None:
        print("posefix serve: note: no --checkpoint: RefinePose gives the input back; RefinePoseStream refines "
              "over time (docs/video.md)", file=sys.stderr, flush=True)
        serve(NoRefiner(r.batch_size), o.host, o.port, grace_s=o.grace_s, drain_s=o.drain_s, model_version="",
              **queue)
        return 0
    refiner = Refiner.from_checkpoint(o.checkpoint, r.replace(device=str(device)))
    if refiner.keeps_every_input:
        print(f"posefix serve: note: {KEEPS_INPUT_NOTICE}", file=sys.stderr, flush=True)
    h, w = refiner.cfg.input_size
    warm = np.zeros((1, NUM_KEYPOINTS, 3))
    warm[0, :, :2], warm[0, :, 2] = (w / 2, h / 2), 1.0
    refiner.refine([torch.zeros((3, h, w), dtype=torch.uint8)], np.zeros(1, dtype=np.int64), warm)
    serve(refiner, o.host, o.port, grace_s=o.grace_s, drain_s=o.drain_s,
          model_version=checkpoint_version(r.onnx or o.checkpoint), **queue)
    return 0
