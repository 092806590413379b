"""The gRPC service against real servers on 127.0.0.1 (port 0) over real channels: the numbers match the
offline engine, calls batch together, overload and deadlines and shutdown behave, malformed requests
name their field, and the Python and Node.js clients work. A small random-weight refiner on the CPU."""
import json
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from posefix._proto import SERVICE_NAME, pb2
from posefix.client import PoseRefinerClient, image_message, request_message
from posefix.formats import LAYOUTS
from posefix.images import decode
from posefix.protocols import RefinerLike
from posefix.refiner import Refiner
from posefix.serve import Limits, create_server
from posefix.tracking import OneEuroFilter, OneEuroParams

from .conftest import IMAGE_785, RESULTS, TIMEOUT, StandIn, as_array, metric_samples, stub_for

ROOT = Path(__file__).resolve().parent.parent
TOL = 1e-4  # pixels and confidence


class GatedRefiner(StandIn):
    """A refiner whose calls wait for ``gate`` (when closed) and are counted: calls, persons computed."""

    def __init__(self, inner: Refiner):
        super().__init__(inner)
        self.calls = self.persons = 0
        self.started = threading.Event()
        self.gate = threading.Event()
        self.gate.set()

    def refine(self, images, image_index, poses):
        self.calls += 1
        self.persons += len(poses)
        self.started.set()
        assert self.gate.wait(TIMEOUT)
        return self.inner.refine(images, image_index, poses)


def wait_until(predicate, timeout=TIMEOUT):
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "timed out waiting"
        time.sleep(0.005)


# Numbers.

def test_refinement_matches_the_offline_engine(stub, poses_785, offline_785):
    xy, conf = offline_785
    request = request_message(IMAGE_785.read_bytes(), poses_785, "coco17")
    request.persons[0].box.CopyFrom(pb2.Box(x=1, y=2, width=30, height=40))
    request.persons[0].score = 0.75
    response = stub.RefinePose(request, timeout=TIMEOUT)
    got = as_array(response)
    assert got.shape == (len(poses_785), 17, 3)
    np.testing.assert_allclose(got[..., :2], xy, atol=TOL)
    np.testing.assert_allclose(got[..., 2], conf, atol=TOL)
    assert np.abs(xy - poses_785[..., :2]).max() > 0.1  # the refiner moved joints: equal numbers mean equal work
    assert response.persons[0].box == pb2.Box(x=1, y=2, width=30, height=40)
    assert response.persons[0].score == 0.75 and not response.persons[1].HasField("score")
    assert all(k.refined for p in response.persons for k in p.keypoints)


def test_raw_pixels_give_the_same_refinement(stub, poses_785, offline_785):
    pixels = decode(IMAGE_785).permute(1, 2, 0).numpy()  # (H, W, 3) RGB
    got = as_array(stub.RefinePose(request_message(pixels, poses_785), timeout=TIMEOUT))
    np.testing.assert_allclose(got[..., :2], offline_785[0], atol=TOL)
    np.testing.assert_allclose(got[..., 2], offline_785[1], atol=TOL)


@pytest.mark.parametrize("fmt", ["blazepose33", "body25", "coco18"])
def test_other_formats_come_back_in_their_own_layout(stub, poses_785, offline_785, fmt):
    layout = LAYOUTS[fmt]
    rng = np.random.default_rng(1)
    native = np.zeros((len(poses_785), len(layout.names), 3))
    native[..., :2] = rng.uniform(0, 400, native[..., :2].shape)
    native[..., 2] = rng.uniform(0.1, 1, native[..., 2].shape)
    native[:, list(layout.coco_index)] = poses_785
    name = {"blazepose33": pb2.KEYPOINT_FORMAT_BLAZEPOSE_33, "body25": pb2.KEYPOINT_FORMAT_OPENPOSE_BODY_25,
            "coco18": pb2.KEYPOINT_FORMAT_OPENPOSE_COCO_18}[fmt]
    response = stub.RefinePose(request_message(IMAGE_785.read_bytes(), native, name), timeout=TIMEOUT)
    got = as_array(response)
    coco = got[:, list(layout.coco_index)]
    np.testing.assert_allclose(coco[..., :2], offline_785[0], atol=TOL)
    np.testing.assert_allclose(coco[..., 2], offline_785[1], atol=TOL)
    extra = [k for k in range(len(layout.names)) if k not in layout.coco_index]
    np.testing.assert_allclose(got[:, extra], native[:, extra], atol=1e-6)  # as sent (score: float32)
    flags = np.array([[k.refined for k in p.keypoints] for p in response.persons])
    assert flags[:, list(layout.coco_index)].all() and not flags[:, extra].any()


