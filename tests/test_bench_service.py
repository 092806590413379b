"""benchmarks/bench_service.py on a tiny model: one level with 2 clients for about a second, batching
on and off, against a real server and a spawned load-generator process; its counts add up."""
import asyncio
from pathlib import Path

import numpy as np
import pytest

from posefix._proto import pb2

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(BENCHMARKS))  # the spawned load generator inherits it
        import bench_service
        yield bench_service


@pytest.fixture(scope="module")
def refiner(bench):
    return bench.build_refiner("resnet18", (64, 64), "cpu")


@pytest.fixture(scope="module")
def load(bench):
    _, request, _ = bench.sample_request()
    with bench.LoadGenerator(request, processes=1) as generator:
        yield generator


def test_sample_request_is_one_real_person(bench):
    jpeg, request, pose = bench.sample_request()
    message = pb2.RefinePoseRequest.FromString(request)
    assert message.image.encoded == jpeg and jpeg[:2] == b"\xff\xd8"
    assert len(message.persons) == 1 and pose.shape == (1, 17, 3)
    sent = np.array([(k.x, k.y, k.score) for k in message.persons[0].keypoints])
    np.testing.assert_allclose(sent, pose[0], atol=1e-4)
    assert (pose[0, :, 2] > 0).sum() >= 5


def test_one_level_counts_add_up(bench, refiner, load):
    assert len(load.cpus) == 1 and load.cpus[0] >= 1
    rows = []
    for max_batch_size in (64, 1):
        rows += asyncio.run(bench.serve_levels(refiner, load, [2], max_batch_size=max_batch_size,
                                               warmup=0.3, seconds=1.0, max_requests=100_000))
    assert [(r["clients"], r["max_batch_size"]) for r in rows] == [(2, 64), (2, 1)]
    for r in rows:
        s = r["server"]
        assert r["calls"] > 0 and r["calls"] == r["ok"], r["outcomes"]
        assert r["outcomes"] == {"OK": r["calls"]}
        assert 0.9 <= r["window_s"] <= 1.5 and r["warmup_s"] >= 0.3
        assert r["calls_per_s"] == pytest.approx(r["calls"] / r["window_s"])
        lat = r["latency_ms"]
        assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"]
        # The server computed the calls the clients saw end in the window, give or take those in flight
        # at its two edges (at most one per client each).
        assert abs(s["calls"] - r["calls"]) <= 2 * r["clients"]
        assert s["persons"] == s["calls"] and s["batches"] >= 1
        assert 1 <= s["mean_batch"] <= min(r["max_batch_size"], r["clients"])
        # Batches that finished in the window: the first may have started before it.
        assert 0 < s["model_busy"] < 1.5 and s["compute_ms_per_batch"] > 0
        assert s["rejected"] == s["expired"] == 0
        assert len(r["client_cpu_cores"]) == 1 and r["client_cpu_cores"][0] > 0
    assert rows[1]["server"]["mean_batch"] == 1 and rows[1]["server"]["largest_batch"] == 1


def test_max_requests_ends_a_level_early(bench, refiner, load):
    [row] = asyncio.run(bench.serve_levels(refiner, load, [2], max_batch_size=64, warmup=0.2,
                                           seconds=30.0, max_requests=5))
    assert row["window_s"] < 10
    assert 5 <= row["server"]["calls"] <= 5 + 2 * 2 and row["calls"] == row["ok"]


def test_inprocess_rate(bench, refiner):
    jpeg, _, pose = bench.sample_request()
    from posefix.images import decode_encoded

    for worker_thread in (False, True):
        out = bench.inprocess_rate(refiner, decode_encoded(jpeg), pose, 3, seconds=0.1, worker_thread=worker_thread)
        assert out["batch"] == 3 and out["persons_per_s"] == pytest.approx(3e3 / out["ms_per_batch"])
        assert out["cpu_cores"] > 0
