"""Ronchi & Perona's keypoint error taxonomy, vectorised, and the diagnosis of a COCO results file.

Glossary: N detections, K = 17 joints, M other GT persons of the same image (padded),
A = 2 + 2M candidates per joint in the classifier's tie order: own joint, the other persons' same
joint, own left/right partner, the other persons' partners. D results, G GT annotations.

:func:`diagnose` follows coco-analyze (Ronchi & Perona's tool) with two stated differences: the area
range is COCO's [0, 1e10] (coco-analyze starts at 32²), and an erroneous keypoint is corrected by
moving it onto its own GT joint (KS = 1) rather than to a KS boundary.
"""
from __future__ import annotations

import contextlib
import io

import numpy as np

from ..errors import InputError
from ..keypoints import KS_HIT, NAMES, NUM_KEYPOINTS, PARTNER, ks
from .coco import overlaps
from .cocoio import GroundTruth, validate_results
from .profile import GOOD, INVERSION, JITTER, MISS, OUTCOMES, SWAP

NO_LABEL = -1  # the GT does not label this joint
FORMAT = "posefix-diagnosis/1"
MATCH_OKS = 0.1  # COCO matching threshold of the taxonomy: every detection with OKS >= 0.1 to a GT is judged
MAX_DETS = 20  # COCO keypoint evaluation's detections per image; lower-scored ones stay unmatched
AREA_RANGE = [0.0, 1e10]  # COCO's "all" (coco-analyze's starts at 32²)
CORRECTION_ORDER = ("miss", "swap", "inversion", "jitter")  # coco-analyze's cumulative order
CORRECTION = "own GT joint (KS = 1)"
AP_METRIC = ("COCO keypoint AP (pycocotools stats[0], OKS .50:.95, area all, 20 detections) on the images the "
             "results cover")
# (name, lowest, highest) of other non-crowd persons overlapping the matched GT (box IoU >= 0.1).
OVERLAP_BINS = (("0", 0, 0), ("1-2", 1, 2), ("3-8", 3, 8), (">8", 9, np.inf))
# (name, lowest, highest) of the matched GT's labelled keypoints (COCO's num_keypoints).
VISIBLE_BINS = (("1-5", 1, 5), ("6-10", 6, 10), ("11-15", 11, 15), ("16-17", 16, 17))
PERSON_CATEGORY = {"id": 1, "name": "person", "supercategory": "person"}


def candidate_ks(pred, gt, area, others=None, others_area=None):
    """KS of every predicted joint to every candidate, -1 where the candidate is unlabelled.

    pred: (N, K, 2+); gt: (N, K, 3); area: (N,); others: (N, M, K, 3); others_area: (N, M).
    Returns (N, A, K); KS to a candidate uses that candidate person's area.
    """
    pred = np.asarray(pred, dtype=np.float64)[..., :2]
    gt = np.asarray(gt, dtype=np.float64)
    n = gt.shape[0]
    if others is None:
        others, others_area = np.zeros((n, 0, NUM_KEYPOINTS, 3)), np.zeros((n, 0))
    others = np.asarray(others, dtype=np.float64).reshape(n, -1, NUM_KEYPOINTS, 3)
    persons = np.concatenate([gt[:, None], others], axis=1)  # (N, 1+M, K, 3)
    areas = np.concatenate([np.asarray(area, np.float64).reshape(n, 1),
                            np.asarray(others_area, np.float64).reshape(n, -1)], axis=1)
    cand = np.concatenate([persons, persons[:, :, PARTNER]], axis=1)  # (N, A, K, 3)
    cand_area = np.concatenate([areas, areas], axis=1)  # (N, A)
    return np.where(cand[..., 2] > 0, ks(pred[:, None], cand, cand_area), -1.0)  # (N, A, K)


