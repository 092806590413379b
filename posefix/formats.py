"""Estimator output formats: reading them onto COCO-17 for the refiner, and writing refined poses back.

posefix refines COCO-17 poses in image pixels. This module reads what the estimators its users run write
(COCO results, MoveNet, BlazePose / MediaPipe Pose, TF.js PoseNet, OpenPose), maps each person onto the 17
COCO joints, and writes the refined joints back into the format's own keypoints so that nothing the user
gave is dropped. numpy only.

Glossary:
    P       persons read, in file order (OpenPose: files sorted by name, then ``people`` order).
    K       17, the COCO joints (``synth.keypoints.NAMES`` order).
    Kf      keypoints of the format's layout: 17 (COCO, MoveNet, PoseNet), 33 (BlazePose), 25 (OpenPose
            BODY_25) or 18 (OpenPose COCO-18).
    layout  a format's keypoint order and, for each COCO joint, its index in that order (:class:`Layout`).
    pixels  image coordinates: x to the right, y down, in pixels of the original image.
    normalised  x / width and y / height of the original image, so [0, 1] inside it (MoveNet, BlazePose);
            landmarks outside the frame fall outside [0, 1] and are kept.
    score   a joint's confidence in [0, 1] (OpenPose: >= 0); 0 means absent. The refiner treats a joint as
            present where its score is > 0.
    image key  what a person's image is called in the file: the COCO ``image_id`` (int), the entry's
            ``"image"`` (a file name, or an int image id) or the OpenPose file's stem before ``_keypoints``.

Accepted JSON (one file; OpenPose: one file or a directory of them):

coco: ``[{"image_id": int, "category_id": 1, "keypoints": [x, y, score] * 17, "score": s, ...}, ...]`` in
    pixels; other fields (``bbox``, ``center``, ``scale``...) are kept.
movenet: ``[{"image": name | id, "keypoints": [[y, x, score] * 17]}, ...]`` (SinglePose; the model's
    [1, 1, 17, 3] output as nested lists is accepted too) or ``[{"image": ..., "people": [[56 numbers],
    ...]}, ...]`` (MultiPose; rows of 17 * (y, x, score) then ymin, xmin, ymax, xmax, score; the model's
    [1, 6, 56] output is accepted too; every row is read, however low its score). y and x are normalised
    to the original image. MoveNet's raw output is relative to its input square: if the image was
    letterboxed (padded to a square) before resizing, undo the padding first; with the padded side
    S = max(W, H) and the padding split evenly, x = (x_out * S - (S - W) / 2) / W and
    y = (y_out * S - (S - H) / 2) / H.
blazepose: ``[{"image": name | id, "landmarks": [[x, y, z, visibility, presence] * 33]}, ...]``, one entry
    per person (several entries may share an image); a landmark may also omit presence
    (``[x, y, z, visibility]``) or be MediaPipe's object ``{"x", "y", "z", "visibility"[, "presence"]}``.
    x, y normalised to the image. A joint's score is its visibility (in [0, 1]); presence is kept but not
    used, since MediaPipe's legacy Pose solution reported it as 0 throughout.
posenet: ``[{"image": name | id, "poses": [{"score": s, "keypoints": [{"part": "leftEye", "position":
    {"x": x, "y": y}, "score": s}, ...]}, ...]}, ...]`` in pixels (TF.js PoseNet's ``estimatePoses``
    output per image). Parts are matched by name in any order; a missing part has score 0. The
    ``@tensorflow-models/pose-detection`` form of the same (``{"name": "left_eye", "x": x, "y": y,
    "score": s}``, snake_case names; what its MoveNet and PoseNet return) is accepted too.
openpose: OpenPose's ``--write_json`` files ``<stem>_keypoints.json`` (a directory of them, or one file):
    ``{"people": [{"pose_keypoints_2d": [x, y, c] * 25 | [x, y, c] * 18, ...}, ...], ...}`` in pixels
    (the default ``--keypoint_scale 0``); (0, 0, 0) is a joint not found. BODY_25 or COCO-18 is told by the
    length, which every person of every file must share. Older OpenPose's ``pose_keypoints`` is accepted.

MoveNet and BlazePose need each image's (width, height): from ``image_sizes`` {image key: (width, height)}
or the entry's own ``"width"`` and ``"height"``.

Instance scores: COCO's ``score``, MoveNet MultiPose's row score and PoseNet's pose score; where the format
has none (MoveNet SinglePose, BlazePose, OpenPose, a pose-detection pose without ``score``), the mean score of
the present (score > 0) COCO joints, 0 if none is.

Writing back (:func:`write_coco_results`): COCO results with the refined joints, and for the other formats
the person's own keypoints in the format's own form with the refined COCO joints written at their mapped
positions (normalised again for MoveNet and BlazePose, the refined confidence in the joint's score slot),
every other keypoint, value and field kept as given.
"""
from __future__ import annotations