def test_a_request_without_persons_is_answered_empty(stub):
    request = request_message(IMAGE_785.read_bytes(), np.zeros((0, 17, 3)))
    assert len(stub.RefinePose(request, timeout=TIMEOUT).persons) == 0


# Health, reflection, model info.

def test_health_reflection_and_model_info(server, stub):
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    health = health_pb2_grpc.HealthStub(channel)
    for name in ("", SERVICE_NAME):
        reply = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=TIMEOUT)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    db = ProtoReflectionDescriptorDatabase(channel)
    assert {SERVICE_NAME, "grpc.health.v1.Health"} <= set(db.get_services())
    assert db.FindFileContainingSymbol(SERVICE_NAME).name == "posefix/v1/posefix.proto"
    channel.close()
    info = stub.GetModelInfo(pb2.GetModelInfoRequest(), timeout=TIMEOUT)
    assert (info.input_height, info.input_width, info.model_variant) == (128, 96, "resnet18")
    assert info.keypoint_format == pb2.KEYPOINT_FORMAT_COCO_17 and not info.flip_test and info.backend == "torch"
    assert info.limits.max_persons_per_image == Limits().max_persons_per_image
    assert info.limits.max_batch_size == 64 and info.limits.max_queue_size == 1024
    assert {f.format: len(f.keypoint_names) for f in info.formats} == {1: 17, 2: 33, 3: 25, 4: 18}


def test_the_refiner_and_its_stand_ins_are_refiner_like(refiner):
    """What the server calls on a refiner is the Protocol's: a Refiner has all of it, so do the stand-ins."""
    assert isinstance(refiner, RefinerLike) and isinstance(GatedRefiner(refiner), RefinerLike)
    assert not isinstance(object(), RefinerLike)


# Batching, overload, deadlines, shutdown.

def test_concurrent_calls_are_batched_together(start, refiner, poses_785, offline_785):
    gated = GatedRefiner(refiner)
    handle = start(gated, metrics_port=0, max_batch_size=64, max_queue_delay_ms=20)
    stub, channel = stub_for(handle)
    image = IMAGE_785.read_bytes()
    gated.gate.clear()
    with ThreadPoolExecutor(8) as pool:
        first = pool.submit(stub.RefinePose, request_message(image, poses_785[:1]), timeout=TIMEOUT)
        assert gated.started.wait(TIMEOUT)  # the first batch is computing; the others queue behind it
        rest = [pool.submit(stub.RefinePose, request_message(image, poses_785[i:i + 1]), timeout=TIMEOUT)
                for i in range(1, 7)]
        wait_until(lambda: handle.batcher.queued_persons == 6)
        gated.gate.set()
        results = [first.result(TIMEOUT)] + [f.result(TIMEOUT) for f in rest]
    channel.close()
    got = np.concatenate([as_array(r) for r in results])
    np.testing.assert_allclose(got[..., :2], offline_785[0][:7], atol=TOL)
    np.testing.assert_allclose(got[..., 2], offline_785[1][:7], atol=TOL)
    assert gated.calls == 2 and handle.batcher.stats.largest_batch == 6
    m = metric_samples(handle)
    assert m[("posefix_batch_calls_count", frozenset())] == 2
    assert m[("posefix_batch_calls_bucket", frozenset({("le", "1.0")}))] == 1  # one batch of a single call...
    assert m[("posefix_batch_calls_bucket", frozenset({("le", "6.0")}))] == 2  # ...and one of six
    assert m[("posefix_batch_persons_sum", frozenset())] == 7
    assert m[("posefix_requests_total", frozenset({("method", "RefinePose"), ("code", "OK")}))] == 7
    assert m[("posefix_queue_seconds_count", frozenset())] == 7
    assert m[("posefix_compute_seconds_count", frozenset())] == 2


