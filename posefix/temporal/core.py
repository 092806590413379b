"""Per-track temporal refinement: the person's scale, trajectory errors corrected, gaps filled, smoothing.

Arrays of tracks stacked as (N, T, ...): xy (N, T, 17, 2) pixels, score (N, T, 17), present (N, T, 17) bool,
scale (N, T) pixels. Every operation is vectorised over tracks, frames and joints; causal ones use at frame t
only frames ≤ t, so a live stream that keeps the last :data:`HISTORY` frames of a track gets the same output.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from ..errors import InputError
from ..keypoints import FLIP_PAIRS, NUM_KEYPOINTS
from .smoothers import run_smoother

# Joints swapped with a skeleton neighbour: (elbow, wrist) and (knee, ankle) of each side.
NEIGHBOUR_PAIRS: tuple[tuple[int, int], ...] = ((7, 9), (8, 10), (13, 15), (14, 16))


@dataclass(frozen=True)
class TemporalOptions:
    """Parameters of the corrections and gap filling; distances in units of the person's scale.

    max_gap: the longest run of frames where a joint is missing that is filled in; max_person_gap: the same
    for the whole person (offline only; at most max_gap). flip_gate: a left/right pair (or a joint and its
    skeleton neighbour) is swapped back where the two stray together more than this from their recent course
    and the swapped pair fits at most ``swap_ratio`` of that. spike_gate: a joint further than this from its
    recent course is taken as an error and filled in from its trajectory, where at most ``max_spikes`` joints
    of the frame are (more: the body moved, not a joint). window: frames of the running median that gives a
    joint's recent course (offline centred on the frame; causal: the medians of the two halves of the window
    before the frame, extrapolated linearly to it). person_gate (offline only; 0, the default: off): a frame
    where most of the person's joints are further than this from their course (the running median of the
    person's centre plus the joint's course relative to it), and whose joints' mean score is below
    ``lost_score``, is taken as one where the estimator lost the person: all its joints are taken out, to be
    filled in from the frames around it (where at most ``max_gap`` frames are). A confident jump is kept: a
    shaking camera moves the whole body for real. filled_score: a filled joint's score, as a fraction of the
    lower of the scores it was filled between."""

    max_gap: int = 5
    max_person_gap: int = 0
    flip_gate: float = 0.1
    swap_ratio: float = 0.5
    spike_gate: float = 0.3
    max_spikes: int = 3
    window: int = 7
    filled_score: float = 0.5
    person_gate: float = 0.0
    lost_score: float = 0.3

    RANGES: ClassVar[dict[str, tuple[float, float]]] = {
        "max_gap": (0, 300), "max_person_gap": (0, 300), "flip_gate": (0.0, 100.0), "swap_ratio": (0.0, 1.0),
              "spike_gate": (0.0, 100.0), "max_spikes": (0, 17), "window": (3, 301), "filled_score": (0.0, 1.0),
              "person_gate": (0.0, 100.0), "lost_score": (0.0, 1.0)}

    def __post_init__(self):
        for name, (lo, hi) in self.RANGES.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
                    or not lo <= value <= hi:  # NaN included
                raise InputError(f"temporal.{name}", f"must be in [{lo:g}, {hi:g}], got {value!r}")
            if name in ("max_gap", "max_person_gap", "max_spikes", "window") and int(value) != value:
                raise InputError(f"temporal.{name}", f"must be an integer, got {value!r}")


SCALE_WINDOW = 15  # frames of the running median of the person's scale


def frame_scale(xy: np.ndarray, present: np.ndarray) -> np.ndarray:
    """The person's size in each frame: sqrt of the area of the box around its present joints, (..., T);
    NaN where fewer than two joints are present or the box is degenerate."""
    big = np.where(present[..., None], xy, np.inf)
    small = np.where(present[..., None], xy, -np.inf)
    lo, hi = big.min(-2), small.max(-2)
    area = np.prod(hi - lo, axis=-1)
    with np.errstate(invalid="ignore"):
        s = np.sqrt(np.where((present.sum(-1) >= 2) & (area > 0), area, np.nan))
    return s


def running_median(x: np.ndarray, window: int, causal: bool) -> np.ndarray:
    """The median over a window along axis 1 (frames) of x (N, T, ...), ignoring NaN: offline centred on the
    frame, causal over the ``window - 1`` frames before it. NaN where the window has no value."""
    x = np.moveaxis(x, 1, -1)
    t = x.shape[-1]
    if causal:
        before, after = window - 1, 0
    else:
        before = after = window // 2
    pad = [(0, 0)] * (x.ndim - 1) + [(before, after)]
    xp = np.pad(x, pad, constant_values=np.nan)
    win = np.lib.stride_tricks.sliding_window_view(xp, window, axis=-1)[..., :t, :]
    if causal:
        win = win[..., :-1]  # the frames before t, not t itself
    win = np.sort(win, axis=-1)  # NaN last
    n = (~np.isnan(win)).sum(-1)
    lo = np.take_along_axis(win, np.maximum((n - 1) // 2, 0)[..., None], -1)[..., 0]
    hi = np.take_along_axis(win, np.maximum(n // 2, 0)[..., None], -1)[..., 0]
    med = np.where(n > 0, 0.5 * (lo + hi), np.nan)
    return np.moveaxis(med, -1, 1)


def person_scale(xy: np.ndarray, present: np.ndarray, causal: bool) -> np.ndarray:
    """The person's scale (N, T): the running median (over :data:`SCALE_WINDOW` frames) of
    :func:`frame_scale` (offline centred, causal ending at the frame), so that one frame's stray joint does not
    change it; where the window has none, offline the track's median, else 1 pixel."""
    s = frame_scale(xy, present)
    if causal:
        # the frame itself counts: a median over the window ending at t
        med = running_median(np.concatenate([s, np.full(s.shape[:1] + (1,), np.nan)], axis=1), SCALE_WINDOW + 1,
                             True)[:, 1:]
    else:
        med = running_median(s, SCALE_WINDOW, False)
    if causal:
        fallback = np.ones(s.shape[:1] + (1,))  # before the first measured frame: nothing to scale yet
    else:
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            fallback = np.nanmedian(s, axis=1, keepdims=True)
        fallback = np.where(np.isfinite(fallback), fallback, 1.0)
    med = np.where(np.isfinite(med), med, fallback)
    return np.maximum(med, 1e-6)