import contextlib
import copy
import math
import numbers
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .synth.cocoio import validate_results

from .fileio import read_json
from .errors import InputError
from .synth.keypoints import NAMES, NUM_KEYPOINTS

FORMATS = ("coco", "movenet", "blazepose", "posenet", "openpose")


@dataclass(frozen=True)
class Layout:
    """A keypoint layout: its keypoint names in order and, for each of the 17 COCO joints (in
    ``synth.keypoints.NAMES`` order), that joint's index in this layout."""

    name: str
    names: tuple[str, ...]
    coco_index: tuple[int, ...]

    def __post_init__(self):
        if len(self.coco_index) != NUM_KEYPOINTS or len(set(self.coco_index)) != NUM_KEYPOINTS:
            raise ValueError(f"layout {self.name}: coco_index must name 17 distinct keypoints")
        if not all(0 <= k < len(self.names) for k in self.coco_index):
            raise ValueError(f"layout {self.name}: coco_index out of range of its {len(self.names)} names")


BLAZEPOSE_NAMES = (
    "nose", "left_eye_inner", "left_eye", "left_eye_outer", "right_eye_inner", "right_eye", "right_eye_outer",
    "left_ear", "right_ear", "mouth_left", "mouth_right", "left_shoulder", "right_shoulder", "left_elbow",
    "right_elbow", "left_wrist", "right_wrist", "left_pinky", "right_pinky", "left_index", "right_index",
    "left_thumb", "right_thumb", "left_hip", "right_hip", "left_knee", "right_knee", "left_ankle",
    "right_ankle", "left_heel", "right_heel", "left_foot_index", "right_foot_index",
)
BODY25_NAMES = (
    "Nose", "Neck", "RShoulder", "RElbow", "RWrist", "LShoulder", "LElbow", "LWrist", "MidHip", "RHip",
    "RKnee", "RAnkle", "LHip", "LKnee", "LAnkle", "REye", "LEye", "REar", "LEar", "LBigToe", "LSmallToe",
    "LHeel", "RBigToe", "RSmallToe", "RHeel",
)
COCO18_NAMES = (
    "Nose", "Neck", "RShoulder", "RElbow", "RWrist", "LShoulder", "LElbow", "LWrist", "RHip", "RKnee",
    "RAnkle", "LHip", "LKnee", "LAnkle", "REye", "LEye", "REar", "LEar",
)
# PoseNet's part names (camelCase), in COCO order.
POSENET_PARTS = (
    "nose", "leftEye", "rightEye", "leftEar", "rightEar", "leftShoulder", "rightShoulder", "leftElbow",
    "rightElbow", "leftWrist", "rightWrist", "leftHip", "rightHip", "leftKnee", "rightKnee", "leftAnkle",
    "rightAnkle",
)

LAYOUTS: dict[str, Layout] = {
    "coco17": Layout("coco17", NAMES, tuple(range(NUM_KEYPOINTS))),
    "blazepose33": Layout("blazepose33", BLAZEPOSE_NAMES,
                          (0, 2, 5, 7, 8, 11, 12, 13, 14, 15, 16, 23, 24, 25, 26, 27, 28)),
    "body25": Layout("body25", BODY25_NAMES, (0, 16, 15, 18, 17, 5, 2, 6, 3, 7, 4, 12, 9, 13, 10, 14, 11)),
    "coco18": Layout("coco18", COCO18_NAMES, (0, 15, 14, 17, 16, 5, 2, 6, 3, 7, 4, 11, 8, 12, 9, 13, 10)),
}
FORMAT_LAYOUT = {"coco": "coco17", "movenet": "coco17", "blazepose": "blazepose33", "posenet": "coco17",
                 "openpose": "body25"}

