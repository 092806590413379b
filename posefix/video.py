"""Refining an estimator's poses on a video file, and drawing them onto a video.

Frames are decoded by PyAV (FFmpeg, bundled in its wheels) one at a time — never the whole video in
memory — and the persons of consecutive frames are refined together, as ``posefix refine`` does for the
images of a dataset. ``follow`` and ``smooth`` are the same code the service's RefinePoseStream uses
(:mod:`posefix.tracking`); with ``follow`` each frame waits for the previous one's refined poses.

Glossary: F frames, P persons of a frame, K = 17 COCO joints; poses (P, K, 3) = x, y in pixels, score;
frame indices are 0-based, in decoding order; times in seconds.
"""
from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from .choice import finish
from .errors import InputError
from .fileio import atomic_path, write_json_atomic
from .formats import Estimates, frame_index, load_estimates, write_coco_results
from .keypoints import NUM_KEYPOINTS
from .options import RefineOptions
from .refine import refine_images
from .refiner import Refiner
from .temporal.files import VideoPoseFile, refine_file, refined_results, temporal_setup
from .tracking import OneEuroParams, Tracks
from .viz import INPUT_COLOUR, REFINED_COLOUR, draw_poses


@dataclass(frozen=True)
class VideoInfo:
    frames: int  # as the container declares it; 0 when it does not say
    fps: float
    width: int
    height: int


def _open(path):
    import av

    path = Path(path)
    if not path.is_file():
        raise InputError("video", "file not found", str(path))
    try:
        container = av.open(str(path))
    except (av.FFmpegError, OSError, ValueError) as e:
        raise InputError("video", f"cannot open: {e}", str(path)) from None
    if not container.streams.video:
        container.close()
        raise InputError("video", "has no video stream", str(path))
    return container


def probe(path) -> VideoInfo:
    with _open(path) as container:
        s = container.streams.video[0]
        fps = float(s.average_rate or s.guessed_rate or 0) or 30.0
        return VideoInfo(int(s.frames or 0), fps, s.codec_context.width, s.codec_context.height)


def frames(path) -> Iterator[tuple[int, float, torch.Tensor]]:
    """Decode a video: (index, time in seconds, (3, H, W) uint8 RGB) per frame, one at a time. A
    corrupt stream, or one with fewer frames than its container declares, is an InputError."""
    import av

    info = probe(path)
    count = 0
    with _open(path) as container:
        stream = container.streams.video[0]
        try:
            for frame in container.decode(stream):
                t = float(frame.time) if frame.time is not None else count / info.fps
                yield count, t, torch.from_numpy(frame.to_ndarray(format="rgb24")).permute(2, 0, 1)
                count += 1
        except (av.FFmpegError, ValueError) as e:
            raise InputError("video", f"cannot decode frame {count}: {e}", str(path)) from None
    if info.frames and count < info.frames:
        raise InputError("video", f"truncated: decoded {count} of the {info.frames} frames it declares", str(path))


@dataclass
class VideoPoses:
    """The poses of a video, by frame: ``rows[f]`` the indices into ``est`` of frame f's persons."""

    est: Estimates
    frame: np.ndarray  # (N,) frame index of each person
    track: np.ndarray  # (N,) track id, 0 = untracked
    rows: dict


def load_poses(path, fmt: str = "coco", size: tuple[int, int] | None = None) -> VideoPoses:
    """Per-frame poses: COCO results with ``image_id`` = frame index (and an optional ``track_id``),
    or any supported estimator format keyed by frame; ``size``: the frames' (width, height), for the
    formats with normalised coordinates."""
    est = load_estimates(path, fmt, size=size)
    frame = np.array([frame_index(k, f"poses[{i}].image") for i, k in enumerate(est.image_keys)], dtype=np.int64)
    track = np.zeros(len(frame), dtype=np.int64)
    for i, record in enumerate(est.records):
        tid = record.get("track_id", 0) if isinstance(record, dict) else 0
        if not isinstance(tid, int) or isinstance(tid, bool) or tid < 0:
            raise InputError(f"poses[{i}].track_id", f"must be a non-negative integer, got {tid!r}")
        track[i] = tid
    rows: dict[int, list[int]] = {}
    for i, f in enumerate(frame):
        rows.setdefault(int(f), []).append(i)
    for f, members in rows.items():
        Tracks.check_ids([int(track[i]) for i in members], field=f"frame {f} persons")
    return VideoPoses(est, frame, track, rows)


