"""MoveNet: ``[{"image": name | id, "keypoints": [[y, x, score] * 17]}, ...]`` (SinglePose; the model's
[1, 1, 17, 3] output as nested lists is accepted too) or ``[{"image": ..., "people": [[56 numbers], ...]},
...]`` (MultiPose; rows of 17 * (y, x, score) then ymin, xmin, ymax, xmax, score; the model's [1, 6, 56]
output is accepted too; every row is read, however low its score). y and x are normalised to the original
image. MoveNet's raw output is relative to its input square: if the image was letterboxed (padded to a
square) before resizing, undo the padding first; with the padded side S = max(W, H) and the padding split
evenly, x = (x_out * S - (S - W) / 2) / W and y = (y_out * S - (S - H) / 2) / H."""
from __future__ import annotations

import copy

import numpy as np

from ..errors import InputError
from ..keypoints import NUM_KEYPOINTS
from . import common
from .common import COCO17, Estimates, Format, _Reader

LAYOUT = COCO17


def _unwrap(value, depth: int):
    """Strip up to ``depth`` singleton list levels ([[x]] → x), as a model's batch dimensions come."""
    for _ in range(depth):
        if isinstance(value, list) and len(value) == 1 and isinstance(value[0], list) \
                and value[0] and isinstance(value[0][0], list):
            value = value[0]
        else:
            break
    return value


def read(path, reader: _Reader, image_sizes: dict | None = None) -> Estimates:
    def one(f: str, entry: dict, key, source: str) -> None:
        if ("keypoints" in entry) == ("people" in entry):
            raise InputError(f, "needs exactly one of \"keypoints\" (SinglePose: [[y, x, score] * 17]) and "
                             "\"people\" (MultiPose: rows of 56 numbers)", source)
        w, h = common._image_size(key, entry, f, source, image_sizes)
        if "keypoints" in entry:
            rows = _unwrap(entry["keypoints"], 2)
            if not isinstance(rows, list) or len(rows) != NUM_KEYPOINTS:
                got = f"{len(rows)} rows" if isinstance(rows, list) else common._kind(rows)
                raise InputError(f"{f}.keypoints", f"must be 17 rows of [y, x, score], got {got}", source)
            native = np.array([common._numbers(r, (3,), f"{f}.keypoints[{k}]", source, "y, x, score")
                               for k, r in enumerate(rows)])
            for k in range(NUM_KEYPOINTS):
                common._score(native[k, 2], f"{f}.keypoints[{k}]", source, upper=1.0)
            common._json_clean(entry, f, source, skip=("keypoints",))
            pixels = np.stack([native[:, 1] * w, native[:, 0] * h, native[:, 2]], axis=1)
            reader.add(key, native, pixels, common._mean_present(native[:, 2]), entry, (w, h))
            return
        common._json_clean(entry, f, source, skip=("people",))
        people = _unwrap(entry["people"], 1)
        if not isinstance(people, list):
            raise InputError(f"{f}.people", f"must be a list of rows of 56 numbers, got {common._kind(people)}", source)
        for j, row in enumerate(people):
            with reader.unit():
                fj = f"{f}.people[{j}]"
                row = common._numbers(row, (56,), fj, source, "17 * (y, x, score), then ymin, xmin, ymax, xmax, score")
                native = np.asarray(row[:51]).reshape(NUM_KEYPOINTS, 3)
                for k in range(NUM_KEYPOINTS):
                    common._score(native[k, 2], fj, source, upper=1.0)
                common._score(row[55], fj, source, upper=1.0)
                pixels = np.stack([native[:, 1] * w, native[:, 0] * h, native[:, 2]], axis=1)
                reader.add(key, native, pixels, row[55], {**entry, "people": [people[j]]}, (w, h))

    reader.read_entries(path, one)
    return reader.result(LAYOUT, 3)


def _person(record: dict):
    """(the person's keypoints as given, the entry's other fields)."""
    if "keypoints" in record:
        return record["keypoints"], {k: v for k, v in record.items() if k not in ("image", "keypoints")}
    return record["people"][0], {k: v for k, v in record.items() if k not in ("image", "people")}


def write(est: Estimates, i: int, refined) -> list:
    """Person i's keypoints as given (SinglePose rows or the MultiPose row, its box and score kept) with the
    refined joints written in, normalised."""
    out = copy.deepcopy(_person(est.records[i])[0])
    single = "keypoints" in est.records[i]
    for _, k, x, y, s in common._joints(est, i, refined):
        if single:
            row = _unwrap(out, 2)[k]
            row[0], row[1], row[2] = y, x, s
        else:
            out[3 * k], out[3 * k + 1], out[3 * k + 2] = y, x, s
    return out


def fields(record: dict) -> dict:
    return _person(record)[1]


FORMAT = Format("movenet", LAYOUT, normalised=True, key_field="image", coco_results=False, read=read, write=write,
                fields=fields)
