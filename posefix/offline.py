"""Refining files offline: ``posefix refine`` (:func:`refine_file`, on this machine or on Ray) and
``posefix fit-choice`` (:func:`fit_choice_file`), through the one policy of :mod:`posefix.refine`."""
from __future__ import annotations

import json
import posixpath
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from .choice import choose, fit_choice, instance_scores, keeps_every_input, matched_truth, select_margin
from .distributed import refine_images_ray
from .errors import InputError
from .fileio import atomic_path
from .formats import OUTSIDE_HINT, Estimates, image_file, image_ids, load_estimates, write_coco_results
from .images import is_uri
from .options import RefineOptions
from .refine import Refinement, by_image, raw_refinement, refine_estimates
from .refiner import Refiner
from .synth.cocoio import load_ground_truth
from .synth.diagnose import keypoint_ap
from .weights import has_fitted_choice, write_fitted_choice


def image_sources(images, keys, coco_images: dict | None, allow_outside: bool = False,
                  skipped: list | None = None) -> dict:
    """{image key: its file under the directory ``images``, or its URI under the URI ``images``} for ``keys``.
    A name leading out of ``images`` (without ``allow_outside``) is an InputError naming it, or with
    ``skipped`` a list appended to it as (key, message) and left out."""
    sources = {}
    for key in keys:
        try:
            if not is_uri(images):
                sources[key] = image_file(images, key, coco_images, allow_outside)
                continue
            name = image_file("", key, coco_images, allow_outside=True).as_posix()
            if not allow_outside and (name.startswith("/") or posixpath.normpath(name).split("/")[0] == ".."):
                raise InputError("image", f"leads outside {images} ({OUTSIDE_HINT})", repr(name))
            sources[key] = images.rstrip("/") + "/" + name
        except InputError as e:
            if skipped is None:
                raise
            skipped.append((key, str(e)))
    return sources


def shard_paths(out, shards: int | None) -> list[Path]:
    """``out`` itself, or ``shards`` files beside it: ``refined.json`` → ``refined-00000-of-00004.json``..."""
    out = Path(out)
    if shards is None:
        return [out]
    return [out.with_name(f"{out.stem}-{i:05d}-of-{shards:05d}{out.suffix}") for i in range(shards)]


def write_json_files(paths: list[Path], docs: list) -> None:
    """Write each doc as JSON to its path, atomically as :func:`posefix.fileio.write_json_atomic` does; all
    are written to temporary files before the first is renamed onto its path."""
    with ExitStack() as stack:
        for path, doc in zip(paths, docs):
            tmp = stack.enter_context(atomic_path(path))
            with open(tmp, "w") as f:
                json.dump(doc, f, separators=(",", ":"), allow_nan=False)


def write_refined(out, shards: int | None, est: Estimates, refinement: Refinement, ids, groups: dict,
                  skipped: list) -> tuple[int, str]:
    """The refined persons as COCO results in ``out`` (or ``shards`` files beside it, each image's persons in
    one), the persons of ``skipped`` images left out; every file is written in full before any replaces what
    was there. Returns (persons written, where)."""
    keep = np.ones(len(est.image_keys), dtype=bool)
    for key, _ in skipped:
        keep[groups[key]] = False
    rows = np.flatnonzero(keep)
    if not keep.all():
        est = replace(est, image_keys=[est.image_keys[i] for i in rows], keypoints=est.keypoints[rows],
                      scores=est.scores[rows], native=est.native[rows], records=[est.records[i] for i in rows],
                      sizes=None if est.sizes is None else est.sizes[rows])
    r = refinement
    results = write_coco_results(est, r.xy[rows], r.conf[rows], r.scores[rows], ids[rows], r.kept[rows])
    image_of = np.zeros(len(keep), dtype=np.int64)
    for g, group in enumerate(groups.values()):
        image_of[group] = g
    paths = shard_paths(out, shards)
    shard = image_of[rows] * len(paths) // max(len(groups), 1)
    write_json_files(paths, [[results[i] for i in np.flatnonzero(shard == s)] for s in range(len(paths))])
    return len(results), str(out) if shards is None else f"{paths[0]} ... {paths[-1].name}"


@dataclass
class FileRefinement:
    """What :func:`refine_file` did: persons written, images refined, seconds refining, where it wrote,
    present input keypoints of the persons written and how many of them were kept, the entries left out of
    the input (``skipped_entries``: messages) and the images left out (``skipped_images``: (key, message)),
    and whether the choice kept every input joint (the checkpoint's choice not fitted)."""

    persons: int
    images: int
    seconds: float
    where: str
    present: int
    kept: int
    skipped_entries: list
    skipped_images: list
    keeps_every_input: bool


def check_run(shards: int | None, ray: dict | None, options: RefineOptions) -> None:
    """How :func:`refine_file` is asked to run, checked before anything is read or written: ``shards`` only on
    Ray and at least 1, Ray with the torch backend. Errors name the arguments (``shards``, ``ray``)."""
    if ray is None and shards is not None:
        raise InputError("shards", "only goes with a run on Ray")
    if shards is not None and shards < 1:
        raise InputError("shards", f"must be at least 1, got {shards}")
    if ray is not None and options.resolved_backend != "torch":
        raise InputError("ray", "runs the torch backend only (not onnxruntime)")


