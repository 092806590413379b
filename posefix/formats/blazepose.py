"""BlazePose / MediaPipe Pose: ``[{"image": name | id, "landmarks": [[x, y, z, visibility, presence] * 33]},
...]``, one entry per person (several entries may share an image); a landmark may also omit presence
(``[x, y, z, visibility]``) or be MediaPipe's object ``{"x", "y", "z", "visibility"[, "presence"]}``. x, y
normalised to the image. A joint's score is its visibility (in [0, 1]); presence is kept but not used, since
MediaPipe's legacy Pose solution reported it as 0 throughout."""
from __future__ import annotations

import copy
import math

import numpy as np

from ..errors import InputError
from . import common
from .common import Estimates, Format, Layout, _Reader, to_coco17

NAMES = (
    "nose", "left_eye_inner", "left_eye", "left_eye_outer", "right_eye_inner", "right_eye", "right_eye_outer",
    "left_ear", "right_ear", "mouth_left", "mouth_right", "left_shoulder", "right_shoulder", "left_elbow",
    "right_elbow", "left_wrist", "right_wrist", "left_pinky", "right_pinky", "left_index", "right_index",
    "left_thumb", "right_thumb", "left_hip", "right_hip", "left_knee", "right_knee", "left_ankle",
    "right_ankle", "left_heel", "right_heel", "left_foot_index", "right_foot_index",
)
LAYOUT = Layout("blazepose33", NAMES, (0, 2, 5, 7, 8, 11, 12, 13, 14, 15, 16, 23, 24, 25, 26, 27, 28))


def _landmark(lm, f: str, source: str) -> list[float]:
    """One BlazePose landmark → [x, y, z, visibility, presence] (presence NaN where not given)."""
    if isinstance(lm, dict):
        values = []
        for name in ("x", "y", "z", "visibility", "presence"):
            v = lm.get(name)
            if v is None and name == "presence":
                values.append(math.nan)
                continue
            if not common._finite(v):
                raise InputError(f"{f}.{name}", f"missing or not a finite number, got {v!r}", source)
            values.append(float(v))
    else:
        values = common._numbers(lm, (5, 4), f, source, "x, y, z, visibility[, presence]")
        values += [math.nan] * (5 - len(values))
    common._score(values[3], f, source, upper=1.0)
    return values


def read(path, reader: _Reader, image_sizes: dict | None = None) -> Estimates:
    def one(f: str, entry: dict, key, source: str) -> None:
        lms = entry.get("landmarks")
        if not isinstance(lms, list) or len(lms) != len(LAYOUT.names):
            got = f"{len(lms)} landmarks" if isinstance(lms, list) else common._kind(lms)
            raise InputError(f"{f}.landmarks", f"must be a list of 33 landmarks, got {got}", source)
        w, h = common._image_size(key, entry, f, source, image_sizes)
        native = np.array([_landmark(lm, f"{f}.landmarks[{k}]", source) for k, lm in enumerate(lms)])
        common._json_clean(entry, f, source)
        pixels = np.stack([native[:, 0] * w, native[:, 1] * h, native[:, 3]], axis=1)
        reader.add(key, native, pixels, common._mean_present(to_coco17(pixels, LAYOUT)[:, 2]), entry, (w, h))

    reader.read_entries(path, one)
    return reader.result(LAYOUT, 5)


def write(est: Estimates, i: int, refined) -> list:
    """Person i's 33 landmarks as given with the refined joints' x, y (normalised) and visibility written in;
    z and presence kept."""
    out = copy.deepcopy(est.records[i]["landmarks"])
    for _, k, x, y, s in common._joints(est, i, refined):
        lm = out[k]
        if isinstance(lm, dict):
            lm["x"], lm["y"], lm["visibility"] = x, y, s
        else:
            lm[0], lm[1], lm[3] = x, y, s
    return out


def fields(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in ("image", "landmarks")}


FORMAT = Format("blazepose", LAYOUT, normalised=True, key_field="image", coco_results=False, read=read, write=write,
                fields=fields)
