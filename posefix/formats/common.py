"""Shared by the formats: layouts, :class:`Estimates`, :class:`Format`, the checks every reader makes,
image files and ids. numpy only."""
from __future__ import annotations

import contextlib
import math
import numbers
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..fileio import read_json
from ..keypoints import KEYPOINT_BOUND, NAMES, NUM_KEYPOINTS, is_number


@dataclass(frozen=True)
class Layout:
    """A keypoint layout: its keypoint names in order and, for each of the 17 COCO joints (in
    ``posefix.keypoints.NAMES`` order), that joint's index in this layout."""

    name: str
    names: tuple[str, ...]
    coco_index: tuple[int, ...]

    def __post_init__(self):
        if len(self.coco_index) != NUM_KEYPOINTS or len(set(self.coco_index)) != NUM_KEYPOINTS:
            raise ValueError(f"layout {self.name}: coco_index must name 17 distinct keypoints")
        if not all(0 <= k < len(self.names) for k in self.coco_index):
            raise ValueError(f"layout {self.name}: coco_index out of range of its {len(self.names)} names")


COCO17 = Layout("coco17", NAMES, tuple(range(NUM_KEYPOINTS)))


def to_coco17(keypoints, layout: Layout) -> np.ndarray:
    """The COCO joints of keypoints in ``layout``: (..., Kf, C) → (..., 17, C), a new array."""
    keypoints = np.asarray(keypoints, dtype=np.float64)
    if keypoints.ndim < 2 or keypoints.shape[-2] != len(layout.names):
        raise ValueError(f"keypoints of shape {keypoints.shape} are not in layout {layout.name} "
                         f"({len(layout.names)} keypoints)")
    return keypoints[..., list(layout.coco_index), :].copy()


def from_coco17(refined, original, layout: Layout) -> np.ndarray:
    """``original`` (..., Kf, C) with its COCO joints replaced by ``refined`` (..., 17, C') (C' <= C: the
    first C' channels, e.g. x, y, score); its other keypoints and channels are kept as they were."""
    refined = np.asarray(refined, dtype=np.float64)
    out = np.array(original, dtype=np.float64, copy=True)
    if out.ndim < 2 or out.shape[-2] != len(layout.names):
        raise ValueError(f"original of shape {out.shape} is not in layout {layout.name} "
                         f"({len(layout.names)} keypoints)")
    c = refined.shape[-1]
    if refined.shape[:-2] != out.shape[:-2] or refined.shape[-2] != NUM_KEYPOINTS or c > out.shape[-1]:
        raise ValueError(f"refined of shape {refined.shape} does not fit original of shape {out.shape}")
    out[..., list(layout.coco_index), :c] = refined
    return out


@dataclass
class Estimates:
    """What an estimator's file held, as arrays, plus what is needed to write it back.

    image_keys: per person, its image key. keypoints (P, 17, 3): COCO-17 x, y in image pixels and the
    score (0 where absent). scores (P,): instance scores. native (P, Kf, C): the format's own keypoints as
    given, in the format's own channels and convention: COCO, PoseNet, OpenPose (x, y, score) pixels; MoveNet
    (y, x, score) normalised; BlazePose (x, y, z, visibility, presence) normalised, presence NaN where not
    given. PoseNet's are in COCO order whatever order the file listed them in, a missing part (0, 0, 0).
    records: per person, the file's JSON restricted to that person: the COCO result; the MoveNet SinglePose
    or BlazePose entry; the MoveNet MultiPose or PoseNet entry with only this person in ``people`` /
    ``poses``; the OpenPose file with only this person in ``people``. sizes (P, 2): the image (width,
    height) the normalised coordinates were scaled by; NaN for pixel formats. skipped: with
    ``skip_invalid``, the error message of each entry or person left out.
    """

    format: str
    layout: Layout
    image_keys: list
    keypoints: np.ndarray
    scores: np.ndarray
    native: np.ndarray
    records: list
    needs_image_size: bool
    sizes: np.ndarray | None = None
    skipped: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Format:
    """An estimator format, as :data:`posefix.formats.FORMATS` holds it.

    layout: its keypoint layout (OpenPose: BODY_25, or COCO-18 where the files hold 18 keypoints).
    normalised: its coordinates are fractions of the image, so each image's size is needed. key_field: the
    field of a result written back that holds the person's image key. coco_results: its records are COCO
    results, written back as themselves with ``keypoints`` and ``score`` replaced. read(path, reader,
    image_sizes) → :class:`Estimates`. write(est, i, refined (17, 3)): person i's keypoints in the format's
    JSON form with the refined COCO joints written in. fields(record): the other fields of a person and its
    entry, kept beside them (None where coco_results).
    """

    name: str
    layout: Layout
    normalised: bool
    key_field: str
    coco_results: bool
    read: Callable[[str | Path, _Reader, dict | None], Estimates]
    write: Callable[[Estimates, int, np.ndarray], object]
    fields: Callable[[dict], dict] | None = None


