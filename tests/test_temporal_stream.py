"""RefinePoseStream's temporal refinement: a server without a refiner refines streams over time exactly as
``posefix refine-video --causal`` does; with a refiner, after it; bad options are INVALID_ARGUMENT."""
from __future__ import annotations

import grpc
import numpy as np
import pytest

from posefix._proto import pb2
from posefix.client import PoseRefinerClient, request_message
from posefix.serve.server import NoRefiner
from posefix.temporal import make_smoother, refine_poses

from .conftest import TIMEOUT, stub_for

FRAMES = 24


def _video(seed=0):
    """Two walking persons, noisy, with a 3-frame left/right wrist flip; per frame (persons (P, 17, 3), ids)."""
    rng = np.random.default_rng(seed)
    out = []
    base = [rng.uniform(-40, 40, (17, 2)) + c for c in ((120.0, 150.0), (320.0, 160.0))]
    for b in base:
        b[9], b[10] = b[5] + [-30, 50], b[6] + [30, 50]
    for f in range(FRAMES):
        persons = []
        for n, b in enumerate(base):
            xy = b + [2.0 * f, 0.3 * f] + rng.normal(0, 1.5, (17, 2))
            if n == 0 and 8 <= f < 11:
                xy[[9, 10]] = xy[[10, 9]]
            persons.append(np.concatenate([xy, rng.uniform(0.3, 0.9, (17, 1))], -1))
        out.append(np.array(persons))
    return out


@pytest.fixture(scope="module")
def bare(start):
    return start(NoRefiner())


def _image():
    return np.zeros((240, 480, 3), dtype=np.uint8)


@pytest.mark.parametrize("with_ids", [True, False])
def test_a_server_without_a_refiner_streams_what_refine_video_causal_gives(bare, with_ids):
    video = _video()
    ids = [[3, 4] if with_ids else [0, 0] for _ in video]
    with PoseRefinerClient(f"127.0.0.1:{bare.port}") as client:
        got = list(client.refine_stream([(_image(), p, t) for p, t in zip(video, ids)], timeout=TIMEOUT))
    kp = np.concatenate(video)
    frame = np.repeat(np.arange(FRAMES), 2)
    want = refine_poses(kp, make_smoother("body"), frame=frame, track=np.concatenate(ids), causal=True)
    got = np.concatenate(got)
    np.testing.assert_allclose(got[..., :2], want.xy, atol=1e-6)
    np.testing.assert_allclose(got[..., 2], want.score, atol=1e-5)  # float32 on the wire
    assert want.corrected[2 * 8:2 * 11:2, [9, 10]].any()  # the flip was seen and undone
    assert np.abs(got[..., :2] - kp[..., :2]).max() > 0.1  # the stream refined


def test_a_stream_option_picks_the_smoother(bare):
    video = _video(1)
    with PoseRefinerClient(f"127.0.0.1:{bare.port}") as client:
        got = np.concatenate(list(client.refine_stream([(_image(), p, [1, 2]) for p in video],
                                                       temporal={"smoother": "sg9", "max_gap": 2},
                                                       timeout=TIMEOUT)))
    from posefix.temporal import TemporalOptions

    want = refine_poses(np.concatenate(video), make_smoother("sg9"), frame=np.repeat(np.arange(FRAMES), 2),
                        track=np.tile([1, 2], FRAMES), causal=True, options=TemporalOptions(max_gap=2))
    np.testing.assert_allclose(got[..., :2], want.xy, atol=1e-6)


def test_with_a_refiner_the_temporal_refinement_follows_it(start, refiner, poses_785):
    from .conftest import IMAGE_785

    handle = start(refiner)
    image = IMAGE_785.read_bytes()
    rng = np.random.default_rng(2)
    frames = [poses_785[:2] + np.concatenate([rng.normal(0, 1.0, (2, 17, 2)), np.zeros((2, 17, 1))], -1)
              for _ in range(6)]
    with PoseRefinerClient(f"127.0.0.1:{handle.port}") as client:
        plain = list(client.refine_stream([(image, p, [1, 2]) for p in frames], timeout=TIMEOUT))
        both = list(client.refine_stream([(image, p, [1, 2]) for p in frames], temporal={}, timeout=TIMEOUT))
    refined = np.concatenate(plain)
    want = refine_poses(refined, make_smoother("body"), frame=np.repeat(np.arange(6), 2),
                        track=np.tile([1, 2], 6), causal=True)
    np.testing.assert_allclose(np.concatenate(both)[..., :2], want.xy, atol=2e-3)