def classify(pred, gt, area, others=None, others_area=None):
    """Label each joint of each prediction: (N, K) int8 codes into ``OUTCOMES``, -1 where the GT
    joint is unlabelled.

    The single best candidate (highest KS; ties to the earliest in the tie order) decides: the own
    joint with KS >= 0.85 is good, with 0.5 <= KS < 0.85 jitter; the own partner with KS >= 0.5 an
    inversion (never for the nose, whose partner is itself); another person's joint or partner with
    KS >= 0.5 a swap; KS < 0.5 to every candidate a miss.
    """
    k = candidate_ks(pred, gt, area, others, others_area)
    m = (k.shape[1] - 2) // 2
    best = k.max(axis=1)  # (N, K)
    arg = k.argmax(axis=1)  # first maximum: the tie order
    labels = np.full(best.shape, SWAP, dtype=np.int8)
    labels[arg == m + 1] = INVERSION
    labels[arg == 0] = np.where(best[arg == 0] >= 0.85, GOOD, JITTER)
    labels[best < KS_HIT] = MISS
    labels[np.asarray(gt)[..., 2] <= 0] = NO_LABEL
    return labels


def label_names(labels):
    """(…, K) codes → nested lists of outcome names, ``None`` for unlabelled joints."""
    names = np.array(OUTCOMES + (None,), dtype=object)
    return names[np.asarray(labels)].tolist()


def diagnose(gt: GroundTruth, results: list[dict], source: str = "results", *, with_ap: bool = True) -> dict:
    """Classify every keypoint of every detection in ``results`` and summarise, as coco-analyze does.

    Matching is COCO's (pycocotools COCOeval, OKS >= 0.1, area [0, 1e10], 20 detections per image)
    on the images the results cover. A detection matched to a labelled, non-crowd GT person gets a
    label per joint the GT labels, against all other non-crowd GT persons of the image; one matched
    to a crowd region or to a GT with no labelled keypoint gets none. ``with_ap=False`` skips the
    eight AP evaluations (``summary["ap"]`` is then None).

    Returns ``{"format", "source", "detections", "summary"}``; ``detections`` has one entry per
    result, in order: ``{"index", "image_id", "matched_gt", "oks", "labels"}`` with the matched GT's
    annotation id and COCOeval's own OKS of the match (null when unmatched; for a GT with no labelled
    keypoint, COCO's distance-to-box variant), and 17 outcome names, null where there is no label.
    """
    results = validate_results(results, source, gt)
    if not results:
        raise InputError("results", "is empty: nothing to diagnose", source)
    coco_gt = _coco_gt(gt)
    categories = set(coco_gt.getCatIds())
    for i, r in enumerate(results):
        if r["category_id"] not in categories:
            raise InputError(f"results[{i}].category_id", f"category {r['category_id']} is not among the GT "
                             f"categories {sorted(categories)}", source)
    image_ids = np.array([r["image_id"] for r in results], dtype=np.int64)  # (D,)
    keypoints = np.array([r["keypoints"] for r in results], dtype=np.float64).reshape(-1, NUM_KEYPOINTS, 3)
    scores = np.array([r["score"] for r in results], dtype=np.float64)
    cats = np.array([r["category_id"] for r in results], dtype=np.int64)
    covered = sorted(set(image_ids.tolist()))

    matched_id, oks_value = match_detections(coco_gt, covered, image_ids, keypoints, scores, cats)
    index_of = {int(a): i for i, a in enumerate(gt.ids)}
    matched = np.array([index_of.get(int(a), -1) for a in matched_id], dtype=np.int64)  # (D,) GT index or -1
    labels = label_matched(gt, keypoints, matched)

    detections = [{"index": i, "image_id": int(image_ids[i]),
                   "matched_gt": int(matched_id[i]) if matched[i] >= 0 else None,
                   "oks": float(oks_value[i]) if matched[i] >= 0 else None,
                   "labels": names} for i, names in enumerate(label_names(labels))]
    ap = None
    if with_ap:
        gt_xy = np.where((matched >= 0)[:, None, None], gt.keypoints[np.maximum(matched, 0), :, :2], 0.0)
        ap = ap_gains(coco_gt, covered, image_ids, keypoints, scores, cats, labels, gt_xy)
    summary = {"images": len(covered), "detections": _detection_counts(gt, matched, labels),
               **_label_counts(labels), "ap": ap, "crowding": crowding_breakdown(gt, matched, labels)}
    return {"format": FORMAT, "source": source, "detections": detections, "summary": summary}


