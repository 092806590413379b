"""OpenPose: its ``--write_json`` files ``<stem>_keypoints.json`` (a directory of them, or one file):
``{"people": [{"pose_keypoints_2d": [x, y, c] * 25 | [x, y, c] * 18, ...}, ...], ...}`` in pixels (the
default ``--keypoint_scale 0``); (0, 0, 0) is a joint not found. BODY_25 or COCO-18 is told by the length,
which every person of every file must share. Older OpenPose's ``pose_keypoints`` is accepted. A person's
image key is its file's stem before ``_keypoints``."""
from __future__ import annotations

import contextlib
import copy
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..fileio import read_json
from . import common
from .common import Estimates, Format, Layout, _Reader, to_coco17

BODY25_NAMES = (
    "Nose", "Neck", "RShoulder", "RElbow", "RWrist", "LShoulder", "LElbow", "LWrist", "MidHip", "RHip",
    "RKnee", "RAnkle", "LHip", "LKnee", "LAnkle", "REye", "LEye", "REar", "LEar", "LBigToe", "LSmallToe",
    "LHeel", "RBigToe", "RSmallToe", "RHeel",
)
COCO18_NAMES = (
    "Nose", "Neck", "RShoulder", "RElbow", "RWrist", "LShoulder", "LElbow", "LWrist", "RHip", "RKnee",
    "RAnkle", "LHip", "LKnee", "LAnkle", "REye", "LEye", "REar", "LEar",
)
BODY25 = Layout("body25", BODY25_NAMES, (0, 16, 15, 18, 17, 5, 2, 6, 3, 7, 4, 12, 9, 13, 10, 14, 11))
COCO18 = Layout("coco18", COCO18_NAMES, (0, 15, 14, 17, 16, 5, 2, 6, 3, 7, 4, 11, 8, 12, 9, 13, 10))
LAYOUT = BODY25  # input without any person reads as BODY_25


def _files(path: Path) -> list[Path]:
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


def _keypoints_field(person: dict) -> str:
    return "pose_keypoints_2d" if "pose_keypoints_2d" in person or "pose_keypoints" not in person \
        else "pose_keypoints"


def read(path, reader: _Reader, image_sizes: dict | None = None) -> Estimates:
    path = Path(path)
    layout, first = None, None
    by_count = {25: BODY25, 18: COCO18}
    many = path.is_dir()
    for file in _files(path):
        source = str(file)
        # In a directory a bad file is one malformed entry; a single file given is the whole input.
        with reader.unit() if many else contextlib.nullcontext():
            doc = read_json(file, "openpose")
            if not isinstance(doc, dict) or not isinstance(doc.get("people"), list):
                got = common._kind(doc.get("people")) if isinstance(doc, dict) else common._kind(doc)
                raise InputError("people", f"an OpenPose file is an object with a list \"people\", got {got}", source)
            for k, v in doc.items():
                if k != "people":
                    common._json_clean(v, k, source)
            frame = {k: v for k, v in doc.items() if k != "people"}
            for j, person in enumerate(doc["people"]):
                fj = f"people[{j}]"
                with reader.unit():
                    person = common._entry(person, fj, source)
                    kf = _keypoints_field(person)
                    flat = common._numbers(person.get(kf), (75, 54), f"{fj}.{kf}", source,
                                    "x, y, c for 25 BODY_25 or 18 COCO-18 keypoints")
                    n = len(flat) // 3
                    native = np.asarray(flat).reshape(n, 3)
                    for k in range(n):
                        common._score(native[k, 2], f"{fj}.{kf}", source)
                    common._json_clean(person, fj, source)
                    if layout is None:
                        layout, first = by_count[n], f"{source}: {fj}"
                    elif n != len(layout.names):
                        e = InputError(f"{fj}.{kf}", f"has {n} keypoints ({by_count[n].name}) but {first} has "
                                       f"{len(layout.names)} ({layout.name}); all persons must share one layout",
                                       source)
                        e.fatal = True  # a mix of layouts is no malformed entry: refused even when skipping
                        raise e
                    reader.add(openpose_key(file), native, native,
                               common._mean_present(to_coco17(native, layout)[:, 2]), {**frame, "people": [person]})
    return reader.result(layout or LAYOUT, 3)


def write(est: Estimates, i: int, refined) -> list:
    """Person i's flat [x, y, c] keypoints as given with the refined joints written in."""
    person = est.records[i]["people"][0]
    out = copy.deepcopy(person[_keypoints_field(person)])
    for _, k, x, y, s in common._joints(est, i, refined):
        out[3 * k], out[3 * k + 1], out[3 * k + 2] = x, y, s
    return out


def fields(record: dict) -> dict:
    """The file's other fields and the person's (face and hand keypoints...)."""
    person = record["people"][0]
    kf = _keypoints_field(person)
    return {**{k: v for k, v in record.items() if k != "people"}, **{k: v for k, v in person.items() if k != kf}}


FORMAT = Format("openpose", LAYOUT, normalised=False, key_field="file", coco_results=False, read=read, write=write,
                fields=fields)
