"""What a RefinePoseStream carries from frame to frame (:class:`VideoState`): its options, validated, its
clock, its tracks (:class:`posefix.tracking.Tracks`, shared with ``posefix refine-video``) and its temporal
refinement (:class:`posefix.temporal.stream.TemporalStream`, what ``posefix refine-video --causal`` gives).

Glossary: P persons of a frame, K = 17 COCO joints; times in seconds; track id 0 = untracked.
"""
from __future__ import annotations

from fractions import Fraction

from .._proto import pb2
from ..errors import InputError
from ..temporal import DEFAULT_SMOOTHER, TemporalOptions, make_smoother
from ..temporal.stream import TemporalStream
from ..tracking import OneEuroParams, Tracks

FRAME_RATE_HZ = (1e-3, 1e6)  # StreamOptions.frame_rate_hz's range


class VideoState:
    """What a RefinePoseStream carries from frame to frame: its clock and ``tracks``, the
    :class:`posefix.tracking.Tracks` of ``posefix refine-video`` (previous refined pose for follow_tracks: the
    poses to refine and to crop around; One-Euro smoothing)."""

    def __init__(self, options: pb2.StreamOptions | None, temporal_by_default: bool = False, learned=None):
        options = options or pb2.StreamOptions()
        self.frame_rate = options.frame_rate_hz if options.HasField("frame_rate_hz") else 30.0
        lo, hi = FRAME_RATE_HZ
        if not lo <= self.frame_rate <= hi:  # NaN included
            raise InputError("options.frame_rate_hz", f"must be in [{lo:g}, {hi:g}] Hz, got {self.frame_rate}")
        smoothing = None
        if options.HasField("smoothing"):
            s, d = options.smoothing, OneEuroParams()
            try:
                smoothing = OneEuroParams(*(getattr(s, n) if s.HasField(n) else getattr(d, n)
                                            for n in ("min_cutoff_hz", "beta", "d_cutoff_hz")))
            except InputError as e:
                raise InputError(f"options.{e.field}", e.problem) from None
        self.tracks = Tracks(options.follow_tracks, smoothing)
        self.temporal = None  # posefix.temporal's causal refinement, where asked for (or the server has no refiner)
        if options.HasField("temporal") or temporal_by_default:
            self.temporal = temporal_stream(options.temporal, learned)
        self.period = Fraction(1 / self.frame_rate)
        self.t: Fraction | None = None  # the previous frame's time, seconds, exact

    def clock(self, timestamp_us: int) -> Fraction:
        """The frame's time in seconds, exact (a Fraction, so that 1 µs steps stay steps at any timestamp):
        its timestamp, or one frame period after the previous frame."""
        if timestamp_us == 0:
            t = Fraction(0) if self.t is None else self.t + self.period
        else:
            t = Fraction(timestamp_us, 1_000_000)
            if self.t is not None and t <= self.t:
                raise InputError("timestamp_us", f"{timestamp_us} does not increase on the previous frame's "
                                 f"{round(self.t * 1_000_000)}")
        self.t = t
        return t

    @staticmethod
    def track_ids(persons) -> list[int]:
        return Tracks.check_ids([p.track_id for p in persons])


def temporal_stream(t: pb2.TemporalOptions, learned=None):
    """The :class:`posefix.temporal.stream.TemporalStream` of StreamOptions.temporal; bad values are InputErrors
    naming their field. ``learned``: the server's learned smoother (``posefix serve --temporal-weights``), or
    None."""
    name = t.smoother or DEFAULT_SMOOTHER
    try:
        options = TemporalOptions(max_gap=t.max_gap if t.HasField("max_gap") else TemporalOptions.max_gap)
    except InputError as e:
        raise InputError("options.temporal." + e.field.split(".")[-1], e.problem) from None
    if name == "learned":
        if learned is None:
            raise InputError("options.temporal.smoother", "learned needs a server started with --temporal-weights")
        return TemporalStream(learned, options)
    try:
        smoother = make_smoother(name)
    except InputError as e:
        raise InputError("options.temporal.smoother", e.problem) from None
    return TemporalStream(smoother, options)
