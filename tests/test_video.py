"""``posefix refine-video``: the same refinement as frames-as-images, smoothing, rendering, bad videos."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from posefix import SAMPLE_DIR
from posefix.cli import main
from posefix.engine import Refiner, export_weights
from posefix.images import decode
from posefix.model import ModelConfig, PoseFixNet
from posefix.tracking import OneEuroParams, Tracks
from posefix.video import frames, make_sample_video, probe

FRAMES = 16


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """A video panned over a bundled image, its per-frame poses (the real estimator's, moved with the
    window, each person a track) and a checkpoint."""
    d = tmp_path_factory.mktemp("video")
    image = decode(SAMPLE_DIR / "images" / "000000000785.jpg")
    offsets = make_sample_video(image, d / "clip.mp4", num_frames=FRAMES, size=(320, 240), fps=12.0)
    results = [r for r in json.loads((SAMPLE_DIR / "topdown_keypoints_val4.json").read_text())
               if r["image_id"] == 785][:3]
    poses = []
    for f in range(FRAMES):
        if f == 5:
            continue  # a frame without poses
        for t, r in enumerate(results):
            k = np.array(r["keypoints"]).reshape(17, 3)
            k[:, :2] -= offsets[f]
            poses.append({"image_id": f, "category_id": 1, "keypoints": k.reshape(-1).tolist(), "score": r["score"],
                          "track_id": t + 1})
    (d / "poses.json").write_text(json.dumps(poses))
    torch.manual_seed(0)
    model = PoseFixNet(ModelConfig(backbone="resnet18", input_size=(128, 96), sigma=3.5, head_channels=32,
                                   input_prior=False))
    export_weights(model, d / "model.safetensors", {})
    return d, poses


def test_video_refinement_equals_refining_its_frames_as_images(clip):
    d, poses = clip
    out, render = d / "refined.json", d / "render.mp4"
    assert main(["refine-video", "--checkpoint", str(d / "model.safetensors"), "--video", str(d / "clip.mp4"),
                 "--input", str(d / "poses.json"), "--out", str(out), "--render", str(render), "--quiet",
                 "--batch-size", "5"]) == 0
    refined = json.loads(out.read_text())
    assert [r["image_id"] for r in refined] == [p["image_id"] for p in poses]
    assert [r["track_id"] for r in refined] == [p["track_id"] for p in poses]
    refiner = Refiner.from_checkpoint(d / "model.safetensors")
    for index, _, image in frames(d / "clip.mp4"):
        rows = [n for n, p in enumerate(poses) if p["image_id"] == index]
        if not rows:
            continue
        xy, conf = refiner.refine([image], np.zeros(len(rows), dtype=int),
                                  np.array([poses[n]["keypoints"] for n in rows]).reshape(-1, 17, 3))
        got = np.array([refined[n]["keypoints"] for n in rows]).reshape(-1, 17, 3)
        np.testing.assert_allclose(got[..., :2], xy, atol=1e-3)
        np.testing.assert_allclose(got[..., 2], conf, atol=1e-5)
    # The rendered video has the input's frame count and size.
    a, b = probe(render), probe(d / "clip.mp4")
    assert (a.frames, a.width, a.height) == (b.frames, b.width, b.height) and a.fps == pytest.approx(b.fps)
    assert sum(1 for _ in frames(render)) == FRAMES


def test_follow_and_smooth_run_and_change_the_result(clip):
    d, _ = clip
    plain, smooth = d / "plain.json", d / "smooth.json"
    common = ["--checkpoint", str(d / "model.safetensors"), "--video", str(d / "clip.mp4"), "--input",
              str(d / "poses.json"), "--quiet"]
    assert main(["refine-video", *common, "--out", str(plain)]) == 0
    assert main(["refine-video", *common, "--out", str(smooth), "--follow", "--smooth", "--min-cutoff", "0.5"]) == 0
    a = np.array([r["keypoints"] for r in json.loads(plain.read_text())])
    b = np.array([r["keypoints"] for r in json.loads(smooth.read_text())])
    assert a.shape == b.shape and np.abs(a - b).max() > 0.1


def test_smoothing_removes_jitter_without_lagging_motion():
    """A joint moving sinusoidally (amplitude 40 px, period 2 s) at 30 fps with 3 px jitter: the
    One-Euro filter with its default parameters halves the frame-to-frame jitter and lags the motion by
    at most 2 frames."""
    rng = np.random.default_rng(0)
    fps, n = 30.0, 300
    t = np.arange(n) / fps
    truth = 40 * np.sin(2 * np.pi * t / 2.0)
    noisy = truth + rng.normal(0, 3.0, n)
    tracks = Tracks(smoothing=OneEuroParams())
    out = np.zeros(n)
    for i in range(n):
        pose = np.zeros((1, 17, 3))
        pose[0, :, :2] = noisy[i]
        pose[0, :, 2] = 1.0
        out[i] = tracks.update([7], pose, pose[..., :2], np.ones((1, 17)), t[i])[0, 0, 0]
    jitter = lambda x: np.std(np.diff(x) - np.diff(truth))
    assert jitter(out) < 0.5 * jitter(noisy)
    lags = range(8)
    err = [np.mean((out[30 + lag:] - truth[30:n - lag]) ** 2) for lag in lags]
    assert int(np.argmin(err)) <= 2


def test_follow_fills_absent_joints_and_crops_from_the_previous_pose():
    tracks = Tracks(follow=True)
    first = np.zeros((1, 17, 3))
    first[0, :, :2], first[0, :, 2] = 100.0, 0.9
    refined = first[..., :2] + 5.0
    tracks.update([3], first, refined, np.full((1, 17), 0.8), 0.0)
    second = first.copy()
    second[0, 4:8, 2] = 0  # the estimator lost four joints
    inp, crop = tracks.prepare([3], second)
    np.testing.assert_allclose(inp[0, 4:8, :2], refined[0, 4:8])
    np.testing.assert_allclose(inp[0, 4:8, 2], 0.8)
    np.testing.assert_allclose(crop[0, :, :2], refined[0])
    assert tracks.prepare([9], second)[1] is None  # an unknown track crops around its own input


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "posefix", *map(str, args)], capture_output=True, text=True,
                          check=False, timeout=300)


def test_bad_videos_and_poses_are_reported(clip, tmp_path):
    d, poses = clip
    ckpt = d / "model.safetensors"
    out = tmp_path / "out.json"
    truncated = tmp_path / "truncated.mp4"
    data = (d / "clip.mp4").read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    r = _cli("refine-video", "--checkpoint", ckpt, "--video", truncated, "--input", d / "poses.json", "--out", out,
             "--quiet")
    assert r.returncode == 2 and "truncated.mp4" in r.stderr and not out.exists(), r.stderr
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"\x00" * 5000)
    r = _cli("refine-video", "--checkpoint", ckpt, "--video", garbage, "--input", d / "poses.json", "--out", out)
    assert r.returncode == 2 and "garbage.mp4: video: cannot open" in r.stderr and not out.exists()
    beyond = tmp_path / "beyond.json"
    beyond.write_text(json.dumps(poses + [dict(poses[0], image_id=FRAMES + 3)]))
    render = tmp_path / "r.mp4"
    r = _cli("refine-video", "--checkpoint", ckpt, "--video", d / "clip.mp4", "--input", beyond, "--out", out,
             "--render", render, "--quiet")
    assert r.returncode == 2 and f"poses for frame {FRAMES + 3}" in r.stderr
    assert not out.exists() and not render.exists() and list(tmp_path.glob("*.posefix-tmp")) == []
    twice = tmp_path / "twice.json"
    twice.write_text(json.dumps(poses + [dict(poses[0])]))
    r = _cli("refine-video", "--checkpoint", ckpt, "--video", d / "clip.mp4", "--input", twice, "--out", out)
    assert r.returncode == 2 and "track_id" in r.stderr
