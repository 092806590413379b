"""Causal temporal refinement of a live stream, one frame at a time (the service's RefinePoseStream).

:class:`TemporalStream` keeps each track's last :data:`posefix.temporal.core.HISTORY` frames and refines the
newest one; fed a video's frames in order (every frame, those without persons too), it gives what
:func:`posefix.temporal.refine_poses` gives with ``causal=True`` over the whole video, where the video's persons
either all carry track ids or none do (then ids count from 1).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import InputError
from ..keypoints import NUM_KEYPOINTS
from .core import HISTORY, TemporalOptions, refine_tracks
from .pipeline import Associator


@dataclass
class FrameRefinement:
    """One frame's persons, in their order: xy (P, 17, 2), score (P, 17), track (P,), filled and corrected
    (P, 17) bool (as :class:`posefix.temporal.pipeline.PoseRefinement`)."""

    xy: np.ndarray
    score: np.ndarray
    track: np.ndarray
    filled: np.ndarray
    corrected: np.ndarray


class TemporalStream:
    """The causal temporal refinement of one stream (module docstring)."""

    def __init__(self, smoother, options: TemporalOptions | None = None):
        self.smoother = smoother
        self.options = options or TemporalOptions()
        self.associator = Associator(self.options.max_gap)
        self.frame = -1
        # track id → (rows (L, 17, 3) of its last frames, oldest first; frames since it was last seen)
        self.history: dict[int, np.ndarray] = {}
        self.unseen: dict[int, int] = {}

    def step(self, keypoints, track=None) -> FrameRefinement:
        """The next frame's persons: keypoints (P, 17, 3) pixels and score, track (P,) ids (0: none)."""
        self.frame += 1
        kp = np.asarray(keypoints, dtype=np.float64).reshape(-1, NUM_KEYPOINTS, 3)
        p = len(kp)
        track = np.zeros(p, dtype=np.int64) if track is None else np.asarray(track, dtype=np.int64).copy()
        if track.shape != (p,):
            raise InputError("track", f"must be {p} integers, got shape {track.shape}")
        if not np.isfinite(kp).all():
            raise InputError(f"keypoints[{int(np.flatnonzero(~np.isfinite(kp).all(axis=(1, 2)))[0])}]",
                             "must be finite")
        untracked = track == 0
        ids = self.associator.step(self.frame, kp[untracked])
        track[untracked] = ids
        seen = set()
        for i, tid in enumerate(track.tolist()):
            if tid in seen:
                raise InputError("track_id", f"track {tid} has two persons in frame {self.frame}")
            seen.add(tid)
        # every known track gets this frame's row: the person's, or an absent one
        rows = {tid: kp[i] for i, tid in enumerate(track.tolist())}
        for tid in list(self.history):
            if tid not in rows:
                self.unseen[tid] += 1
                if self.unseen[tid] >= HISTORY:
                    del self.history[tid], self.unseen[tid]
                    continue
            self.history[tid] = np.concatenate([self.history[tid], rows.get(tid, np.zeros((1, NUM_KEYPOINTS, 3)))
                                                .reshape(1, NUM_KEYPOINTS, 3)])[-HISTORY:]
        for tid, row in rows.items():
            if tid not in self.history:
                self.history[tid] = row[None].copy()
            self.unseen[tid] = 0
        out = FrameRefinement(kp[..., :2].copy(), kp[..., 2].copy(), track, np.zeros((p, NUM_KEYPOINTS), bool),
                              np.zeros((p, NUM_KEYPOINTS), bool))
        if not p:
            return out
        length = max(len(self.history[tid]) for tid in track.tolist())
        batch = np.zeros((p, length, NUM_KEYPOINTS, 3))
        for i, tid in enumerate(track.tolist()):
            h = self.history[tid]
            batch[i, length - len(h):] = h  # absent frames before a track's first change nothing
        r = refine_tracks(batch[..., :2], batch[..., 2], batch[..., 2] > 0, self.smoother, True, self.options)
        out.xy, out.score = r.xy[:, -1], r.score[:, -1]
        out.filled, out.corrected = r.filled[:, -1], r.corrected[:, -1]
        return out
