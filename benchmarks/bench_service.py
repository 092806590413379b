"""The gRPC service under load: throughput, latency and batching against the same refiner in-process.

    python benchmarks/bench_service.py [--device cpu|cuda] [--backbone resnet18] [--input-size 128 96]
        [--clients 1 4 16 64] [--seconds 10] [--warmup 2] [--max-requests 100000]
        [--client-processes 1] [--torch-threads N] [--json PATH]

A server (``posefix.serve.create_server``) runs on 127.0.0.1 (port 0) in this process with a
random-weight ``PoseFixNet`` wrapped in a ``Refiner`` (no checkpoint, no downloads). A load generator
of its own, in ``--client-processes`` separate processes (spawned, so its Python does not share the
server's GIL), runs C concurrent clients, each with its own channel (its own connection), each sending
RefinePose back to back: the bundled image 000000000785.jpg (640×425 JPEG, decoded by the server
on every call) with one real person from the bundled top-down results. Requests are serialized once;
each response is parsed and checked (one person, 17 keypoints).

For each client count C, with dynamic batching on (``max_batch_size`` 64, the default queue delay)
and off (``max_batch_size`` 1): clients start, run ``--warmup`` seconds unmeasured, then the server
measures a window that ends after ``--seconds`` or once ``--max-requests`` calls were computed,
whichever comes first; then the clients stop and finish their calls in flight. Reported: calls/s and
persons/s completed in the window, p50 and p99 latency (client side, call to response), the mean batch
the batcher formed (``batcher.stats``), and where the time went: the share of the window the model
was computing, the mean compute time per batch, the mean time a call waited in the queue, and the CPU
cores each side kept busy (the server's process: gRPC, protobuf, JPEG decoding, the batcher and the
model; the load generator's processes), and those other processes on the machine kept busy (Linux;
anything else running disturbs these numbers).

In-process: the same ``Refiner`` called directly, in this process with the clients idle, on batches
of the size the service formed on average (rounded; each person in an image of its own, as in the
service) and of 1 person, images already decoded. ``service / in-process`` is the service's persons/s
over the in-process persons/s at its mean batch: what serving costs on top of the model. The target
on a GPU: >= 85 % under load, and batching far ahead of batch-1 serving. The same batches are also
timed from a new worker thread, where the batcher runs the model, and ``(worker thread)`` is the
service's share of that: on a CPU, once two threads have run torch's OpenMP regions the runtime has more
threads than cores and its workers stop spinning between regions, so a small model loses up to a third
of its speed in any process where the model does not run on the thread that used torch first.

Defaults: on the CPU a ResNet-18 at 128×96, 10 s per level after a 2 s warm-up, C in 1 4 16 64, one
load-generator process: about 3 minutes on 2 cores. There the load generator and the server share the
cores (the first lines printed say how many each side could use, the table how many each kept busy);
``--torch-threads`` sets the server's torch threads.
On a GPU (``--device cuda``, the default when one is present) a ResNet-50 at 256×192; the full sweep:

    python benchmarks/bench_service.py --device cuda --clients 1 4 16 64 128 256 --seconds 20 --client-processes 4

If a load-generator process keeps a whole core busy, it is what limits the calls (marked ``client-bound``):
add --client-processes. Numbers go to benchmarks/results/service.json.

Goodput under overload (``--goodput [--factors 0.5 1 2 4] [--deadlines 0.1 3]``): first the capacity C,
the calls/s of C-max clients calling back to back without deadlines; then open-loop load, calls arriving
at each factor × C per second (Poisson, seeded) over that many channels whatever the answers, each call
with a deadline drawn log-uniformly from the range, against a server with deadline-aware admission and
against one first in first out (``admission=False``: deadlines checked only when a batch starts), one
after the other in the same run. Reported per level: OK calls per second (goodput), the share of the
calls answered OK (within their deadline), the calls refused at once (RESOURCE_EXHAUSTED) and those that
ran out of time (DEADLINE_EXCEEDED), and goodput at each factor over goodput at 1×. Numbers go to
benchmarks/results/service_goodput.json.
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import multiprocessing as mp
import os
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np

from posefix import SAMPLE_DIR
from posefix._proto import SERVICE_NAME, pb2

# torch, the model and the server are imported in the functions of the server's side: the
# load generator's processes import this module and need none of them.

IMAGE = SAMPLE_DIR / "images" / "000000000785.jpg"
RESULTS = SAMPLE_DIR / "topdown_keypoints_val4.json"
METHOD = f"/{SERVICE_NAME}/RefinePose"
CALL_TIMEOUT_S = 120.0
CLIENT_BOUND = 0.9  # cores busy per load-generator process above which it limits the calls
ANSWER_TIMEOUT_S = 600.0  # a load-generator process that does not answer in this long has failed


# The load generator (its own processes).

def sample_request() -> tuple[bytes, bytes, np.ndarray]:
    """The bundled image's JPEG bytes, its highest-scoring person (1, 17, 3) from the bundled top-down
    results, and the serialized RefinePoseRequest of the two."""
    from posefix.client import request_message

    results = [r for r in json.loads(RESULTS.read_text()) if r["image_id"] == 785]
    best = max(results, key=lambda r: r["score"])
    pose = np.asarray(best["keypoints"], dtype=np.float64).reshape(1, 17, 3)
    jpeg = IMAGE.read_bytes()
    return jpeg, request_message(jpeg, pose, "coco17").SerializeToString(), pose


async def _timed_call(call, request: bytes, timeout: float, ends: list, latencies: list, codes: list) -> None:
    """One call: its end (monotonic clock), latency and outcome ("OK", "BAD_RESPONSE" or the status code's name)."""
    t0 = time.monotonic()
    try:
        response = await call(request, timeout=timeout)
        good = len(response.persons) == 1 and len(response.persons[0].keypoints) == 17
        code = "OK" if good else "BAD_RESPONSE"
    except grpc.aio.AioRpcError as e:
        code = e.code().name
    t1 = time.monotonic()
    ends.append(t1)
    latencies.append(t1 - t0)
    codes.append(code)


async def _client(call, request: bytes, stop: asyncio.Event, ends: list, latencies: list, codes: list) -> None:
    """One client: calls back to back until ``stop``; records each call's end (monotonic clock),
    latency and outcome ("OK", "BAD_RESPONSE" or the status code's name)."""
    while not stop.is_set():
        await _timed_call(call, request, CALL_TIMEOUT_S, ends, latencies, codes)


async def _open_loop(calls, request: bytes, stop: asyncio.Event, rate: float, seed: int, deadlines: tuple[float, float],
                     ends: list, latencies: list, codes: list, budgets: list) -> None:
    """Open-loop load: calls arrive at ``rate`` per second (Poisson, seeded), whatever the answers, round
    robin over ``calls``; each with a deadline drawn log-uniformly from ``deadlines`` (seconds)."""
    rng = np.random.default_rng(seed)
    loop = asyncio.get_running_loop()
    tasks = set()

    async def one(call, timeout):
        await _timed_call(call, request, timeout, ends, latencies, codes)
        budgets.append(timeout)

    due, n = time.monotonic(), 0
    lo, hi = np.log(deadlines[0]), np.log(deadlines[1])
    while not stop.is_set():
        due += rng.exponential(1 / rate)
        if due > time.monotonic():
            await asyncio.sleep(due - time.monotonic())
        task = loop.create_task(one(calls[n % len(calls)], float(np.exp(rng.uniform(lo, hi)))))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        n += 1
    await asyncio.gather(*tasks)


async def _load(conn, go, stop, target: str, request: bytes, clients: int, open_loop: dict | None = None) -> dict:
    loop = asyncio.get_running_loop()
    options = [("grpc.use_local_subchannel_pool", 1),  # a connection per client, not one shared
               ("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
    channels = [grpc.aio.insecure_channel(target, options=options) for _ in range(clients)]
    try:
        await asyncio.wait_for(asyncio.gather(*(c.channel_ready() for c in channels)), 30)
        calls = [c.unary_unary(METHOD, request_serializer=None,
                               response_deserializer=pb2.RefinePoseResponse.FromString) for c in channels]
        conn.send("ready")
        while not await asyncio.to_thread(go.wait, 1.0):
            pass
        stopping = asyncio.Event()

        async def watch():
            while not await asyncio.to_thread(stop.wait, 1.0):
                pass
            stopping.set()

        watcher = loop.create_task(watch())
        cpu0, t0 = time.process_time(), time.monotonic()
        ends, latencies, codes, budgets = [], [], [], []
        if open_loop is None:
            await asyncio.gather(*(_client(call, request, stopping, ends, latencies, codes) for call in calls))
        else:
            await _open_loop(calls, request, stopping, ends=ends, latencies=latencies, codes=codes, budgets=budgets,
                             **open_loop)
        await watcher
        cpu, wall = time.process_time() - cpu0, time.monotonic() - t0
    finally:
        await asyncio.gather(*(c.close() for c in channels))
    return {"ends": np.array(ends), "latencies": np.array(latencies), "codes": codes, "budgets": np.array(budgets),
            "cpu_s": cpu, "wall_s": wall}


def load_generator(conn, go, stop, request: bytes) -> None:
    """A load-generator process: answers its CPU count, then for each (target, clients) it receives,
    connects, says "ready", runs from ``go`` to ``stop`` and sends back what it recorded; None ends it."""
    conn.send(len(os.sched_getaffinity(0)))
    while (job := conn.recv()) is not None:
        target, clients, open_loop = job
        try:
            if clients == 0:
                conn.send("ready")
                while not go.wait(1.0):
                    pass
                while not stop.wait(1.0):
                    pass
                result = {"ends": np.zeros(0), "latencies": np.zeros(0), "codes": [], "cpu_s": 0.0, "wall_s": 0.0}
            else:
                result = asyncio.run(_load(conn, go, stop, target, request, clients, open_loop))
        except Exception:  # noqa: BLE001 — reported to the parent, which fails the benchmark with it
            result = {"error": traceback.format_exc()}
        conn.send(result)


class LoadGenerator:
    """``processes`` load-generator processes (spawned); ``run_level`` runs C clients split among them."""

    def __init__(self, request: bytes, processes: int = 1):
        ctx = mp.get_context("spawn")
        self.go, self.stop = ctx.Event(), ctx.Event()
        self.workers = []
        for _ in range(processes):
            ours, theirs = ctx.Pipe()
            proc = ctx.Process(target=load_generator, args=(theirs, self.go, self.stop, request), daemon=True)
            proc.start()
            theirs.close()
            self.workers.append((proc, ours))
        self.cpus = [self._receive(proc, conn) for proc, conn in self.workers]

    @staticmethod
    def _receive(proc, conn, timeout: float = ANSWER_TIMEOUT_S):
        deadline = time.monotonic() + timeout
        while not conn.poll(0.2):
            if not proc.is_alive():
                raise RuntimeError(f"a load-generator process exited (status {proc.exitcode})")
            if time.monotonic() > deadline:
                raise RuntimeError(f"a load-generator process did not answer in {timeout:g} s")
        message = conn.recv()
        if isinstance(message, dict) and "error" in message:
            raise RuntimeError(f"a load-generator process failed:\n{message['error']}")
        return message

    async def receive_all(self) -> list:
        return await asyncio.gather(*(asyncio.to_thread(self._receive, proc, conn) for proc, conn in self.workers))

    async def run_level(self, server, clients: int, warmup: float, seconds: float, max_requests: int,
                        open_loop: dict | None = None) -> dict:
        """C clients against ``server`` (a started PoseRefinerServer on this loop): warm up, measure the
        window, stop. What the clients recorded in the window and what the server did in it.
        ``open_loop`` ({"rate": calls/s, "seed", "deadlines": (lo, hi) s}): instead of calling back to
        back, the C channels carry calls arriving at that rate in all, split among the processes."""
        n = len(self.workers)
        for i, (_, conn) in enumerate(self.workers):
            mine = None if open_loop is None else open_loop | {"rate": open_loop["rate"] / n,
                                                                "seed": [open_loop["seed"], i]}
            conn.send((f"127.0.0.1:{server.port}", clients // n + (i < clients % n), mine))
        await self.receive_all()  # "ready": every client connected
        self.go.set()
        try:
            started = time.monotonic()
            await asyncio.sleep(warmup)
            first = _snapshot(server)
            until = first["t"] + seconds
            while time.monotonic() < until and server.batcher.stats.calls - first["stats"].calls < max_requests:
                await asyncio.sleep(0.01)
            last = _snapshot(server)
        finally:
            self.stop.set()
            records = await self.receive_all()
            self.go.clear()
            self.stop.clear()
        t0, t1 = first["t"], last["t"]
        ends = np.concatenate([r["ends"] for r in records])
        latencies = np.concatenate([r["latencies"] for r in records])
        codes = np.array([c for r in records for c in r["codes"]], dtype=object)
        inside = (ends >= t0) & (ends <= t1)
        ok = inside & (codes == "OK")
        outcomes, counts = np.unique(codes[inside], return_counts=True) if inside.any() else ([], [])
        window = t1 - t0
        stats0, stats1 = first["stats"], last["stats"]
        batches = stats1.batches - stats0.batches
        server_calls = stats1.calls - stats0.calls
        lat_ms = 1e3 * latencies[ok]
        client_cores = [r["cpu_s"] / r["wall_s"] if r["wall_s"] else 0.0 for r in records]
        server_cores = (last["cpu"] - first["cpu"]) / window
        others = (None if first["busy"] is None
                  else (last["busy"] - first["busy"]) / window - server_cores - sum(client_cores))
        return {
            "clients": clients, "window_s": window, "warmup_s": t0 - started,
            "calls": int(inside.sum()), "ok": int(ok.sum()),
            "outcomes": {str(k): int(v) for k, v in zip(outcomes, counts)},
            "calls_per_s": ok.sum() / window, "persons_per_s": ok.sum() / window,  # one person per call
            "latency_ms": {q: float(np.percentile(lat_ms, p)) if lat_ms.size else None
                           for q, p in (("p50", 50), ("p90", 90), ("p99", 99))}
                          | {"mean": float(lat_ms.mean()) if lat_ms.size else None},
            "server": {
                "calls": server_calls, "persons": stats1.persons - stats0.persons, "batches": batches,
                "mean_batch": (stats1.persons - stats0.persons) / batches if batches else None,
                "largest_batch": stats1.largest_batch,
                "model_busy": (stats1.compute_seconds - stats0.compute_seconds) / window,
                "compute_ms_per_batch": 1e3 * (stats1.compute_seconds - stats0.compute_seconds) / batches
                if batches else None,
                "queue_ms_per_call": 1e3 * (stats1.queue_seconds - stats0.queue_seconds) / server_calls
                if server_calls else None,
                "rejected": stats1.rejected - stats0.rejected, "expired": stats1.expired - stats0.expired,
                "cpu_cores": server_cores,
            },
            "client_cpu_cores": client_cores,
            "other_cpu_cores": others,  # the machine's busy cores less both sides': other processes
            "client_bound": any(c >= CLIENT_BOUND for c in client_cores),
            "refused_for_deadline": stats1.refused_for_deadline - stats0.refused_for_deadline,
            "timed_out": stats1.timed_out - stats0.timed_out,
        }

    def close(self) -> None:
        for proc, conn in self.workers:
            try:
                conn.send(None)
            except OSError:
                pass
        for proc, conn in self.workers:
            proc.join(10)
            if proc.is_alive():
                proc.terminate()
                proc.join(10)
            conn.close()
        self.workers = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# The server's side.

def machine_busy_s() -> float | None:
    """CPU seconds the whole machine has been busy, all processes (Linux's /proc/stat); None elsewhere."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
    except (OSError, ValueError):
        return None
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def _snapshot(server) -> dict:
    """The batcher's totals, this process's and the machine's CPU time and the monotonic clock, taken
    together on the loop."""
    return {"t": time.monotonic(), "stats": dataclasses.replace(server.batcher.stats), "cpu": time.process_time(),
            "busy": machine_busy_s()}


def build_refiner(backbone: str, input_size: tuple[int, int], device: str, seed: int = 0):
    """A random-weight PoseFixNet (σ scaled with the input height, 7 at 256) in a Refiner, warmed up."""
    import torch

    from posefix.model import ModelConfig, PoseFixNet
    from posefix.refiner import Refiner

    torch.manual_seed(seed)
    h, w = input_size
    model = PoseFixNet(ModelConfig(backbone=backbone, input_size=(h, w), sigma=7.0 * h / 256))
    refiner = Refiner(model, device=device, batch_size=64)
    warm = np.zeros((1, 17, 3))
    warm[0, :, :2], warm[0, :, 2] = (w / 2, h / 2), 1.0
    refiner.refine([torch.zeros((3, h, w), dtype=torch.uint8)], np.zeros(1, dtype=np.int64), warm)
    return refiner


async def serve_levels(refiner, load: LoadGenerator, clients: list[int], *, max_batch_size: int,
                       warmup: float, seconds: float, max_requests: int, max_queue_delay_ms: float = 5.0,
                       progress=None) -> list[dict]:
    """One server with the given batching, every client count in turn; a row per count."""
    from posefix.serve import create_server

    server = create_server(refiner, "127.0.0.1", 0, max_batch_size=max_batch_size,
                           max_queue_delay_ms=max_queue_delay_ms, max_queue_size=max(1024, 4 * max(clients)))
    await server.start()
    rows = []
    try:
        for c in clients:
            row = await load.run_level(server, c, warmup, seconds, max_requests)
            row |= {"max_batch_size": max_batch_size, "max_queue_delay_ms": max_queue_delay_ms}
            rows.append(row)
            if progress is not None:
                progress(row)
    finally:
        await server.stop(grace_s=5.0)
    return rows


async def goodput_levels(refiner, load: LoadGenerator, factors: list[float], *, channels: int, warmup: float,
                         seconds: float, deadlines: tuple[float, float], seed: int = 0, progress=None) -> dict:
    """Goodput under overload: the capacity C (calls/s of ``channels`` closed-loop clients without
    deadlines), then open-loop load at each factor × C, calls with deadlines drawn from ``deadlines``,
    against a server with deadline-aware admission and one first in first out (deadlines checked when a
    batch starts only), side by side at each factor."""
    from posefix.serve import create_server

    rows, capacity = [], None
    for admission in (True, False):
        server = create_server(refiner, "127.0.0.1", 0, max_batch_size=64, max_queue_size=1024, admission=admission)
        await server.start()
        try:
            if capacity is None:
                cap = await load.run_level(server, channels, warmup, seconds, 10 ** 9)
                capacity = cap["calls_per_s"]
                if progress is not None:
                    progress(f"capacity: {capacity:.1f} calls/s ({channels} clients back to back, no deadline)")
            for k, factor in enumerate(factors):
                row = await load.run_level(server, channels, warmup, seconds, 10 ** 9,
                                           open_loop={"rate": factor * capacity, "seed": [seed, k],
                                                      "deadlines": deadlines})
                row |= {"admission": admission, "factor": factor, "offered_per_s": factor * capacity,
                        "goodput_per_s": row["ok"] / row["window_s"],
                        "within_deadline": row["ok"] / row["calls"] if row["calls"] else None}
                rows.append(row)
                if progress is not None:
                    progress(f"admission {'on' if admission else 'off'}, {factor:g}× capacity: "
                             f"{row['goodput_per_s']:.1f} OK/s, {row['outcomes']}")
        finally:
            await server.stop(grace_s=5.0)
    return {"capacity_per_s": capacity, "deadlines_s": list(deadlines), "channels": channels, "rows": rows}


def print_goodput(report: dict) -> None:
    print(f"\ngoodput (capacity {report['capacity_per_s']:.1f} calls/s; deadlines {report['deadlines_s'][0]:g}-"
          f"{report['deadlines_s'][1]:g} s, log-uniform)\n{'admission':>9} {'load':>5} | {'offered/s':>9} "
          f"{'OK/s':>6} {'within deadline':>15} | {'refused':>7} {'late':>6} | {'p99 OK ms':>9}")
    for r in report["rows"]:
        o = r["outcomes"]
        print(f"{'on' if r['admission'] else 'off':>9} {r['factor']:4g}× | {r['offered_per_s']:9.1f} "
              f"{r['goodput_per_s']:6.1f} {100 * (r['within_deadline'] or 0):14.1f}% | "
              f"{o.get('RESOURCE_EXHAUSTED', 0):7d} {o.get('DEADLINE_EXCEEDED', 0):6d} | "
              f"{_fmt(r['latency_ms']['p99'], '.0f', 9)}")
    for admission in (True, False):
        by = {r["factor"]: r["goodput_per_s"] for r in report["rows"] if r["admission"] == admission}
        if by.get(1.0):
            print(f"admission {'on' if admission else 'off'}: goodput at " + ", ".join(
                f"{f:g}× {100 * g / by[1.0]:.0f} %" for f, g in by.items()) + " of goodput at 1×")


def inprocess_rate(refiner, image, pose: np.ndarray, batch: int, seconds: float, worker_thread: bool = False) -> dict:
    """The Refiner alone: batches of ``batch`` persons, each in an image of its own (``image``, decoded),
    called back to back for at least ``seconds`` (and 3 calls) after one unmeasured call; from this
    thread, or from a new worker thread as the batcher calls it."""
    if worker_thread:
        with ThreadPoolExecutor(max_workers=1) as worker:
            return worker.submit(inprocess_rate, refiner, image, pose, batch, seconds).result()
    images = [image] * batch
    index = np.arange(batch, dtype=np.int64)
    poses = np.repeat(pose, batch, axis=0)
    refiner.refine(images, index, poses)
    calls, t0, cpu0, busy0 = 0, time.perf_counter(), time.process_time(), machine_busy_s()
    while calls < 3 or time.perf_counter() - t0 < seconds:
        refiner.refine(images, index, poses)
        calls += 1
    elapsed = time.perf_counter() - t0
    cores = (time.process_time() - cpu0) / elapsed
    others = None if busy0 is None else (machine_busy_s() - busy0) / elapsed - cores
    return {"batch": batch, "persons_per_s": batch * calls / elapsed, "ms_per_batch": 1e3 * elapsed / calls,
            "cpu_cores": cores, "other_cpu_cores": others}


def decode_ms(jpeg: bytes, repeat: int = 20) -> float:
    from posefix.images import decode_encoded

    decode_encoded(jpeg)
    t0 = time.perf_counter()
    for _ in range(repeat):
        decode_encoded(jpeg)
    return 1e3 * (time.perf_counter() - t0) / repeat


def _fmt(value, spec: str, width: int) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:{width}{spec}}"


def _clamp(cores: float | None) -> float | None:
    """Other processes' cores for printing: the difference of counters read at slightly different
    times is within about 0.1 core of the truth and can come out below 0."""
    return None if cores is None else max(cores, 0.0)


def print_tables(rows: list[dict]) -> None:
    print(f"\n{'batching':>9} {'clients':>7} | {'calls/s':>8} {'persons/s':>9} {'p50 ms':>8} {'p99 ms':>8} "
          f"{'mean batch':>10} | {'in-process batch':>16} {'persons/s':>9} | {'service / in-process':>20} "
          f"{'(worker thread)':>15}")
    for r in rows:
        s, ip = r["server"], r["inprocess"]
        mode = f"on ({r['max_batch_size']})" if r["max_batch_size"] > 1 else "off (1)"
        bound = "  client-bound" if r["client_bound"] else ""
        print(f"{mode:>9} {r['clients']:7d} | {r['calls_per_s']:8.1f} {r['persons_per_s']:9.1f} "
              f"{_fmt(r['latency_ms']['p50'], '.1f', 8)} {_fmt(r['latency_ms']['p99'], '.1f', 8)} "
              f"{_fmt(s['mean_batch'], '.2f', 10)} | {ip['batch']:16d} {ip['persons_per_s']:9.1f} | "
              f"{100 * r['service_over_inprocess']:19.1f}% {100 * r['service_over_inprocess_worker']:14.1f}%{bound}")
    print(f"\nwhere the time goes (per level's window)\n{'batching':>9} {'clients':>7} | {'model busy':>10} "
          f"{'ms/batch':>8} | {'in-process ms/batch':>19} {'(worker thread)':>15} | {'queue ms/call':>13} | "
          f"{'server cores':>12} {'client cores':>12} {'other processes':>15}")
    for r in rows:
        s, ip, ipw = r["server"], r["inprocess"], r["inprocess_worker_thread"]
        mode = f"on ({r['max_batch_size']})" if r["max_batch_size"] > 1 else "off (1)"
        print(f"{mode:>9} {r['clients']:7d} | {100 * s['model_busy']:9.1f}% "
              f"{_fmt(s['compute_ms_per_batch'], '.1f', 8)} "
              f"| {ip['ms_per_batch']:19.1f} {ipw['ms_per_batch']:15.1f} | "
              f"{_fmt(s['queue_ms_per_call'], '.1f', 13)} | "
              f"{s['cpu_cores']:12.2f} {sum(r['client_cpu_cores']):12.2f} "
              f"{_fmt(_clamp(r['other_cpu_cores']), '.2f', 15)}")


def run(args) -> dict:
    """The whole benchmark for parsed ``args``; the report (also printed and written)."""
    import torch

    from posefix.images import decode_encoded

    device = args.device
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    backbone = args.backbone or ("resnet50" if device.startswith("cuda") else "resnet18")
    input_size = tuple(args.input_size or ((256, 192) if device.startswith("cuda") else (128, 96)))
    jpeg, request, pose = sample_request()
    refiner = build_refiner(backbone, input_size, device)
    server_cpus = len(os.sched_getaffinity(0))
    decode_workers = 4  # create_server's default
    clients = sorted(set(args.clients))

    def progress(row):
        mode = f"batching {'on' if row['max_batch_size'] > 1 else 'off'}"
        print(f"  {mode}, {row['clients']:3d} clients: {row['calls']} calls in {row['window_s']:.1f} s, "
              f"{row['calls_per_s']:.1f} calls/s", flush=True)

    if args.goodput:
        with LoadGenerator(request, args.client_processes) as load:
            print(f"goodput: {backbone} {input_size[0]}x{input_size[1]} on {device}; one person per call; "
                  f"{args.seconds:g} s per level after {args.warmup:g} s warm-up", flush=True)
            report = asyncio.run(goodput_levels(refiner, load, args.factors, channels=max(clients), warmup=args.warmup,
                                                seconds=args.seconds, deadlines=tuple(args.deadlines),
                                                progress=lambda line: print("  " + line, flush=True)))
        print_goodput(report)
        return {"benchmark": "service_goodput", "config": {"backbone": backbone, "input_size": list(input_size),
                                                           "device": device, "factors": args.factors}} | report
    with LoadGenerator(request, args.client_processes) as load:
        print(f"service: {backbone} {input_size[0]}x{input_size[1]} on {device}"
              f"{' (' + torch.cuda.get_device_name(0) + ')' if device.startswith('cuda') else ''}; one person per "
              f"call; {args.seconds:g} s or {args.max_requests} calls per level after {args.warmup:g} s warm-up")
        print(f"server process: {server_cpus} CPUs, {torch.get_num_threads()} torch threads, {decode_workers} "
              f"decode threads; load generator: {len(load.cpus)} process(es) of {'/'.join(map(str, load.cpus))} "
              f"CPUs; neither side is pinned: they share the machine's {os.cpu_count()} cores", flush=True)
        rows = []
        for max_batch_size in (args.max_batch_size, 1):
            rows += asyncio.run(serve_levels(refiner, load, clients, max_batch_size=max_batch_size,
                                             warmup=args.warmup, seconds=args.seconds,
                                             max_requests=args.max_requests,
                                             max_queue_delay_ms=args.max_queue_delay_ms, progress=progress))
    image = decode_encoded(jpeg)
    batches = {1} | {max(1, round(r["server"]["mean_batch"])) for r in rows if r["server"]["mean_batch"]}
    inprocess, inprocess_worker = {}, {}
    for b in sorted(batches):
        for where, table, worker_thread in (("this thread", inprocess, False),
                                            ("a worker thread", inprocess_worker, True)):
            ip = table[b] = inprocess_rate(refiner, image, pose, b, args.inprocess_seconds, worker_thread)
            print(f"  in-process from {where}, batch {b}: {ip['persons_per_s']:.1f} persons/s, "
                  f"{ip['ms_per_batch']:.1f} ms per batch, {ip['cpu_cores']:.2f} cores busy "
                  f"(other processes: {_fmt(_clamp(ip['other_cpu_cores']), '.2f', 0)})", flush=True)
    for r in rows:
        b = max(1, round(r["server"]["mean_batch"])) if r["server"]["mean_batch"] else 1
        r["inprocess"], r["inprocess_worker_thread"] = inprocess[b], inprocess_worker[b]
        r["service_over_inprocess"] = r["persons_per_s"] / inprocess[b]["persons_per_s"]
        r["service_over_inprocess_worker"] = r["persons_per_s"] / inprocess_worker[b]["persons_per_s"]
    print_tables(rows)
    gain = {}
    for c in clients:
        on = [r for r in rows if r["clients"] == c and r["max_batch_size"] > 1]
        off = [r for r in rows if r["clients"] == c and r["max_batch_size"] == 1]
        if on and off and off[0]["persons_per_s"] > 0:
            gain[c] = on[0]["persons_per_s"] / off[0]["persons_per_s"]
    print("\nbatching on / off, persons/s: " + ", ".join(f"{c} clients {g:.2f}×" for c, g in gain.items()))
    dec = decode_ms(jpeg)
    print(f"JPEG decoding ({image.shape[2]}x{image.shape[1]}): {dec:.2f} ms per call in the server's process")
    measured = rows + list(inprocess.values()) + list(inprocess_worker.values())
    others = [x["other_cpu_cores"] for x in measured if x["other_cpu_cores"] is not None]
    if others and max(others) > 0.25:
        print(f"other processes kept up to {max(others):.2f} cores busy during the measurements: these numbers are "
              f"disturbed (a quiet machine gives cleaner ones)")
    if any(r["client_bound"] for r in rows):
        print("client-bound: a load-generator process kept a core busy; those rows are limited by it "
              "(add --client-processes)")
    report = {
        "benchmark": "service",
        "config": {"backbone": backbone, "torch_threads": torch.get_num_threads(), "input_size": list(input_size),
                   "device": device, "clients": clients, "seconds": args.seconds, "warmup_s": args.warmup,
                   "max_requests": args.max_requests, "max_batch_size": args.max_batch_size,
                   "max_queue_delay_ms": args.max_queue_delay_ms, "persons_per_call": 1,
                   "image": IMAGE.name, "image_bytes": len(jpeg), "request_bytes": len(request)},
        "cores": {"server_process_cpus": server_cpus, "torch_threads": torch.get_num_threads(),
                  "decode_threads": decode_workers, "load_generator_processes": len(load.cpus),
                  "load_generator_cpus": load.cpus},
        "decode_ms": dec,
        "inprocess": list(inprocess.values()),
        "inprocess_worker_thread": list(inprocess_worker.values()),
        "rows": rows,
        "batching_gain": {str(c): g for c, g in gain.items()},
    }
    return report


def main():
    import torch
    from common import machine, write

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--backbone", default=None, help="default: resnet18 on the CPU, resnet50 on a GPU")
    ap.add_argument("--input-size", type=int, nargs=2, metavar=("H", "W"), default=None,
                    help="default: 128 96 on the CPU, 256 192 on a GPU")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--seconds", type=float, default=10.0, help="measured seconds per level, at most")
    ap.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds before each level")
    ap.add_argument("--max-requests", type=int, default=100_000, help="calls per level, at most")
    ap.add_argument("--max-batch-size", type=int, default=64, help="persons per batch with batching on")
    ap.add_argument("--max-queue-delay-ms", type=float, default=5.0)
    ap.add_argument("--client-processes", type=int, default=1)
    ap.add_argument("--torch-threads", type=int, default=None, help="the server's torch threads (default: torch's)")
    ap.add_argument("--inprocess-seconds", type=float, default=3.0, help="seconds per in-process batch size")
    ap.add_argument("--goodput", action="store_true",
                    help="instead: goodput under open-loop overload, admission on and off (clients: the largest "
                         "--clients, as channels)")
    ap.add_argument("--factors", type=float, nargs="+", default=[0.5, 1, 2, 4], help="load / capacity (--goodput)")
    ap.add_argument("--deadlines", type=float, nargs=2, default=[0.1, 3.0], metavar=("LO", "HI"),
                    help="call deadlines in seconds, log-uniform (--goodput)")
    ap.add_argument("--json", default=None, help="default: benchmarks/results/service.json (--goodput: "
                                                 "service_goodput.json)")
    args = ap.parse_args()
    args.json = args.json or str(Path(__file__).parent / "results" /
                                 ("service_goodput.json" if args.goodput else "service.json"))
    if (min(args.clients) < 1 or args.client_processes < 1 or args.max_requests < 1 or args.max_batch_size < 2
            or (args.torch_threads is not None and args.torch_threads < 1)):
        ap.error("--clients, --client-processes, --max-requests and --torch-threads must be >= 1, "
                 "--max-batch-size >= 2")
    report = run(args)
    write(args.json, report | {"machine": machine(args.device)})


if __name__ == "__main__":
    main()
