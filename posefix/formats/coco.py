"""COCO keypoint results: ``[{"image_id": int, "category_id": 1, "keypoints": [x, y, score] * 17, "score": s,
...}, ...]`` in pixels; other fields (``bbox``, ``center``, ``scale``...) are kept. Written back as themselves
with ``keypoints`` and ``score`` replaced."""
from __future__ import annotations

import numpy as np

from ..errors import InputError
from ..fileio import read_json
from ..keypoints import NUM_KEYPOINTS
from ..synth.cocoio import validate_results
from .common import COCO17, Estimates, Format, _json_clean, _kind, _numbers, _Reader

LAYOUT = COCO17


def read(path, reader: _Reader, image_sizes: dict | None = None) -> Estimates:
    source = str(path)
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
    return reader.result(LAYOUT, 3)


def write(est: Estimates, i: int, refined) -> list[float]:
    """Person i's refined keypoints (17, 3) as COCO's flat [x, y, score] * 17."""
    return np.asarray(refined, dtype=np.float64).reshape(-1).tolist()


FORMAT = Format("coco", LAYOUT, normalised=False, key_field="image_id", coco_results=True, read=read, write=write)