def test_a_full_queue_answers_resource_exhausted(start, refiner, poses_785):
    gated = GatedRefiner(refiner)
    handle = start(gated, max_batch_size=1, max_queue_size=2, limits=Limits(max_persons_per_image=2))
    stub, channel = stub_for(handle)
    one = request_message(IMAGE_785.read_bytes(), poses_785[:1])
    gated.gate.clear()
    with ThreadPoolExecutor(4) as pool:
        computing = pool.submit(stub.RefinePose, one, timeout=TIMEOUT)
        assert gated.started.wait(TIMEOUT)
        queued = [pool.submit(stub.RefinePose, one, timeout=TIMEOUT) for _ in range(2)]
        wait_until(lambda: handle.batcher.queued_persons == 2)
        with pytest.raises(grpc.RpcError) as err:
            stub.RefinePose(one, timeout=TIMEOUT)
        gated.gate.set()
        assert all(len(f.result(TIMEOUT).persons) == 1 for f in [computing, *queued])
    channel.close()
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "queue full" in err.value.details()
    assert handle.batcher.stats.rejected == 1 and gated.calls == 3


def test_an_expired_deadline_is_not_computed(start, refiner, poses_785):
    gated = GatedRefiner(refiner)
    handle = start(gated, metrics_port=0, max_batch_size=4)
    stub, channel = stub_for(handle)
    image = IMAGE_785.read_bytes()
    gated.gate.clear()
    with ThreadPoolExecutor(2) as pool:
        computing = pool.submit(stub.RefinePose, request_message(image, poses_785[:1]), timeout=TIMEOUT)
        assert gated.started.wait(TIMEOUT)
        with pytest.raises(grpc.RpcError) as err:
            stub.RefinePose(request_message(image, poses_785[1:3]), timeout=0.2)
        gated.gate.set()
        assert len(computing.result(TIMEOUT).persons) == 1
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    time.sleep(0.2)  # time for a batch that should not happen
    channel.close()
    assert gated.calls == 1 and gated.persons == 1
    assert handle.batcher.stats.cancelled + handle.batcher.stats.expired == 1
    m = metric_samples(handle)
    assert m[("posefix_requests_total", frozenset({("method", "RefinePose"), ("code", "DEADLINE_EXCEEDED")}))] == 1


def test_graceful_stop_lets_calls_in_flight_finish(loop, refiner, poses_785):
    gated = GatedRefiner(refiner)

    async def create_and_start():
        handle = create_server(gated, "127.0.0.1", 0, max_batch_size=8, max_queue_delay_ms=1, max_queue_size=512)
        await handle.start()
        return handle

    handle = loop.run(create_and_start())
    stub, channel = stub_for(handle)
    health = health_pb2_grpc.HealthStub(channel)
    gated.gate.clear()
    with ThreadPoolExecutor(1) as pool:
        in_flight = pool.submit(stub.RefinePose, request_message(IMAGE_785.read_bytes(), poses_785[:2]),
                                timeout=TIMEOUT)
        assert gated.started.wait(TIMEOUT)
        stopping = loop.submit(handle.stop(grace_s=5.0, drain_s=0.3))
        reply = health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=TIMEOUT)
        assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
        time.sleep(0.4)  # past the drain: the server refuses new calls, the call in flight goes on
        with pytest.raises(grpc.RpcError) as err:
            stub.GetModelInfo(pb2.GetModelInfoRequest(), timeout=TIMEOUT)
        assert not in_flight.done()
        gated.gate.set()
        assert len(in_flight.result(TIMEOUT).persons) == 2
        stopping.result(TIMEOUT)
    channel.close()
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


# Malformed requests.