# Each image-key field of the records written back, per format.
_KEY_FIELD = {"movenet": "image", "blazepose": "image", "posenet": "image", "openpose": "file"}
_PART_INDEX = {**{p: j for j, p in enumerate(POSENET_PARTS)}, **{n: j for j, n in enumerate(NAMES)}}
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
_KNOWN_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


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


# No coordinate, score or image size is this large; bounding them keeps every product and mean finite.
_LIMIT = 1e9


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and abs(x) <= _LIMIT


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

    def __init__(self, fmt: str, skip: bool):
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
        return Estimates(self.fmt, layout, self.keys, to_coco17(pixels, layout),
                         np.asarray(self.scores, dtype=np.float64).reshape(p), native, self.records,
                         self.fmt in ("movenet", "blazepose"), sizes, self.skipped)


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


def _unwrap(value, depth: int):
    """Strip up to ``depth`` singleton list levels ([[x]] → x), as a model's batch dimensions come."""
    for _ in range(depth):
        if isinstance(value, list) and len(value) == 1 and isinstance(value[0], list) \
                and value[0] and isinstance(value[0][0], list):
            value = value[0]
        else:
            break
    return value


# Readers: each returns an Estimates.

def _read_coco(path, source: str, reader: _Reader) -> Estimates:
    doc = read_json(path, "results")
    if not isinstance(doc, list):
        raise InputError("results", f"must be a JSON list of COCO result objects, got {_kind(doc)}", source)
    for i, r in enumerate(doc):
        with reader.unit():
            try:
                (rec,) = validate_results([r], source)
            except InputError as e:
                field_ = e.field.replace("results[0]", f"results[{i}]", 1)
                raise InputError(field_, e.problem, e.source) from None
            _json_clean(rec, f"results[{i}]", source)
            _numbers(rec["keypoints"], (3 * NUM_KEYPOINTS,), f"results[{i}].keypoints", source, "x, y, score × 17")
            kp = np.asarray(rec["keypoints"], dtype=np.float64).reshape(NUM_KEYPOINTS, 3)
            reader.add(rec["image_id"], kp, kp, float(rec["score"]), rec)
    return reader.result(LAYOUTS["coco17"], 3)


def _read_movenet(path, source: str, reader: _Reader, image_sizes) -> Estimates:
    for i, entry in enumerate(_entries(read_json(path, "entries"), source, "movenet")):
        f = f"entries[{i}]"
        with reader.unit():
            entry = _entry(entry, f, source)
            key = _image_key(entry, f, source)
            if ("keypoints" in entry) == ("people" in entry):
                raise InputError(f, "needs exactly one of \"keypoints\" (SinglePose: [[y, x, score] * 17]) and "
                                 "\"people\" (MultiPose: rows of 56 numbers)", source)
            w, h = _image_size(key, entry, f, source, image_sizes)
            if "keypoints" in entry:
                rows = _unwrap(entry["keypoints"], 2)
                if not isinstance(rows, list) or len(rows) != NUM_KEYPOINTS:
                    got = f"{len(rows)} rows" if isinstance(rows, list) else _kind(rows)
                    raise InputError(f"{f}.keypoints", f"must be 17 rows of [y, x, score], got {got}", source)
                native = np.array([_numbers(r, (3,), f"{f}.keypoints[{k}]", source, "y, x, score")
                                   for k, r in enumerate(rows)])
                for k in range(NUM_KEYPOINTS):
                    _score(native[k, 2], f"{f}.keypoints[{k}]", source, upper=1.0)
                _json_clean(entry, f, source, skip=("keypoints",))
                pixels = np.stack([native[:, 1] * w, native[:, 0] * h, native[:, 2]], axis=1)
                reader.add(key, native, pixels, _mean_present(native[:, 2]), entry, (w, h))
                continue
            _json_clean(entry, f, source, skip=("people",))
            people = _unwrap(entry["people"], 1)
            if not isinstance(people, list):
                raise InputError(f"{f}.people", f"must be a list of rows of 56 numbers, got {_kind(people)}", source)
            for j, row in enumerate(people):
                with reader.unit():
                    fj = f"{f}.people[{j}]"
                    row = _numbers(row, (56,), fj, source, "17 * (y, x, score), then ymin, xmin, ymax, xmax, score")
                    native = np.asarray(row[:51]).reshape(NUM_KEYPOINTS, 3)
                    for k in range(NUM_KEYPOINTS):
                        _score(native[k, 2], fj, source, upper=1.0)
                    _score(row[55], fj, source, upper=1.0)
                    pixels = np.stack([native[:, 1] * w, native[:, 0] * h, native[:, 2]], axis=1)
                    reader.add(key, native, pixels, row[55], {**entry, "people": [people[j]]}, (w, h))
    return reader.result(LAYOUTS["coco17"], 3)


