"""Temporal refinement of any estimator's per-frame poses: tracking, trajectory errors corrected, gaps filled,
smoothing in units of the person's size; offline (non-causal, for files) or causal (live streams).

The Python API::

    from posefix.temporal import make_smoother, refine_poses
    r = refine_poses(keypoints, make_smoother("body"), video=video, frame=frame, track=track, causal=False)

``keypoints`` (P, 17, 3) x, y in pixels and score (0: joint not reported); ``video``, ``frame``, ``track``
(P,) integers (track 0: no id; such persons are associated into tracks). The result
(:class:`posefix.temporal.pipeline.PoseRefinement`) gives each person's refined joints, its track id, which
joints were filled in or corrected, and the persons filled in where a track missed a few frames.

Per track the arrays are xy float64 (T, 17, 2) pixels, score (T, 17), present bool (T, 17) and scale (T,):
the person's size in pixels, the running median over 15 frames of sqrt(area of the box around its present
joints) (:func:`posefix.temporal.core.person_scale`). Smoothers (:mod:`posefix.temporal.smoothers`) are
registered by name in :data:`SMOOTHERS` (:mod:`posefix.temporal.registry`) as factories
``make(**options) -> smoother``; ``posefix refine-video --smoother NAME --temporal-weights FILE`` makes one
with ``weights=FILE``.
"""
from .core import HISTORY, TemporalOptions, TrackRefinement, correct, fill_gaps, person_scale, refine_tracks
from .pipeline import PoseRefinement, associate, refine_poses
from .registry import DEFAULT_SMOOTHER, SMOOTHERS, make_smoother

__all__ = ["DEFAULT_SMOOTHER", "HISTORY", "SMOOTHERS", "PoseRefinement", "TemporalOptions", "TrackRefinement",
           "associate", "correct", "fill_gaps", "make_smoother", "person_scale", "refine_poses", "refine_tracks"]
