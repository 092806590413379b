"""Refining many images' persons: batched across images, with one policy for every caller, and the files.

:func:`refine_images` refines the persons of many images, batching persons across images while the images are
decoded. :func:`refine_estimates` refines the persons of an :class:`~posefix.formats.Estimates` through it and
applies the policy (:mod:`posefix.choice`): with ``output="choice"`` each joint is the input joint or the
refined one (:func:`~posefix.choice.choose`, with the refiner's margin and fitted rule), with ``"raw"`` every
joint as refined; then ``keep_input_below``; then the instance scores. ``posefix refine``, ``fit-choice``,
``demo``, search's query refinement, the evaluation on synthesized inputs and the offline benchmark refine
through it; ``refine-video``, whose frames are refined as they are decoded, applies the same policy with
:func:`~posefix.choice.finish`. :mod:`posefix.offline` refines files through it.

Glossary as in :mod:`posefix.refiner`: P persons, K = 17 joints.
"""
from __future__ import annotations

from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from .choice import (
    OUTPUTS,
    choose,
    finish,
)
from .errors import InputError
from .formats import Estimates
from .images import Reduced, decode_reduced
from .keypoints import NUM_KEYPOINTS
from .protocols import RefinerLike


def by_image(image_keys) -> dict:
    """{image key: the indices of its persons}, the images in the order of their first person."""
    groups: dict = {}
    for i, key in enumerate(image_keys):
        groups.setdefault(key, []).append(i)
    return groups


def refine_images(refiner: RefinerLike, jobs, workers: int = 2, lookahead: int = 8, progress=None, skipped=None,
                  parts: bool = False):
    """Refine the persons of many images, batching persons across images.

    jobs: iterable of (key, image path or decoded (3, H, W) uint8 tensor or :class:`~posefix.images.Reduced`,
    poses (P, K, 3) image pixels). Images are decoded in ``workers`` background threads, up to ``lookahead``
    ahead, while the model runs; each is decoded once, a JPEG at the reduction its persons' crops allow
    (:meth:`Refiner.decode_reduction`). Every model call but the last gets exactly ``refiner.batch_size``
    persons: an image's persons may be split between two calls. Fixed shapes keep the device busy and let freed
    memory be reused as it is (see :mod:`posefix.runtime`). Yields (key, xy (P, K, 2), confidence (P, K)) in
    the order of ``jobs``, each as soon as its persons are done. ``progress(n)`` is called with the number of
    persons of each call. An image that cannot be read or decoded raises its InputError or, with ``skipped`` a
    list, is appended to it as (key, message), its persons not refined and not yielded. ``parts``: refine with
    :meth:`Refiner.refine_parts` instead, yielding (key, xy, confidence, input confidence).
    """
    jobs, want_parts = iter(jobs), parts
    stage = refiner.stage
    with ThreadPoolExecutor(max_workers=max(workers, 1), thread_name_prefix="posefix-decode") as pool:
        queue: deque[_Job] = deque()  # in the order of jobs, not yet yielded

        def add_one() -> bool:
            job = next(jobs, None)
            if job is None:
                return False
            key, source, poses = job
            poses = np.asarray(poses, dtype=np.float64).reshape(-1, NUM_KEYPOINTS, 3)
            queue.append(_Job(key, pool.submit(_staged, stage, source, poses, refiner.decode_reduction), poses))
            return True

        def fill():
            while sum(job.taken == 0 for job in queue) < lookahead and add_one():
                pass

        while True:
            fill()
            parts, need, i = [], refiner.batch_size, 0  # parts: (job, first person, end)
            while need > 0:
                if i == len(queue) and not add_one():
                    break
                job = queue[i]
                if skipped is not None and job.taken == 0 and isinstance(job.image.exception(), InputError):
                    job.taken = len(job.poses)  # its image failed (reported when it leaves the queue)
                    if progress is not None:
                        progress(len(job.poses))
                take = min(len(job.poses) - job.taken, need)
                if take > 0:
                    parts.append((job, job.taken, job.taken + take))
                    job.taken += take
                    need -= take
                i += 1
            if parts:
                jobs_in = list(dict.fromkeys(job for job, _, _ in parts))
                images, reductions = zip(*(job.image.result() for job in jobs_in))
                where = {id(job): n for n, job in enumerate(jobs_in)}
                index = np.concatenate([np.full(hi - lo, where[id(job)], dtype=np.int64) for job, lo, hi in parts])
                poses = np.concatenate([job.poses[lo:hi] for job, lo, hi in parts])
                run = refiner.refine_parts if want_parts else refiner.refine
                out = run(list(images), index, poses, reductions=None if max(reductions) == 1 else reductions)
                start = 0
                for job, lo, hi in parts:
                    job.xy[lo:hi], job.conf[lo:hi] = out[0][start:start + hi - lo], out[1][start:start + hi - lo]
                    if want_parts:
                        job.input_conf[lo:hi] = out[2][start:start + hi - lo]
                    start += hi - lo
                if progress is not None:
                    progress(len(poses))
            while queue and queue[0].taken == len(queue[0].poses):
                job = queue.popleft()
                error = job.image.exception() if skipped is not None else None
                if isinstance(error, InputError):
                    skipped.append((job.key, str(error)))
                    continue
                job.image.result()  # an image without persons is still decoded: a broken file is reported
                yield (job.key, job.xy, job.conf, job.input_conf) if want_parts else (job.key, job.xy, job.conf)
            if not parts and not queue:
                return


class _Job:
    """One image of refine_images: its decoding, its poses, how many are in a batch, and their results."""

    __slots__ = ("conf", "image", "input_conf", "key", "poses", "taken", "xy")

    def __init__(self, key, image, poses: np.ndarray):
        self.key, self.image, self.poses, self.taken = key, image, poses, 0
        self.xy = poses[..., :2].copy()
        self.conf = np.zeros(poses.shape[:2])
        self.input_conf = np.zeros(poses.shape[:2])


def _staged(stage, source, poses, decode_reduction) -> Reduced:
    """A job's image, decoded when it is a file (at the reduction ``decode_reduction(poses)`` allows), staged
    for the refiner's device, with the reduction it was decoded at. Runs in a decoding thread."""
    if isinstance(source, torch.Tensor):
        source = Reduced(source, 1)
    elif not isinstance(source, Reduced):
        source = decode_reduced(source, decode_reduction(poses))
    return Reduced(stage(source.image), source.reduction)


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
    persons of a key not in it are not refined. ``refiner``: a :class:`~posefix.refiner.Refiner` (or what
    stands in for one); its ``output``, ``choice_margin`` and ``fitted_choice`` are the per-joint choice,
    ``output`` ("choice" or "raw") overriding its own. ``workers``, ``progress`` and ``skipped`` are
    :func:`refine_images`' (an unreadable image raises its InputError or, with ``skipped`` a
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


def raw_refinement(refiner, est: Estimates, files: dict, workers: int = 2):
    """Refine every person of ``est`` raw with ``refiner`` (:func:`refine_estimates`), ``files`` mapping each
    image key to its file. Returns xy (P, K, 2), confidence (P, K) and input confidence (P, K) in ``est`` order."""
    out = refine_estimates(refiner, est, files, output="raw", workers=workers)
    return out.xy, out.conf, out.input_conf
