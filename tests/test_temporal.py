"""posefix.temporal: the filters against plain per-joint loops, and what a user relies on (a still person comes
out stiller and unbiased, constant velocity unchanged, a planted flip undone, ids through a gap, errors)."""
from __future__ import annotations

import numpy as np
import pytest

from posefix.errors import InputError
from posefix.temporal import (
    HISTORY,
    SMOOTHERS,
    TemporalOptions,
    associate,
    fill_gaps,
    make_smoother,
    person_scale,
    refine_poses,
    refine_tracks,
)
from posefix.temporal.core import frame_scale, running_median
from posefix.temporal.smoothers import BodySmoother, adaptive_poly, local_poly


def _fit_loop(y, w, offsets, degree, t, kernel):
    """The weighted polynomial fit at frame t by np.linalg.lstsq: one joint's (T, C) values, (T,) weights."""
    h = max(abs(offsets.start), abs(offsets.stop - 1), 1)
    rows, vals, ws = [], [], []
    for k in offsets:
        if 0 <= t + k < len(y) and w[t + k] > 0:
            kw = (1 - (abs(k) / (h + 1)) ** 3) ** 3 if kernel == "tricube" else 1.0
            rows.append([(k / h) ** m for m in range(degree + 1)])
            vals.append(y[t + k])
            ws.append(kw * w[t + k])
    for deg in range(degree, -1, -1):
        if len(rows) > deg:
            a = np.array(rows)[:, :deg + 1] * np.sqrt(ws)[:, None]
            b = np.array(vals) * np.sqrt(ws)[:, None]
            if np.linalg.matrix_rank(a) == deg + 1:
                return np.linalg.lstsq(a, b, rcond=None)[0][0]
    return y[t]


@pytest.mark.parametrize("degree,kernel,causal", [(2, "tricube", False), (1, "uniform", True), (0, "uniform", False)])
def test_local_poly_matches_a_per_joint_least_squares_loop(degree, kernel, causal):
    rng = np.random.default_rng(0)
    y = rng.normal(0, 5, (2, 20, 3, 2))
    w = rng.uniform(0.1, 1, (2, 20, 3)) * (rng.random((2, 20, 3)) > 0.3)
    offsets = range(-4, 1) if causal else range(-3, 4)
    out = local_poly(y, w, offsets, degree, kernel)
    for n in range(2):
        for j in range(3):
            for t in range(20):
                np.testing.assert_allclose(out[n, t, j], _fit_loop(y[n, :, j], w[n, :, j], offsets, degree, t, kernel),
                                           rtol=1e-7, atol=1e-7)


