"""Prometheus metrics of a server: calls by method and status, latency, queue and compute time, batch sizes."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from ..batcher import BatchRecord


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
