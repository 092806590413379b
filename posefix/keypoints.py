"""COCO-17 keypoint conventions shared by the whole project, vectorised KS / OKS, and what a valid keypoint is.

Glossary: N persons, K = 17 keypoints. Keypoints are (x, y) in pixels with x to the right and y down;
a pose is (K, 3) = (x, y, v) where v > 0 marks a labelled (GT) or present (prediction) joint.
Areas are COCO's object areas in pixels² (the ``area`` field that COCO's OKS uses).
"""
from __future__ import annotations

import math

import numpy as np

from .errors import InputError

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

# No coordinate, score or image size is this large; bounding them keeps every product and mean finite.
KEYPOINT_BOUND = 1e9

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


# ---------------------------------------------------------------------------------------------- validation
# What a valid keypoint is, checked in one place: a finite number for each of x, y and its flag or score
# (within ±bound where one is given), as many as the layout has keypoints, and, where the image is known,
# a present keypoint no further out of the image than its own size.

_NUMBER_TYPES = frozenset((int, float))
_COLUMNS = ("x", "y", "score")


def _within(bound: float) -> str:
    """" (within ±1e9)" for a bound of 1e9, nothing for none."""
    return f" (within ±{bound:g})".replace("e+0", "e").replace("e+", "e") if bound < math.inf else ""


def is_number(x, bound: float = math.inf) -> bool:
    """Whether ``x`` is a JSON number (an int or a float, not a bool) that is finite as a float64 and within
    ±``bound``."""
    if type(x) is bool or not isinstance(x, (int, float)):
        return False
    try:
        value = float(x)
    except OverflowError:  # an integer beyond float64
        return False
    return math.isfinite(value) and abs(value) <= bound


def keypoint_list(value, field: str, source: str | None = None, k: int = NUM_KEYPOINTS, what: str = "x, y, v",
                  bound: float = math.inf) -> np.ndarray:
    """A flat list of 3·k numbers (``what`` per keypoint, as COCO files write them) as (k, 3) float64.

    Else an InputError naming ``field``: the list's length, or its first entry that is not a finite number
    (within ±``bound``).
    """
    if type(value) is list and len(value) == 3 * k and set(map(type, value)) <= _NUMBER_TYPES:
        try:
            a = np.array(value, dtype=np.float64)
        except OverflowError:
            a = None
        if a is not None and np.isfinite(a).all() and not (np.abs(a) > bound).any():
            return a.reshape(k, 3)
    if not isinstance(value, list) or len(value) != 3 * k:
        got = f"{len(value)} numbers" if isinstance(value, list) else type(value).__name__
        raise InputError(field, f"must be a list of {3 * k} numbers ({what} for {k} keypoints), got {got}", source)
    bad = [i for i, x in enumerate(value) if not is_number(x, bound)]
    if bad:
        raise InputError(field, f"entry {bad[0]} is {value[bad[0]]!r}, not a finite number{_within(bound)}", source)
    return np.asarray(value, dtype=np.float64).reshape(k, 3)


def check_poses(poses, field: str, k: int | None = NUM_KEYPOINTS, finite: bool = True,
                image_size: tuple[float, float] | None = None, bound: float = math.inf) -> np.ndarray:
    """Poses (P, k, 3) = (x, y, score) in image pixels as float64 (the array itself where it is one), checked.

    k: the keypoints of the layout (None: any). ``finite``: every value finite and within ±``bound`` (else
    non-finite x, y only mark an absent joint, as :func:`present` has it). image_size (H, W): every present
    keypoint (score > 0) lies within the image extended by its own width and height on each side. An
    InputError names ``field`` for the shape, else the first offender: ``field[i].keypoints[j].x`` (.y,
    .score) for a value, ``field[i].keypoints[j]`` for a keypoint out of the image.
    """
    a = np.asarray(poses, dtype=np.float64)
    if a.ndim != 3 or a.shape[2] != 3 or (k is not None and a.shape[1] != k):
        raise InputError(field, f"must be poses of shape (N, {'K' if k is None else k}, 3) (x, y, score), "
                                f"got shape {a.shape}")
    if finite:
        bad = np.argwhere(~np.isfinite(a) | (np.abs(a) > bound))
        if len(bad):
            i, j, c = bad[0]
            raise InputError(f"{field}[{i}].keypoints[{j}].{_COLUMNS[c]}",
                             f"must be finite{_within(bound)}, got {a[i, j, c]}")
    if image_size is not None:
        height, width = image_size
        outside = (a[..., 2] > 0) & ((a[..., 0] < -width) | (a[..., 0] > 2 * width)
                                     | (a[..., 1] < -height) | (a[..., 1] > 2 * height))
        if outside.any():
            i, j = np.argwhere(outside)[0]
            raise InputError(f"{field}[{i}].keypoints[{j}]", f"({a[i, j, 0]:g}, {a[i, j, 1]:g}) is more than the "
                             f"image's own size outside the {width}×{height} image (x, y in pixels?)")
    return a


def present(poses) -> np.ndarray:
    """(..., K, 3) → (..., K) bool: the joints present, score (or v) > 0 and x, y finite."""
    poses = np.asarray(poses)
    return (poses[..., 2] > 0) & np.isfinite(poses[..., :2]).all(-1)
