"""Synthesis over a whole COCO annotation file."""
from __future__ import annotations

import numpy as np

from .cocoio import GroundTruth
from .keypoints import NUM_KEYPOINTS, box_iou
from .profile import OUTCOMES, Profile
from .synthesize import UNLABELLED, synthesize

OVERLAP_IOU = 0.1
MIN_AREA = 1.0  # px²; keeps the KS scale of degenerate annotations positive


def _images(gt: GroundTruth):
    """Per image with two or more non-crowd persons: their indices (M,) and box IoUs (M, M)."""
    order = np.argsort(gt.image_ids, kind="stable")
    bounds = np.flatnonzero(np.diff(gt.image_ids[order])) + 1
    for idx in np.split(order, bounds):
        idx = idx[~gt.crowd[idx]]
        if idx.size >= 2:
            yield idx, box_iou(gt.boxes[idx], gt.boxes[idx])


def overlaps(gt: GroundTruth) -> tuple[np.ndarray, list[np.ndarray]]:
    """For every annotation, the count of non-crowd persons of its image whose box has IoU >= 0.1
    with its box, and the indices of those among them that have labelled keypoints."""
    n = gt.ids.size
    ov = np.zeros(n, dtype=np.int64)
    near: list[np.ndarray] = [np.zeros(0, dtype=np.int64)] * n
    labelled = (gt.keypoints[..., 2] > 0).any(-1)
    for idx, iou in _images(gt):
        np.fill_diagonal(iou, 0.0)
        hit = iou >= OVERLAP_IOU
        ov[idx] = hit.sum(1)
        for row, i in enumerate(idx):
            near[i] = idx[hit[row] & labelled[idx]]
    return ov, near


def image_persons(gt: GroundTruth) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """For every annotation, the other non-crowd persons of its image that label a joint (indices),
    and whether each overlaps it (box IoU >= 0.1)."""
    n = gt.ids.size
    members: list[np.ndarray] = [np.zeros(0, dtype=np.int64)] * n
    overlap: list[np.ndarray] = [np.zeros(0, dtype=bool)] * n
    labelled = (gt.keypoints[..., 2] > 0).any(-1)
    for idx, iou in _images(gt):
        for row, i in enumerate(idx):
            keep = labelled[idx] & (idx != i)
            members[i], overlap[i] = idx[keep], iou[row, keep] >= OVERLAP_IOU
    return members, overlap


def synthesize_coco(gt: GroundTruth, rng: np.random.Generator, profile: Profile | None = None):
    """One synthesized input pose per labelled, non-crowd GT person, in annotation order.

    Swaps and misses are planted around the persons that overlap (box IoU >= 0.1), as PoseFix does;
    every point also keeps clear of the other persons of the image, so that a classifier that looks at
    the whole image (as COCO-style analysis does) labels it as planted.

    Returns (results, labels): COCO results dicts, and per result what was planted:
    ``{"gt_id", "image_id", "labels": [K names, "unlabelled" for joints the GT does not label],
    "anchors": [K × [GT annotation id, joint]]}`` (the anchor a joint was planted around).
    """
    persons = np.flatnonzero(~gt.crowd & (gt.keypoints[..., 2] > 0).any(-1))
    ov, _ = overlaps(gt)
    near, near_overlap = image_persons(gt)
    counts = np.array([near[i].size for i in persons], dtype=np.int64)
    kp = np.zeros((persons.size, NUM_KEYPOINTS, 3))
    outcome = np.zeros((persons.size, NUM_KEYPOINTS), dtype=np.int64)
    anchor_id = np.zeros((persons.size, NUM_KEYPOINTS), dtype=np.int64)
    anchor_joint = np.zeros((persons.size, NUM_KEYPOINTS), dtype=np.int64)
    score = np.zeros(persons.size)
    # Persons with the same number of overlapping persons go together: no padding.
    for m in np.unique(counts):
        sel = np.flatnonzero(counts == m)
        who = persons[sel]
        others_idx = np.stack([near[i] for i in who]) if m else np.zeros((who.size, 0), dtype=np.int64)
        others_overlap = np.stack([near_overlap[i] for i in who]) if m else np.zeros((who.size, 0), dtype=bool)
        res = synthesize(gt.keypoints[who], np.maximum(gt.areas[who], MIN_AREA), rng,
                         others=gt.keypoints[others_idx], others_area=np.maximum(gt.areas[others_idx], MIN_AREA),
                         others_overlap=others_overlap, ov=ov[who], profile=profile)
        kp[sel], outcome[sel], score[sel] = res.keypoints, res.outcome, res.score
        own = np.broadcast_to(gt.ids[who][:, None], res.anchor_person.shape)
        other_ids = gt.ids[others_idx] if m else np.zeros((who.size, 1), dtype=np.int64)
        anchor_id[sel] = np.where(res.anchor_person < 0, own,
                                  np.take_along_axis(other_ids, np.maximum(res.anchor_person, 0), axis=1))
        anchor_joint[sel] = res.anchor_joint
    names = np.array(list(OUTCOMES) + ["unlabelled"], dtype=object)
    outcome[outcome == UNLABELLED] = len(OUTCOMES)
    results, labels = [], []
    for row, i in enumerate(persons):
        results.append({"image_id": int(gt.image_ids[i]), "category_id": 1,
                        "keypoints": kp[row].reshape(-1).tolist(), "score": float(score[row])})
        labels.append({"gt_id": int(gt.ids[i]), "image_id": int(gt.image_ids[i]),
                       "labels": names[outcome[row]].tolist(),
                       "anchors": [[int(a), int(j)] for a, j in zip(anchor_id[row], anchor_joint[row])]})
    return results, labels