def _finite(x) -> bool:
    """A JSON number within ±KEYPOINT_BOUND (no coordinate, score or image size is larger; bounding them keeps
    every product and mean finite), an integer beyond float64 included."""
    return is_number(x, KEYPOINT_BOUND)


def _kind(x) -> str:
    return "null" if x is None else type(x).__name__


def _numbers(value, counts: tuple[int, ...], field_: str, source: str, what: str) -> list[float]:
    """A list of finite numbers, as many as one of ``counts``, else an InputError naming the field."""
    if not isinstance(value, list) or len(value) not in counts:
        got = f"{len(value)} numbers" if isinstance(value, list) else _kind(value)
        n = " or ".join(str(c) for c in counts)
        raise InputError(field_, f"must be a list of {n} numbers ({what}), got {got}", source)
    for i, x in enumerate(value):
        if not _finite(x):
            raise InputError(field_, f"element {i} is {x!r}, not a finite number (within ±1e9)", source)
    return [float(x) for x in value]


def _json_clean(value, field_: str, source: str, skip: tuple[str, ...] = ()) -> None:
    """Every number in a kept JSON value is finite (results are written as strict JSON); ``skip`` names
    top-level keys already checked or not kept."""
    if isinstance(value, float) and not math.isfinite(value):
        raise InputError(field_, f"is {value!r}; NaN and infinities cannot be kept in JSON results", source)
    if isinstance(value, dict):
        for k, v in value.items():
            if k not in skip:
                _json_clean(v, f"{field_}.{k}", source)
    elif isinstance(value, list):
        for k, v in enumerate(value):
            _json_clean(v, f"{field_}[{k}]", source)


def _score(x: float, field_: str, source: str, upper: float | None = None) -> float:
    if x < 0 or (upper is not None and x > upper):
        bound = f"in [0, {upper:g}]" if upper is not None else ">= 0"
        raise InputError(field_, f"score {x!r} must be {bound}", source)
    return x


def _mean_present(scores) -> float:
    present = scores[scores > 0]
    return float(present.mean()) if present.size else 0.0


class _Reader:
    """Collects persons; a unit (an entry, a file or a person) that raises InputError is skipped with its
    message when ``skip`` is set."""

    def __init__(self, fmt: Format, skip: bool):
        self.fmt, self.skip = fmt, skip
        self.keys, self.native, self.pixels, self.scores, self.records, self.sizes = [], [], [], [], [], []
        self.skipped: list[str] = []

    @contextlib.contextmanager
    def unit(self):
        try:
            yield
        except InputError as e:
            if not self.skip or getattr(e, "fatal", False):
                raise
            self.skipped.append(str(e))

    def read_entries(self, path, one) -> None:
        """Read a file of per-image entries (a JSON list of objects, each naming its ``image``): call
        ``one(f, entry, key, source)`` for each, with f the entry's field name (``entries[i]``), each entry
        one unit."""
        source = str(path)
        for i, entry in enumerate(_entries(read_json(path, "entries"), source, self.fmt.name)):
            f = f"entries[{i}]"
            with self.unit():
                entry = _entry(entry, f, source)
                one(f, entry, _image_key(entry, f, source), source)

    def add(self, key, native, pixels, score, record, size=(math.nan, math.nan)):
        self.keys.append(key)
        self.native.append(np.asarray(native, dtype=np.float64))
        self.pixels.append(np.asarray(pixels, dtype=np.float64))
        self.scores.append(score)
        self.records.append(record)
        self.sizes.append(size)

    def result(self, layout: Layout, channels: int) -> Estimates:
        p = len(self.keys)
        kf = len(layout.names)
        pixels = np.stack(self.pixels) if p else np.zeros((0, kf, 3))
        native = np.stack(self.native) if p else np.zeros((0, kf, channels))
        sizes = np.asarray(self.sizes, dtype=np.float64).reshape(p, 2)
        return Estimates(self.fmt.name, layout, self.keys, to_coco17(pixels, layout),
                         np.asarray(self.scores, dtype=np.float64).reshape(p), native, self.records,
                         self.fmt.normalised, sizes, self.skipped)


