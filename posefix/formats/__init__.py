"""Estimator output formats: reading them onto COCO-17 for the refiner, and writing refined poses back.

posefix refines COCO-17 poses in image pixels. This package reads what the estimators its users run write
(COCO results, MoveNet, BlazePose / MediaPipe Pose, TF.js PoseNet, OpenPose), maps each person onto the 17
COCO joints, and writes the refined joints back into the format's own keypoints so that nothing the user
gave is dropped. numpy only (PIL for the image headers :func:`image_sizes` reads).

One module per format (:mod:`.coco`, :mod:`.movenet`, :mod:`.blazepose`, :mod:`.posenet`, :mod:`.openpose`:
the JSON it accepts, its layout, reading and writing back), :mod:`.common` what they share; :data:`FORMATS`
maps each format's name to its :class:`Format`.

Glossary:
    P       persons read, in file order (OpenPose: files sorted by name, then ``people`` order).
    K       17, the COCO joints (``posefix.keypoints.NAMES`` order).
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

MoveNet and BlazePose need each image's (width, height): from ``image_sizes`` {image key: (width, height)}
(:func:`image_sizes`) or the entry's own ``"width"`` and ``"height"``.

Instance scores: COCO's ``score``, MoveNet MultiPose's row score and PoseNet's pose score; where the format
has none (MoveNet SinglePose, BlazePose, OpenPose, a pose-detection pose without ``score``), the mean score of
the present (score > 0) COCO joints, 0 if none is.

Writing back (:func:`write_coco_results`): COCO results with the refined joints, and for the other formats
the person's own keypoints in the format's own form with the refined COCO joints written at their mapped
positions (normalised again for MoveNet and BlazePose, the refined confidence in the joint's score slot),
every other keypoint, value and field kept as given.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import InputError
from ..fileio import read_json
from ..keypoints import NUM_KEYPOINTS
from ..synth.cocoio import validate_results
from . import blazepose, coco, movenet, openpose, posenet
from .common import (
    COCO17,
    OUTSIDE_HINT,
    Estimates,
    Format,
    Layout,
    _kind,
    _Reader,
    frame_index,
    from_coco17,
    image_file,
    image_ids,
    image_under,
    to_coco17,
)
from .openpose import openpose_key

FORMATS: dict[str, Format] = {f.name: f for f in (coco.FORMAT, movenet.FORMAT, blazepose.FORMAT, posenet.FORMAT,
                                                  openpose.FORMAT)}
LAYOUTS: dict[str, Layout] = {layout.name: layout for layout in (COCO17, blazepose.LAYOUT, openpose.BODY25,
                                                                 openpose.COCO18)}
BLAZEPOSE_NAMES = blazepose.NAMES
BODY25_NAMES = openpose.BODY25_NAMES
COCO18_NAMES = openpose.COCO18_NAMES
POSENET_PARTS = posenet.PARTS

__all__ = [
    "BLAZEPOSE_NAMES", "BODY25_NAMES", "COCO18_NAMES", "FORMATS", "LAYOUTS", "OUTSIDE_HINT", "POSENET_PARTS",
    "Estimates", "Format", "Layout", "as_coco_results", "frame_index", "from_coco17", "image_file", "image_ids",
    "image_sizes", "image_under", "load_estimates", "openpose_key", "read_estimates", "source_keypoints", "to_coco17",
    "write_coco_results",
]


def _format(fmt: str) -> Format:
    if fmt not in FORMATS:
        raise InputError("format", f"unknown estimator format {fmt!r}; one of {list(FORMATS)}")
    return FORMATS[fmt]


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
    spec = _format(fmt)
    if image_sizes is not None and not isinstance(image_sizes, dict):
        raise InputError("image_sizes", f"must be a dict {{image key: (width, height)}}, got {_kind(image_sizes)}")
    return spec.read(path, _Reader(spec, skip_invalid), image_sizes)


def image_sizes(path: str | Path, fmt: str, images_dir: str | Path | None = None, coco_images: dict | None = None,
                allow_outside: bool = False, size: tuple[int, int] | None = None) -> dict | None:
    """The ``image_sizes`` :func:`read_estimates` needs for format ``fmt``: None where its coordinates are in
    pixels, else (width, height) of each image the file's entries name: ``size`` where given (a video's
    frames), else from ``coco_images`` ({image_id: COCO image dict}) where it has them, else from the header
    of the image file under ``images_dir`` (:func:`image_file`; the InputError of a refused name; a file that
    cannot be read is left out, to be reported by name where it is needed)."""
    if not _format(fmt).normalised or (size is None and images_dir is None and not coco_images):
        return None  # pixels, or nothing to read sizes from: read_estimates names what each entry lacks
    from PIL import Image

    doc = read_json(path, "input")
    sizes = {}
    by_id = coco_images or {}
    for entry in doc if isinstance(doc, list) else []:
        key = entry.get("image") if isinstance(entry, dict) else None
        if not isinstance(key, (int, str)) or key in sizes:
            continue
        if size is not None:
            sizes[key] = size
            continue
        if isinstance(key, int) and key in by_id and {"width", "height"} <= set(by_id[key]):
            sizes[key] = (by_id[key]["width"], by_id[key]["height"])
            continue
        try:
            file = image_file(images_dir, key, coco_images, allow_outside)
        except InputError as e:
            sizes[key] = e
            continue
        try:
            with Image.open(file) as im:
                sizes[key] = im.size
        except (OSError, ValueError):
            pass  # reported by name when the file is needed
    return sizes


def load_estimates(path: str | Path, fmt: str, images_dir: str | Path | None = None, coco_images: dict | None = None,
                   allow_outside: bool = False, size: tuple[int, int] | None = None, *,
                   skip_invalid: bool = False) -> Estimates:
    """An estimator's file read as every command reads one: :func:`read_estimates` with the image sizes of
    :func:`image_sizes` (for the formats with normalised coordinates)."""
    return read_estimates(path, fmt, image_sizes(path, fmt, images_dir, coco_images, allow_outside, size),
                          skip_invalid=skip_invalid)


def source_keypoints(est: Estimates, i: int, refined) -> object:
    """Person i's keypoints in the format's own JSON form with its COCO joints replaced by ``refined``
    (17, 3) (x, y in pixels, confidence), normalised again for MoveNet and BlazePose; the confidence goes
    into the joint's score (MoveNet score, BlazePose visibility, PoseNet score, OpenPose c). Every other
    keypoint and value (BlazePose z and presence, MoveNet MultiPose's box and score) is kept as given.
    A PoseNet part the file lacked is appended."""
    return FORMATS[est.format].write(est, i, refined)


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
    spec = FORMATS[est.format]
    out = []
    for i in range(p):
        keypoints = refined[i].reshape(-1).tolist()
        source = {} if kept is None else {"keypoint_source": ["input" if k else "refined" for k in kept[i].tolist()]}
        if spec.coco_results:
            out.append({**est.records[i], "image_id": image_ids[i], "keypoints": keypoints, "score": float(inst[i]),
                        **source})
            continue
        res = {"image_id": image_ids[i], "category_id": 1, "keypoints": keypoints, "score": float(inst[i]),
               **source, "source_format": est.format, spec.key_field: est.image_keys[i],
               "source_keypoints": spec.write(est, i, refined[i])}
        fields = spec.fields(est.records[i])
        if fields:
            res["source_fields"] = fields
        out.append(res)
    return out


def as_coco_results(path, fmt: str, images_dir, gt, allow_outside=False) -> list[dict]:
    """An estimator's output in its own format, read as ``posefix refine`` reads it, as validated COCO results
    on ``gt``'s images (the keypoints and instance scores as given)."""
    coco_images = {im["id"]: im for im in gt.doc["images"]}
    est = load_estimates(path, fmt, images_dir, coco_images, allow_outside)
    return validate_results(write_coco_results(est, est.keypoints[..., :2], est.keypoints[..., 2], est.scores,
                                               image_ids(est, coco_images)), str(path), gt)
