"""COCO-17 keypoint conventions shared by the whole project, and vectorised KS / OKS.

Glossary: N persons, K = 17 keypoints. Keypoints are (x, y) in pixels with x to the right and y down;
a pose is (K, 3) = (x, y, v) where v > 0 marks a labelled (GT) or present (prediction) joint.
Areas are COCO's object areas in pixels² (the ``area`` field that COCO's OKS uses).
"""
from __future__ import annotations

import numpy as np

NAMES: tuple[str, ...] = (
    "nose", "left_eye", "right_eye", "left_ear", "right_ear",
    "left_shoulder", "right_shoulder", "left_elbow", "right_elbow",
    "left_wrist", "right_wrist", "left_hip", "right_hip",
    "left_knee", "right_knee", "left_ankle", "right_ankle",
)
NUM_KEYPOINTS = len(NAMES)

# Left/right pairs; the nose has no partner.
FLIP_PAIRS: tuple[tuple[int, int], ...] = ((1, 2), (3, 4), (5, 6), (7, 8), (9, 10), (11, 12), (13, 14), (15, 16))

# PARTNER[j] is j's left/right partner; the nose is its own partner.
PARTNER = np.arange(NUM_KEYPOINTS)
for _a, _b in FLIP_PAIRS:
    PARTNER[_a], PARTNER[_b] = _b, _a
PARTNER.flags.writeable = False

# COCO's per-keypoint OKS sigmas.
SIGMAS = np.array([.26, .25, .25, .35, .35, .79, .79, .72, .72, .62, .62,
                   1.07, 1.07, .87, .87, .89, .89]) / 10.0
SIGMAS.flags.writeable = False
# KS of a joint at distance d from the truth, of a person of area A: exp(-d² / (A·KS_SCALE[j])), i.e. COCO's
# exp(-d² / (2·A·(2σ_j)²)). Every KS in posefix (numpy here, torch in codec.ks) takes its scale from here.
KS_SCALE = 2.0 * (2.0 * SIGMAS) ** 2
KS_SCALE.flags.writeable = False
# A joint within KS >= KS_HIT of the truth is right (not a miss): what the confidence heads estimate, the
# per-joint choice goes by and the diagnosis calls a miss below.
KS_HIT = 0.5

# Skeleton edges as 0-based index pairs (COCO's person category lists the same edges 1-based).
SKELETON: tuple[tuple[int, int], ...] = (
    (15, 13), (13, 11), (16, 14), (14, 12), (11, 12), (5, 11), (6, 12), (5, 6), (5, 7),
    (6, 8), (7, 9), (8, 10), (1, 2), (0, 1), (0, 2), (1, 3), (2, 4), (3, 5), (4, 6),
)

# An upright person facing the camera, unit height (top of head to ankles), centred at the origin,
# y down; the subject's left side appears at +x. Used to place unlabelled joints plausibly.
TEMPLATE = np.array([
    [0.000, -0.340], [0.022, -0.355], [-0.022, -0.355], [0.072, -0.342], [-0.072, -0.342],
    [0.104, -0.210], [-0.104, -0.210], [0.162, -0.055], [-0.162, -0.055],
    [0.150, -0.003], [-0.150, -0.003], [0.066, 0.133], [-0.066, 0.133],
    [0.076, 0.363], [-0.076, 0.363], [0.070, 0.630], [-0.070, 0.630],
])
TEMPLATE.flags.writeable = False
# A COCO person's height (head to ankles) is about this many times sqrt(area).
HEIGHT_PER_SQRT_AREA = 1.77


def ks_scale(area, sigmas=SIGMAS):
    """The squared-distance scale s of KS = exp(-d² / s): s = 2·A·(2σ)² (A·KS_SCALE for COCO's σ).

    area: (...,) → (..., K).
    """
    area = np.asarray(area, dtype=np.float64)
    return area[..., None] * (KS_SCALE if sigmas is SIGMAS else 2.0 * (2.0 * np.asarray(sigmas)) ** 2)


def ks_radius(t, area, sigmas=SIGMAS):
    """Distance in pixels at which KS equals ``t``: d(t) = 2σ·sqrt(-2·A·ln t). area (...,) → (..., K)."""
    return np.sqrt(-np.log(t) * ks_scale(area, sigmas))


def ks(pred, gt, area, sigmas=SIGMAS):
    """Keypoint similarity of each predicted joint to its GT joint.

    pred, gt: (..., K, 2+) pixels; area: (...,). Returns (..., K) in (0, 1].
    """
    d2 = np.sum((np.asarray(pred)[..., :2] - np.asarray(gt)[..., :2]) ** 2, axis=-1)
    return np.exp(-d2 / (ks_scale(area, sigmas) + np.spacing(1)))


def oks(pred, gt, area, sigmas=SIGMAS):
    """COCO OKS: mean KS over the GT's labelled joints (v > 0); 0 where the GT has none.

    pred: (..., K, 2+); gt: (..., K, 3); area: (...,). Returns (...,).
    """
    gt = np.asarray(gt, dtype=np.float64)
    vis = gt[..., 2] > 0
    k = ks(pred, gt, area, sigmas)
    n = vis.sum(axis=-1)
    return np.where(n > 0, (k * vis).sum(axis=-1) / np.maximum(n, 1), 0.0)


def box_iou(a, b):
    """IoU of COCO boxes (x, y, w, h): a (N, 4), b (M, 4) → (N, M)."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    ax1, ay1 = a[:, 0] + a[:, 2], a[:, 1] + a[:, 3]
    bx1, by1 = b[:, 0] + b[:, 2], b[:, 1] + b[:, 3]
    iw = np.clip(np.minimum(ax1[:, None], bx1[None]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    ih = np.clip(np.minimum(ay1[:, None], by1[None]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = iw * ih
    union = (a[:, 2] * a[:, 3])[:, None] + (b[:, 2] * b[:, 3])[None] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)