def _valid(poses_785) -> pb2.RefinePoseRequest:
    return request_message(IMAGE_785.read_bytes(), poses_785[:2])


def _png_header(width: int, height: int) -> bytes:
    return b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\x0dIHDR" + width.to_bytes(4, "big") + height.to_bytes(4, "big") + \
        b"\x08\x02\x00\x00\x00" + bytes(4)


def _wrong_count(r):
    del r.persons[1].keypoints[16]


def _nan_x(r):
    r.persons[0].keypoints[3].x = float("nan")


def _inf_score(r):
    r.persons[1].keypoints[0].score = float("inf")


def _no_image(r):
    r.ClearField("image")


def _empty_encoded(r):
    r.image.encoded = b""


def _not_an_image(r):
    r.image.encoded = b"GIF89a not what the contract accepts"


def _truncated_jpeg(r):
    r.image.encoded = IMAGE_785.read_bytes()[:5000]


def _raw_size_mismatch(r):
    r.image.CopyFrom(pb2.Image(raw=pb2.RawImage(pixels=bytes(100), height=10, width=10, channels=3)))


def _raw_channels(r):
    r.image.CopyFrom(pb2.Image(raw=pb2.RawImage(pixels=bytes(200), height=10, width=10, channels=2)))


def _too_large_raw(r):
    r.image.CopyFrom(pb2.Image(raw=pb2.RawImage(pixels=bytes(9000), height=1, width=9000, channels=1)))


def _too_large_png(r):
    r.image.encoded = _png_header(5000, 5000)


def _too_many_persons(r):
    for _ in range(Limits().max_persons_per_image - 1):
        r.persons.add().CopyFrom(r.persons[0])


def _unknown_format(r):
    r.format = 99


def _unspecified_format(r):
    r.format = pb2.KEYPOINT_FORMAT_UNSPECIFIED


def _far_outside(r):
    r.persons[1].keypoints[5].x = 1e7


def _bad_box(r):
    r.persons[0].box.CopyFrom(pb2.Box(x=0, y=0, width=-5, height=10))


MALFORMED = [
    (_wrong_count, "persons[1].keypoints"), (_nan_x, "persons[0].keypoints[3].x"),
    (_inf_score, "persons[1].keypoints[0].score"), (_no_image, "image"), (_empty_encoded, "image.encoded"),
    (_not_an_image, "image.encoded"), (_truncated_jpeg, "image.encoded"), (_raw_size_mismatch, "image.raw.pixels"),
    (_raw_channels, "image.raw.channels"), (_too_large_raw, "image.raw"), (_too_large_png, "image.encoded"),
    (_too_many_persons, "persons"), (_unknown_format, "format"), (_unspecified_format, "format"),
    (_far_outside, "persons[1].keypoints[5]"), (_bad_box, "persons[0].box"),
]


@pytest.mark.parametrize("spoil, field", MALFORMED, ids=[f.__name__.strip("_") for f, _ in MALFORMED])
def test_a_malformed_request_is_invalid_argument_naming_its_field(stub, poses_785, spoil, field):
    request = _valid(poses_785)
    spoil(request)
    with pytest.raises(grpc.RpcError) as err:
        stub.RefinePose(request, timeout=TIMEOUT)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith(f"{field}: "), err.value.details()
    assert dict(err.value.trailing_metadata())["posefix-field"] == field


# Streams.

def _frames(poses_785, n=3):
    """n frames of image 785, persons 0-2 moving right 3 px a frame; person 1 loses its left arm in frame 1."""
    frames = []
    for t in range(n):
        poses = poses_785[:3].copy()
        poses[..., 0] += 3 * t
        if t == 1:
            poses[1, [5, 7, 9], 2] = 0
        frames.append(poses)
    return frames


