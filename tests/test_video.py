"""``posefix refine-video``: the same refinement as frames-as-images and as a gRPC stream, smoothing, rendering,
bad videos."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from posefix import SAMPLE_DIR
from posefix.cli import main
from posefix.client import PoseRefinerClient
from posefix.images import decode
from posefix.model import ModelConfig, PoseFixNet
from posefix.refiner import Refiner
from posefix.video import frames, probe
from posefix.weights import export_weights

from .videos import make_sample_video

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


def test_temporal_refinement_follows_the_image_refiner(clip):
    """--temporal: the image refiner's output, refined over time as refine-video refines a file without --video."""
    from posefix.temporal import make_smoother, refine_poses

    d, _ = clip
    common = ["--checkpoint", str(d / "model.safetensors"), "--video", str(d / "clip.mp4"), "--input",
              str(d / "poses.json"), "--quiet"]
    assert main(["refine-video", *common, "--out", str(d / "image.json")]) == 0
    assert main(["refine-video", *common, "--out", str(d / "both.json"), "--temporal"]) == 0
    image = json.loads((d / "image.json").read_text())
    both = json.loads((d / "both.json").read_text())
    kp = np.array([r["keypoints"] for r in image]).reshape(-1, 17, 3)
    want = refine_poses(kp, make_smoother("body"), frame=np.array([r["image_id"] for r in image]),
                        track=np.array([r["track_id"] for r in image]))
    got = np.array([r["keypoints"] for r in both]).reshape(-1, 17, 3)
    np.testing.assert_allclose(got[..., :2], want.xy, atol=1e-6)
    assert all(len(r["keypoint_temporal"]) == 17 for r in both)


# (follow, One-Euro parameters or None) of each case: the stream's options, and refine-video's flags
STREAMED = {"each frame alone": (False, None), "follow": (True, None),
            "smooth": (False, {"min_cutoff_hz": 0.5, "beta": 0.01, "d_cutoff_hz": 1.0}),
            "follow and smooth": (True, {"min_cutoff_hz": 0.5, "beta": 0.01, "d_cutoff_hz": 2.0})}


@pytest.mark.parametrize("case", list(STREAMED))
def test_a_grpc_stream_refines_as_refine_video(clip, checkpoint, refiner, start, tmp_path, case):
    """The frames of the video with their poses and track ids, sent over RefinePoseStream with the same options,
    come back as ``posefix refine-video`` refines them: the same crops around each track's previous refined pose,
    the same filled-in joints, the same smoothing. Person 2 loses four joints in frames 3 and 4. A frame without
    poses is not sent: refine-video leaves the tracks as they are over it, as a stream does over a frame it is
    not sent."""
    d, poses = clip
    poses = [dict(p, keypoints=list(p["keypoints"])) for p in poses]
    for p in poses:
        if p["image_id"] in (3, 4) and p["track_id"] == 2:
            for j in range(5, 9):
                p["keypoints"][3 * j + 2] = 0.0
    given = tmp_path / "poses.json"
    given.write_text(json.dumps(poses))
    follow, smoothing = STREAMED[case]
    options = ["--follow"] * follow
    if smoothing is not None:
        options += ["--smooth", "--min-cutoff", str(smoothing["min_cutoff_hz"]), "--beta", str(smoothing["beta"]),
                    "--d-cutoff", str(smoothing["d_cutoff_hz"])]

    def video(*extra):
        out = tmp_path / f"refined{len(extra)}.json"
        assert main(["refine-video", "--checkpoint", str(checkpoint), "--video", str(d / "clip.mp4"), "--input",
                     str(given), "--out", str(out), "--quiet", "--choice-margin", "0", *extra]) == 0  # as the server
        return np.array([r["keypoints"] for r in json.loads(out.read_text())]).reshape(-1, 17, 3)

    want = video(*options)
    sent, rows = [], []
    for index, t, image in frames(d / "clip.mp4"):
        mine = [n for n, p in enumerate(poses) if p["image_id"] == index]
        if mine:
            persons = np.array([poses[n]["keypoints"] for n in mine]).reshape(-1, 17, 3)
            sent.append((image.permute(1, 2, 0).numpy(), persons, [poses[n]["track_id"] for n in mine], round(t * 1e6)))
            rows.append(mine)
    handle = start(refiner)
    with PoseRefinerClient(f"127.0.0.1:{handle.port}") as client:
        streamed = list(client.refine_stream(sent, follow_tracks=follow, smoothing=smoothing, timeout=120))
    assert len(streamed) == len(sent) == FRAMES - 1
    got = np.zeros_like(want)
    for mine, refined in zip(rows, streamed):
        got[mine] = refined
    np.testing.assert_allclose(got[..., :2], want[..., :2], atol=1e-3)
    np.testing.assert_allclose(got[..., 2], want[..., 2], atol=1e-4)
    if options:  # the options change the refinement: equal numbers mean the stream followed and smoothed too
        assert np.abs(want[..., :2] - video()[..., :2]).max() > 0.1


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
