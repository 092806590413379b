"""Temporal refinement of an estimator's output file, as ``posefix refine-video`` does it.

Frames: without annotations, each entry's image key is the frame index of one video (an integer, or a name
ending in one, as :func:`posefix.formats.frame_index` reads it). With annotations (a COCO-style JSON whose
``images`` carry ``id``, ``vid_id`` and ``frame_id``, as PoseTrack's do; many videos in one file), each
entry's ``image_id`` is one of those images.

Output: COCO keypoint results, one per input person in input order (COCO input: the input record with
``keypoints`` and ``score`` replaced; other formats: as :func:`posefix.formats.write_coco_results` writes them,
with the format's own keypoints in ``source_keypoints``), each with

- ``track_id``: the estimator's id where it gave one, else the id association gave (ids count up from one
  above the largest id given in its video);
- ``keypoint_temporal``: 17 × one of ``"smoothed"`` (reported, refined over time), ``"corrected"`` (reported,
  but a trajectory error: swapped back from a left/right or neighbour swap, or replaced as a spike),
  ``"filled"`` (not reported: filled in from the trajectory), ``"absent"`` (not reported and not filled,
  kept as given).

Offline, persons that a track missed for at most ``max_person_gap`` frames follow, filled in: ``{"image_id",
"category_id": 1, "keypoints", "score", "track_id", "keypoint_temporal", "filled_person": true}`` (their
``image_id``: the frame's image in the annotations, else the frame index).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..fileio import read_json, write_json_atomic
from ..formats import Estimates, frame_index, load_estimates, write_coco_results
from .core import TemporalOptions
from .pipeline import PoseRefinement, refine_poses
from .registry import make_smoother


@dataclass
class VideoPoseFile:
    """An estimator's file over frames: ``est`` and per person its video, frame index and track (0 = none);
    ``image_of`` maps (video, frame) to the image_id results carry (None: the frame index)."""

    est: Estimates
    video: np.ndarray
    frame: np.ndarray
    track: np.ndarray
    image_of: dict | None


def read_annotations(path) -> dict[int, dict]:
    """{image id: image} of a COCO-style file whose images carry ``vid_id`` and ``frame_id``."""
    doc = read_json(path, "annotations")
    images = doc.get("images") if isinstance(doc, dict) else None
    if not isinstance(images, list):
        raise InputError("annotations.images", "must be a list of images", str(path))
    out = {}
    for i, im in enumerate(images):
        if not isinstance(im, dict):
            raise InputError(f"annotations.images[{i}]", "must be an object", str(path))
        for name in ("id", "vid_id", "frame_id"):
            v = im.get(name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise InputError(f"annotations.images[{i}].{name}", f"must be a non-negative integer, got {v!r}",
                                 str(path))
        out[im["id"]] = im
    return out


def _tracks(est: Estimates) -> np.ndarray:
    track = np.zeros(len(est.records), dtype=np.int64)
    for i, record in enumerate(est.records):
        tid = record.get("track_id", 0) if isinstance(record, dict) else 0
        if tid is None:
            tid = 0
        if not isinstance(tid, int) or isinstance(tid, bool) or tid < 0:
            raise InputError(f"poses[{i}].track_id", f"must be a non-negative integer, got {tid!r}")
        track[i] = tid
    return track


def read_video_poses(path, fmt: str = "coco", annotations=None, size: tuple[int, int] | None = None) -> VideoPoseFile:
    """Read an estimator's per-frame output (module docstring); ``annotations``: a path or None; ``size``: every
    frame's (width, height), for the formats with normalised coordinates."""
    if annotations is None:
        est = load_estimates(path, fmt, size=size)
        frame = np.array([frame_index(k, f"poses[{i}].image") for i, k in enumerate(est.image_keys)], dtype=np.int64)
        return VideoPoseFile(est, np.zeros(len(frame), dtype=np.int64), frame, _tracks(est), None)
    images = read_annotations(annotations)
    est = load_estimates(path, fmt, coco_images=images, size=size)
    video = np.zeros(len(est.records), dtype=np.int64)
    frame = np.zeros(len(est.records), dtype=np.int64)
    for i, key in enumerate(est.image_keys):
        if not isinstance(key, int) or isinstance(key, bool) or key not in images:
            raise InputError(f"poses[{i}].image_id", f"{key!r} is not an image of the annotations")
        video[i], frame[i] = images[key]["vid_id"], images[key]["frame_id"]
    image_of = {(im["vid_id"], im["frame_id"]): im["id"] for im in images.values()}
    return VideoPoseFile(est, video, frame, _tracks(est), image_of)