def refine_video(refiner: Refiner, video, poses: VideoPoses, follow: bool = False,
                 smoothing: OneEuroParams | None = None, progress=None, on_frame=None):
    """Refine every frame's persons. Returns xy (N, K, 2), confidence (N, K) in the order of
    ``poses.est`` and the number of frames decoded. ``on_frame(index, frame, rows, xy, conf)`` sees each
    frame once its persons are refined (for drawing); ``progress(1)`` is called per frame."""
    n = len(poses.frame)
    xy = np.zeros((n, NUM_KEYPOINTS, 2))
    conf = np.zeros((n, NUM_KEYPOINTS))
    given = poses.est.keypoints
    decoded = 0
    if follow or smoothing is not None:
        tracks = Tracks(follow, smoothing)
        for index, t, image in frames(video):
            decoded += 1
            rows = poses.rows.get(index, [])
            ids = [int(poses.track[i]) for i in rows]
            inp, crop = tracks.follow_inputs(ids, given[rows]) if rows else (given[rows], None)
            if rows:
                fx, fc = refiner.refine([image], np.zeros(len(rows), dtype=np.int64), inp, crop_poses=crop)
                xy[rows], conf[rows] = tracks.update(ids, inp, fx, fc, t), fc
            if on_frame:
                on_frame(index, image, rows, xy[rows], conf[rows])
            if progress:
                progress(1)
    else:
        held: dict[int, torch.Tensor] = {}

        def jobs():
            for index, _, image in frames(video):
                if on_frame:
                    held[index] = image
                yield index, image, given[poses.rows.get(index, [])]

        for index, fx, fc in refine_images(refiner, jobs(), workers=1):
            decoded += 1
            rows = poses.rows.get(index, [])
            xy[rows], conf[rows] = fx, fc
            if on_frame:
                on_frame(index, held.pop(index), rows, fx, fc)
            if progress:
                progress(1)
    beyond = sorted(f for f in poses.rows if f >= decoded)
    if beyond:
        raise InputError("poses", f"poses for frame {beyond[0]}, but the video has {decoded} frames (0..{decoded - 1})")
    return xy, conf, decoded


class VideoWriter:
    """An H.264 (or MPEG-4) video written atomically: frames go to a temporary file that replaces
    ``path`` when closed without error. Odd frame sizes are padded by a pixel (the codecs need even)."""

    def __init__(self, path, fps: float, width: int, height: int):
        import av

        self._ctx = atomic_path(path)
        self._tmp = self._ctx.__enter__()
        self.container = av.open(str(self._tmp), mode="w", format="mp4")
        try:
            self.stream = self.container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        except (av.FFmpegError, ValueError):
            self.stream = self.container.add_stream("mpeg4", rate=Fraction(fps).limit_denominator(1001))
        self.stream.width, self.stream.height = width + width % 2, height + height % 2
        self.stream.pix_fmt = "yuv420p"

    def write(self, image: torch.Tensor) -> None:
        import av

        h, w = image.shape[1:]
        if (w, h) != (self.stream.width, self.stream.height):
            padded = torch.zeros((3, self.stream.height, self.stream.width), dtype=torch.uint8)
            padded[:, :h, :w] = image
            image = padded
        frame = av.VideoFrame.from_ndarray(image.permute(1, 2, 0).contiguous().numpy(), format="rgb24")
        for packet in self.stream.encode(frame):
            self.container.mux(packet)

    def close(self, error: BaseException | None = None) -> None:
        try:
            if error is None:
                for packet in self.stream.encode():
                    self.container.mux(packet)
        finally:
            self.container.close()
            if error is None:
                self._ctx.__exit__(None, None, None)
            else:
                self._ctx.__exit__(type(error), error, error.__traceback__)