def _landmark(lm, f: str, source: str) -> list[float]:
    """One BlazePose landmark → [x, y, z, visibility, presence] (presence NaN where not given)."""
    if isinstance(lm, dict):
        values = []
        for name in ("x", "y", "z", "visibility", "presence"):
            v = lm.get(name)
            if v is None and name == "presence":
                values.append(math.nan)
                continue
            if not _finite(v):
                raise InputError(f"{f}.{name}", f"missing or not a finite number, got {v!r}", source)
            values.append(float(v))
    else:
        values = _numbers(lm, (5, 4), f, source, "x, y, z, visibility[, presence]")
        values += [math.nan] * (5 - len(values))
    _score(values[3], f, source, upper=1.0)
    return values


def _read_blazepose(path, source: str, reader: _Reader, image_sizes) -> Estimates:
    layout = LAYOUTS["blazepose33"]
    for i, entry in enumerate(_entries(read_json(path, "entries"), source, "blazepose")):
        f = f"entries[{i}]"
        with reader.unit():
            entry = _entry(entry, f, source)
            key = _image_key(entry, f, source)
            lms = entry.get("landmarks")
            if not isinstance(lms, list) or len(lms) != len(layout.names):
                got = f"{len(lms)} landmarks" if isinstance(lms, list) else _kind(lms)
                raise InputError(f"{f}.landmarks", f"must be a list of 33 landmarks, got {got}", source)
            w, h = _image_size(key, entry, f, source, image_sizes)
            native = np.array([_landmark(lm, f"{f}.landmarks[{k}]", source) for k, lm in enumerate(lms)])
            _json_clean(entry, f, source)
            pixels = np.stack([native[:, 0] * w, native[:, 1] * h, native[:, 3]], axis=1)
            reader.add(key, native, pixels, _mean_present(to_coco17(pixels, layout)[:, 2]), entry, (w, h))
    return reader.result(layout, 5)


def _posenet_keypoint(kp, f: str, source: str) -> tuple[int, float, float, float]:
    """One PoseNet keypoint → (COCO joint, x, y, score)."""
    if not isinstance(kp, dict):
        raise InputError(f, f"must be an object, got {_kind(kp)}", source)
    name_field = "part" if "part" in kp else "name"
    part = kp.get(name_field)
    if not isinstance(part, str) or part not in _PART_INDEX:
        raise InputError(f"{f}.{name_field}", f"{part!r} is not a body part; expected one of {list(POSENET_PARTS)} "
                         "(or their snake_case forms)", source)
    if "position" in kp:
        pos, where = kp["position"], f"{f}.position"
        if not isinstance(pos, dict):
            raise InputError(where, f"must be an object {{\"x\", \"y\"}}, got {_kind(pos)}", source)
    else:
        pos, where = kp, f
    xy = []
    for name in ("x", "y"):
        if not _finite(pos.get(name)):
            raise InputError(f"{where}.{name}", f"missing or not a finite number, got {pos.get(name)!r}", source)
        xy.append(float(pos[name]))
    s = kp.get("score")
    if not _finite(s):
        raise InputError(f"{f}.score", f"missing or not a finite number, got {s!r}", source)
    return _PART_INDEX[part], xy[0], xy[1], _score(float(s), f"{f}.score", source, upper=1.0)