def test_a_stream_without_options_refines_each_frame_on_its_own(stub, refiner, poses_785):
    image = IMAGE_785.read_bytes()
    frames = _frames(poses_785)
    requests = [pb2.RefinePoseStreamRequest(frame=request_message(image, p, track_ids=[1, 2, 3])) for p in frames]
    responses = list(stub.RefinePoseStream(iter(requests), timeout=TIMEOUT))
    assert [r.frame_index for r in responses] == [0, 1, 2]
    for poses, response in zip(frames, responses):
        xy, conf = refiner.refine([decode(IMAGE_785)], np.zeros(3, dtype=np.int64), poses)
        got = as_array(response.result)
        np.testing.assert_allclose(got[..., :2], xy, atol=TOL)
        np.testing.assert_allclose(got[..., 2], conf, atol=TOL)
        assert [p.track_id for p in response.result.persons] == [1, 2, 3]


def test_a_stream_follows_tracks_and_smooths_them(stub, refiner, poses_785):
    image = IMAGE_785.read_bytes()
    frames = _frames(poses_785)
    stamps = [1_000_000, 1_040_000, 1_080_000]
    params = OneEuroParams(min_cutoff_hz=0.5, beta=0.01)
    options = pb2.StreamOptions(follow_tracks=True, smoothing=pb2.OneEuroFilter(min_cutoff_hz=0.5, beta=0.01))
    requests = [pb2.RefinePoseStreamRequest(frame=request_message(image, p, track_ids=[7, 8, 0]), timestamp_us=s)
                for p, s in zip(frames, stamps)]
    requests[0].options.CopyFrom(options)
    responses = list(stub.RefinePoseStream(iter(requests), timeout=TIMEOUT))
    # The same by hand: the engine, the previous refined pose for absent joints and to crop around, a One-Euro
    # filter per track.
    filters = {7: OneEuroFilter(params), 8: OneEuroFilter(params)}
    previous = {}
    for t, (poses, response) in enumerate(zip(frames, responses)):
        inputs = poses.copy()
        crops = poses.copy()
        for i, track in enumerate((7, 8)):
            if track in previous:
                absent = inputs[i, :, 2] <= 0
                inputs[i, absent, :2], inputs[i, absent, 2] = previous[track][0][absent], previous[track][1][absent]
                crops[i, :, :2], crops[i, :, 2] = previous[track][0], np.maximum(previous[track][1], 1e-3)
        xy, conf = refiner.refine([decode(IMAGE_785)], np.zeros(3, dtype=np.int64), inputs,
                                  crop_poses=crops if previous else None)
        for i, track in enumerate((7, 8)):
            xy[i] = filters[track](xy[i], stamps[t] / 1e6)
            previous[track] = (xy[i].copy(), conf[i].copy())
        got = as_array(response.result)
        np.testing.assert_allclose(got[..., :2], xy, atol=TOL)
        np.testing.assert_allclose(got[..., 2], conf, atol=TOL)
    plain = list(stub.RefinePoseStream(iter([pb2.RefinePoseStreamRequest(frame=r.frame) for r in requests]),
                                       timeout=TIMEOUT))
    assert np.abs(as_array(plain[2].result) - as_array(responses[2].result))[:2].max() > 0.01  # smoothing acted
    np.testing.assert_allclose(as_array(plain[2].result)[2], as_array(responses[2].result)[2], atol=TOL)  # untracked


@pytest.mark.parametrize("case", ["options_later", "timestamps_back", "bad_frame", "duplicate_track", "bad_filter"])
def test_a_malformed_stream_message_ends_the_stream_naming_it(stub, poses_785, case):
    image = IMAGE_785.read_bytes()
    requests = [pb2.RefinePoseStreamRequest(frame=request_message(image, poses_785[:2], track_ids=[1, 2]),
                                            timestamp_us=1000 * (n + 1)) for n in range(3)]
    field = {"options_later": "options", "timestamps_back": "timestamp_us", "bad_frame": "frame.persons[0].keypoints",
             "duplicate_track": "frame.persons[1].track_id", "bad_filter": "options.smoothing.min_cutoff_hz"}[case]
    bad = 0 if case == "bad_filter" else 2
    if case == "options_later":
        requests[2].options.follow_tracks = True
    elif case == "timestamps_back":
        requests[2].timestamp_us = 1500
    elif case == "bad_frame":
        del requests[2].frame.persons[0].keypoints[0]
    elif case == "duplicate_track":
        requests[2].frame.persons[1].track_id = 1
    else:
        requests[0].options.smoothing.min_cutoff_hz = 0
    call = stub.RefinePoseStream(iter(requests), timeout=TIMEOUT)
    answered = []
    with pytest.raises(grpc.RpcError) as err:
        for response in call:
            answered.append(response.frame_index)
    assert answered == list(range(bad))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details() == f"stream message {bad}: " + err.value.details().split(": ", 1)[1]
    assert dict(err.value.trailing_metadata())["posefix-field"] == field