def refine_file(checkpoint, input, images, out, options: RefineOptions | None = None, *, fmt: str = "coco",
                annotations=None, keep_input_below: float | None = None, workers: int = 2,
                skip_invalid: bool = False, allow_outside_images: bool = False, shards: int | None = None,
                ray: dict | None = None, start: Callable[[int], None] | None = None,
                progress: Callable[[int], None] | None = None) -> FileRefinement:
    """``posefix refine``: refine an estimator's file ``input`` (format ``fmt``) on the images under ``images``
    (a directory, or with ``ray`` a URI) with the weights ``checkpoint``, run as ``options`` say, and write
    COCO results to ``out`` (or ``shards`` files beside it).

    ``annotations``: COCO annotations naming the image files and sizes. ``skip_invalid``: leave out malformed
    entries and the persons of images that cannot be read. ``ray``: refine on Ray
    (:func:`posefix.distributed.refine_images_ray`'s keyword arguments ``actors``, ``num_gpus``, ``address``,
    ``show_progress``). ``start(total)`` is called with the number of persons once the input is read,
    ``progress(n)`` as persons are done (not on Ray)."""
    options = options or RefineOptions()
    check_run(shards, ray, options)
    if not (ray is not None and is_uri(str(images))) and not Path(images).is_dir():
        raise InputError("images", f"{images} is not a directory")
    coco_images = None
    if annotations:
        coco_images = {im["id"]: im for im in load_ground_truth(annotations).doc["images"]}
    est = load_estimates(input, fmt, images, coco_images, allow_outside_images, skip_invalid=skip_invalid)
    groups = by_image(est.image_keys)
    skipped_images: list = []  # (key, message) of the images not read, with skip_invalid
    sources = image_sources(str(images) if is_uri(str(images)) else images, groups, coco_images,
                            allow_outside_images, skipped_images if skip_invalid else None)
    refiner = run = None
    if ray is None:
        refiner = Refiner.from_checkpoint(checkpoint, options)
    else:
        def run(jobs):
            return refine_images_ray(checkpoint, jobs, options, workers=workers,
                                     skipped=skipped_images if skip_invalid else None, **ray)
    if start is not None:
        start(len(est.image_keys))
    t0 = time.perf_counter()
    out_ = refine_estimates(refiner, est, sources, output=options.output, keep_input_below=keep_input_below,
                            workers=workers, progress=progress, skipped=skipped_images if skip_invalid else None,
                            run=run)
    elapsed = time.perf_counter() - t0
    n, where = write_refined(out, shards, est, out_, image_ids(est, coco_images), groups, skipped_images)
    present = (est.keypoints[..., 2] > 0) & out_.refined[:, None]  # of the persons written
    keeps = refiner.keeps_every_input if refiner is not None else keeps_every_input(
        options.output, options.choice_margin, has_fitted_choice(checkpoint))
    return FileRefinement(n, len(groups) - len(skipped_images), elapsed, where, int(present.sum()),
                          int(out_.kept[present].sum()), list(est.skipped), skipped_images, keeps)


def fit_choice_file(checkpoint, input, images, annotations, out, options: RefineOptions | None = None, *,
                    fmt: str = "coco", workers: int = 2, skip_invalid: bool = False,
                    allow_outside_images: bool = False):
    """``posefix fit-choice``: fit the per-joint choice (:func:`posefix.choice.fit_choice`) to an estimator's
    file ``input`` on the labelled images under ``images`` (COCO ``annotations``), its margin chosen by AP on
    them (:func:`posefix.choice.select_margin`), and write a copy of ``checkpoint`` carrying it to ``out``.
    ``options``: how the refiner runs (its output is raw here). Returns the :class:`~posefix.choice.FittedChoice`."""
    if not Path(images).is_dir():
        raise InputError("images", f"{images} is not a directory")
    gt = load_ground_truth(annotations)
    coco_images = {im["id"]: im for im in gt.doc["images"]}
    est = load_estimates(input, fmt, images, coco_images, allow_outside_images, skip_invalid=skip_invalid)
    refiner = Refiner.from_checkpoint(checkpoint, (options or RefineOptions()).replace(output="raw"))
    files = {key: image_file(images, key, coco_images, allow_outside_images) for key in dict.fromkeys(est.image_keys)}
    xy, conf, input_conf = raw_refinement(refiner, est, files, workers)
    ids = image_ids(est, coco_images)
    given = est.keypoints
    truth, area = matched_truth(gt, write_coco_results(est, given[..., :2], given[..., 2], est.scores, ids))
    rule = fit_choice(given, xy, conf, input_conf, truth, area)
    rule.info.update(format=fmt, input=Path(input).name, persons=int((truth[..., 2] > 0).any(-1).sum()))
    present = given[..., 2] > 0

    def ap(pxy, pconf, output):
        return keypoint_ap(gt, write_coco_results(est, pxy, pconf, instance_scores(est.scores, pconf, present, output),
                                                  ids))

    rule.margin, by_margin = select_margin(lambda m: ap(*choose(given, xy, conf, input_conf, m, rule), "choice"))
    rule.info.update(ap_input=keypoint_ap(gt, write_coco_results(est, given[..., :2], given[..., 2], est.scores, ids)),
                     ap_raw=ap(xy, conf, "raw"), ap_fitted=by_margin[rule.margin], ap_by_margin=by_margin,
                     taken=float((np.tanh(rule.logit(given, xy, conf, input_conf) / 2) > rule.margin)[
                         truth[..., 2] > 0].mean()))
    write_fitted_choice(checkpoint, rule, out)
    return rule