def _ici_loop(y, w, sizes, degree, causal, gamma, t):
    """The intersection-of-confidence-intervals choice at frame t for one joint, by lstsq and explicit variances."""
    lo, hi, out = np.full(y.shape[1], -np.inf), np.full(y.shape[1], np.inf), y[t]
    for size in sorted(sizes):
        offs = range(-(size - 1), 1) if causal else range(-(size // 2), size // 2 + 1)
        deg = min(degree, size - 1)
        ks = [k for k in offs if 0 <= t + k < len(y) and w[t + k] > 0]
        if len(ks) <= deg:
            continue
        x = np.array([[float(k) ** m for m in range(deg + 1)] for k in ks])
        wk = np.array([w[t + k] for k in ks])
        m = x.T @ (x * wk[:, None])
        if np.linalg.cond(m) > 1e8:
            continue
        cov = np.linalg.inv(m)
        est = (cov @ (x.T @ (np.array([y[t + k] for k in ks]) * wk[:, None])))[0]
        sd = gamma * np.sqrt(cov[0, 0])
        lo, hi = np.maximum(lo, est - sd), np.minimum(hi, est + sd)
        if (lo > hi).any():
            break
        out = est
    return out


@pytest.mark.parametrize("causal", [False, True])
def test_adaptive_poly_matches_a_per_joint_loop(causal):
    rng = np.random.default_rng(1)
    t = np.arange(30)
    y = np.stack([np.sin(t / 3.0) * 10, np.where(t > 15, 8.0, 0.0)], -1)[None, :, None, :] \
        + rng.normal(0, 0.5, (1, 30, 4, 2))
    w = rng.uniform(1, 4, (1, 30, 4)) * (rng.random((1, 30, 4)) > 0.2)
    sizes = (1, 2, 3, 5, 7) if causal else (3, 5, 7, 9)
    degree = 1 if causal else 2
    out = adaptive_poly(y, w, sizes, degree, causal, 2.0)
    for j in range(4):
        for i in range(30):
            np.testing.assert_allclose(out[0, i, j], _ici_loop(y[0, :, j], w[0, :, j], sizes, degree, causal, 2.0, i),
                                       rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("causal", [False, True])
def test_running_median_matches_nanmedian_loop(causal):
    rng = np.random.default_rng(2)
    x = rng.normal(0, 1, (3, 25, 4))
    x[rng.random(x.shape) < 0.3] = np.nan
    out = running_median(x, 7, causal)
    for n in range(3):
        for t in range(25):
            window = x[n, max(t - 6, 0):t] if causal else x[n, max(t - 3, 0):t + 4]
            for c in range(4):
                vals = sorted(v for v in window[:, c] if not np.isnan(v))
                ref = (vals[(len(vals) - 1) // 2] + vals[len(vals) // 2]) / 2 if vals else np.nan
                np.testing.assert_allclose(out[n, t, c], ref, equal_nan=True)


def test_frame_scale_and_fill_gaps_match_loops():
    rng = np.random.default_rng(3)
    xy = rng.uniform(0, 100, (2, 30, 17, 2))
    present = rng.random((2, 30, 17)) > 0.3
    present[0, 10:14] = False  # a whole-person gap of 4 frames
    score = rng.uniform(0.2, 1, (2, 30, 17))
    s = frame_scale(xy, present)
    for n in range(2):
        for t in range(30):
            p = xy[n, t][present[n, t]]
            area = np.prod(p.max(0) - p.min(0)) if len(p) >= 2 else 0
            np.testing.assert_allclose(s[n, t], np.sqrt(area) if area > 0 else np.nan, equal_nan=True)
    opts = TemporalOptions(max_gap=3)
    fx, fs, fp, filled = fill_gaps(xy, score, present, False, opts)
    w = np.where(present, np.clip(score, 0.05, 1), 0)
    centre = (w[..., None] * xy).sum(-2) / np.maximum(w.sum(-1), 1e-300)[..., None]
    has = present.any(-1)
    for n in range(2):
        # the centre, interpolated over whole-person gaps of at most 3 frames
        c = centre[n].copy()
        cok = has[n].copy()
        for t in range(30):
            if not has[n, t]:
                prev = [u for u in range(t) if has[n, u]]
                nxt = [u for u in range(t + 1, 30) if has[n, u]]
                if prev and nxt and nxt[0] - prev[-1] - 1 <= 3:
                    a, b = prev[-1], nxt[0]
                    c[t] = c[a] + (t - a) / (b - a) * (c[b] - c[a])
                    cok[t] = True
        for j in range(17):
            for t in range(30):
                if present[n, t, j]:
                    assert not filled[n, t, j]
                    continue
                prev = [u for u in range(t) if present[n, u, j]]
                nxt = [u for u in range(t + 1, 30) if present[n, u, j]]
                expect = bool(prev and nxt and nxt[0] - prev[-1] - 1 <= 3 and cok[t])
                assert filled[n, t, j] == expect, (n, t, j)
                if expect:
                    a, b = prev[-1], nxt[0]
                    da, db = xy[n, a, j] - c[a], xy[n, b, j] - c[b]
                    np.testing.assert_allclose(fx[n, t, j], c[t] + da + (t - a) / (b - a) * (db - da), atol=1e-9)
                    assert fs[n, t, j] == pytest.approx(min(score[n, a, j], score[n, b, j]) * opts.filled_score)
    assert (fp == (present | filled)).all()


def _person(rng, frames=60, size=120.0):
    base = rng.uniform(-0.5, 0.5, (17, 2)) * size + 300
    return np.broadcast_to(base, (frames, 17, 2)).copy()


@pytest.mark.parametrize("name", ["body", "sg9"])
@pytest.mark.parametrize("causal", [False, True])
def test_still_person_with_jitter_comes_out_stiller_and_unbiased(name, causal):
    rng = np.random.default_rng(4)
    gt = _person(rng)
    noisy = gt + rng.normal(0, 2.0, gt.shape)
    kp = np.concatenate([noisy, np.full(gt.shape[:2] + (1,), 0.6)], -1)
    r = refine_poses(kp, make_smoother(name), frame=np.arange(60), track=np.ones(60, np.int64), causal=causal)
    jitter_in = np.linalg.norm(np.diff(noisy, axis=0), axis=-1).mean()
    jitter_out = np.linalg.norm(np.diff(r.xy, axis=0), axis=-1).mean()
    assert jitter_out < 0.6 * jitter_in
    assert np.linalg.norm((r.xy - gt)[10:-10].mean((0, 1))) < 0.3  # no bias, px
    assert np.linalg.norm(r.xy - gt, axis=-1).mean() < np.linalg.norm(noisy - gt, axis=-1).mean()


@pytest.mark.parametrize("name", ["body", "sg9", "ma9"])
def test_constant_velocity_comes_out_unchanged_offline(name):
    rng = np.random.default_rng(5)
    start = _person(rng, frames=1)[0]
    vel = rng.normal(0, 3, (17, 2))  # each joint its own velocity: the body moves and articulates
    t = np.arange(40)[:, None, None]
    xy = start + vel * t
    score = np.broadcast_to(rng.uniform(0.3, 0.9, 17), (40, 17))
    kp = np.concatenate([xy, score[..., None]], -1)
    r = refine_poses(kp, make_smoother(name), frame=np.arange(40), track=np.ones(40, np.int64), causal=False)
    if name == "ma9":  # a moving average is exact on constant velocity only where its window is whole
        np.testing.assert_allclose(r.xy[4:-4], xy[4:-4], atol=1e-6)
    else:
        np.testing.assert_allclose(r.xy, xy, atol=1e-6)
    assert not r.corrected.any() and not r.filled.any()


@pytest.mark.parametrize("causal", [False, True])
def test_planted_three_frame_left_right_flip_is_undone(causal):
    rng = np.random.default_rng(6)
    gt = _person(rng, frames=40)
    gt[:, 9] = gt[:, 7] + [-30, 25]  # left wrist well apart from the right one
    gt[:, 10] = gt[:, 8] + [30, 25]
    gt += np.arange(40)[:, None, None] * [1.5, 0.5]  # walking
    noisy = gt + rng.normal(0, 0.5, gt.shape)
    flipped = noisy.copy()
    flipped[20:23, [9, 10]] = noisy[20:23, [10, 9]]
    kp = np.concatenate([flipped, np.full(gt.shape[:2] + (1,), 0.7)], -1)
    r = refine_poses(kp, make_smoother("body"), frame=np.arange(40), track=np.ones(40, np.int64), causal=causal)
    assert r.corrected[20:23, [9, 10]].all()
    err = np.linalg.norm(r.xy[20:23, [9, 10]] - gt[20:23, [9, 10]], axis=-1)
    assert err.max() < 3.0  # px; swapped they are 60 px off


def test_ids_survive_a_five_frame_gap():
    rng = np.random.default_rng(7)
    a, b = _person(rng, 30), _person(rng, 30) + [200, 0]
    a += np.arange(30)[:, None, None] * [2.0, 0]
    b += np.arange(30)[:, None, None] * [-1.0, 1.0]
    frames, poses = [], []
    for f in range(30):
        order = [b, a] if f % 2 else [a, b]  # persons listed in either order
        for p in order:
            if p is a and 10 <= f < 15:  # a is missing for 5 frames
                continue
            frames.append(f)
            poses.append(np.concatenate([p[f] + rng.normal(0, 1, (17, 2)), np.full((17, 1), 0.8)], -1))
    frames, poses = np.array(frames), np.array(poses)
    ids = associate(frames, poses, max_gap=5)
    is_a = np.array([np.abs(p[:, :2] - a[f]).max() < 10 for f, p in zip(frames, poses)])
    assert len(set(ids[is_a])) == 1 and len(set(ids[~is_a])) == 1 and ids[is_a][0] != ids[~is_a][0]
    r = refine_poses(poses, make_smoother("body"), frame=frames, options=TemporalOptions(max_person_gap=5))
    assert len(set(r.track[is_a])) == 1
    np.testing.assert_array_equal(np.sort(r.added_frame), np.arange(10, 15))  # the gap filled and marked


def test_estimator_ids_are_kept():
    rng = np.random.default_rng(8)
    p = _person(rng, 10)
    kp = np.concatenate([p, np.full((10, 17, 1), 0.8)], -1)
    r = refine_poses(kp, make_smoother("body"), frame=np.arange(10), track=np.full(10, 42))
    assert (r.track == 42).all()


def test_causal_refinement_needs_only_the_last_history_frames():
    """A stream that keeps a track's last HISTORY frames gives exactly the causal refinement of the whole track."""
    rng = np.random.default_rng(9)
    t = HISTORY + 40
    xy = _person(rng, t) + np.cumsum(rng.normal(0, 3, (t, 1, 2)), 0) + rng.normal(0, 2, (t, 17, 2))
    score = rng.uniform(0.05, 1, (t, 17))
    present = rng.random((t, 17)) > 0.1
    present[50:53] = False
    xy[[30, 70], 9] += 80  # spikes
    sm = make_smoother("body")
    whole = refine_tracks(xy[None], score[None], present[None], sm, True)
    for end in (HISTORY + 5, t):
        part = refine_tracks(xy[None, end - HISTORY:end], score[None, end - HISTORY:end],
                             present[None, end - HISTORY:end], sm, True)
        np.testing.assert_allclose(part.xy[0, -1], whole.xy[0, end - 1], atol=1e-9)
        np.testing.assert_array_equal(part.corrected[0, -1], whole.corrected[0, end - 1])


def test_batched_body_smoother_equals_per_track_calls():
    rng = np.random.default_rng(10)
    xy = rng.normal(100, 20, (3, 25, 17, 2))
    score = rng.uniform(0, 1, (3, 25, 17))
    present = rng.random((3, 25, 17)) > 0.2
    scale = person_scale(xy, present, False)
    sm = BodySmoother()
    for causal in (False, True):
        batched = sm(xy, score, present, scale, causal)
        for n in range(3):
            np.testing.assert_allclose(batched[n], sm(xy[n], score[n], present[n], scale[n], causal), atol=1e-9)


def test_every_registered_smoother_runs_through_the_pipeline(tmp_path):
    from posefix.temporal.learned import NetConfig, TemporalNet, save_weights
    from posefix.temporal.registry import needs_weights

    weights = tmp_path / "w.safetensors"
    save_weights(weights, TemporalNet(NetConfig(window=5, hidden=8)), TemporalNet(NetConfig(window=3, hidden=8)))
    rng = np.random.default_rng(11)
    kp = np.concatenate([_person(rng, 12), np.full((12, 17, 1), 0.5)], -1)
    for name in SMOOTHERS:
        smoother = make_smoother(name, weights=str(weights)) if needs_weights(name) else make_smoother(name)
        r = refine_poses(kp, smoother, frame=np.arange(12), track=np.ones(12, np.int64))
        assert r.xy.shape == (12, 17, 2) and np.isfinite(r.xy).all()


@pytest.mark.parametrize("call,field", [
    (lambda: TemporalOptions(max_gap=-1), "temporal.max_gap"),
    (lambda: TemporalOptions(spike_gate=float("nan")), "temporal.spike_gate"),
    (lambda: make_smoother("nope"), "smoother"),
    (lambda: make_smoother("body", gamma="2"), "smoother.gamma"),
    (lambda: make_smoother("body", causal_gamma=-1.0), "smoother.causal_gamma"),
    (lambda: make_smoother("body", speed=1.0), "smoother.speed"),
    (lambda: make_smoother("sg9", window=0), "smoother.window"),
    (lambda: refine_poses(np.full((2, 17, 3), np.nan), make_smoother("body")), "keypoints[0]"),
    (lambda: refine_poses(np.zeros((2, 16, 3)), make_smoother("body")), "keypoints"),
    (lambda: refine_poses(np.ones((2, 17, 3)), make_smoother("body"), frame=np.array([0, -1])), "frame[1]"),
    (lambda: refine_poses(np.ones((2, 17, 3)), make_smoother("body"), frame=np.array([0, 0]),
                          track=np.array([3, 3])), "track_id"),
])
def test_bad_parameters_and_input_are_errors_naming_the_field(call, field):
    with pytest.raises(InputError) as e:
        call()
    assert e.value.field == field
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("with_ids", [True, False])
def test_the_stream_gives_what_the_causal_refinement_of_the_whole_video_gives(with_ids):
    from posefix.temporal.stream import TemporalStream

    rng = np.random.default_rng(12)
    frames = 40
    people = [_person(rng, frames) + np.cumsum(rng.normal(0, 3, (frames, 1, 2)), 0) + [dx, 0]
              for dx in (0.0, 300.0)]
    frame, track, kp = [], [], []
    for f in range(frames):
        for n, p in enumerate(people):
            if n == 1 and 10 <= f < 13:  # the second person missing for 3 frames
                continue
            pose = np.concatenate([p[f] + rng.normal(0, 2, (17, 2)), rng.uniform(0.05, 1, (17, 1))], -1)
            pose[rng.random(17) < 0.1, 2] = 0  # joints not reported
            frame.append(f)
            track.append(n + 5 if with_ids else 0)
            kp.append(pose)
    frame, track, kp = np.array(frame), np.array(track), np.array(kp)
    whole = refine_poses(kp, make_smoother("body"), frame=frame, track=track, causal=True)
    stream = TemporalStream(make_smoother("body"))
    for f in range(frames):
        rows = np.flatnonzero(frame == f)
        got = stream.step(kp[rows], track[rows])
        np.testing.assert_array_equal(got.track, whole.track[rows])
        np.testing.assert_allclose(got.xy, whole.xy[rows], atol=1e-9)
        np.testing.assert_allclose(got.score, whole.score[rows], atol=1e-12)
        np.testing.assert_array_equal(got.filled, whole.filled[rows])
        np.testing.assert_array_equal(got.corrected, whole.corrected[rows])


@pytest.mark.parametrize("causal", [False, True])
def test_adaptive_fits_in_blocks_equal_one_pass(monkeypatch, causal):
    """Blocks of tracks, and stretches of one long track with the frames around them, give each frame exactly
    what one pass over the whole array gives."""
    import posefix.temporal.smoothers as sm

    rng = np.random.default_rng(13)
    sizes = (1, 2, 3, 5, 7, 9) if causal else (3, 5, 7, 9, 13)
    for shape in ((7, 50, 17), (2, 400, 17)):
        y = np.cumsum(rng.normal(0, 2, shape + (2,)), axis=1)
        w = rng.uniform(0, 4, shape) * (rng.random(shape) > 0.2)
        whole = sm.adaptive_poly(y, w, sizes, 2 - causal, causal, 2.0)
        monkeypatch.setattr(sm, "FIT_BLOCK", 17 * 60)  # 1 track of 50 frames per block; 400 frames in stretches
        blocks = sm.adaptive_poly(y, w, sizes, 2 - causal, causal, 2.0)
        monkeypatch.undo()
        np.testing.assert_array_equal(blocks, whole)
    for shape in ((0, 5, 17), (1, 0, 17), (0, 17)):  # no tracks, no frames, one track of none
        assert sm.adaptive_poly(np.zeros(shape + (2,)), np.zeros(shape), sizes, 1, causal, 2.0).shape == shape + (2,)


def test_tracks_refined_in_small_batches_equal_one_batch(monkeypatch):
    from posefix.temporal import pipeline

    rng = np.random.default_rng(14)
    frame, track, kp = [], [], []
    for n, length in enumerate((30, 31, 45, 12, 60, 29)):
        xy = _person(rng, length) + np.cumsum(rng.normal(0, 3, (length, 1, 2)), 0) + rng.normal(0, 2, (length, 17, 2))
        kp.append(np.concatenate([xy, rng.uniform(0.05, 1, (length, 17, 1))], -1))
        frame.append(np.arange(length) + n)
        track.append(np.full(length, n + 1))
    kp, frame, track = np.concatenate(kp), np.concatenate(frame), np.concatenate(track)
    for causal in (False, True):
        one = refine_poses(kp, make_smoother("body"), frame=frame, track=track, causal=causal)
        monkeypatch.setattr(pipeline, "BATCH_JOINT_FRAMES", 17 * 40)
        assert len(pipeline._groups(np.array([30, 31, 45, 12, 60, 29]))) >= 5
        small = refine_poses(kp, make_smoother("body"), frame=frame, track=track, causal=causal)
        monkeypatch.undo()
        np.testing.assert_array_equal(small.xy, one.xy)
        np.testing.assert_array_equal(small.corrected, one.corrected)


def test_frames_where_the_estimator_lost_the_person_are_taken_out_and_filled_offline():
    """With person_gate set, two frames where the whole body sits 0.6 of its size away from its course with low
    scores are taken out and filled from the frames around them (offline); the same jump with confident scores
    (a camera shake) is kept, and a frame whose legs go missing (which moves the joints' centre) is not."""
    rng = np.random.default_rng(15)
    gt = _person(rng, frames=40) + np.arange(40)[:, None, None] * [2.0, 0.5]
    noisy = gt + rng.normal(0, 0.5, gt.shape)
    size = np.sqrt(np.prod(np.ptp(gt[0], axis=0)))
    noisy[18:20] += [0.6 * size, 0.0]
    score = np.full(gt.shape[:2], 0.6)
    score[18:20] = 0.2
    score[28, 11:] = 0  # legs missing
    kp = np.concatenate([noisy, score[..., None]], -1)
    frame, track = np.arange(40), np.ones(40, np.int64)
    gate = TemporalOptions(person_gate=0.3)
    shake = kp.copy()
    shake[18:20, :, 2] = 0.6
    assert not refine_poses(shake, make_smoother("body"), frame=frame, track=track, options=gate).corrected[18:20].all()
    off = refine_poses(kp, make_smoother("body"), frame=frame, track=track, options=gate)
    assert off.corrected[18:20].all() and not off.corrected[28].any()
    assert np.linalg.norm(off.xy[18:20] - gt[18:20], axis=-1).max() < 3.0  # px; taken as reported: 0.6 · size
    assert not off.corrected[[17, 20, 21]].any()
    kept = refine_poses(kp, make_smoother("body"), frame=frame, track=track)  # off by default
    assert not kept.corrected[18:20].all()
    assert np.linalg.norm(kept.xy[18:20] - gt[18:20], axis=-1).max() > 0.3 * size
    causal = refine_poses(kp, make_smoother("body"), frame=frame, track=track, causal=True, options=gate)
    assert not causal.corrected[18:20].all()  # offline only: causally it cannot tell a jump from a move