def _quiet():
    """pycocotools prints progress to stdout; diagnosis output must not."""
    return contextlib.redirect_stdout(io.StringIO())


def _coco_gt(gt: GroundTruth):
    """A pycocotools COCO object over ``gt.doc``, built in memory.

    The annotations are copies (COCOeval writes flags into them), completed with the fields COCOeval
    reads where the file leaves them out (area, iscrowd, keypoints of crowd regions, num_keypoints).
    """
    from pycocotools.coco import COCO  # imported here so that the taxonomy itself needs numpy only

    anns = []
    for i, a in enumerate(gt.doc["annotations"]):
        kp = gt.keypoints[i]  # (K, 3)
        anns.append({**a, "area": float(gt.areas[i]), "bbox": gt.boxes[i].tolist(), "iscrowd": int(gt.crowd[i]),
                     "category_id": a.get("category_id", PERSON_CATEGORY["id"]),
                     "keypoints": kp.reshape(-1).tolist(),
                     "num_keypoints": a.get("num_keypoints", int((kp[:, 2] > 0).sum()))})
    categories = gt.doc.get("categories") or [PERSON_CATEGORY]
    with _quiet():
        coco = COCO()
        coco.dataset = {"images": gt.doc["images"], "annotations": anns, "categories": categories}
        coco.createIndex()
    return coco


def _coco_dt(coco_gt, image_ids, keypoints, scores, cats):
    """Results as a pycocotools object; result i gets annotation id i + 1.

    image_ids (D,), keypoints (D, K, 3), scores (D,), cats (D,).
    """
    anns = [{"image_id": int(im), "category_id": int(c), "keypoints": kp.reshape(-1).tolist(), "score": float(s)}
            for im, c, kp, s in zip(image_ids, cats, keypoints, scores)]
    with _quiet():
        return coco_gt.loadRes(anns)


def _evaluator(coco_gt, coco_dt, covered):
    from pycocotools.cocoeval import COCOeval

    ev = COCOeval(coco_gt, coco_dt, "keypoints")
    ev.params.imgIds = list(covered)
    return ev


def match_detections(coco_gt, covered, image_ids, keypoints, scores, cats):
    """COCO's greedy matching at OKS >= 0.1 over the covered images.

    Returns the matched GT annotation id (D,) (0 when unmatched) and the OKS of each match (D,)
    (NaN when unmatched), read from COCOeval's own OKS matrix.
    """
    ev = _evaluator(coco_gt, _coco_dt(coco_gt, image_ids, keypoints, scores, cats), covered)
    ev.params.iouThrs = np.array([MATCH_OKS])
    ev.params.areaRng, ev.params.areaRngLbl = [AREA_RANGE], ["all"]
    ev.params.maxDets = [MAX_DETS]
    with _quiet():
        ev.evaluate()
    d = image_ids.size
    matched_id = np.zeros(d, dtype=np.int64)
    oks_value = np.full(d, np.nan)
    for e in ev.evalImgs:
        if e is None:
            continue
        # Rows of COCOeval's OKS matrix follow dtIds; its columns, the image's GT in index order.
        ious = ev.ious[e["image_id"], e["category_id"]]
        column = {g: c for c, g in enumerate(coco_gt.getAnnIds(imgIds=[e["image_id"]], catIds=[e["category_id"]]))}
        for row, (dt_id, gt_id) in enumerate(zip(e["dtIds"], e["dtMatches"][0])):
            if gt_id:
                matched_id[dt_id - 1] = int(gt_id)
                oks_value[dt_id - 1] = ious[row, column[int(gt_id)]]
    return matched_id, oks_value


def _other_persons(gt: GroundTruth) -> list[np.ndarray]:
    """For every annotation, the indices of the other non-crowd persons of its image that label a joint."""
    candidate = ~gt.crowd & (gt.keypoints[..., 2] > 0).any(-1)  # (G,)
    others: list[np.ndarray] = [np.zeros(0, dtype=np.int64)] * gt.ids.size
    order = np.argsort(gt.image_ids, kind="stable")
    for idx in np.split(order, np.flatnonzero(np.diff(gt.image_ids[order])) + 1):
        persons = idx[candidate[idx]]
        for i in idx:
            others[i] = persons[persons != i]
    return others


