"""Error sequences for tracks: per-frame inputs whose errors persist over time as real estimators' do.

Each labelled joint of a track is, at every frame, in one state: *base* (a good or jittered point), or one of
the gross errors *inversion*, *swap* and *miss*. A gross error starts (from base) with an onset rate and
lasts a geometric number of frames with mean ``durations[error]``; the onset rate λ_e = p_e / ((1 − P) d_e)
(p_e the profile's per-frame rate of error e for that joint, averaged over the track's frames, P the sum over
the gross errors, d_e the mean duration) makes the long-run share of frames in error e equal to p_e, and
the first frame is drawn from that stationary distribution, so every frame's marginal rates are the
profile's. Jitter is a 2-D AR(1) offset u_t = ρ u_{t−1} + sqrt(1 − ρ²) s ε_t in keypoint-similarity units
(the offset in pixels divided by 2σ_j sqrt(area), so KS = exp(−|u|² / 2)), with s set per joint so that
the share of base frames with KS < 0.85 (jitter) is the profile's, and |u| capped below KS 0.5 (no miss
from jitter). During an inversion or a swap the point follows its anchor (the partner joint, or that joint
of the nearest overlapping person of the frame) with the same offset in the anchor's units; where another
candidate would claim a base, inversion or swap point, its offset is halved until none does (up to
BASE_TRIES times); a miss holds one offset at KS 0.1–0.5 from the own joint for its whole
duration, the first of MISS_TRIES draws that is a miss at the episode's first frame. A gross error that is
impossible at a frame (the partner or every other person unlabelled there, the nose's inversion) leaves that
frame in base. The labels are the Ronchi & Perona classification of each point against every person of its
frame (the truth whatever the geometry), beside the planted states.

``durations`` and ``jitter_rho`` are the parameters (:class:`SequenceParams`); the defaults
(``profiles/sequences.json``) are measured by :func:`fit_sequences` from real estimators' per-frame outputs.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources

import numpy as np

from ..errors import InputError
from ..keypoints import KS_HIT, NUM_KEYPOINTS, PARTNER, SIGMAS, box_iou
from .cocoio import GroundTruth
from .diagnose import classify
from .profile import GOOD, INVERSION, JITTER, MISS, OUTCOMES, SWAP, Profile, published_profile
from .shards import Shard, count_outcomes, encode_lines, gzip_bytes, shard_rng
from .synthesize import UNLABELLED, place_unlabelled

GROSS = (INVERSION, SWAP, MISS)
GROSS_NAMES = tuple(OUTCOMES[e] for e in GROSS)
KS_GOOD = 0.85
U_CAP2 = 2.0 * np.log(1.0 / KS_HIT) * (1.0 - 1e-6)  # |u|² below this keeps KS above 0.5
FORMAT = "posefix-sequence-params/1"
MISS_TRIES = 8  # draws of a miss's offset until one is a miss at its episode's first frame
BASE_TRIES = 6  # halvings of a jitter offset that another candidate would claim


@dataclass(frozen=True)
class SequenceParams:
    """durations: mean frames of each gross error (inversion, swap, miss), each >= 1; jitter_rho: lag-1
    correlation of the jitter offset, in [0, 1); source: where the numbers come from."""

    durations: dict
    jitter_rho: float
    source: str = ""

    def __post_init__(self):
        if not isinstance(self.durations, dict) or set(self.durations) != set(GROSS_NAMES):
            raise InputError("durations", f"must give a mean duration for each of {list(GROSS_NAMES)}")
        for k, v in self.durations.items():
            if not (isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) and v >= 1):
                raise InputError(f"durations.{k}", f"must be a number of frames >= 1, got {v!r}")
        r = self.jitter_rho
        if not (isinstance(r, (int, float)) and not isinstance(r, bool) and 0 <= r < 1):
            raise InputError("jitter_rho", f"must be a number in [0, 1), got {r!r}")

    def to_dict(self) -> dict:
        return {"format": FORMAT, "durations": {k: float(self.durations[k]) for k in GROSS_NAMES},
                "jitter_rho": float(self.jitter_rho), "source": self.source}

    @classmethod
    def from_dict(cls, doc, source: str = "sequence parameters") -> SequenceParams:
        if not isinstance(doc, dict) or doc.get("format", FORMAT) != FORMAT:
            raise InputError("sequence parameters", f"must be a JSON object of format {FORMAT!r}", source)
        extra = sorted(set(doc) - {"format", "durations", "jitter_rho", "source", "measured"})
        if extra:
            raise InputError("sequence parameters", f"unknown key(s) {extra}", source)
        return cls(doc.get("durations"), doc.get("jitter_rho"), str(doc.get("source", "")))

    @classmethod
    def default(cls) -> SequenceParams:
        text = resources.files("posefix.synth.profiles").joinpath("sequences.json").read_text()
        return cls.from_dict(json.loads(text), "bundled sequences.json")


@dataclass(frozen=True)
class Tracks:
    """Per annotation (P,): track id, clip (an integer code per video), frame index, and the video's id as the
    file gives it (PoseTrack's ``vid_id`` is a string)."""

    track: np.ndarray
    clip: np.ndarray
    frame: np.ndarray
    video: np.ndarray


def track_layout(gt: GroundTruth, source: str = "annotations") -> Tracks:
    """The track, video and frame of every annotation: images carry PoseTrack's ``vid_id`` and ``frame_id``
    (or ``clip_id`` and ``frame``), annotations ``track_id``."""
    images, codes = {}, {}
    for i, im in enumerate(gt.doc.get("images", [])):
        if "vid_id" in im and "frame_id" in im:
            (vk, vid), (fk, fr) = ("vid_id", im["vid_id"]), ("frame_id", im["frame_id"])
        elif "clip_id" in im and "frame" in im:
            (vk, vid), (fk, fr) = ("clip_id", im["clip_id"]), ("frame", im["frame"])
        else:
            raise InputError(f"images[{i}]", "needs vid_id and frame_id (PoseTrack) or clip_id and frame", source)
        if not (isinstance(vid, (int, str)) and not isinstance(vid, bool)):
            raise InputError(f"images[{i}].{vk}", f"must be an integer or a string, got {vid!r}", source)
        if not isinstance(fr, int) or isinstance(fr, bool):
            raise InputError(f"images[{i}].{fk}", f"must be an integer, got {fr!r}", source)
        images[im["id"]] = (codes.setdefault(vid, len(codes)), fr, vid)
    anns = gt.doc.get("annotations", [])
    track = np.zeros(len(anns), dtype=np.int64)
    for i, a in enumerate(anns):
        t = a.get("track_id")
        if not isinstance(t, int) or isinstance(t, bool):
            raise InputError(f"annotations[{i}].track_id", f"missing or not an integer, got {t!r}", source)
        track[i] = t
    rows = [images[int(i)] for i in gt.image_ids]
    vf = np.array([r[:2] for r in rows], dtype=np.int64).reshape(-1, 2)
    return Tracks(track, vf[:, 0], vf[:, 1], np.array([r[2] for r in rows], dtype=object))


@dataclass(frozen=True)
class TrackResult:
    """keypoints (N, T, K, 3); outcome (N, T, K) int8 the classification of each point against every person
    of its frame (UNLABELLED where the GT joint is unlabelled or the frame absent); state (N, T, K) int8 the
    planted state (in base frames GOOD or JITTER by the point's KS to its own joint, else the gross error);
    anchor (N, T, K) the other person (index along ``others``) a swap follows, -1 otherwise."""

    keypoints: np.ndarray
    outcome: np.ndarray
    state: np.ndarray
    anchor: np.ndarray


def _ks_unit(area):
    """(…,) areas → (…, K) pixels per KS unit: 2σ_j sqrt(area)."""
    return 2.0 * SIGMAS * np.sqrt(np.asarray(area, dtype=np.float64))[..., None]


def synthesize_tracks(gt, area, params: SequenceParams, rng: np.random.Generator, profile: Profile | None = None,
                      valid=None, others=None, others_area=None, ov=None, others_overlap=None) -> TrackResult:
    """Erroneous per-frame inputs for N tracks of T frames (see the module's description).

    gt: (N, T, K, 3) GT joints (x, y, v) per frame; area: (N, T); valid: (N, T) bool, frames the track has
    (default all); others: (N, T, M, K, 3) the other persons of each frame (padded with v = 0) and
    others_area (N, T, M), for the classification; others_overlap: (N, T, M) bool, those that overlap the
    person (box IoU >= 0.1: a swap lands on one of them; default all); ov: (N, T) overlapping persons (for
    the profile's crowding bins; default 0).
    """
    profile = profile or published_profile()
    gt = np.asarray(gt, dtype=np.float64)
    if gt.ndim != 4 or gt.shape[2:] != (NUM_KEYPOINTS, 3) or not np.isfinite(gt).all():
        raise InputError("gt", f"must be a finite (N, T, {NUM_KEYPOINTS}, 3) array, got shape {gt.shape}")
    n, t_len = gt.shape[:2]
    area = np.asarray(area, dtype=np.float64)
    if area.shape != (n, t_len) or not np.all(np.isfinite(area)):
        raise InputError("area", f"must be a finite ({n}, {t_len}) array, got shape {area.shape}")
    valid = np.ones((n, t_len), dtype=bool) if valid is None else np.asarray(valid, dtype=bool).reshape(n, t_len)
    area = np.where(valid, np.maximum(area, 1.0), 1.0)
    if others is None:
        others, others_area = np.zeros((n, t_len, 0, NUM_KEYPOINTS, 3)), np.ones((n, t_len, 0))
    others = np.asarray(others, dtype=np.float64).reshape(n, t_len, -1, NUM_KEYPOINTS, 3)
    others_area = np.maximum(np.asarray(others_area, dtype=np.float64).reshape(n, t_len, others.shape[2]), 1.0)
    ov = np.zeros((n, t_len), dtype=np.int64) if ov is None else np.asarray(ov).reshape(n, t_len)
    vis = (gt[..., 2] > 0) & valid[..., None]  # (N, T, K)

    # Per-frame profile rates, averaged over each track's labelled frames of each joint.  (N, K, 5)
    p = profile.probabilities(vis.sum(-1).reshape(-1), ov.reshape(-1)).reshape(n, t_len, NUM_KEYPOINTS, -1)
    w = vis[..., None].astype(np.float64)
    pbar = (p * w).sum(1) / np.maximum(w.sum(1), 1.0)
    pg = pbar[..., list(GROSS)]  # (N, K, 3)
    big_p = np.minimum(pg.sum(-1, keepdims=True), 0.999)
    dur = np.array([params.durations[k] for k in GROSS_NAMES])
    onset = pg / ((1.0 - big_p) * dur)  # (N, K, 3)
    onset = onset / np.maximum(onset.sum(-1, keepdims=True), 1.0)
    q = np.clip(pbar[..., JITTER] / np.maximum(1.0 - big_p[..., 0], 1e-9), 1e-9, 1 - 1e-9)  # jitter share in base
    s = np.sqrt(np.log(KS_GOOD) / np.log(q))  # (N, K): P(|u|² > 2 ln(1/0.85)) = q for u ~ N(0, s² I)

    # The planted states: a semi-Markov chain per (track, joint), started in its stationary distribution.
    state = np.zeros((n, t_len, NUM_KEYPOINTS), dtype=np.int8)  # 0 base, 1..3 GROSS[i - 1]
    left = np.zeros((n, NUM_KEYPOINTS), dtype=np.int64)
    cur = np.zeros((n, NUM_KEYPOINTS), dtype=np.int8)
    stat = np.concatenate([1.0 - pg.sum(-1, keepdims=True), pg], axis=-1)
    u0 = rng.random((n, NUM_KEYPOINTS))
    cur[:] = np.minimum((np.cumsum(stat, -1) <= u0[..., None] * stat.sum(-1, keepdims=True)).sum(-1), 3)
    geo_p = 1.0 / dur
    g0 = rng.geometric(geo_p[np.maximum(cur - 1, 0)])
    left[:] = np.where(cur > 0, g0, 0)
    cum = np.cumsum(onset, -1)
    for t in range(t_len):
        if t:
            ending = (cur > 0) & (left <= 0)
            cur[ending] = 0
            base = cur == 0
            u = rng.random((n, NUM_KEYPOINTS))
            new = np.where(u[..., None] < cum, 1, 0).argmax(-1) + 1
            new = np.where(u < cum[..., -1], new, 0)
            d = rng.geometric(geo_p[np.maximum(new - 1, 0)])
            start = base & (new > 0)
            cur[start] = new[start]
            left[start] = d[start]
        state[:, t] = cur
        left -= 1

    # The jitter offset: AR(1) in KS units, capped below KS 0.5.  (N, T, K, 2)
    rho = params.jitter_rho
    eps = rng.standard_normal((n, t_len, NUM_KEYPOINTS, 2))
    u = np.empty_like(eps)
    u[:, 0] = eps[:, 0]
    c = np.sqrt(1.0 - rho * rho)
    for t in range(1, t_len):
        u[:, t] = rho * u[:, t - 1] + c * eps[:, t]
    u *= s[:, None, :, None]
    r2 = (u ** 2).sum(-1, keepdims=True)
    u *= np.sqrt(np.minimum(1.0, U_CAP2 / np.maximum(r2, 1e-300)))

    # Anchors: the partner (inversion), the nearest other person labelling that joint (swap).
    unit = _ks_unit(area)  # (N, T, K)
    own = gt[..., :2]
    partner = gt[:, :, PARTNER]
    inv_ok = (partner[..., 2] > 0) & (PARTNER != np.arange(NUM_KEYPOINTS))
    m = others.shape[2]
    anchor = np.full((n, t_len, NUM_KEYPOINTS), -1, dtype=np.int64)
    swap_ok = np.zeros((n, t_len, NUM_KEYPOINTS), dtype=bool)
    swap_xy = np.zeros((n, t_len, NUM_KEYPOINTS, 2))
    swap_unit = np.ones((n, t_len, NUM_KEYPOINTS))
    if m:
        ovis = others[..., 2] > 0  # (N, T, M, K)
        if others_overlap is not None:
            ovis &= np.asarray(others_overlap, dtype=bool).reshape(n, t_len, m)[..., None]
        d2 = ((others[..., :2] - own[:, :, None]) ** 2).sum(-1)
        d2 = np.where(ovis, d2, np.inf)
        anchor = d2.argmin(2)
        swap_ok = np.isfinite(d2.min(2))
        swap_xy = np.take_along_axis(others[..., :2], anchor[:, :, None, :, None], axis=2)[:, :, 0]
        swap_unit = np.take_along_axis(_ks_unit(others_area), anchor[:, :, None, :], axis=2)[:, :, 0]
        anchor = np.where(swap_ok, anchor, -1)
    flat_gt = gt.reshape(n * t_len, NUM_KEYPOINTS, 3)
    has = vis.any(-1).reshape(-1)
    flat_area = area.reshape(-1)[has]
    flat_others = others.reshape(n * t_len, m, NUM_KEYPOINTS, 3)[has]
    flat_others_area = others_area.reshape(n * t_len, m)[has]

    def labels_of(points):  # (N, T, K, 2) → (N, T, K) classification against every person of the frame
        out = np.full((n, t_len, NUM_KEYPOINTS), UNLABELLED, dtype=np.int8)
        if has.any():
            out.reshape(-1, NUM_KEYPOINTS)[has] = classify(points.reshape(-1, NUM_KEYPOINTS, 2)[has], flat_gt[has],
                                                           flat_area, flat_others, flat_others_area)
        return out

    # A miss: one offset per episode, at KS uniform in (0.1, 0.5) from the own joint, in a uniform direction:
    # the first of MISS_TRIES draws whose point is a miss at the episode's first frame (KS < 0.5 to every
    # other candidate too).
    own_unit = _ks_unit(area)
    miss_u = np.zeros((n, t_len, NUM_KEYPOINTS, 2))
    found = np.zeros((n, t_len, NUM_KEYPOINTS), dtype=bool)
    for _ in range(MISS_TRIES):
        ks_m = rng.uniform(0.1, KS_HIT, (n, t_len, NUM_KEYPOINTS))
        ang = rng.uniform(0.0, 2 * np.pi, (n, t_len, NUM_KEYPOINTS))
        rad = np.sqrt(-2.0 * np.log(ks_m))
        cand = np.stack([rad * np.cos(ang), rad * np.sin(ang)], axis=-1)
        take = ~found & (labels_of(gt[..., :2] + cand * own_unit[..., None]) == MISS)
        miss_u[take] = cand[take]
        found |= take
        miss_u[~found] = cand[~found]  # the last draw where none is a miss
    episode_start = np.concatenate([np.ones((n, 1, NUM_KEYPOINTS), bool), state[:, 1:] != state[:, :-1]], axis=1)
    idx = np.where(episode_start, np.arange(t_len)[None, :, None], 0)
    idx = np.maximum.accumulate(idx, axis=1)
    miss_u = np.take_along_axis(miss_u, idx[..., None], axis=1)

    st = np.where(state == 1, INVERSION, np.where(state == 2, SWAP, np.where(state == 3, MISS, GOOD))).astype(np.int8)
    st[(st == INVERSION) & ~inv_ok] = GOOD
    st[(st == SWAP) & ~swap_ok] = GOOD
    def place(u):
        xy = own + u * unit[..., None]
        xy = np.where((st == INVERSION)[..., None], partner[..., :2] + u * unit[..., PARTNER, None], xy)
        xy = np.where((st == SWAP)[..., None], swap_xy + u * swap_unit[..., None], xy)
        return np.where((st == MISS)[..., None], own + miss_u * unit[..., None], xy)

    anchor = np.where(st == SWAP, anchor, -1)
    # A point that another candidate would claim (a partner or another person's joint closer than its own
    # anchor): its offset is halved, up to BASE_TRIES times, so that base frames stay good or jitter and an
    # inversion or swap stays one.
    xy = place(u)
    for _ in range(BASE_TRIES):
        lab = labels_of(xy)
        bad = vis & np.where(st == GOOD, (lab != GOOD) & (lab != JITTER),
                             ((st == INVERSION) | (st == SWAP)) & (lab != st))
        if not bad.any():
            break
        u[bad] *= 0.5
        xy = place(u)

    # Unlabelled joints: placed plausibly from the labelled ones, frame by frame.
    placed = np.zeros((n * t_len, NUM_KEYPOINTS, 2))
    if has.any():
        placed[has] = place_unlabelled(flat_gt[has], area.reshape(-1)[has], rng)
    placed = placed.reshape(n, t_len, NUM_KEYPOINTS, 2)
    xy = np.where(vis[..., None], xy, placed)

    outcome = labels_of(xy)
    outcome[~vis] = UNLABELLED
    st[(st == GOOD) & (outcome == JITTER)] = JITTER  # a base point is good or jitter by its KS
    st[~vis] = UNLABELLED
    conf = np.empty((n, t_len, NUM_KEYPOINTS))
    for code, name in list(enumerate(OUTCOMES)) + [(UNLABELLED, "unlabelled")]:
        sel = outcome == code
        if sel.any():
            a, b = profile.scores[name]
            conf[sel] = rng.beta(a, b, size=int(sel.sum()))
    conf = np.clip(conf, 1e-3, 1.0)
    return TrackResult(np.concatenate([xy, conf[..., None]], axis=-1), outcome, st, anchor)


def synthesize_track(gt_xy, area, params: SequenceParams | None = None, rng: np.random.Generator | None = None,
                     profile: Profile | None = None) -> TrackResult:
    """One track alone: gt_xy (T, K, 3) GT joints per frame (v > 0 labelled), area (T,); returns a
    :class:`TrackResult` with its leading track axis removed ((T, K, 3) keypoints, (T, K) outcome...).
    ``rng`` is required; ``params`` default to the bundled ones."""
    if rng is None:
        raise InputError("rng", "give a seeded numpy Generator (np.random.default_rng(seed))")
    gt_xy = np.asarray(gt_xy, dtype=np.float64)
    if gt_xy.ndim != 3:
        raise InputError("gt_xy", f"must be a (T, {NUM_KEYPOINTS}, 3) array, got shape {gt_xy.shape}")
    r = synthesize_tracks(gt_xy[None], np.asarray(area, dtype=np.float64)[None], params or SequenceParams.default(),
                          rng, profile)
    return TrackResult(r.keypoints[0], r.outcome[0], r.state[0], r.anchor[0])


def _track_arrays(gt: GroundTruth, tracks: Tracks, idx: np.ndarray):
    """Dense arrays of the tracks of annotations ``idx``: per track its annotations by frame, with the other
    persons of each frame. Returns (keys (N,) track ids, ann (N, T) annotation index or -1, gt, area, valid,
    others, others_area, ov, others_ann (N, T, M) the annotation index of each other person or -1, overlap
    (N, T, M) whether it overlaps the person)."""
    idx = idx[~gt.crowd[idx] & (gt.keypoints[idx, :, 2] > 0).any(-1)]
    keys, tix = np.unique(tracks.track[idx], return_inverse=True)
    first = np.full(keys.size, np.iinfo(np.int64).max)
    np.minimum.at(first, tix, tracks.frame[idx])
    pos = tracks.frame[idx] - first[tix]
    t_len = int(pos.max(initial=-1)) + 1
    ann = np.full((keys.size, t_len), -1, dtype=np.int64)
    ann[tix, pos] = idx
    valid = ann >= 0
    safe = np.where(valid, ann, idx[0] if idx.size else 0)
    g = np.where(valid[..., None, None], gt.keypoints[safe], 0.0)
    area = np.where(valid, np.maximum(gt.areas[safe], 1.0), 1.0)
    # Other persons of each frame: every non-crowd annotation of the same image.
    by_image: dict[int, list[int]] = {}
    for a in idx.tolist():
        by_image.setdefault(int(gt.image_ids[a]), []).append(a)
    m = max((len(v) for v in by_image.values()), default=1) - 1
    others = np.zeros(valid.shape + (m, NUM_KEYPOINTS, 3))
    others_area = np.ones(valid.shape + (m,))
    ov = np.zeros(valid.shape, dtype=np.int64)
    others_ann = np.full(valid.shape + (m,), -1, dtype=np.int64)
    overlap = np.zeros(valid.shape + (m,), dtype=bool)
    if m:
        for i, t in zip(*np.nonzero(valid)):
            a = ann[i, t]
            rest = [b for b in by_image[int(gt.image_ids[a])] if b != a]
            if rest:
                others[i, t, :len(rest)] = gt.keypoints[rest]
                others_area[i, t, :len(rest)] = np.maximum(gt.areas[rest], 1.0)
                others_ann[i, t, :len(rest)] = rest
                hit = box_iou(gt.boxes[a:a + 1], gt.boxes[rest])[0] >= 0.1
                overlap[i, t, :len(rest)] = hit
                ov[i, t] = int(hit.sum())
    return keys, ann, g, area, valid, others, others_area, ov, others_ann, overlap


def make_sequence_shard(gt: GroundTruth, tracks: Tracks, block_idx, block: int, variant: int, seed: int,
                        profile: Profile, params: SequenceParams):
    """Shard (block, variant) of a sequences dataset: one record per (track, frame) in track, frame order."""
    _, ann, g, area, valid, others, others_area, ov, others_ann, overlap = _track_arrays(gt, tracks,
                                                                                          np.asarray(block_idx))
    res = synthesize_tracks(g, area, params, shard_rng(seed, block, variant), profile, valid, others, others_area, ov,
                            overlap)
    ii, tt = np.nonzero(valid)
    a = ann[ii, tt]
    own = gt.ids[a]
    anchor_id = np.repeat(own[:, None], NUM_KEYPOINTS, 1)
    anchor_joint = np.tile(np.arange(NUM_KEYPOINTS), (a.size, 1))
    st = res.state[ii, tt]
    anchor_joint[st == INVERSION] = np.broadcast_to(PARTNER, anchor_joint.shape)[st == INVERSION]
    swap = st == SWAP
    if swap.any():
        which = np.take_along_axis(others_ann[ii, tt], np.maximum(res.anchor[ii, tt], 0), axis=1)  # (R, K)
        anchor_id[swap] = gt.ids[which[swap]]
    score = np.where(res.outcome[ii, tt] >= 0, res.keypoints[ii, tt, :, 2], 0).sum(-1) / np.maximum(
        (res.outcome[ii, tt] >= 0).sum(-1), 1)
    raw = encode_lines(gt.image_ids[a], own, variant, res.keypoints[ii, tt], score, res.outcome[ii, tt],
                       anchor_id, anchor_joint,
                       extra={"track_id": tracks.track[a], "video_id": tracks.video[a].tolist(),
                              "frame": tracks.frame[a],
                              "planted": [[None if x < 0 else OUTCOMES[x] for x in row] for row in st.tolist()]})
    return Shard(block, variant, gzip_bytes(raw), int(a.size), count_outcomes(res.outcome[ii, tt]))


def fit_sequences(gt: GroundTruth, results: list[dict], source: str = "results") -> tuple[SequenceParams, dict]:
    """Measure the sequence parameters from an estimator's per-frame results (COCO results with ``track_id``,
    one per track per frame): each result is matched to the GT annotation of its image and track, every
    joint labelled against every person of its frame; the mean length of each gross error's runs of
    consecutive frames, and the lag-1 correlation of the KS-unit offset over pairs of consecutive frames
    where the joint is good or jittered in both. Returns the parameters and what was measured (counts)."""
    tracks = track_layout(gt, "annotations")
    key = {(int(i), int(t)): a for a, (i, t) in enumerate(zip(gt.image_ids, tracks.track)) if not gt.crowd[a]}
    pred = np.zeros((len(gt.ids), NUM_KEYPOINTS, 3))
    have = np.zeros(len(gt.ids), dtype=bool)
    for i, r in enumerate(results):
        t = r.get("track_id")
        if not isinstance(t, int) or isinstance(t, bool):
            raise InputError(f"results[{i}].track_id", f"missing or not an integer, got {t!r}", source)
        a = key.get((int(r["image_id"]), t))
        if a is not None:
            pred[a] = np.asarray(r["keypoints"], dtype=np.float64).reshape(NUM_KEYPOINTS, 3)
            have[a] = True
    if not have.any():
        raise InputError("results", "no result matches a GT annotation by image_id and track_id", source)
    idx = np.arange(len(gt.ids))
    _, ann, g, area, valid, others, others_area, _, _, _ = _track_arrays(gt, tracks, idx)
    ok = valid & have[np.maximum(ann, 0)]
    p = pred[np.maximum(ann, 0)]
    n, t_len = ok.shape
    lab = np.full((n, t_len, NUM_KEYPOINTS), UNLABELLED, dtype=np.int8)
    if ok.any():
        lab[ok] = classify(p[ok], g[ok], area[ok], others[ok], others_area[ok])
    runs = {e: [] for e in GROSS_NAMES}
    for e, name in zip(GROSS, GROSS_NAMES):
        inside = lab == e
        for i, j in zip(*np.nonzero(inside.any(1))):
            col = np.concatenate([[False], inside[i, :, j], [False]]).astype(np.int8)
            d = np.diff(col)
            runs[name] += (np.flatnonzero(d == -1) - np.flatnonzero(d == 1)).tolist()
    u = (p[..., :2] - g[..., :2]) / _ks_unit(area)[..., None]
    base = (lab == GOOD) | (lab == JITTER)
    pair = base[:, 1:] & base[:, :-1]
    a0, a1 = u[:, :-1][pair], u[:, 1:][pair]
    a0, a1 = a0 - a0.mean(0), a1 - a1.mean(0)
    rho = float((a0 * a1).sum() / np.sqrt((a0 ** 2).sum() * (a1 ** 2).sum())) if pair.sum() > 1 else 0.0
    default = SequenceParams.default()
    durations = {k: (float(np.mean(v)) if v else default.durations[k]) for k, v in runs.items()}
    labelled = int((lab >= 0).sum())
    measured = {"runs": {k: len(v) for k, v in runs.items()}, "pairs": int(pair.sum()), "labelled_joints": labelled,
                "rates": {o: (float((lab == c).sum() / labelled) if labelled else 0.0) for c, o in enumerate(OUTCOMES)}}
    return SequenceParams(durations, min(max(rho, 0.0), 0.999), source), measured
