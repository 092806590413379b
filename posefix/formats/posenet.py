"""TF.js PoseNet: ``[{"image": name | id, "poses": [{"score": s, "keypoints": [{"part": "leftEye", "position":
{"x": x, "y": y}, "score": s}, ...]}, ...]}, ...]`` in pixels (``estimatePoses``' output per image). Parts are
matched by name in any order; a missing part has score 0. The ``@tensorflow-models/pose-detection`` form of
the same (``{"name": "left_eye", "x": x, "y": y, "score": s}``, snake_case names; what its MoveNet and PoseNet
return) is accepted too."""
from __future__ import annotations

import copy

import numpy as np

from ..errors import InputError
from ..keypoints import NAMES, NUM_KEYPOINTS
from . import common
from .common import COCO17, Estimates, Format, _Reader

LAYOUT = COCO17
# PoseNet's part names (camelCase), in COCO order.
PARTS = (
    "nose", "leftEye", "rightEye", "leftEar", "rightEar", "leftShoulder", "rightShoulder", "leftElbow",
    "rightElbow", "leftWrist", "rightWrist", "leftHip", "rightHip", "leftKnee", "rightKnee", "leftAnkle",
    "rightAnkle",
)
_PART_INDEX = {**{p: j for j, p in enumerate(PARTS)}, **{n: j for j, n in enumerate(NAMES)}}


def _keypoint(kp, f: str, source: str) -> tuple[int, float, float, float]:
    """One PoseNet keypoint → (COCO joint, x, y, score)."""
    if not isinstance(kp, dict):
        raise InputError(f, f"must be an object, got {common._kind(kp)}", source)
    name_field = "part" if "part" in kp else "name"
    part = kp.get(name_field)
    if not isinstance(part, str) or part not in _PART_INDEX:
        raise InputError(f"{f}.{name_field}", f"{part!r} is not a body part; expected one of {list(PARTS)} "
                         "(or their snake_case forms)", source)
    if "position" in kp:
        pos, where = kp["position"], f"{f}.position"
        if not isinstance(pos, dict):
            raise InputError(where, f"must be an object {{\"x\", \"y\"}}, got {common._kind(pos)}", source)
    else:
        pos, where = kp, f
    xy = []
    for name in ("x", "y"):
        if not common._finite(pos.get(name)):
            raise InputError(f"{where}.{name}", f"missing or not a finite number, got {pos.get(name)!r}", source)
        xy.append(float(pos[name]))
    s = kp.get("score")
    if not common._finite(s):
        raise InputError(f"{f}.score", f"missing or not a finite number, got {s!r}", source)
    return _PART_INDEX[part], xy[0], xy[1], common._score(float(s), f"{f}.score", source, upper=1.0)


def read(path, reader: _Reader, image_sizes: dict | None = None) -> Estimates:
    def one(f: str, entry: dict, key, source: str) -> None:
        poses = entry.get("poses")
        if not isinstance(poses, list):
            raise InputError(f"{f}.poses", f"missing or not a list of poses, got {common._kind(poses)}", source)
        common._json_clean(entry, f, source, skip=("poses",))
        for j, pose in enumerate(poses):
            fj = f"{f}.poses[{j}]"
            with reader.unit():
                pose = common._entry(pose, fj, source)
                kps = pose.get("keypoints")
                if not isinstance(kps, list):
                    raise InputError(f"{fj}.keypoints", f"missing or not a list, got {common._kind(kps)}", source)
                native = np.zeros((NUM_KEYPOINTS, 3))
                seen = {}
                for k, kp in enumerate(kps):
                    joint, x, y, s = _keypoint(kp, f"{fj}.keypoints[{k}]", source)
                    if joint in seen:
                        raise InputError(f"{fj}.keypoints[{k}]", f"{PARTS[joint]} is also "
                                         f"keypoints[{seen[joint]}]", source)
                    seen[joint] = k
                    native[joint] = x, y, s
                common._json_clean(pose, fj, source)
                if "score" in pose:
                    if not common._finite(pose["score"]):
                        raise InputError(f"{fj}.score", f"not a finite number, got {pose['score']!r}", source)
                    score = common._score(float(pose["score"]), f"{fj}.score", source, upper=1.0)
                else:
                    score = common._mean_present(native[:, 2])
                reader.add(key, native, native, score, {**entry, "poses": [pose]})

    reader.read_entries(path, one)
    return reader.result(LAYOUT, 3)


def _put(kps: list, joint: int, x: float, y: float, s: float) -> None:
    for kp in kps:
        if _PART_INDEX[kp.get("part", kp.get("name"))] == joint:
            break
    else:
        legacy = not kps or "part" in kps[0]
        kp = {"part": PARTS[joint], "position": {}} if legacy else {"name": NAMES[joint]}
        kps.append(kp)
    pos = kp.get("position", kp)
    pos["x"], pos["y"], kp["score"] = x, y, s


def write(est: Estimates, i: int, refined) -> list:
    """Person i's keypoints as given with the refined joints written in by part; a part the pose lacked is
    appended in the pose's own form."""
    out = copy.deepcopy(est.records[i]["poses"][0]["keypoints"])
    for j, _, x, y, s in common._joints(est, i, refined):
        _put(out, j, x, y, s)
    return out


def fields(record: dict) -> dict:
    """The entry's other fields and the pose's (its score...)."""
    pose = record["poses"][0]
    entry = {k: v for k, v in record.items() if k not in ("image", "poses")}
    return {**entry, **{k: v for k, v in pose.items() if k != "keypoints"}}


FORMAT = Format("posenet", LAYOUT, normalised=False, key_field="image", coco_results=False, read=read, write=write,
                fields=fields)