def label_matched(gt: GroundTruth, keypoints, matched) -> np.ndarray:
    """Labels (D, K) of detections ``keypoints`` (D, K, 3) matched to GT indices ``matched`` (D,), -1 unmatched.

    Detections matched to a crowd region or to a GT with no labelled joint, and unmatched ones, get
    ``NO_LABEL`` throughout.
    """
    labels = np.full((matched.size, NUM_KEYPOINTS), NO_LABEL, dtype=np.int8)
    rows = np.flatnonzero(matched >= 0)
    g = matched[rows]
    keep = ~gt.crowd[g] & (gt.keypoints[g, :, 2] > 0).any(-1)
    rows, g = rows[keep], g[keep]
    others = _other_persons(gt)
    counts = np.array([others[i].size for i in g], dtype=np.int64)
    # Detections whose images have the same number of other persons go together: no padding.
    for m in np.unique(counts):
        sel = counts == m
        who = g[sel]
        idx = np.stack([others[i] for i in who]) if m else np.zeros((who.size, 0), dtype=np.int64)  # (n, m)
        labels[rows[sel]] = classify(keypoints[rows[sel]], gt.keypoints[who], gt.areas[who],
                                     gt.keypoints[idx], gt.areas[idx])
    return labels


def _counts(labels) -> dict:
    """Outcome counts over (..., K) labels."""
    return {name: int((labels == code).sum()) for code, name in enumerate(OUTCOMES)}


def _shares(counts: dict, total: int) -> dict:
    return {name: (c / total if total else None) for name, c in counts.items()}


def _label_counts(labels) -> dict:
    """``{"keypoints": {...}, "per_keypoint": {name: {...}}}``: labelled joints, counts and shares."""
    labelled = labels >= 0  # (D, K)
    total = int(labelled.sum())
    overall = _counts(labels)
    per_keypoint = {}
    for j, name in enumerate(NAMES):
        n = int(labelled[:, j].sum())
        c = _counts(labels[:, j])
        per_keypoint[name] = {"labelled": n, "counts": c, "shares": _shares(c, n)}
    return {"keypoints": {"labelled": total, "counts": overall, "shares": _shares(overall, total)},
            "per_keypoint": per_keypoint}


def _detection_counts(gt: GroundTruth, matched, labels) -> dict:
    m = matched >= 0
    labelled = (labels >= 0).any(-1)
    return {"total": int(matched.size), "matched": int(m.sum()), "labelled": int(labelled.sum()),
            "unmatched": int((~m).sum()),
            "matched_to_crowd": int(gt.crowd[matched[m]].sum()),
            "matched_to_unlabelled_gt": int((m & ~labelled).sum() - gt.crowd[matched[m]].sum())}


def _bin(value, bins) -> int:
    return next(b for b, (_, lo, hi) in enumerate(bins) if lo <= value <= hi)


def crowding_breakdown(gt: GroundTruth, matched, labels) -> dict:
    """Outcome counts of the labelled detections by crowding × labelled keypoints of the matched GT.

    Crowding = other non-crowd GT persons whose box has IoU >= 0.1 with the matched GT's box (as
    :func:`synth.coco.overlaps` counts them). The ">8" bin appears only when a detection falls in it.
    Returns ``{"overlap_bins", "visible_bins", "cells": {overlap bin: {visible bin: counts}}}``, each
    cell ``{"detections", "labelled", "good", "jitter", "inversion", "swap", "miss"}``.
    """
    ov, _ = overlaps(gt)
    rows = np.flatnonzero((labels >= 0).any(-1))
    g = matched[rows]
    nv = (gt.keypoints[g, :, 2] > 0).sum(-1)
    o_bin = np.array([_bin(x, OVERLAP_BINS) for x in ov[g]], dtype=np.int64)
    v_bin = np.array([_bin(x, VISIBLE_BINS) for x in nv], dtype=np.int64)
    n_overlap = len(OVERLAP_BINS) if (o_bin == len(OVERLAP_BINS) - 1).any() else len(OVERLAP_BINS) - 1
    cells = {}
    for ob in range(n_overlap):
        cells[OVERLAP_BINS[ob][0]] = {}
        for vb, (vname, _, _) in enumerate(VISIBLE_BINS):
            sel = rows[(o_bin == ob) & (v_bin == vb)]
            cells[OVERLAP_BINS[ob][0]][vname] = {"detections": int(sel.size), "labelled": int((labels[sel] >= 0).sum()),
                                                 **_counts(labels[sel])}
    return {"overlap_bins": [b[0] for b in OVERLAP_BINS[:n_overlap]], "visible_bins": [b[0] for b in VISIBLE_BINS],
            "cells": cells}