def _read_posenet(path, source: str, reader: _Reader) -> Estimates:
    for i, entry in enumerate(_entries(read_json(path, "entries"), source, "posenet")):
        f = f"entries[{i}]"
        with reader.unit():
            entry = _entry(entry, f, source)
            key = _image_key(entry, f, source)
            poses = entry.get("poses")
            if not isinstance(poses, list):
                raise InputError(f"{f}.poses", f"missing or not a list of poses, got {_kind(poses)}", source)
            _json_clean(entry, f, source, skip=("poses",))
            for j, pose in enumerate(poses):
                fj = f"{f}.poses[{j}]"
                with reader.unit():
                    pose = _entry(pose, fj, source)
                    kps = pose.get("keypoints")
                    if not isinstance(kps, list):
                        raise InputError(f"{fj}.keypoints", f"missing or not a list, got {_kind(kps)}", source)
                    native = np.zeros((NUM_KEYPOINTS, 3))
                    seen = {}
                    for k, kp in enumerate(kps):
                        joint, x, y, s = _posenet_keypoint(kp, f"{fj}.keypoints[{k}]", source)
                        if joint in seen:
                            raise InputError(f"{fj}.keypoints[{k}]", f"{POSENET_PARTS[joint]} is also "
                                             f"keypoints[{seen[joint]}]", source)
                        seen[joint] = k
                        native[joint] = x, y, s
                    _json_clean(pose, fj, source)
                    if "score" in pose:
                        if not _finite(pose["score"]):
                            raise InputError(f"{fj}.score", f"not a finite number, got {pose['score']!r}", source)
                        score = _score(float(pose["score"]), f"{fj}.score", source, upper=1.0)
                    else:
                        score = _mean_present(native[:, 2])
                    reader.add(key, native, native, score, {**entry, "poses": [pose]})
    return reader.result(LAYOUTS["coco17"], 3)


def _openpose_files(path: Path) -> list[Path]:
    if not path.is_dir():
        return [path]
    files = sorted(p for p in path.iterdir() if p.name.endswith("_keypoints.json") and p.is_file())
    if not files:
        raise InputError("openpose", "no *_keypoints.json files in the directory (OpenPose --write_json)", str(path))
    return files


def openpose_key(path: str | Path) -> str:
    """The image key of an OpenPose file: its name before ``_keypoints.json`` (else before ``.json``)."""
    name = Path(path).name
    for suffix in ("_keypoints.json", ".json"):
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[:-len(suffix)]
    return name


def _read_openpose(path, reader: _Reader) -> Estimates:
    path = Path(path)
    layout, first = None, None
    by_count = {25: LAYOUTS["body25"], 18: LAYOUTS["coco18"]}
    many = path.is_dir()
    for file in _openpose_files(path):
        source = str(file)
        # In a directory a bad file is one malformed entry; a single file given is the whole input.
        with reader.unit() if many else contextlib.nullcontext():
            doc = read_json(file, "openpose")
            if not isinstance(doc, dict) or not isinstance(doc.get("people"), list):
                got = _kind(doc.get("people")) if isinstance(doc, dict) else _kind(doc)
                raise InputError("people", f"an OpenPose file is an object with a list \"people\", got {got}", source)
            for k, v in doc.items():
                if k != "people":
                    _json_clean(v, k, source)
            frame = {k: v for k, v in doc.items() if k != "people"}
            for j, person in enumerate(doc["people"]):
                fj = f"people[{j}]"
                with reader.unit():
                    person = _entry(person, fj, source)
                    kf = "pose_keypoints_2d" if "pose_keypoints_2d" in person or "pose_keypoints" not in person \
                        else "pose_keypoints"
                    flat = _numbers(person.get(kf), (75, 54), f"{fj}.{kf}", source,
                                    "x, y, c for 25 BODY_25 or 18 COCO-18 keypoints")
                    n = len(flat) // 3
                    native = np.asarray(flat).reshape(n, 3)
                    for k in range(n):
                        _score(native[k, 2], f"{fj}.{kf}", source)
                    _json_clean(person, fj, source)
                    if layout is None:
                        layout, first = by_count[n], f"{source}: {fj}"
                    elif n != len(layout.names):
                        e = InputError(f"{fj}.{kf}", f"has {n} keypoints ({by_count[n].name}) but {first} has "
                                       f"{len(layout.names)} ({layout.name}); all persons must share one layout",
                                       source)
                        e.fatal = True  # a mix of layouts is no malformed entry: refused even when skipping
                        raise e
                    reader.add(openpose_key(file), native, native, _mean_present(to_coco17(native, layout)[:, 2]),
                               {**frame, "people": [person]})
    return reader.result(layout or LAYOUTS["body25"], 3)