def _norm(v):
    """The length of 2-vectors along the last axis."""
    return np.hypot(v[..., 0], v[..., 1])


def _centre(xy, score, present):
    w = np.where(present, np.clip(score, 0.05, 1.0), 0.0)
    den = w.sum(-1)
    return (w[..., None] * xy).sum(-2) / np.where(den > 0, den, 1.0)[..., None], den > 0


def _course(d, causal: bool, window: int):
    """The recent course of values d (N, T, J, 2) (NaN: none): offline the running median over ``window``
    frames centred on the frame; causal extrapolated to frame t from the medians of the two halves of the window
    before it (window 7: frames t-3..t-1 and t-6..t-4), so that a limb moving fast is not taken for a spike."""
    if not causal:
        return running_median(d, window, False)
    half = max(window // 2, 1)
    m1 = running_median(d, half + 1, True)
    m0 = np.concatenate([np.full_like(m1[:, :half], np.nan), m1[:, :-half]], axis=1) if m1.shape[1] > half \
        else np.full_like(m1, np.nan)
    return np.where(np.isnan(m0), m1, m1 + (m1 - m0) * ((half + 1) / 2) / half)


def correct(xy, score, present, scale, causal: bool, options: TemporalOptions):
    """Undo the errors a trajectory exposes. Relative to the person's score-weighted centre, each joint's
    recent course is its running median; a left/right pair (then a joint and its skeleton neighbour) that
    strays from it more than ``flip_gate`` · scale and fits swapped is swapped back; a joint still further
    than ``spike_gate`` · scale from its course is taken out (``present`` False) to be filled in. Returns xy,
    score, present and ``corrected`` (N, T, 17) bool."""
    xy = xy.copy()
    score = score.copy()
    present = present.copy()
    corrected = np.zeros(present.shape, dtype=bool)
    centre, _ = _centre(xy, score, present)
    d = xy - centre[..., None, :]
    d = np.where(present[..., None], d, np.nan)
    course = _course(d, causal, options.window)  # (N, T, 17, 2)
    s = scale[..., None]
    lost = np.zeros(present.shape[:-1], dtype=bool)
    if options.person_gate > 0 and not causal:
        # each joint's distance from its course (the centre's course plus the joint's, so that joints going
        # missing, which move the centre, do not count); the person is lost where most joints are far
        cc = np.where((present.any(-1))[..., None], centre, np.nan)[..., None, :]
        with np.errstate(invalid="ignore"):
            dev = _norm(d + cc - running_median(cc, options.window, False) - course)
            far_j = (dev > options.person_gate * s) & present
        n = present.sum(-1)
        mean_score = np.where(present, score, 0.0).sum(-1) / np.maximum(n, 1)
        lost = (n > 0) & (2 * far_j.sum(-1) > n) & (mean_score < options.lost_score)
    for pairs, gate in ((FLIP_PAIRS, options.flip_gate), (NEIGHBOUR_PAIRS, options.flip_gate)):
        a = np.array([p[0] for p in pairs])
        b = np.array([p[1] for p in pairs])
        da, db, ca, cb = d[..., a, :], d[..., b, :], course[..., a, :], course[..., b, :]
        same = _norm(da - ca) + _norm(db - cb)
        swapped = _norm(da - cb) + _norm(db - ca)
        with np.errstate(invalid="ignore"):
            swap = (same > gate * s) & (swapped < options.swap_ratio * same)
        swap &= present[..., a] & present[..., b]
        if not swap.any():
            continue
        n_, t_, p_ = np.nonzero(swap)
        ia, ib = a[p_], b[p_]
        xa, xb = xy[n_, t_, ia].copy(), xy[n_, t_, ib].copy()
        xy[n_, t_, ia], xy[n_, t_, ib] = xb, xa
        sa, sb = score[n_, t_, ia].copy(), score[n_, t_, ib].copy()
        score[n_, t_, ia], score[n_, t_, ib] = sb, sa
        d[n_, t_, ia], d[n_, t_, ib] = xb - centre[n_, t_], xa - centre[n_, t_]
        corrected[n_, t_, ia] = corrected[n_, t_, ib] = True
    with np.errstate(invalid="ignore"):
        far = _norm(d - course) > options.spike_gate * s
    far &= present
    # a spike is a few joints; where many stray at once the body has changed (or the camera), not a joint
    far &= far.sum(-1, keepdims=True) <= options.max_spikes
    far |= lost[..., None] & present
    present &= ~far
    corrected |= far
    return xy, score, present, corrected


def _fill(values, score, present, causal: bool, max_gap: int):
    """values (N, T, J, C), score and present (N, T, J): the runs of at most ``max_gap`` frames where a value
    is not present, filled offline linearly between the frames around the run, causal with the last value.
    Returns the values, the filled score (the lower of those around the run; causal the last) and the mask."""
    t = present.shape[1]
    idx = np.arange(t)[None, :, None]
    last = np.maximum.accumulate(np.where(present, idx, -1), axis=1)
    nxt = np.flip(np.minimum.accumulate(np.flip(np.where(present, idx, t + max_gap + 1), axis=1), axis=1), axis=1)
    if causal:
        fill = ~present & (last >= 0) & (idx - last <= max_gap)
    else:
        fill = ~present & (last >= 0) & (nxt < t) & (nxt - last - 1 <= max_gap)
    lc = np.clip(last, 0, t - 1)
    v0 = np.take_along_axis(values, lc[..., None], 1)
    s0 = np.take_along_axis(score, lc, 1)
    if causal:
        vf, sf = v0, s0
    else:
        nc = np.clip(nxt, 0, t - 1)
        v1 = np.take_along_axis(values, nc[..., None], 1)
        f = ((idx - lc) / np.maximum(nc - lc, 1))[..., None]
        vf, sf = v0 + f * (v1 - v0), np.minimum(s0, np.take_along_axis(score, nc, 1))
    return np.where(fill[..., None], vf, values), np.where(fill, sf, score), fill


def fill_gaps(xy, score, present, causal: bool, options: TemporalOptions):
    """Fill runs of at most ``max_gap`` frames where a joint is not present, relative to the person's
    score-weighted centre (so that a joint filled in moves with the person): offline linearly between the
    frames around the run, causal by holding the last offset from the centre. The centre itself, where the
    whole person is missing, is filled the same way. Runs before a joint's first or (offline) after its last
    frame are left. Returns xy, score, present and ``filled`` (N, T, 17) bool."""
    if present.all():
        return xy, score, present, np.zeros_like(present)
    centre, has = _centre(xy, score, present)
    cscore = has.astype(np.float64)[..., None]
    centre, _, cfill = _fill(centre[..., None, :], cscore, has[..., None], causal, options.max_gap)
    centre, cok = centre[..., 0, :], has | cfill[..., 0]
    d = xy - centre[..., None, :]
    d, sf, fill = _fill(d, score, present, causal, options.max_gap)
    fill &= cok[..., None]
    xy = np.where(fill[..., None], centre[..., None, :] + d, xy)
    score = np.where(fill, sf * options.filled_score, score)
    return xy, score, present | fill, fill


@dataclass
class TrackRefinement:
    """What :func:`refine_tracks` gives, (N, T, ...) as its input: xy, score, present (reported or filled),
    filled (a joint not reported, or a whole frame of the person, filled in), corrected (a reported joint
    swapped back or replaced from its trajectory), scale (N, T)."""

    xy: np.ndarray
    score: np.ndarray
    present: np.ndarray
    filled: np.ndarray
    corrected: np.ndarray
    scale: np.ndarray


def refine_tracks(xy, score, present, smoother, causal: bool, options: TemporalOptions | None = None
                  ) -> TrackRefinement:
    """The temporal refinement of tracks stacked as (N, T, 17, ...): scale, corrections, gap filling, then
    ``smoother`` (:mod:`posefix.temporal.smoothers`). Joints neither present nor filled keep their input."""
    options = options or TemporalOptions()
    xy = np.asarray(xy, dtype=np.float64)
    score = np.asarray(score, dtype=np.float64)
    present = np.asarray(present, dtype=bool)
    if xy.ndim != 4 or xy.shape[2:] != (NUM_KEYPOINTS, 2) or score.shape != xy.shape[:3] \
            or present.shape != xy.shape[:3]:
        raise ValueError(f"xy {xy.shape}, score {score.shape}, present {present.shape}: need (N, T, 17, 2), "
                         "(N, T, 17), (N, T, 17)")
    scale = person_scale(xy, present, causal)
    cx, cs, cp, corrected = correct(xy, score, present, scale, causal, options)
    fx, fs, fp, filled = fill_gaps(cx, cs, cp, causal, options)
    filled &= ~present  # a reported joint taken out and filled in is "corrected"
    out = run_smoother(smoother, fx, fs, fp, scale, causal)
    out = np.where(fp[..., None], out, xy)
    score_out = np.where(fp, fs, score)
    corrected &= fp
    return TrackRefinement(out, score_out, fp, filled, corrected, scale)


# Frames of a track's past that a causal refinement of its newest frame depends on (windows of the
# corrections, the scale, the gap filling and the smoother's fits, chained), with a margin.
HISTORY = 96
