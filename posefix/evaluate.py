"""Refining synthesized inputs of a COCO set and scoring the result: AP before and after, and how
well the refined keypoints' confidences are calibrated."""
from __future__ import annotations

import numpy as np

from .formats import LAYOUTS, Estimates
from .images import coco_image_path
from .keypoints import KS_HIT, NUM_KEYPOINTS, ks
from .refine import by_image, refine_estimates
from .refiner import Refiner
from .synth.coco import synthesize_coco
from .synth.cocoio import GroundTruth
from .synth.diagnose import keypoint_ap
from .synth.profile import Profile


def refine_synthesized(refiner: Refiner, gt: GroundTruth, images_dir, seed: int = 0, profile: Profile | None = None,
                       max_persons: int | None = None) -> dict:
    """Synthesize one input per labelled GT person (seeded), refine it, and score both with pycocotools.

    Input and refined results carry the same instance score, so the AP difference is the refiner's
    localisation alone. Returns ``input_ap``, ``refined_ap``, ``persons``, the ``input`` and ``refined``
    results, and per labelled joint the refined ``confidence`` and ``hit`` (KS to the truth >= 0.5).
    """
    results, labels = synthesize_coco(gt, np.random.default_rng(seed), profile)
    if max_persons:
        results, labels = results[:max_persons], labels[:max_persons]
    entries = {im["id"]: im for im in gt.doc["images"]}
    keys = [r["image_id"] for r in results]
    poses = np.array([r["keypoints"] for r in results], dtype=np.float64).reshape(len(results), NUM_KEYPOINTS, 3)
    scores = np.array([r["score"] for r in results], dtype=np.float64)
    est = Estimates("coco", LAYOUTS["coco17"], keys, poses, scores, poses, list(results), False)
    files = {i: coco_image_path(images_dir, entries[i], allow_outside=True) for i in by_image(keys)}  # as training
    out = refine_estimates(refiner, est, files)
    xy, conf = out.xy, out.conf
    refined = [dict(r, keypoints=np.concatenate([xy[n], conf[n][:, None]], axis=1).reshape(-1).tolist())
               for n, r in enumerate(results)]
    row = {int(a): n for n, a in enumerate(gt.ids)}
    own = np.array([row[entry["gt_id"]] for entry in labels], dtype=np.int64)
    truth = gt.keypoints[own]  # (P, K, 3)
    similarity = ks(xy, truth, gt.areas[own])  # (P, K)
    labelled = truth[..., 2] > 0
    return {"input_ap": keypoint_ap(gt, results), "refined_ap": keypoint_ap(gt, refined), "persons": len(results),
            "input": results, "refined": refined, "confidence": conf[labelled], "hit": similarity[labelled] >= KS_HIT}


def calibration(confidence, hit, bins: int = 10) -> dict:
    """Reliability of confidences: per equal-width bin the count, mean confidence and hit rate, the
    expected calibration error (count-weighted |hit rate - mean confidence|) and the Brier score."""
    confidence = np.asarray(confidence, dtype=np.float64)
    hit = np.asarray(hit, dtype=np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.searchsorted(edges, confidence, side="right") - 1, 0, bins - 1)
    rows, ece = [], 0.0
    for b in range(bins):
        sel = which == b
        n = int(sel.sum())
        mean_c = float(confidence[sel].mean()) if n else None
        rate = float(hit[sel].mean()) if n else None
        if n:
            ece += n / confidence.size * abs(rate - mean_c)
        rows.append({"lo": float(edges[b]), "hi": float(edges[b + 1]), "count": n, "mean_confidence": mean_c,
                     "hit_rate": rate})
    brier = float(((confidence - hit) ** 2).mean()) if confidence.size else None
    return {"bins": rows, "ece": float(ece) if confidence.size else None, "brier": brier,
            "joints": int(confidence.size)}