def _entries(doc, source: str, fmt: str) -> list:
    if not isinstance(doc, list):
        raise InputError("entries", f"must be a JSON list of {fmt} entries, got {_kind(doc)}", source)
    return doc


def _entry(entry, f: str, source: str) -> dict:
    if not isinstance(entry, dict):
        raise InputError(f, f"must be an object, got {_kind(entry)}", source)
    return entry


def _image_key(entry: dict, f: str, source: str):
    key = entry.get("image")
    if isinstance(key, bool) or not (isinstance(key, int) or (isinstance(key, str) and key)):
        raise InputError(f"{f}.image", f"missing or not a file name or an integer image id, got {key!r}", source)
    return key


def _image_size(key, entry: dict, f: str, source: str, image_sizes: dict | None) -> tuple[float, float]:
    """(width, height) of an entry's image, from image_sizes or the entry's "width" and "height"."""
    given = None
    if image_sizes is not None and key in image_sizes:
        size = image_sizes[key]
        if isinstance(size, InputError):  # the image's file was refused (e.g. a name leading out of --images)
            raise InputError(f"{f}.image", f"{size.source}: {size.problem}", source)
        if not (isinstance(size, (tuple, list, np.ndarray)) and len(size) == 2 and all(
                isinstance(s, numbers.Real) and _finite(float(s)) and s > 0 for s in size)):
            raise InputError(f"image_sizes[{key!r}]", f"must be (width, height) > 0, got {size!r}")
        given = (float(size[0]), float(size[1]))
    if "width" in entry or "height" in entry:
        own = []
        for name in ("width", "height"):
            v = entry.get(name)
            if not (_finite(v) and v > 0):
                raise InputError(f"{f}.{name}", f"must be a positive number of pixels, got {v!r}", source)
            own.append(float(v))
        if given is not None and (abs(given[0] - own[0]) > 1e-6 or abs(given[1] - own[1]) > 1e-6):
            raise InputError(f"{f}.width", f"the entry's size {tuple(own)} disagrees with image_sizes[{key!r}] "
                             f"= {given}", source)
        given = (own[0], own[1])
    if given is None:
        raise InputError(f"{f}.image", f"no size for image {key!r}: coordinates are fractions of the image, so "
                         f"give image_sizes[{key!r}] = (width, height) or the entry's \"width\" and \"height\"",
                         source)
    return given


def _joints(est: Estimates, i: int, refined):
    """(COCO joint j, its index in the layout, x, y, score) of each of person i's refined joints (17, 3) (x, y
    in pixels), x and y normalised again where the format's are."""
    w, h = est.sizes[i] if est.needs_image_size else (1.0, 1.0)
    refined = np.asarray(refined, dtype=np.float64)
    for j, k in enumerate(est.layout.coco_index):
        yield j, k, float(refined[j, 0]) / w, float(refined[j, 1]) / h, float(refined[j, 2])


# Image files and ids.

_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
_KNOWN_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def _coco_file_name(coco_images: dict | None, image_id: int) -> str | None:
    if not coco_images or image_id not in coco_images:
        return None
    im = coco_images[image_id]
    name = im.get("file_name") if isinstance(im, dict) else im
    return name if isinstance(name, str) and name else None


OUTSIDE_HINT = "pass --allow-outside-images to read it"