def draw_frame(image: torch.Tensor, given: np.ndarray, refined: np.ndarray) -> torch.Tensor:
    """A frame with the input poses (orange) and the refined ones (cyan) drawn over it."""
    return draw_poses(draw_poses(image, given, INPUT_COLOUR), refined, REFINED_COLOUR)


def refine_video_frames(checkpoint, video, input, out, options: RefineOptions | None = None, *, fmt: str = "coco",
                        follow: bool = False, smoothing: OneEuroParams | None = None, render=None,
                        temporal: dict | None = None, start=None, progress=None) -> dict:
    """``posefix refine-video --video``: refine the per-frame poses of ``input`` (format ``fmt``, keyed by
    frame) on the frames of ``video`` with the weights ``checkpoint``, run as ``options`` say
    (:func:`refine_video`: ``follow``, ``smoothing``), then the policy (:func:`posefix.choice.finish`), and
    write COCO results to ``out``; ``render``: also write the video with the input and refined poses drawn.
    ``temporal``: then refine the result over time (:func:`posefix.temporal.files.refine_file`; its keys
    ``smoother``, ``weights``, ``max_gap``, ``max_person_gap``, ``causal``, and optionally ``person_gate`` and
    ``lost_score``). ``start(frames)`` is called with the video's frame count (None where unknown),
    ``progress(n)`` as frames are done. Returns counts: persons, frames, seconds, keeps_every_input."""
    info = probe(video)
    poses = load_poses(input, fmt, (info.width, info.height))
    refiner = Refiner.from_checkpoint(checkpoint, options)
    writer = VideoWriter(render, info.fps, info.width, info.height) if render else None
    given = poses.est.keypoints

    def draw(index, image, rows, xy, conf):
        refined = np.concatenate([xy, conf[..., None]], axis=-1)
        writer.write(draw_frame(image, given[rows], refined))

    if start is not None:
        start(info.frames or None)
    t0 = time.perf_counter()
    try:
        xy, conf, decoded = refine_video(refiner, video, poses, follow, smoothing, progress, draw if writer else None)
    except BaseException as e:
        if writer:
            writer.close(e)
        raise
    if writer:
        writer.close()
    elapsed = time.perf_counter() - t0
    xy, conf, kept, scores = finish(given, poses.est.scores, xy, conf, refiner.output)
    results = write_coco_results(poses.est, xy, conf, scores, poses.frame, kept)
    if temporal is not None:
        sm, t_options = temporal_setup(temporal["smoother"], temporal["weights"], temporal["max_gap"],
                                       temporal["max_person_gap"], temporal.get("person_gate", 0.0),
                                       temporal.get("lost_score", 0.3), temporal["causal"])
        pf = VideoPoseFile(poses.est, np.zeros(len(poses.frame), dtype=np.int64), poses.frame, poses.track, None)
        refined = np.concatenate([xy, conf[..., None]], -1)
        r = refine_file(pf, sm, temporal["causal"], t_options, keypoints=refined)
        over_time = refined_results(pf, r, scores, given=refined)
        for res, tmp in zip(results, over_time):
            res.update(keypoints=tmp["keypoints"], track_id=tmp["track_id"], keypoint_temporal=tmp["keypoint_temporal"])
        results += over_time[len(results):]
    write_json_atomic(out, results)
    return {"persons": len(poses.frame), "frames": decoded, "seconds": elapsed,
            "keeps_every_input": refiner.keeps_every_input}
