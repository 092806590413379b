"""What a video carries from frame to frame: per track, the previous refined pose (so that a person's
crop follows it) and a One-Euro filter over the refined keypoints. Shared by ``posefix refine-video``
and the service's ``RefinePoseStream``, so both follow and smooth the same way: each frame's persons are
refined as :meth:`Tracks.follow_inputs` gives them, cropped around its crop poses (``Refiner.refine``'s and the
batcher's ``crop_poses``), and the refinement goes through :meth:`Tracks.update`.

Glossary: P persons of a frame, K = 17 COCO joints; poses (P, K, 3) = x, y in image pixels and a score;
times in seconds; track id 0 = untracked.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from .errors import InputError


@dataclass(frozen=True)
class OneEuroParams:
    """One-Euro filter parameters (Casiez et al., CHI 2012): cutoffs in Hz, beta in 1/pixel.

    The cutoff is min_cutoff_hz + beta · |speed in px/s|: at rest a low cutoff removes jitter; in fast
    motion the cutoff rises and the lag shrinks. Lower min_cutoff_hz smooths more; higher beta lags less.
    """

    min_cutoff_hz: float = 1.0
    beta: float = 0.007
    d_cutoff_hz: float = 1.0

    # The range of each parameter: within them the filter's weights stay finite and in (0, 1] for any
    # time step from 1 µs to days, so the filtered values stay finite.
    RANGES: ClassVar[dict[str, tuple[float, float]]] = {"min_cutoff_hz": (1e-6, 1e6), "beta": (0.0, 1e6),
                                                        "d_cutoff_hz": (1e-6, 1e6)}

    def __post_init__(self):
        for name, (lo, hi) in self.RANGES.items():
            value = getattr(self, name)
            if not lo <= value <= hi:  # NaN included
                raise InputError(f"smoothing.{name}", f"must be in [{lo:g}, {hi:g}], got {value}")


class OneEuroFilter:
    """The One-Euro filter over an array of values, e.g. a person's (17, 2) keypoints in pixels."""

    def __init__(self, params: OneEuroParams):
        self.params = params
        self.t: float | None = None
        self.x: np.ndarray | None = None
        self.dx: np.ndarray | None = None

    @staticmethod
    def _alpha(cutoff_hz, dt: float):
        return 1.0 / (1.0 + 1.0 / (2 * math.pi * cutoff_hz * dt))

    def __call__(self, x: np.ndarray, t: float) -> np.ndarray:
        """Filter the values ``x`` observed at time ``t`` (seconds, increasing; a float or, for exact steps
        at any magnitude, a Fraction); the first call returns x."""
        x = np.asarray(x, dtype=np.float64)
        if self.t is None:
            self.t, self.x, self.dx = t, x.copy(), np.zeros_like(x)
            return x.copy()
        dt = float(t - self.t)
        a_d = self._alpha(self.params.d_cutoff_hz, dt)
        self.dx = a_d * (x - self.x) / dt + (1 - a_d) * self.dx
        a = self._alpha(self.params.min_cutoff_hz + self.params.beta * np.abs(self.dx), dt)
        self.x = a * x + (1 - a) * self.x
        self.t = t
        return self.x.copy()


class Tracks:
    """Per-track state of one video: ``follow`` fills a tracked person's absent joints from, and crops
    around, its previous refined pose; ``smoothing`` (None = off) filters its refined keypoints."""

    def __init__(self, follow: bool = False, smoothing: OneEuroParams | None = None):
        self.follow = follow
        self.smoothing = smoothing
        self.previous: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # track → (xy (K, 2), confidence (K,))
        self.filters: dict[int, OneEuroFilter] = {}

    @staticmethod
    def check_ids(tracks, field: str = "persons") -> list[int]:
        seen: dict[int, int] = {}
        for i, tid in enumerate(tracks):
            if tid and tid in seen:
                raise InputError(f"{field}[{i}].track_id", f"{tid} is also {field}[{seen[tid]}].track_id")
            seen[tid] = i
        return list(tracks)

    def follow_inputs(self, tracks: list[int], poses: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Before refinement: the poses to refine (P, K, 3) and the poses to crop around (P, K, 3; None:
        the poses themselves). With ``follow``, a tracked person's absent joints come from its previous
        refined pose (score: the refined confidence) and its crop from that pose; the other persons crop
        around their own poses."""
        if not self.follow or not any(t in self.previous for t in tracks):
            return poses, None
        poses = poses.copy()
        crop = poses.copy()
        for i, tid in enumerate(tracks):
            if tid in self.previous:
                xy, conf = self.previous[tid]
                absent = poses[i, :, 2] <= 0
                poses[i, absent, :2] = xy[absent]
                poses[i, absent, 2] = conf[absent]
                crop[i, :, :2], crop[i, :, 2] = xy, np.maximum(conf, 1e-3)
        return poses, crop

    def update(self, tracks: list[int], poses: np.ndarray, xy: np.ndarray, conf: np.ndarray, t: float) -> np.ndarray:
        """After refinement: smooth each tracked person's refined xy (P, K, 2), remember this frame's
        tracks and forget the others. Returns the (smoothed) xy."""
        xy = xy.copy()
        filters, previous = {}, {}
        for i, tid in enumerate(tracks):
            if not tid or not (poses[i, :, 2] > 0).any():
                continue
            if self.smoothing is not None:
                f = self.filters.get(tid) or OneEuroFilter(self.smoothing)
                xy[i] = f(xy[i], t)
                filters[tid] = f
            previous[tid] = (xy[i].copy(), conf[i].copy())
        self.filters, self.previous = filters, previous
        return xy