@pytest.mark.parametrize("options,field", [
    (pb2.StreamOptions(temporal=pb2.TemporalOptions(smoother="nope")), "options.temporal.smoother"),
    (pb2.StreamOptions(temporal=pb2.TemporalOptions(max_gap=-1)), "options.temporal.max_gap"),
    (pb2.StreamOptions(temporal=pb2.TemporalOptions(max_gap=100000)), "options.temporal.max_gap"),
])
def test_bad_temporal_options_are_invalid_argument(bare, options, field):
    stub, channel = stub_for(bare)
    video = _video()
    requests = [pb2.RefinePoseStreamRequest(frame=request_message(_image(), p, track_ids=[1, 2])) for p in video[:2]]
    requests[0].options.CopyFrom(options)
    with pytest.raises(grpc.RpcError) as err:
        list(stub.RefinePoseStream(iter(requests), timeout=TIMEOUT))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert dict(err.value.trailing_metadata())["posefix-field"] == field
    channel.close()


def test_a_server_with_temporal_weights_streams_the_learned_smoother(start, tmp_path):
    import torch

    from posefix.temporal.learned import NetConfig, TemporalNet, save_weights

    torch.manual_seed(0)
    nets = [TemporalNet(NetConfig()) for _ in range(2)]
    for net in nets:  # a correction that is not zero, so that the learned smoother differs from body
        torch.nn.init.normal_(net.out[1].bias, std=0.05)
    weights = tmp_path / "temporal.safetensors"
    save_weights(weights, *nets)
    handle = start(NoRefiner(), temporal_weights=str(weights))
    video = _video(3)
    with PoseRefinerClient(f"127.0.0.1:{handle.port}") as client:
        got = {name: np.concatenate(list(client.refine_stream([(_image(), p, [1, 2]) for p in video],
                                                              temporal={"smoother": name}, timeout=TIMEOUT)))
               for name in ("learned", "body")}
    frame, track = np.repeat(np.arange(FRAMES), 2), np.tile([1, 2], FRAMES)
    for name in ("learned", "body"):
        want = refine_poses(np.concatenate(video), make_smoother(name, **({"weights": weights} if name == "learned"
                                                                            else {})),
                            frame=frame, track=track, causal=True)
        # the network runs in float32 on the stream's windows, the file's at once: equal within 0.02 px
        np.testing.assert_allclose(got[name][..., :2], want.xy, atol=1e-5 if name == "body" else 0.02)
    assert np.abs(got["learned"][..., :2] - got["body"][..., :2]).max() > 0.5


def test_the_learned_smoother_without_temporal_weights_is_invalid_argument(bare):
    stub, channel = stub_for(bare)
    requests = [pb2.RefinePoseStreamRequest(frame=request_message(_image(), p, track_ids=[1, 2])) for p in _video()[:2]]
    requests[0].options.CopyFrom(pb2.StreamOptions(temporal=pb2.TemporalOptions(smoother="learned")))
    with pytest.raises(grpc.RpcError) as err:
        list(stub.RefinePoseStream(iter(requests), timeout=TIMEOUT))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "--temporal-weights" in err.value.details()
    assert dict(err.value.trailing_metadata())["posefix-field"] == "options.temporal.smoother"
    channel.close()


def test_serve_refuses_temporal_weights_that_are_not_there(tmp_path):
    from posefix.errors import InputError
    from posefix.serve.server import create_server

    with pytest.raises(InputError, match="temporal_weights: file not found"):
        create_server(NoRefiner(), temporal_weights=str(tmp_path / "none.safetensors"))
