"""Reading and validating COCO keypoint files; the synthesis outputs and their labels file."""
from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..fileio import dumps_json, gc_paused, read_json, write_bytes_atomic
from ..keypoints import NUM_KEYPOINTS, is_number, keypoint_list


def write_synth_outputs(results_path: str | Path, results: list, labels_path: str | Path | None = None,
                        labels: list | None = None) -> None:
    """Write synthesized COCO results and, where ``labels_path`` is given, what was planted in them.

    The labels file, ``{"results_sha256": ..., "labels": [...]}``, records the SHA-256 of the results
    file's bytes and is written after it: a run stopped between the two writes leaves labels that name
    other results, which :func:`load_synth_labels` refuses. Numbers must be finite.
    """
    data = dumps_json(results)
    write_bytes_atomic(results_path, data)
    if labels_path is not None:
        write_bytes_atomic(labels_path, dumps_json({"results_sha256": hashlib.sha256(data).hexdigest(),
                                                    "labels": labels}))


def load_synth_labels(labels_path: str | Path, results_path: str | Path) -> list[dict]:
    """The labels ``posefix synth --labels`` wrote, after checking that they belong to ``results_path``
    (the SHA-256 they record is that file's): a mismatched pair is refused, naming both files."""
    doc = read_json(labels_path, "labels")
    if not (isinstance(doc, dict) and isinstance(doc.get("results_sha256"), str)
            and isinstance(doc.get("labels"), list)):
        raise InputError("labels", "not a posefix synth labels file (an object with 'results_sha256' and 'labels')",
                         str(labels_path))
    digest = hashlib.sha256()
    try:
        with open(results_path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    except FileNotFoundError:
        raise InputError("results", "file not found", str(results_path)) from None
    except OSError as e:
        raise InputError("results", f"cannot read: {e.strerror or e}", str(results_path)) from None
    if digest.hexdigest() != doc["results_sha256"]:
        raise InputError("results_sha256", f"does not match {results_path}: these labels were written with other "
                         "results (a run stopped between its two writes, or a later run); run posefix synth again",
                         str(labels_path))
    return doc["labels"]


_NUMBER_TYPES = frozenset((int, float))


@dataclass(frozen=True)
class GroundTruth:
    """COCO person-keypoint GT as arrays; P annotations in file order.

    ids (P,), image_ids (P,), keypoints (P, K, 3), areas (P,), boxes (P, 4) xywh, crowd (P,) bool;
    ``doc`` is the parsed file, for pycocotools.
    """

    ids: np.ndarray
    image_ids: np.ndarray
    keypoints: np.ndarray
    areas: np.ndarray
    boxes: np.ndarray
    crowd: np.ndarray
    image_ids_all: frozenset
    doc: dict


def load_ground_truth(path: str | Path) -> GroundTruth:
    """Load and validate a COCO person-keypoints annotation file."""
    source = str(path)
    doc = read_json(path, "annotations")
    with gc_paused():
        return _ground_truth(doc, source)


_MISSING = object()


def _numbers(rows, width: int):
    """(len(rows), width) float64 of lists of ``width`` finite numbers (ints or floats), else None."""
    if not all(type(r) is list and len(r) == width for r in rows):
        return None
    if not set(map(type, itertools.chain.from_iterable(rows))) <= _NUMBER_TYPES:
        return None
    try:
        a = np.array(rows, dtype=np.float64).reshape(len(rows), width)
    except OverflowError:
        return None
    return a if np.isfinite(a).all() else None


def _bulk_annotations(anns: list, image_ids: set):
    """The arrays of :class:`GroundTruth` for annotations that are all well formed, checked all at once; None
    when any entry fails a check, for the entry-by-entry checks to name the first one."""
    if not all(type(a) is dict for a in anns):
        return None
    ids, img = [a.get("id") for a in anns], [a.get("image_id") for a in anns]
    if not set(map(type, ids)) | set(map(type, img)) <= {int} or len(set(ids)) != len(ids) or not set(img) <= image_ids:
        return None
    crowd = np.array([bool(a.get("iscrowd", 0)) for a in anns], dtype=bool)
    given = [a.get("keypoints", _MISSING) for a in anns]
    has = np.array([k is not _MISSING for k in given], dtype=bool)
    if not np.all(has | crowd):
        return None
    kps = np.zeros((len(anns), NUM_KEYPOINTS, 3))
    if has.any():
        values = _numbers([k for k in given if k is not _MISSING], 3 * NUM_KEYPOINTS)
        if values is None or values[:, 2::3].min() < 0:
            return None
        kps[has] = values.reshape(-1, NUM_KEYPOINTS, 3)
    boxes = _numbers([a.get("bbox") for a in anns], 4)
    if boxes is None or (len(anns) and boxes[:, 2:].min() < 0):
        return None
    area = [a.get("area", _MISSING) for a in anns]
    area = [a["bbox"][2] * a["bbox"][3] if x is _MISSING else x for a, x in zip(anns, area)]
    areas = _numbers([area], len(area)) if area else np.zeros((1, 0))
    if areas is None or (len(anns) and areas.min() < 0):
        return None
    return (np.array(ids, dtype=np.int64).reshape(-1), np.array(img, dtype=np.int64).reshape(-1), kps,
            areas.reshape(-1), boxes.reshape(-1, 4), crowd)


def _ground_truth(doc, source: str, bulk: bool = True) -> GroundTruth:
    if not isinstance(doc, dict):
        raise InputError("annotations", "must be a COCO annotation object with 'images' and 'annotations'", source)
    for key in ("images", "annotations"):
        if not isinstance(doc.get(key), list):
            raise InputError(key, "missing or not a list", source)
    image_ids = set()
    for i, im in enumerate(doc["images"]):
        if not isinstance(im, dict) or not isinstance(im.get("id"), int):
            raise InputError(f"images[{i}].id", "missing or not an integer", source)
        image_ids.add(im["id"])
    anns = doc["annotations"]
    arrays = _bulk_annotations(anns, image_ids) if bulk else None
    if arrays is not None:
        return GroundTruth(*arrays, frozenset(image_ids), doc)
    n = len(anns)
    ids = np.zeros(n, dtype=np.int64)
    img = np.zeros(n, dtype=np.int64)
    kps = np.zeros((n, NUM_KEYPOINTS, 3))
    areas = np.zeros(n)
    boxes = np.zeros((n, 4))
    crowd = np.zeros(n, dtype=bool)
    seen = set()
    for i, a in enumerate(anns):
        f = f"annotations[{i}]"
        if not isinstance(a, dict):
            raise InputError(f, "must be an object", source)
        for key in ("id", "image_id"):
            if not isinstance(a.get(key), int) or isinstance(a.get(key), bool):
                raise InputError(f"{f}.{key}", "missing or not an integer", source)
        if a["id"] in seen:
            raise InputError(f"{f}.id", f"duplicate annotation id {a['id']}", source)
        seen.add(a["id"])
        if a["image_id"] not in image_ids:
            raise InputError(f"{f}.image_id", f"image {a['image_id']} is not in 'images'", source)
        crowd[i] = bool(a.get("iscrowd", 0))
        if "keypoints" in a:
            kps[i] = keypoint_list(a["keypoints"], f"{f}.keypoints", source)
            if np.any(kps[i, :, 2] < 0):
                raise InputError(f"{f}.keypoints", "visibility flags must be 0, 1 or 2", source)
        elif not crowd[i]:
            raise InputError(f"{f}.keypoints", "missing (not a person-keypoints annotation file?)", source)
        bbox = a.get("bbox")
        if (not (isinstance(bbox, list) and len(bbox) == 4 and all(is_number(x) for x in bbox))
                or bbox[2] < 0 or bbox[3] < 0):
            raise InputError(f"{f}.bbox", "must be [x, y, width, height] with non-negative size", source)
        area = a.get("area", bbox[2] * bbox[3])
        if not is_number(area) or area < 0:
            raise InputError(f"{f}.area", f"must be a non-negative number, got {area!r}", source)
        ids[i], img[i], areas[i], boxes[i] = a["id"], a["image_id"], area, bbox
    return GroundTruth(ids, img, kps, areas, boxes, crowd, frozenset(image_ids), doc)


def validate_results(doc, source: str = "results", gt: GroundTruth | None = None) -> list[dict]:
    """Check a COCO keypoint results document and return it as a new list of shallow copies.

    Each result needs an integer ``image_id`` (one of ``gt``'s images when ``gt`` is given), 51 finite
    ``keypoints`` (x, y, confidence for 17 joints) and a finite numeric ``score``; ``category_id`` is
    optional (an integer, 1 when absent, filled in on the copies). Other fields (``center``, ``scale``,
    ``bbox``...) are kept as they are. Raises :class:`InputError` naming ``results[i].field``.
    """
    if not isinstance(doc, list):
        raise InputError("results", f"must be a JSON list of COCO result objects, got {type(doc).__name__}", source)
    out = []
    for i, r in enumerate(doc):
        f = f"results[{i}]"
        if not isinstance(r, dict):
            raise InputError(f, f"must be an object, got {type(r).__name__}", source)
        image_id = r.get("image_id")
        if not isinstance(image_id, int) or isinstance(image_id, bool):
            raise InputError(f"{f}.image_id", f"missing or not an integer, got {image_id!r}", source)
        if gt is not None and image_id not in gt.image_ids_all:
            raise InputError(f"{f}.image_id", f"image {image_id} is not in the GT images", source)
        keypoint_list(r.get("keypoints"), f"{f}.keypoints", source)
        if not is_number(r.get("score")):
            raise InputError(f"{f}.score", f"missing or not a finite number, got {r.get('score')!r}", source)
        category_id = r.get("category_id", 1)
        if not isinstance(category_id, int) or isinstance(category_id, bool):
            raise InputError(f"{f}.category_id", f"not an integer, got {category_id!r}", source)
        out.append({**r, "category_id": category_id})
    return out


def load_results(path: str | Path, gt: GroundTruth | None = None) -> list[dict]:
    """Read and validate a COCO keypoint results file (see :func:`validate_results`)."""
    return validate_results(read_json(path, "results"), str(path), gt)