def refine_file(poses: VideoPoseFile, smoother, causal: bool = False, options: TemporalOptions | None = None,
                keypoints: np.ndarray | None = None) -> PoseRefinement:
    """The temporal refinement of a file's persons (``keypoints`` (P, 17, 3): instead of the file's own, e.g.
    the image refiner's output)."""
    kp = poses.est.keypoints if keypoints is None else keypoints
    return refine_poses(kp, smoother, video=poses.video, frame=poses.frame, track=poses.track, causal=causal,
                        options=options)


def _labels(filled, corrected, present):
    out = np.full(filled.shape, "absent", dtype=object)
    out[present] = "smoothed"
    out[corrected] = "corrected"
    out[filled] = "filled"
    return out


def refined_results(poses: VideoPoseFile, r: PoseRefinement, instance_scores=None,
                    given: np.ndarray | None = None) -> list[dict]:
    """The output results (module docstring). ``given``: the keypoints refined (default the file's)."""
    est = poses.est
    given = est.keypoints if given is None else given
    inst = est.scores if instance_scores is None else instance_scores
    if poses.image_of is None:
        ids = poses.frame
    else:
        ids = np.array(est.image_keys, dtype=np.int64) if len(est.image_keys) else np.zeros(0, np.int64)
    results = write_coco_results(est, r.xy, r.score, inst, ids)
    labels = _labels(r.filled, r.corrected, given[..., 2] > 0)
    for i, res in enumerate(results):
        res["track_id"] = int(r.track[i])
        res["keypoint_temporal"] = labels[i].tolist()
    for v, f, t, xy, sc in zip(r.added_video, r.added_frame, r.added_track, r.added_xy, r.added_score):
        if poses.image_of is None:
            image_id = int(f)
        elif (int(v), int(f)) in poses.image_of:
            image_id = poses.image_of[(int(v), int(f))]
        else:
            continue  # a frame the annotations do not list
        kp = np.concatenate([xy, sc[:, None]], -1)
        results.append({"image_id": image_id, "category_id": 1, "keypoints": kp.reshape(-1).tolist(),
                        "score": float(sc[sc > 0].mean()) if (sc > 0).any() else 0.0, "track_id": int(t),
                        "keypoint_temporal": ["filled" if s > 0 else "absent" for s in sc.tolist()],
                        "filled_person": True})
    return results


def temporal_setup(smoother: str, weights=None, max_gap: int = 5, max_person_gap: int = 0,
                   person_gate: float = 0.0, lost_score: float = 0.3, causal: bool = False):
    """The smoother and options asked for (:class:`TemporalOptions`' fields of the same names), with errors
    naming the arguments (``max_gap``, ``person_gate``, ``temporal_weights``); the lost-frame gate
    (``person_gate``) is offline only."""
    if causal and person_gate:
        raise InputError("person_gate", "works offline only, not causal")
    try:
        options = TemporalOptions(max_gap=max_gap, max_person_gap=max_person_gap, person_gate=person_gate,
                                  lost_score=lost_score)
    except InputError as e:
        raise InputError(e.field.split(".")[-1], e.problem) from None
    if weights is not None and not Path(weights).is_file():
        raise InputError("temporal_weights", "file not found", str(weights))
    return make_smoother(smoother, weights=weights), options


def parse_size(text: str | None, field: str = "frame_size") -> tuple[int, int] | None:
    """"WxH" → (W, H) positive integers; None stays None."""
    if text is None:
        return None
    parts = str(text).lower().split("x")
    try:
        w, h = (int(v) for v in parts)
    except ValueError:
        raise InputError(field, f"must be WIDTHxHEIGHT in pixels, e.g. 640x480, got {text!r}") from None
    if w < 1 or h < 1:
        raise InputError(field, f"must be positive, got {text!r}")
    return w, h


def refine_video_file(path, out, fmt: str = "coco", annotations=None, causal: bool = False,
                      smoother: str = "body", weights=None, max_gap: int = 5, max_person_gap: int = 0,
                      frame_size: str | None = None, person_gate: float = 0.0, lost_score: float = 0.3) -> dict:
    """``posefix refine-video`` without a video: read, refine over time, write ``out`` atomically. Returns
    counts: persons, tracks, videos, filled and corrected joints, filled persons. ``frame_size`` "WxH": every
    frame's size, for formats with normalised coordinates (without annotations that give it); ``person_gate``
    and ``lost_score``: the lost-frame gate (:class:`TemporalOptions`; offline only)."""
    sm, options = temporal_setup(smoother, weights, max_gap, max_person_gap, person_gate, lost_score, causal)
    poses = read_video_poses(path, fmt, annotations, parse_size(frame_size))
    r = refine_file(poses, sm, causal, options)
    results = refined_results(poses, r)
    write_json_atomic(out, results)
    return {"persons": len(poses.frame), "tracks": len(set(zip(poses.video.tolist(), r.track.tolist()))),
            "videos": len(set(poses.video.tolist())), "filled": int(r.filled.sum()),
            "corrected": int(r.corrected.sum()), "filled_persons": len(results) - len(poses.frame)}