# Clients.

def test_python_client(server, poses_785, offline_785):
    target = f"127.0.0.1:{server.port}"
    pixels = decode(IMAGE_785).permute(1, 2, 0).numpy()
    with PoseRefinerClient(target, timeout=TIMEOUT) as client:
        for image in (IMAGE_785.read_bytes(), IMAGE_785, pixels):
            got = client.refine(image, poses_785, format="coco17")
            np.testing.assert_allclose(got[..., :2], offline_785[0], atol=TOL)
            np.testing.assert_allclose(got[..., 2], offline_785[1], atol=TOL)
        info = client.model_info()
        assert info["model_variant"] == "resnet18" and info["limits"]["max_persons_per_image"] == 256
        frames = [(IMAGE_785.read_bytes(), poses_785[:2], [1, 2]) for _ in range(2)]
        streamed = list(client.refine_stream(frames, smoothing={}, timeout=TIMEOUT))
        assert len(streamed) == 2 and streamed[0].shape == (2, 17, 3)
        with pytest.raises(grpc.RpcError) as err:
            client.refine(IMAGE_785, poses_785[:, :16], format="coco17")
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert image_message(pixels[..., 0]).raw.channels == 1


def test_node_client_refines_the_sample_image(server, offline_785, poses_785):
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("the Node.js client test needs node and npm on PATH")
    example = ROOT / "examples" / "node"
    if not (example / "node_modules" / "@grpc" / "grpc-js").is_dir():
        install = subprocess.run([npm, "install", "--no-audit", "--no-fund"], cwd=example, timeout=120,
                                 capture_output=True, text=True, check=False)
        assert install.returncode == 0, f"npm install failed in {example}:\n{install.stderr[-2000:]}"
    run = subprocess.run([node, "refine.js", "--target", f"127.0.0.1:{server.port}", "--image", str(IMAGE_785),
                          "--results", str(RESULTS), "--timeout-ms", str(TIMEOUT * 1000)],
                         cwd=example, capture_output=True, text=True, timeout=60, check=False)
    assert run.returncode == 0, run.stderr
    refined = json.loads(run.stdout)
    assert len(refined) == len(poses_785) and all(r["image_id"] == 785 for r in refined)
    got = np.array([r["keypoints"] for r in refined]).reshape(-1, 17, 3)
    np.testing.assert_allclose(got[..., :2], offline_785[0], atol=TOL)
    np.testing.assert_allclose(got[..., 2], offline_785[1], atol=TOL)


# The process: posefix serve until SIGTERM.

def test_serve_main_runs_until_sigterm_and_stops_gracefully(checkpoint):
    cmd = [sys.executable, "-m", "posefix", "serve", "--checkpoint", str(checkpoint), "--host", "127.0.0.1",
           "--port", "0", "--device", "cpu", "--max-batch-size", "16", "--max-queue-delay-ms", "2",
           "--grace-s", "2", "--flip-test"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert "listening on 127.0.0.1:" in line, line + proc.stderr.read()
        port = int(line.split("127.0.0.1:")[1].split()[0].rstrip(";"))
        with PoseRefinerClient(f"127.0.0.1:{port}", timeout=TIMEOUT) as client:
            info = client.model_info()
            assert info["model_version"].startswith("sha256:") and info["flip_test"]
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(TIMEOUT)
    assert proc.returncode == 0, err
    assert "stopping" in out and out.rstrip().endswith("posefix serve: stopped")
