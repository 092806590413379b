"""From per-frame persons to tracks and back: association, packing, refinement, unpacking.

Persons are given flat, P of them: video (P,) int (0 for a single video), frame (P,) int index within its
video, track (P,) int (0 = the estimator gave no id), keypoints (P, 17, 3) x, y in pixels and a score (0 =
joint not reported).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import InputError
from ..keypoints import NUM_KEYPOINTS, SIGMAS
from .core import TemporalOptions, frame_scale, refine_tracks

ASSOCIATION_MIN_SIMILARITY = 0.2  # the least keypoint similarity of a person to a track's predicted pose


def _similarity(pred_xy, pred_present, pred_scale, xy, present):
    """OKS-like similarity (A, B) of predicted track poses to a frame's persons, over joints both have."""
    d2 = ((pred_xy[:, None] - xy[None]) ** 2).sum(-1)  # (A, B, 17)
    var = (2 * SIGMAS) ** 2 * (pred_scale[:, None, None] ** 2) * 2
    both = pred_present[:, None] & present[None]
    e = np.exp(-d2 / np.maximum(var, 1e-9)) * both
    n = both.sum(-1)
    return np.where(n > 0, e.sum(-1) / np.maximum(n, 1), 0.0)


class Associator:
    """Online association of one video's persons that carry no track id, frame by frame (:meth:`step`): each
    frame's persons are matched (Hungarian, on keypoint similarity) to the tracks' poses predicted at their
    whole-body velocity; a track unseen for more than ``max_gap`` frames ends; an unmatched person starts a
    track. Ids count from ``first_id``."""

    def __init__(self, max_gap: int = 5, min_similarity: float = ASSOCIATION_MIN_SIMILARITY, first_id: int = 1):
        self.max_gap, self.min_similarity, self.next_id = max_gap, min_similarity, first_id
        # active tracks: id, last frame, last xy, velocity per frame, present, scale
        self.t_id: list[int] = []
        self.t_last: list[int] = []
        self.t_xy: list[np.ndarray] = []
        self.t_vel: list[np.ndarray] = []
        self.t_pres: list[np.ndarray] = []
        self.t_scale: list[float] = []

    def step(self, f: int, keypoints: np.ndarray) -> np.ndarray:
        """Track ids (P,) of frame ``f``'s persons (P, 17, 3); frames in increasing order."""
        from scipy.optimize import linear_sum_assignment

        present = keypoints[..., 2] > 0
        xy = keypoints[..., :2]
        scale = frame_scale(xy, present)
        scale = np.where(np.isfinite(scale), scale, 1.0)
        alive = [i for i in range(len(self.t_id)) if f - self.t_last[i] <= self.max_gap + 1]
        self.t_id, self.t_last, self.t_xy, self.t_vel, self.t_pres, self.t_scale = (
            [lst[i] for i in alive] for lst in (self.t_id, self.t_last, self.t_xy, self.t_vel, self.t_pres,
                                                self.t_scale))
        match = {}
        if self.t_id and len(keypoints):
            dt = np.array([f - tl for tl in self.t_last], dtype=np.float64)
            pred = np.stack(self.t_xy) + np.stack(self.t_vel) * dt[:, None, None]
            sim = _similarity(pred, np.stack(self.t_pres), np.array(self.t_scale), xy, present)
            rows, cols = linear_sum_assignment(-sim)
            for r, c in zip(rows, cols):
                if sim[r, c] >= self.min_similarity:
                    match[int(c)] = int(r)
        ids = np.zeros(len(keypoints), dtype=np.int64)
        for c in range(len(keypoints)):
            if c in match:
                r = match[c]
                both = self.t_pres[r] & present[c]
                step = max(f - self.t_last[r], 1)
                vel = (xy[c] - self.t_xy[r]) / step
                # the whole-body velocity: the joints' median, robust to one joint's jump
                v = np.median(vel[both], axis=0) if both.any() else np.zeros(2)
                self.t_vel[r] = np.broadcast_to(v, (NUM_KEYPOINTS, 2)).copy()
                self.t_xy[r] = np.where(present[c][:, None], xy[c], self.t_xy[r] + self.t_vel[r] * step)
                self.t_pres[r] = self.t_pres[r] | present[c]
                self.t_last[r], self.t_scale[r] = f, float(scale[c])
                ids[c] = self.t_id[r]
            else:
                ids[c] = self.next_id
                self.t_id.append(self.next_id)
                self.t_last.append(f)
                self.t_xy.append(xy[c].copy())
                self.t_vel.append(np.zeros((NUM_KEYPOINTS, 2)))
                self.t_pres.append(present[c].copy())
                self.t_scale.append(float(scale[c]))
                self.next_id += 1
        return ids