STAT_NAMES = ("AP", "AP50", "AP75", "APm", "APl", "AR", "AR50", "AR75", "ARm", "ARl")


def coco_stats(coco_gt, covered, image_ids, keypoints, scores, cats) -> dict:
    """pycocotools' ten keypoint statistics (AP, AP50, AP75, APm, APl, AR, ...) of the given detections
    on the covered images; a statistic pycocotools cannot compute (no GT) is None."""
    ev = _evaluator(coco_gt, _coco_dt(coco_gt, image_ids, keypoints, scores, cats), covered)
    with _quiet():
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {name: (float(v) if v >= 0 else None) for name, v in zip(STAT_NAMES, ev.stats)}


def average_precision(coco_gt, covered, image_ids, keypoints, scores, cats) -> float | None:
    """pycocotools' keypoint AP (stats[0]) of the given detections on the covered images; None when
    those images have no GT person to find."""
    return coco_stats(coco_gt, covered, image_ids, keypoints, scores, cats)["AP"]


def ap_gains(coco_gt, covered, image_ids, keypoints, scores, cats, labels, gt_xy) -> dict:
    """AP of the results as they are, with each error type corrected alone, and cumulatively.

    A corrected keypoint is moved onto its own GT joint (``gt_xy`` (D, K, 2)), keeping its
    confidence. Cumulative corrections follow coco-analyze's order: miss, swap, inversion, jitter;
    each cumulative gain is over the step before.
    """
    def ap_of(kinds):
        fixed = keypoints.copy()
        mask = np.isin(labels, [OUTCOMES.index(k) for k in kinds])  # (D, K)
        fixed[mask, :2] = gt_xy[mask]
        return average_precision(coco_gt, covered, image_ids, fixed, scores, cats)

    def gain(ap, base):
        return None if ap is None or base is None else ap - base

    original = ap_of(())
    alone = {}
    for err in CORRECTION_ORDER:
        ap = ap_of((err,))
        alone[err] = {"ap": ap, "gain": gain(ap, original)}
    cumulative, previous = {}, original
    for step, err in enumerate(CORRECTION_ORDER):
        ap = alone[err]["ap"] if step == 0 else ap_of(CORRECTION_ORDER[:step + 1])
        cumulative[err] = {"ap": ap, "gain": gain(ap, previous)}
        previous = ap
    return {"metric": AP_METRIC, "correction": CORRECTION, "original": original, "alone": alone,
            "cumulative": cumulative}


def keypoint_stats(gt: GroundTruth, results: list[dict], image_ids=None) -> dict:
    """pycocotools' keypoint statistics of ``results`` on the images they cover (or on ``image_ids``)."""
    results = validate_results(results, "results", gt)
    covered = sorted({r["image_id"] for r in results}) if image_ids is None else sorted(image_ids)
    if not covered:
        return dict.fromkeys(STAT_NAMES)
    coco_gt = _coco_gt(gt)
    ids = np.array([r["image_id"] for r in results], dtype=np.int64)
    keypoints = np.array([r["keypoints"] for r in results], dtype=np.float64).reshape(-1, NUM_KEYPOINTS, 3)
    scores = np.array([r["score"] for r in results], dtype=np.float64)
    cats = np.array([r["category_id"] for r in results], dtype=np.int64)
    return coco_stats(coco_gt, covered, ids, keypoints, scores, cats)


def keypoint_ap(gt: GroundTruth, results: list[dict], image_ids=None) -> float | None:
    """pycocotools' keypoint AP of ``results`` on the images they cover (or on ``image_ids``)."""
    if not results and image_ids is None:
        return None
    return keypoint_stats(gt, results, image_ids)["AP"]
