"""How long a hostile request delays everyone else: a health checker polls the server every few
milliseconds while a client sends a RefinePose whose image is ``--mib`` MiB of 0xFF after a JPEG start
marker (refused as not decodable); per trial, the refusal's time and the longest health check during it
(where none ran during it, the first one after it), beside the longest health check of an equal quiet window
before it.

    python benchmarks/bench_hostile.py [--trials 10] [--mib 60] [--json benchmarks/results/hostile.json]

A server (``posefix.serve.create_server``) runs in this process on 127.0.0.1 with the R-18 128×96 refiner
(untrained: its speed is a trained model's); the health checker and the hostile client are threads with
channels of their own. Goal: every trial's longest health check ≤ 100 ms on a 2-core CPU.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common
from posefix._proto import pb2_grpc
from posefix.client import request_message


class HealthPoller(threading.Thread):
    """Checks health every ``period`` s on its own channel; records (start time, latency) of each check."""

    def __init__(self, target: str, period: float = 0.005):
        super().__init__(daemon=True)
        self.target, self.period = target, period
        self.samples: list[tuple[float, float]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        with grpc.insecure_channel(self.target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while not self.stop.is_set():
                t0 = time.monotonic()
                try:
                    stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
                except grpc.RpcError:
                    pass  # a check that failed or timed out counts with its whole latency
                self.samples.append((t0, time.monotonic() - t0))
                time.sleep(self.period)

    def worst(self, start: float, end: float) -> float:
        """The longest check that started in [start, end] or was running at start, in seconds."""
        return max((lat for t, lat in list(self.samples) if start - lat <= t <= end), default=0.0)

    def first_after(self, start: float, wait_s: float = 5.0) -> float:
        """When the first check that started at or after ``start`` started, once it has ended (waiting up to
        ``wait_s``); ``start`` if none did."""
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            after = [t for t, _ in list(self.samples) if t >= start]
            if after:
                return min(after)
            time.sleep(0.005)
        return start


def trial(target: str, poller: HealthPoller, hostile_request, quiet_s: float) -> dict:
    start = time.monotonic()
    time.sleep(quiet_s)
    quiet = poller.worst(start, time.monotonic())
    with grpc.insecure_channel(target, options=[("grpc.max_send_message_length", 1 << 30)]) as channel:
        stub = pb2_grpc.PoseRefinerStub(channel)
        t0 = time.monotonic()
        try:
            stub.RefinePose(hostile_request, timeout=30)
            code = "OK"
        except grpc.RpcError as e:
            code = e.code().name
        t1 = time.monotonic()
    # The checks that ran during the call; where the call was so quick that none did (a busy host can hold the
    # poller back), the first check after it, which waited on what the call left behind.
    end = max(t1, poller.first_after(t0))
    time.sleep(0.05)  # a check that started during the call has ended
    return {"code": code, "refused_s": t1 - t0, "health_worst_ms": 1000 * poller.worst(t0, end),
            "quiet_worst_ms": 1000 * quiet}


async def run(args) -> dict:
    from benchmarks.bench_service import build_refiner
    from posefix.serve import create_server

    refiner = build_refiner("resnet18", (128, 96), "cpu")
    server = create_server(refiner, "127.0.0.1", 0)
    await server.start()
    target = f"127.0.0.1:{server.port}"
    hostile = request_message(b"\xff\xd8" + b"\xff" * (args.mib << 20), np.full((1, 17, 3), 10.0))
    poller = HealthPoller(target)
    poller.start()
    try:
        await asyncio.sleep(0.5)
        rows = []
        for i in range(args.trials):
            row = await asyncio.to_thread(trial, target, poller, hostile, args.quiet_s)
            rows.append(row)
            print(f"trial {i + 1}: {row['code']} in {row['refused_s']:.2f} s; longest health check "
                  f"{row['health_worst_ms']:.1f} ms (quiet window: {row['quiet_worst_ms']:.1f} ms)", flush=True)
    finally:
        poller.stop.set()
        await server.stop(grace_s=2.0)
    worst = [r["health_worst_ms"] for r in rows]
    return {"machine": common.machine(), "mib": args.mib, "trials": rows,
            "health_worst_ms": {"max": max(worst), "median": statistics.median(worst), "min": min(worst)},
            "refused_s": {"max": max(r["refused_s"] for r in rows), "median": statistics.median(
                r["refused_s"] for r in rows)}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--mib", type=int, default=60, help="the hostile image's size in MiB (the limit is 64)")
    ap.add_argument("--quiet-s", type=float, default=0.5, help="seconds of quiet window before each call")
    ap.add_argument("--json", default="benchmarks/results/hostile.json")
    args = ap.parse_args(argv)
    report = asyncio.run(run(args))
    h = report["health_worst_ms"]
    print(f"\nlongest health check during a {args.mib} MiB 0xFF request, over {args.trials} trials: max "
          f"{h['max']:.1f} ms, median {h['median']:.1f} ms, min {h['min']:.1f} ms; refused in at most "
          f"{report['refused_s']['max']:.2f} s")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"numbers written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