def read_estimates(path: str | Path, fmt: str, image_sizes: dict | None = None, *,
                   skip_invalid: bool = False) -> Estimates:
    """Read an estimator's output file (OpenPose: a file or a directory of them) in format ``fmt``.

    image_sizes: {image key: (width, height)} in pixels, for the formats with normalised coordinates
    (MoveNet, BlazePose; an entry's own "width" and "height" serve too); the others ignore it. A key
    mapped to an InputError (its image refused) makes that error the entry's.
    Malformed input raises :class:`InputError` naming the entry and field (``entries[3].landmarks[12]``,
    ``people[1].pose_keypoints_2d`` with the file as source). With ``skip_invalid`` a malformed entry, file
    or person is left out instead and its message listed in ``Estimates.skipped``; a file that is not a
    list of entries at all, or OpenPose persons of two layouts, still raise. OpenPose input without any
    person reads as BODY_25.
    """
    if fmt not in FORMATS:
        raise InputError("format", f"unknown estimator format {fmt!r}; one of {list(FORMATS)}")
    if image_sizes is not None and not isinstance(image_sizes, dict):
        raise InputError("image_sizes", f"must be a dict {{image key: (width, height)}}, got {_kind(image_sizes)}")
    source = str(path)
    reader = _Reader(fmt, skip_invalid)
    if fmt == "coco":
        return _read_coco(path, source, reader)
    if fmt == "movenet":
        return _read_movenet(path, source, reader, image_sizes)
    if fmt == "blazepose":
        return _read_blazepose(path, source, reader, image_sizes)
    if fmt == "posenet":
        return _read_posenet(path, source, reader)
    return _read_openpose(path, reader)


# Writing back.

def _person_keypoints(est: Estimates, i: int):
    """(person i's keypoints as the file gave them, the other fields of the person and its entry)."""
    rec = est.records[i]
    if est.format == "movenet":
        if "keypoints" in rec:
            return rec["keypoints"], {k: v for k, v in rec.items() if k not in ("image", "keypoints")}
        return rec["people"][0], {k: v for k, v in rec.items() if k not in ("image", "people")}
    if est.format == "blazepose":
        return rec["landmarks"], {k: v for k, v in rec.items() if k not in ("image", "landmarks")}
    if est.format == "posenet":
        pose = rec["poses"][0]
        fields = {k: v for k, v in rec.items() if k not in ("image", "poses")}
        return pose["keypoints"], {**fields, **{k: v for k, v in pose.items() if k != "keypoints"}}
    person = rec["people"][0]
    kf = "pose_keypoints_2d" if "pose_keypoints_2d" in person else "pose_keypoints"
    fields = {k: v for k, v in rec.items() if k != "people"}
    return person[kf], {**fields, **{k: v for k, v in person.items() if k != kf}}


def _posenet_put(kps: list, joint: int, x: float, y: float, s: float) -> None:
    for kp in kps:
        if _PART_INDEX[kp.get("part", kp.get("name"))] == joint:
            break
    else:
        legacy = not kps or "part" in kps[0]
        kp = {"part": POSENET_PARTS[joint], "position": {}} if legacy else {"name": NAMES[joint]}
        kps.append(kp)
    pos = kp.get("position", kp)
    pos["x"], pos["y"], kp["score"] = x, y, s


def source_keypoints(est: Estimates, i: int, refined) -> object:
    """Person i's keypoints in the format's own JSON form with its COCO joints replaced by ``refined``
    (17, 3) (x, y in pixels, confidence), normalised again for MoveNet and BlazePose; the confidence goes
    into the joint's score (MoveNet score, BlazePose visibility, PoseNet score, OpenPose c). Every other
    keypoint and value (BlazePose z and presence, MoveNet MultiPose's box and score) is kept as given.
    A PoseNet part the file lacked is appended."""
    if est.format == "coco":
        return np.asarray(refined, dtype=np.float64).reshape(-1).tolist()
    given, _ = _person_keypoints(est, i)
    out = copy.deepcopy(given)
    w, h = est.sizes[i] if est.needs_image_size else (1.0, 1.0)
    refined = np.asarray(refined, dtype=np.float64)
    for j, k in enumerate(est.layout.coco_index):
        x, y, s = float(refined[j, 0]), float(refined[j, 1]), float(refined[j, 2])
        if est.format == "movenet" and "keypoints" in est.records[i]:
            row = _unwrap(out, 2)[k]
            row[0], row[1], row[2] = y / h, x / w, s
        elif est.format == "movenet":
            out[3 * k], out[3 * k + 1], out[3 * k + 2] = y / h, x / w, s
        elif est.format == "blazepose":
            lm = out[k]
            if isinstance(lm, dict):
                lm["x"], lm["y"], lm["visibility"] = x / w, y / h, s
            else:
                lm[0], lm[1], lm[3] = x / w, y / h, s
        elif est.format == "posenet":
            _posenet_put(out, j, x, y, s)
        else:
            out[3 * k], out[3 * k + 1], out[3 * k + 2] = x, y, s
    return out


