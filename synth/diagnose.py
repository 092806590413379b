"""Ronchi & Perona's keypoint error taxonomy, vectorised.

Glossary: N detections, K = 17 joints, M other GT persons of the same image (padded),
A = 2 + 2M candidates per joint in the classifier's tie order: own joint, the other persons' same
joint, own left/right partner, the other persons' partners.
"""
from __future__ import annotations

import numpy as np

from .keypoints import NUM_KEYPOINTS, PARTNER, SIGMAS
from .profile import GOOD, INVERSION, JITTER, MISS, OUTCOMES, SWAP

NO_LABEL = -1  # the GT does not label this joint


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
    d2 = np.sum((cand[..., :2] - pred[:, None]) ** 2, axis=-1)  # (N, A, K)
    scale = 2.0 * cand_area[..., None] * (2.0 * SIGMAS) ** 2 + np.spacing(1)
    return np.where(cand[..., 2] > 0, np.exp(-d2 / scale), -1.0)


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
    labels[best < 0.5] = MISS
    labels[np.asarray(gt)[..., 2] <= 0] = NO_LABEL
    return labels


def label_names(labels):
    """(…, K) codes → nested lists of outcome names, ``None`` for unlabelled joints."""
    names = np.array(OUTCOMES + (None,), dtype=object)
    return names[np.asarray(labels)].tolist()