def associate(frame: np.ndarray, keypoints: np.ndarray, max_gap: int = 5,
              min_similarity: float = ASSOCIATION_MIN_SIMILARITY, first_id: int = 1) -> np.ndarray:
    """Track ids (P,) for the persons of one video that carry none (:class:`Associator`, in frame order; the
    persons of a frame in their given order)."""
    frame = np.asarray(frame, dtype=np.int64)
    ids = np.zeros(len(frame), dtype=np.int64)
    if not len(frame):
        return ids
    a = Associator(max_gap, min_similarity, first_id)
    order = np.argsort(frame, kind="stable")
    bounds = np.flatnonzero(np.diff(frame[order])) + 1
    for group in np.split(order, bounds):
        ids[group] = a.step(int(frame[group[0]]), keypoints[group])
    return ids


@dataclass
class PoseRefinement:
    """What :func:`refine_poses` gives. For the P input persons, in their order: xy (P, 17, 2), score
    (P, 17), track (P,) their track ids (given or assigned), filled / corrected (P, 17) bool. Then the
    persons filled in where a track missed up to ``max_gap`` frames (offline only): added_video, added_frame,
    added_track (A,), added_xy (A, 17, 2), added_score (A, 17) (their joints are all filled)."""

    xy: np.ndarray
    score: np.ndarray
    track: np.ndarray
    filled: np.ndarray
    corrected: np.ndarray
    added_video: np.ndarray
    added_frame: np.ndarray
    added_track: np.ndarray
    added_xy: np.ndarray
    added_score: np.ndarray


def _check(video, frame, track, keypoints):
    keypoints = np.asarray(keypoints, dtype=np.float64)
    p = len(keypoints)
    if keypoints.shape != (p, NUM_KEYPOINTS, 3):
        raise InputError("keypoints", f"must be (persons, 17, 3), got {keypoints.shape}")
    if not np.isfinite(keypoints).all():
        i = int(np.flatnonzero(~np.isfinite(keypoints).all(axis=(1, 2)))[0])
        raise InputError(f"keypoints[{i}]", "must be finite")
    if (keypoints[..., 2] < 0).any():
        i = int(np.flatnonzero((keypoints[..., 2] < 0).any(-1))[0])
        raise InputError(f"keypoints[{i}]", "scores must be ≥ 0")
    out = []
    for name, a in (("video", video), ("frame", frame), ("track", track)):
        a = np.zeros(p, dtype=np.int64) if a is None else np.asarray(a)
        if a.shape != (p,) or (a.size and not np.issubdtype(a.dtype, np.integer)):
            raise InputError(name, f"must be {p} integers, got shape {a.shape} of {a.dtype}")
        if (a < 0).any():
            raise InputError(f"{name}[{int(np.flatnonzero(a < 0)[0])}]", "must be ≥ 0")
        out.append(a.astype(np.int64))
    return (*out, keypoints)


# Joint-frames refined together at most (unless one track is longer): arrays of this size stay in the CPU's
# cache through the refinement's many passes, which is faster than one pass over all tracks.
BATCH_JOINT_FRAMES = 16_384


def _groups(length: np.ndarray, ratio: float = 1.5) -> list[np.ndarray]:
    """Tracks batched by length, so that padding each batch to its longest track wastes little, and each batch
    holds at most :data:`BATCH_JOINT_FRAMES` joint-frames (or one track)."""
    budget = BATCH_JOINT_FRAMES
    order = np.argsort(length, kind="stable")
    groups, start = [], 0
    for i in range(1, len(order) + 1):
        if i == len(order) or length[order[i]] > ratio * max(length[order[start]], 8) \
                or (i + 1 - start) * int(length[order[i]]) * NUM_KEYPOINTS > budget:
            groups.append(order[start:i])
            start = i
    return groups


