"""Refining an estimator's persons over their images, and what is kept and scored: one policy for every path.

:func:`refine_estimates` refines the persons of an :class:`~posefix.formats.Estimates` on their images, batched
across images (:func:`posefix.engine.refine_images`), and applies the policy: with ``output="choice"`` each
joint is the input joint or the refined one (:func:`posefix.engine.choose`, with the refiner's margin and fitted
rule), with ``"raw"`` every joint as refined; then ``keep_input_below``; then the instance scores
(:func:`instance_scores`). ``posefix refine`` (``demo`` through it), ``fit-choice``,
:func:`posefix.engine.refine_results` and the offline benchmark refine through it; ``refine-video``, whose
frames are refined as they are decoded, applies the same policy to them with :func:`finish`.

Glossary as in :mod:`posefix.engine`: P persons, K = 17 joints.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .engine import OUTPUTS, choose, kept_input, refine_images
from .errors import InputError


def by_image(image_keys) -> dict:
    """{image key: the indices of its persons}, the images in the order of their first person."""
    groups: dict = {}
    for i, key in enumerate(image_keys):
        groups.setdefault(key, []).append(i)
    return groups


def instance_scores(scores, conf, present, output: str) -> np.ndarray:
    """Each refined person's instance score: with the per-joint choice the input's own (an input whose every
    joint is kept comes back exactly as given, and COCO's ranking of the persons is the estimator's); raw, the
    input's × the mean refined confidence of its present joints. scores (P,), conf (P, K), present (P, K) bool."""
    if output == "choice":
        return np.asarray(scores, dtype=np.float64)
    total, count = (conf * present).sum(1), np.maximum(present.sum(1), 1)
    with np.errstate(over="ignore", invalid="ignore"):
        product = scores * total / count
    # scores near float64's maximum overflow the product; the mean confidence (at most 1) first cannot
    return np.where(np.isfinite(product) | ~np.isfinite(scores), product, scores * (total / count))


def finish(given, scores, xy, conf, output: str, keep_input_below: float | None = None):
    """The policy after the per-joint choice: given (P, K, 3) the input poses, scores (P,) their instance scores,
    xy (P, K, 2) and conf (P, K) the refined (chosen) joints. ``keep_input_below``: the input joint, its score as
    confidence, wherever the refined confidence is below it and below the input joint's score. Returns xy, conf,
    kept (P, K) bool (the input joint exactly: ``keypoint_source`` "input") and the instance scores (P,)."""
    given = np.asarray(given, dtype=np.float64)
    if keep_input_below is not None:
        xy, conf = np.array(xy, dtype=np.float64), np.array(conf, dtype=np.float64)
        keep = (conf < keep_input_below) & (conf < given[..., 2])
        xy[keep], conf[keep] = given[keep][:, :2], given[keep][:, 2]
    return xy, conf, kept_input(given, xy), instance_scores(scores, conf, given[..., 2] > 0, output)


@dataclass
class Refinement:
    """What :func:`refine_estimates` gives, in the order of the estimates' persons.

    xy (P, K, 2) image pixels and conf (P, K): the joints after the policy; kept (P, K) bool: where a joint is
    the input's exactly; scores (P,): the instance scores; input_conf (P, K): the input-confidence head's
    estimate for each input joint (None where ``run`` refined); refined (P,) bool: the persons refined (False:
    of an image not given or left out, their values the input's as given)."""

    xy: np.ndarray
    conf: np.ndarray
    kept: np.ndarray
    scores: np.ndarray
    input_conf: np.ndarray | None
    refined: np.ndarray


def refine_estimates(refiner, est, sources: dict, *, output: str | None = None,
                     keep_input_below: float | None = None, workers: int = 2, progress=None,
                     skipped: list | None = None, run=None) -> Refinement:
    """Refine the persons of ``est`` (:class:`posefix.formats.Estimates`) on their images, with the policy.

    sources: {image key: its file, or its decoded (3, H, W) uint8 tensor}, in the order to refine them; the
    persons of a key not in it are not refined. ``refiner``: a :class:`~posefix.engine.Refiner` (or what
    stands in for one); its ``output``, ``choice_margin`` and ``fitted_choice`` are the per-joint choice,
    ``output`` ("choice" or "raw") overriding its own. ``workers``, ``progress`` and ``skipped`` are
    :func:`~posefix.engine.refine_images`' (an unreadable image raises its InputError or, with ``skipped`` a
    list, is appended to it and its persons not refined). ``run``: what refines instead, a callable from the
    jobs (key, source, poses (p, K, 3)) to what refine_images yields, (key, xy, confidence) per image, the
    choice already made (:func:`posefix.distributed.refine_images_ray`, whose actors' refiners make it);
    ``refiner`` may then be None, and ``output`` names the choice made."""
    if output is None:
        if refiner is None:
            raise ValueError("output is needed where no refiner is given")
        output = refiner.output
    if output not in OUTPUTS:
        raise InputError("output", f"must be one of {list(OUTPUTS)}, got {output!r}")
    given = np.asarray(est.keypoints, dtype=np.float64)
    groups = by_image(est.image_keys)
    xy, conf = given[..., :2].copy(), given[..., 2].copy()
    input_conf = np.zeros(given.shape[:2]) if run is None else None
    refined = np.zeros(len(given), dtype=bool)
    jobs = ((key, source, given[groups[key]]) for key, source in sources.items())
    if run is None:
        results = refine_images(refiner, jobs, workers=workers, progress=progress, skipped=skipped, parts=True)
    else:
        results = run(jobs)
    try:
        for key, *parts in results:
            rows = groups[key]
            xy[rows], conf[rows] = parts[0], parts[1]
            if input_conf is not None:
                input_conf[rows] = parts[2]
            refined[rows] = True
    finally:
        close = getattr(results, "close", None)
        if close is not None:
            close()  # a generator's threads (or Ray) stop with it, also when interrupted
    if run is None and output == "choice":
        xy[refined], conf[refined] = choose(given[refined], xy[refined], conf[refined], input_conf[refined],
                                            refiner.choice_margin, refiner.fitted_choice)
    xy, conf, kept, scores = finish(given, est.scores, xy, conf, output, keep_input_below)
    return Refinement(xy, conf, kept, scores, input_conf, refined)