def write_coco_results(est: Estimates, refined_xy, refined_conf, instance_scores, image_ids=None,
                       kept=None) -> list[dict]:
    """COCO keypoint results of the refined persons, one per person in ``est`` order.

    refined_xy (P, 17, 2) image pixels; refined_conf (P, 17); instance_scores (P,); image_ids (P,) the
    COCO ``image_id`` of each person (None: the image keys, which must then be integers; see
    :func:`image_ids`). COCO input: each result is the original with only ``keypoints`` and ``score``
    replaced (``image_id`` set), every other field kept. Other formats: ``{"image_id", "category_id": 1,
    "keypoints", "score", "source_format", "image" | "file" (the image key; "file" for OpenPose),
    "source_keypoints"}`` (see :func:`source_keypoints`) and, where the person or its entry had other fields
    (OpenPose's face and hand keypoints, PoseNet's original pose score...), ``"source_fields"`` holding them.
    kept (P, 17) bool, optional: where the output joint is the input's (the per-joint choice); given, each
    result also has ``"keypoint_source"``: 17 × ``"input"`` or ``"refined"``.
    """
    p = len(est.records)
    xy = np.asarray(refined_xy, dtype=np.float64)
    conf = np.asarray(refined_conf, dtype=np.float64)
    inst = np.asarray(instance_scores, dtype=np.float64)
    if xy.shape != (p, NUM_KEYPOINTS, 2) or conf.shape != (p, NUM_KEYPOINTS) or inst.shape != (p,):
        raise ValueError(f"refined_xy {xy.shape}, refined_conf {conf.shape}, instance_scores {inst.shape} do not "
                         f"fit {p} persons: need ({p}, 17, 2), ({p}, 17), ({p},)")
    if not (np.isfinite(xy).all() and np.isfinite(conf).all() and np.isfinite(inst).all()):
        raise ValueError("refined keypoints, confidences and instance scores must be finite")
    if image_ids is None:
        if not all(isinstance(k, int) and not isinstance(k, bool) for k in est.image_keys):
            raise InputError("image_ids", "the image keys are file names; give each person's COCO image_id")
        image_ids = est.image_keys
    image_ids = [int(v) for v in image_ids]
    if len(image_ids) != p:
        raise ValueError(f"image_ids has {len(image_ids)} entries for {p} persons")
    refined = np.concatenate([xy, conf[..., None]], axis=-1)  # (P, 17, 3)
    if kept is not None:
        kept = np.asarray(kept, dtype=bool)
        if kept.shape != (p, NUM_KEYPOINTS):
            raise ValueError(f"kept {kept.shape} does not fit {p} persons: need ({p}, 17)")
    out = []
    for i in range(p):
        keypoints = refined[i].reshape(-1).tolist()
        source = {} if kept is None else {"keypoint_source": ["input" if k else "refined" for k in kept[i].tolist()]}
        if est.format == "coco":
            out.append({**est.records[i], "image_id": image_ids[i], "keypoints": keypoints, "score": float(inst[i]),
                        **source})
            continue
        res = {"image_id": image_ids[i], "category_id": 1, "keypoints": keypoints, "score": float(inst[i]),
               **source, "source_format": est.format, _KEY_FIELD[est.format]: est.image_keys[i],
               "source_keypoints": source_keypoints(est, i, refined[i])}
        _, fields = _person_keypoints(est, i)
        if fields:
            res["source_fields"] = fields
        out.append(res)
    return out


# Image files and ids.

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
