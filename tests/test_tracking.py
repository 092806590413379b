"""Tracks, what a video carries from frame to frame (``posefix refine-video`` and RefinePoseStream alike): the
One-Euro filter, following a track's previous refined pose, and which tracks are remembered."""
import numpy as np

from posefix.tracking import OneEuroParams, Tracks


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
    inp, crop = tracks.follow_inputs([3], second)
    np.testing.assert_allclose(inp[0, 4:8, :2], refined[0, 4:8])
    np.testing.assert_allclose(inp[0, 4:8, 2], 0.8)
    np.testing.assert_allclose(crop[0, :, :2], refined[0])
    assert tracks.follow_inputs([9], second)[1] is None  # an unknown track crops around its own input


def test_only_the_followed_persons_crop_elsewhere_and_tracks_absent_from_a_frame_are_forgotten():
    tracks = Tracks(follow=True)
    frame = np.zeros((3, 17, 3))
    frame[..., :2], frame[..., 2] = np.arange(3)[:, None, None] * 50.0 + 10.0, 0.9
    tracks.update([1, 2, 0], frame, frame[..., :2] + 3.0, np.full((3, 17), 0.7), 0.0)
    assert set(tracks.previous) == {1, 2}  # an untracked person (0) is not remembered
    poses, crop = tracks.follow_inputs([2, 5, 0], frame)  # track 2 followed; 5 new; 0 untracked
    np.testing.assert_array_equal(poses, frame)  # no joint absent: nothing filled in
    np.testing.assert_allclose(crop[0, :, :2], frame[1, :, :2] + 3.0)  # track 2's previous refined pose
    np.testing.assert_array_equal(crop[1:], frame[1:])  # the others around their own poses
    tracks.update([2], frame[:1], frame[:1, :, :2], np.ones((1, 17)), 0.1)
    assert set(tracks.previous) == {2}  # track 1 missed this frame: forgotten
    assert tracks.follow_inputs([1], frame[:1])[1] is None