def refine_poses(keypoints, smoother, *, video=None, frame=None, track=None, causal: bool = False,
                 options: TemporalOptions | None = None) -> PoseRefinement:
    """Temporal refinement of per-frame persons (module docstring): persons without a track id are associated
    into tracks per video (:func:`associate`), every track is refined (:func:`posefix.temporal.core.refine_tracks`
    with ``smoother``), and offline the frames a track missed (up to ``max_gap``) are filled in. Two persons of
    one frame with the same track id are an InputError."""
    options = options or TemporalOptions()
    video, frame, track, keypoints = _check(video, frame, track, keypoints)
    p = len(keypoints)
    track = track.copy()
    for v in np.unique(video):
        sel = np.flatnonzero(video == v)
        untracked = sel[track[sel] == 0]
        if len(untracked):
            first = int(track[sel].max()) + 1
            track[untracked] = associate(frame[untracked], keypoints[untracked], options.max_gap, first_id=first)
    key = np.stack([video, track, frame], axis=1)
    if p:
        uniq, counts = np.unique(key, axis=0, return_counts=True)
        if (counts > 1).any():
            v, tid, f = uniq[np.flatnonzero(counts > 1)[0]]
            raise InputError("track_id", f"track {tid} has two persons in frame {f}" + (f" of video {v}" if v else ""))
    pairs, tix = np.unique(key[:, :2], axis=0, return_inverse=True) if p else (np.zeros((0, 2), np.int64),
                                                                               np.zeros(0, np.int64))
    tix = tix.reshape(-1)
    n = len(pairs)
    start = np.full(n, np.iinfo(np.int64).max)
    np.minimum.at(start, tix, frame)
    end = np.zeros(n, dtype=np.int64)
    np.maximum.at(end, tix, frame)
    length = end - start + 1 if n else np.zeros(0, np.int64)
    out_xy = keypoints[..., :2].copy()
    out_score = keypoints[..., 2].copy()
    filled = np.zeros((p, NUM_KEYPOINTS), dtype=bool)
    corrected = np.zeros((p, NUM_KEYPOINTS), dtype=bool)
    added = []
    groups = _groups(length)
    group_of = np.zeros(n, dtype=np.int64)
    local = np.zeros(n, dtype=np.int64)
    for i, g in enumerate(groups):
        group_of[g], local[g] = i, np.arange(len(g))
    by_group = np.argsort(group_of[tix], kind="stable")
    bounds = np.searchsorted(group_of[tix][by_group], np.arange(1, len(groups)))
    for g, rows in zip(groups, np.split(by_group, bounds)):
        ti, fi = local[tix[rows]], frame[rows] - start[tix[rows]]
        shape = (len(g), int(length[g].max()))
        xy = np.zeros(shape + (NUM_KEYPOINTS, 2))
        score = np.zeros(shape + (NUM_KEYPOINTS,))
        xy[ti, fi] = keypoints[rows, :, :2]
        score[ti, fi] = keypoints[rows, :, 2]
        present = score > 0
        r = refine_tracks(xy, score, present, smoother, causal, options)
        out_xy[rows], out_score[rows] = r.xy[ti, fi], r.score[ti, fi]
        filled[rows], corrected[rows] = r.filled[ti, fi], r.corrected[ti, fi]
        if not causal:
            had = np.zeros(shape, dtype=bool)
            had[ti, fi] = True
            inside = np.arange(shape[1])[None, :] < length[g][:, None]
            idx = np.arange(shape[1])[None, :]
            last = np.maximum.accumulate(np.where(had, idx, -1), axis=1)
            nxt = np.flip(np.minimum.accumulate(np.flip(np.where(had, idx, shape[1]), axis=1), axis=1), axis=1)
            short = (nxt - last - 1) <= min(options.max_person_gap, options.max_gap)
            new = ~had & inside & short & r.present.any(-1)
            a_t, a_f = np.nonzero(new)
            if len(a_t):
                pair = pairs[g[a_t]]
                added.append((pair[:, 0], a_f + start[g[a_t]], pair[:, 1], r.xy[a_t, a_f],
                              np.where(r.present[a_t, a_f], r.score[a_t, a_f], 0.0)))
    if added:
        av, af, at, axy, asc = (np.concatenate(c) for c in zip(*added))
        o = np.lexsort((at, af, av))
        av, af, at, axy, asc = av[o], af[o], at[o], axy[o], asc[o]
    else:
        av = af = at = np.zeros(0, dtype=np.int64)
        axy, asc = np.zeros((0, NUM_KEYPOINTS, 2)), np.zeros((0, NUM_KEYPOINTS))
    return PoseRefinement(out_xy, out_score, track, filled, corrected, av, af, at, axy, asc)