def image_under(images_dir: str | Path, name, allow_outside: bool = False) -> Path:
    """``images_dir / name``, an image file's path; whether it exists is not checked. Unless ``allow_outside``,
    a name that leads out of ``images_dir`` (an absolute path, ``..``, a symbolic link out, all resolved) is an
    InputError naming it."""
    path = Path(images_dir) / name
    if allow_outside:
        return path
    try:
        inside = path.resolve().is_relative_to(Path(images_dir).resolve())
    except (OSError, ValueError, RuntimeError):  # a NUL byte, a symbolic link loop
        raise InputError("image", "not a usable file name", repr(str(name))) from None
    if not inside:
        raise InputError("image", f"leads outside the image directory {images_dir} ({OUTSIDE_HINT})",
                         repr(str(name)))
    return path


def image_file(images_dir: str | Path, key, coco_images: dict | None = None, allow_outside: bool = False) -> Path:
    """The image file of an image key under ``images_dir``; whether it exists is not checked.

    An integer key is a COCO image_id: its ``file_name`` in ``coco_images`` ({image_id: COCO image dict or
    file name}) when there, else COCO's ``%012d.jpg``. A string key is a file name when it ends in an image
    suffix (``.jpg``, ``.png``...), else a stem (OpenPose): the first of ``<stem>.jpg``, ``.jpeg``, ``.png``
    that exists, else ``<stem>.jpg``. A name leading out of ``images_dir`` (``..``, an absolute path, a
    symbolic link out) is an InputError naming it, unless ``allow_outside``
    (:func:`image_under`).
    """
    def under(name):
        return image_under(images_dir, name, allow_outside)

    if isinstance(key, int) and not isinstance(key, bool):
        return under(_coco_file_name(coco_images, key) or f"{key:012d}.jpg")
    key = str(key)
    if Path(key).suffix.lower() in _KNOWN_SUFFIXES:
        return under(key)
    for suffix in _IMAGE_SUFFIXES:
        candidate = under(key + suffix)
        if candidate.is_file():
            return candidate
    return under(key + _IMAGE_SUFFIXES[0])


def frame_index(key, field: str) -> int:
    """A pose file's image key as a frame index: an integer, or the number a name ends with
    (OpenPose's ``<video>_000000000012``)."""
    if isinstance(key, int) and not isinstance(key, bool):
        if key < 0:
            raise InputError(field, f"frame index {key} is negative")
        return key
    match = re.search(r"(\d+)$", Path(str(key)).stem)
    if not match:
        raise InputError(field, f"{key!r} names no frame (expected a frame index)")
    return int(match.group(1))


def image_ids(est: Estimates, coco_images: dict | None = None) -> np.ndarray:
    """A COCO image_id per person (P,) int64: an integer image key is the id; a file key is the id of the
    ``coco_images`` entry ({image_id: COCO image dict or file name}) whose file name, or its stem, is the key
    (an InputError if none is), or without ``coco_images`` the number a COCO-style name carries
    (``000000000785.jpg`` → 785), the other file keys numbered in order of first appearance after the
    largest id."""
    by_name: dict[str, int] = {}
    for image_id in coco_images or {}:
        name = _coco_file_name(coco_images, image_id)
        if name:
            by_name.setdefault(name, image_id)
            by_name.setdefault(Path(name).stem, image_id)
    ints = [k for k in est.image_keys if isinstance(k, int) and not isinstance(k, bool)]
    ints += [int(Path(k).stem) for k in est.image_keys if isinstance(k, str) and Path(k).stem.isdigit()]
    next_id = max(ints, default=0) + 1
    numbered: dict[str, int] = {}
    out = np.zeros(len(est.image_keys), dtype=np.int64)
    for i, key in enumerate(est.image_keys):
        if isinstance(key, int) and not isinstance(key, bool):
            out[i] = key
        elif coco_images is not None:
            if key not in by_name and Path(key).stem not in by_name:
                raise InputError("image", f"{key!r} is not a file name in the COCO images")
            out[i] = by_name.get(key, by_name.get(Path(key).stem))
        elif Path(key).stem.isdigit():
            out[i] = int(Path(key).stem)
        else:
            if key not in numbered:
                numbered[key], next_id = next_id, next_id + 1
            out[i] = numbered[key]
    return out
