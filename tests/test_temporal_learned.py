"""The learned temporal refiner: its features against plain loops, its weights file, its training, and the
motion-capture reader it trains on."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from posefix.errors import InputError
from posefix.keypoints import NUM_KEYPOINTS, PARTNER
from posefix.temporal.learned import (
    LearnedSmoother,
    NetConfig,
    TemporalNet,
    fill_gaps,
    load_weights,
    save_weights,
    window_features,
)
from posefix.temporal.mocap import camera_path, coco_joints, load_bvh, project, world_positions
from posefix.temporal.training import Sequence, train

K = NUM_KEYPOINTS


def _track(rng, t=30):
    xy = rng.uniform(0, 300, (t, K, 2))
    score = rng.uniform(0, 1, (t, K))
    present = rng.random((t, K)) > 0.3
    present[:, 3] = False  # a joint never present
    return xy, score, present


def test_fill_gaps_equals_per_joint_interpolation():
    rng = np.random.default_rng(0)
    xy, _, present = _track(rng)
    filled, centre = fill_gaps(xy, present)
    frames = np.arange(len(xy))
    ever = present.any(0)
    for k in range(K):
        for c in range(2):
            if ever[k]:
                ref = np.interp(frames, frames[present[:, k]], xy[present[:, k], k, c])
            else:
                ref = centre[:, c]
            np.testing.assert_allclose(filled[:, k, c], ref, atol=1e-9)
    np.testing.assert_allclose(centre, filled[:, ever].mean(1))


@pytest.mark.parametrize("causal", [False, True])
def test_window_features_equal_a_plain_loop(causal):
    rng = np.random.default_rng(1)
    xy, score, present = _track(rng, t=12)
    base = xy + rng.normal(0, 3, xy.shape)
    w = 5
    feats, frames, centre, size = window_features(xy, base, score, present, w, causal)
    filled, _ = fill_gaps(xy, present)
    base_filled, _ = fill_gaps(base, present)
    for t in range(len(xy)):
        for i in range(w):
            f = t + i - (w - 1 if causal else w // 2)
            inside = 0 <= f < len(xy)
            fc = min(max(f, 0), len(xy) - 1)
            assert frames[t, i] == fc
            prev = centre[max(fc - 1, 0)]
            for k in range(K):
                row = feats[t, k, i]
                p = PARTNER[k]
                np.testing.assert_allclose(row[0:2], (base_filled[fc, k] - centre[fc]) / size[t], rtol=1e-5,
                                           atol=1e-5)
                np.testing.assert_allclose(row[2:4], np.clip((filled[fc, k] - base_filled[fc, k]) / size[t], -3, 3),
                                           rtol=1e-5, atol=1e-5)
                assert row[4] == pytest.approx(score[fc, k] if inside else 0.0, abs=1e-6)
                assert row[5] == float(present[fc, k] and inside)
                np.testing.assert_allclose(row[6:8], (base_filled[fc, p] - centre[fc]) / size[t], rtol=1e-5,
                                           atol=1e-5)
                assert row[8] == pytest.approx(score[fc, p] if inside else 0.0, abs=1e-6)
                np.testing.assert_allclose(row[9:11], np.clip((centre[fc] - prev) / size[t], -2, 2), atol=1e-5)
                assert row[11] == float(inside)
    np.testing.assert_allclose(centre, base_filled[:, present.any(0)].mean(1))


def _net(window=7, seed=0):
    torch.manual_seed(seed)
    net = TemporalNet(NetConfig(window=window, hidden=32, blocks=1))
    with torch.no_grad():  # a network that is not the identity
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net.eval()


def test_an_untrained_network_returns_the_body_smoothers_output():
    from posefix.temporal import make_smoother, person_scale

    rng = np.random.default_rng(2)
    xy, score, present = _track(rng)
    smoother = LearnedSmoother(TemporalNet(NetConfig(window=7, hidden=16, blocks=1)),
                               TemporalNet(NetConfig(window=7, hidden=16, blocks=1)))
    for causal in (False, True):
        scale = person_scale(xy[None], present[None], causal)[0]
        body = make_smoother("body")(xy, score, present, scale, causal)
        out = smoother(xy, score, present, scale, causal)
        np.testing.assert_allclose(out[present], body[present], atol=1e-4)
        np.testing.assert_allclose(smoother(xy, score, present, None, causal), out)


def test_offline_output_is_the_weighted_mean_of_the_windows_that_hold_a_frame():
    rng = np.random.default_rng(3)
    xy, score, present = _track(rng, t=10)
    net = _net()
    smoother = LearnedSmoother(net, net)
    out = smoother(xy, score, present, None, False)
    w = net.config.window
    base = smoother.base_output(xy, score, present, None, False)
    feats, _, centre, size = window_features(xy, base, score, present, w, False)
    with torch.no_grad():
        u = feats[..., :2] + net(torch.from_numpy(feats)).numpy()
    hann = 0.5 + 0.5 * np.cos(np.linspace(-np.pi, np.pi, w + 2)[1:-1])
    for t in range(len(xy)):
        num, den = np.zeros((K, 2)), 0.0
        for s in range(len(xy)):
            for i in range(w):
                if s + i - w // 2 == t:
                    num += hann[i] * (centre[t] + size[s] * u[s, :, i])
                    den += hann[i]
        np.testing.assert_allclose(out[t], num / den, rtol=1e-4, atol=1e-3)


def test_weights_round_trip_and_bad_files(tmp_path):
    rng = np.random.default_rng(4)
    xy, score, present = _track(rng)
    a, b = _net(seed=1), _net(window=5, seed=2)
    path = tmp_path / "t.safetensors"
    save_weights(path, a, b)
    loaded = LearnedSmoother.load(path)
    for causal in (False, True):
        np.testing.assert_array_equal(loaded(xy, score, present, None, causal),
                                      LearnedSmoother(a, b)(xy, score, present, None, causal))
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(InputError, match="bad.safetensors"):
        load_weights(bad)
    from safetensors.torch import save_file
    other = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(2)}, str(other))
    with pytest.raises(InputError, match="not a posefix temporal refiner"):
        load_weights(other)


@pytest.mark.parametrize("field, value", [("window", 4), ("window", 1), ("hidden", 0), ("blocks", -1)])
def test_bad_network_settings_name_their_field(field, value):
    with pytest.raises(InputError, match=field):
        NetConfig(**{field: value})


def _still_sequences(rng, n=40, t=24):
    base = rng.uniform(80, 120, (K, 2))
    seqs = []
    for _ in range(n):
        gt = np.broadcast_to(base + rng.normal(0, 5, (K, 2)), (t, K, 2)).copy()
        noisy = gt + rng.normal(0, 2.0, gt.shape)
        seqs.append(Sequence(noisy, np.full((t, K), 0.9), np.ones((t, K), bool), gt, np.ones((t, K), bool)))
    return seqs


def test_training_makes_a_still_person_stiller_without_bias():
    rng = np.random.default_rng(5)
    net = train(_still_sequences(rng), NetConfig(window=9, hidden=64, blocks=1), False, steps=300, seed=0, batch=64)
    smoother = LearnedSmoother(net, net)
    test = _still_sequences(np.random.default_rng(6), n=4)
    before = after = bias = 0.0
    for s in test:
        out = smoother(s.xy, s.score, s.present, None, False)
        before += np.abs(s.xy - s.gt).mean()
        after += np.abs(out - s.gt).mean()
        bias += (out - s.gt).mean()
    assert after < 0.8 * before
    assert abs(bias / len(test)) < 0.25


def test_training_is_reproducible_for_a_seed():
    seqs = _still_sequences(np.random.default_rng(7), n=6)
    cfg = NetConfig(window=5, hidden=16, blocks=1)
    a, b = (train(seqs, cfg, True, steps=5, seed=3, batch=8) for _ in range(2))
    for (_, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y)


BVH = """HIERARCHY
ROOT Hips
{
  OFFSET 0 0 0
  CHANNELS 6 Xposition Yposition Zposition Zrotation Yrotation Xrotation
  JOINT Arm
  {
    OFFSET 1 0 0
    CHANNELS 3 Zrotation Yrotation Xrotation
    End Site
    {
      OFFSET 2 0 0
    }
  }
}
MOTION
Frames: 2
Frame Time: 0.5
0 0 0 0 0 0 0 0 0
5 0 0 90 0 0 0 0 90
"""


def test_bvh_forward_kinematics(tmp_path):
    path = tmp_path / "a.bvh"
    path.write_text(BVH)
    sk = load_bvh(path)
    assert sk.names == ["Hips", "Arm"] and sk.parents == [-1, 0] and sk.frame_time == 0.5
    pos, ends = world_positions(sk)
    np.testing.assert_allclose(pos[0], [[0, 0, 0], [1, 0, 0]], atol=1e-12)
    np.testing.assert_allclose(ends[0, 1], [3, 0, 0], atol=1e-12)
    # frame 1: the root moved by x = 5 and turned 90° about z (x → y); the arm's own X rotation leaves x alone
    np.testing.assert_allclose(pos[1], [[5, 0, 0], [5, 1, 0]], atol=1e-12)
    np.testing.assert_allclose(ends[1, 1], [5, 3, 0], atol=1e-12)


SIBLINGS = """HIERARCHY
ROOT Hips
{
  OFFSET 0 0 0
  CHANNELS 6 Xposition Yposition Zposition Zrotation Yrotation Xrotation
  JOINT Spine
  {
    OFFSET 0 2 0
    CHANNELS 3 Zrotation Yrotation Xrotation
    End Site
    {
      OFFSET 0 1 0
    }
  }
  JOINT Leg
  {
    OFFSET 1 0 0
    CHANNELS 3 Zrotation Yrotation Xrotation
  }
}
MOTION
Frames: 2
Frame Time: 0.0333333
0 0 0 0 0 0 0 0 0 0 0 0
5 0 0 90 0 0 0 0 0 0 0 0
"""


def test_bvh_forward_kinematics_of_siblings_after_an_end_site(tmp_path):
    path = tmp_path / "t.bvh"
    path.write_text(SIBLINGS)
    sk = load_bvh(path)
    assert sk.names == ["Hips", "Spine", "Leg"] and sk.parents == [-1, 0, 0]
    assert sk.frame_time == pytest.approx(1 / 30, rel=1e-5)
    pos, ends = world_positions(sk)
    np.testing.assert_allclose(pos[0], [[0, 0, 0], [0, 2, 0], [1, 0, 0]], atol=1e-12)
    # frame 1: moved 5 along x and turned 90° about z: (0, 2, 0) → (-2, 0, 0), (1, 0, 0) → (0, 1, 0)
    np.testing.assert_allclose(pos[1], [[5, 0, 0], [3, 0, 0], [5, 1, 0]], atol=1e-12)
    np.testing.assert_allclose(ends[1, 1], [2, 0, 0], atol=1e-12)


@pytest.mark.parametrize("text, where", [
    (BVH.replace("OFFSET 1 0 0", "OFFSET 1 x 0"), "bad.bvh:8"),
    (BVH.replace("Frames: 2", "Frames: 3"), "declares 3 frames"),
    (BVH.replace("5 0 0 90 0 0 0 0 90", "5 0 0 90 0 0 0 0"), "9 finite numbers"),
    (BVH.replace("Zrotation Yrotation Xrotation\n    End", "Wrotation Yrotation Xrotation\n    End"), "channel"),
])
def test_malformed_bvh_is_one_error_naming_the_place(tmp_path, text, where):
    path = tmp_path / "bad.bvh"
    path.write_text(text)
    with pytest.raises(InputError, match=where):
        load_bvh(path)


def test_a_skeleton_without_coco_joints_is_refused(tmp_path):
    path = tmp_path / "a.bvh"
    path.write_text(BVH)
    with pytest.raises(InputError, match="LeftShoulder"):
        coco_joints(load_bvh(path))


def test_projection_and_camera_paths():
    rng = np.random.default_rng(0)
    joints = rng.normal(size=(20, K, 3))
    lab = np.ones(K, bool)
    lab[1:5] = False
    still = project(joints, lab, _camera())
    assert (still[:, 1:5] == 0).all() and np.isfinite(still).all()
    # a pure image-plane shift moves every labelled joint by the shift
    path = np.zeros((20, 4))
    path[:, 0] = np.arange(20)
    moved = project(joints, lab, _camera(), path)
    np.testing.assert_allclose(moved[:, lab] - still[:, lab], np.broadcast_to(path[:, None, :2], moved[:, lab].shape))
    for kind in ("still", "slow", "fast", "shake"):
        p = camera_path(48, kind, (384, 288), rng)
        assert p.shape == (48, 4) and np.isfinite(p).all()
        if kind == "fast":
            assert np.abs(np.diff(p[:, :2], axis=0)).max() <= 0.12 * 384 + 1e-9
    with pytest.raises(InputError, match="kind"):
        camera_path(10, "wobble", (384, 288), rng)


def _camera():
    from posefix.temporal.mocap import Camera
    return Camera(yaw=30.0)


def _video_files(tmp_path, rng, frames=20):
    """Per-frame GT of two tracks in one video and an estimator's noisy results with the GT's track ids."""
    import json

    images = [{"id": 1000 + f, "vid_id": 1, "frame_id": f, "width": 640, "height": 480} for f in range(frames)]
    annotations, results = [], []
    for tid, offset in ((5, 150.0), (6, 400.0)):
        base = rng.uniform(-40, 40, (K, 2)) + offset
        for f in range(frames):
            gt = base + [2.0 * f, 0.5 * f]
            annotations.append({"id": 10 * (1000 + f) + tid, "image_id": 1000 + f, "category_id": 1, "iscrowd": 0,
                                "track_id": tid, "area": 6400.0, "bbox": [0, 0, 80, 80], "num_keypoints": K,
                                "keypoints": np.concatenate([gt, np.full((K, 1), 2)], 1).ravel().tolist()})
            noisy = gt + rng.normal(0, 2.0, gt.shape)
            results.append({"image_id": 1000 + f, "category_id": 1, "track_id": tid, "score": 0.8,
                            "keypoints": np.concatenate([noisy, np.full((K, 1), 0.8)], 1).ravel().round(3).tolist()})
    gt_path, res_path = tmp_path / "gt.json", tmp_path / "res.json"
    gt_path.write_text(json.dumps({"images": images, "annotations": annotations,
                                   "categories": [{"id": 1, "name": "person"}]}))
    res_path.write_text(json.dumps(results))
    return gt_path, res_path


def test_train_temporal_then_refine_video_with_the_learned_smoother(tmp_path, capsys):
    import json

    from posefix.cli import main
    from posefix.temporal import make_smoother, refine_poses

    bvh = tmp_path / "a.bvh"
    bvh.write_text(BVH)
    gt_path, res_path = _video_files(tmp_path, np.random.default_rng(0))
    weights = tmp_path / "w.safetensors"
    assert main(["train-temporal", "--gt", str(gt_path), "--results", str(res_path), "--out", str(weights),
                 "--steps", "3", "--window", "5", "--quiet"]) == 0
    assert "weights:" in capsys.readouterr().out
    out = tmp_path / "out.json"
    assert main(["refine-video", "--input", str(res_path), "--out", str(out), "--annotations", str(gt_path),
                 "--smoother", "learned", "--temporal-weights", str(weights)]) == 0
    res = json.loads(out.read_text())
    given = json.loads(res_path.read_text())
    kp = np.array([r["keypoints"] for r in given]).reshape(-1, K, 3)
    lib = refine_poses(kp, make_smoother("learned", weights=str(weights)),
                       video=np.ones(len(given), int), frame=np.array([r["image_id"] - 1000 for r in given]),
                       track=np.array([r["track_id"] for r in given]), causal=False)
    got = {(r["image_id"], r["track_id"]): np.array(r["keypoints"]).reshape(K, 3)[:, :2] for r in res}
    for i, r in enumerate(given):
        np.testing.assert_allclose(got[(r["image_id"], r["track_id"])], lib.xy[i], atol=1e-3)
    # the learned smoother without weights, and weights that are not a temporal refiner: one line, status 2
    assert main(["refine-video", "--input", str(res_path), "--out", str(tmp_path / "x.json"),
                 "--smoother", "learned"]) == 2
    assert "temporal-weights" in capsys.readouterr().err
    assert main(["refine-video", "--input", str(res_path), "--out", str(tmp_path / "x.json"), "--smoother", "learned",
                 "--temporal-weights", str(bvh)]) == 2
    assert "a.bvh" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


def test_train_temporal_needs_training_data(tmp_path, capsys):
    from posefix.cli import main

    gt_path, _ = _video_files(tmp_path, np.random.default_rng(1))
    assert main(["train-temporal", "--gt", str(gt_path), "--out", str(tmp_path / "w.safetensors")]) == 2
    assert "--results/--mocap" in capsys.readouterr().err


def test_train_temporal_never_writes_over_its_inputs(tmp_path, capsys):
    from posefix.cli import main

    gt_path, res_path = _video_files(tmp_path, np.random.default_rng(2))
    before = res_path.read_bytes()
    assert main(["train-temporal", "--gt", str(gt_path), "--results", str(res_path), "--out", str(res_path),
                 "--steps", "1"]) == 2
    assert "--results" in capsys.readouterr().err and res_path.read_bytes() == before
