"""Lower-body and random occlusion augmentation for training, as pose + image transforms.

Glossary: K = 17 joints; an image is (H, W, C) or (H, W) of any dtype (uint8 or float in [0, 1]);
a pose is (K, 3) = (x, y, v) in the image's pixels. Each transform returns a new image and pose (the
inputs are never modified), the occluding boxes (R, 4) as (x0, y0, x1, y1), and ``hidden`` (K,):
which labelled joints an occluder covers — the visibility target a refiner can learn.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

HIPS, KNEES, ANKLES = (11, 12), (13, 14), (15, 16)
LEG_JOINTS = HIPS + KNEES + ANKLES


@dataclass(frozen=True)
class Occlusion:
    image: np.ndarray
    keypoints: np.ndarray
    boxes: np.ndarray
    hidden: np.ndarray


def _fill(image, box, rng):
    """Paint box (x0, y0, x1, y1) of ``image`` in place: a flat random colour or random noise."""
    x0, y0, x1, y1 = (int(np.rint(v)) for v in box)
    region = image[y0:y1, x0:x1]
    if region.size == 0:
        return
    hi = 255 if np.issubdtype(image.dtype, np.integer) else 1.0
    shape = region.shape if rng.random() < 0.5 else (1, 1) + region.shape[2:]
    value = rng.random(shape) * hi
    region[...] = value.astype(image.dtype) if np.issubdtype(image.dtype, np.integer) else value


def _clip_box(box, image):
    h, w = image.shape[:2]
    return np.array([np.clip(box[0], 0, w), np.clip(box[1], 0, h), np.clip(box[2], 0, w), np.clip(box[3], 0, h)])


def _inside(keypoints, boxes):
    """(K, 3), (R, 4) → (K,) labelled joints inside any box."""
    x, y = keypoints[:, 0, None], keypoints[:, 1, None]
    inside = (x >= boxes[:, 0]) & (x < boxes[:, 2]) & (y >= boxes[:, 1]) & (y < boxes[:, 3])
    return inside.any(axis=1) & (keypoints[:, 2] > 0)


def _person_size(keypoints):
    v = keypoints[:, 2] > 0
    if v.sum() < 2:
        return 32.0
    span = keypoints[v, :2].max(0) - keypoints[v, :2].min(0)
    return float(max(np.hypot(*span), 8.0))


def shorten_legs(image, keypoints, rng: np.random.Generator, ratio=(0.5, 0.8), margin=0.15) -> Occlusion:
    """Shorten each leg and cut out the image over the legs, as an occluded lower body looks.

    Each labelled hip→knee and knee→ankle segment is scaled by a factor drawn uniformly in ``ratio``
    (the knee moves toward the hip, the ankle follows the knee); the image is then covered from a
    line drawn between hip and knee height down past the lowest leg joint, across the legs' width
    plus ``margin`` of the person's size on each side. Poses without a labelled knee or ankle come
    back unchanged.
    """
    image = np.array(image, copy=True)
    kp = np.array(keypoints, dtype=np.float64, copy=True)
    v = kp[:, 2] > 0
    legs = [j for j in KNEES + ANKLES if v[j]]
    if not legs:
        return Occlusion(image, kp, np.zeros((0, 4)), np.zeros(len(kp), dtype=bool))
    original = kp.copy()
    for hip, knee, ankle in zip(HIPS, KNEES, ANKLES):
        s1, s2 = rng.uniform(ratio[0], ratio[1], size=2)
        new_knee = kp[knee, :2]
        if v[hip] and v[knee]:
            new_knee = kp[hip, :2] + s1 * (kp[knee, :2] - kp[hip, :2])
        if v[knee] and v[ankle]:
            kp[ankle, :2] = new_knee + s2 * (kp[ankle, :2] - kp[knee, :2])
        elif v[hip] and v[ankle] and not v[knee]:
            kp[ankle, :2] = kp[hip, :2] + s1 * s2 * (kp[ankle, :2] - kp[hip, :2])
        kp[knee, :2] = new_knee
    pad = margin * _person_size(original)
    pts = original[[j for j in LEG_JOINTS if v[j]], :2]
    hips_y = [original[j, 1] for j in HIPS if v[j]]
    knees_y = [original[j, 1] for j in KNEES if v[j]]
    top_lo = np.mean(hips_y) if hips_y else pts[:, 1].min() - pad
    top_hi = np.mean(knees_y) if knees_y else pts[:, 1].max()
    top = rng.uniform(min(top_lo, top_hi), max(top_lo, top_hi))
    box = _clip_box(np.array([pts[:, 0].min() - pad, top, pts[:, 0].max() + pad, pts[:, 1].max() + pad]), image)
    _fill(image, box, rng)
    boxes = box[None]
    return Occlusion(image, kp, boxes, _inside(original, boxes))


def occlude_rectangles(image, keypoints, rng: np.random.Generator, count=(1, 3), size=(0.1, 0.3)) -> Occlusion:
    """BlazePose-style random occluders: ``count`` (inclusive range) rectangles, each over a random
    labelled joint, with sides drawn uniformly in ``size`` × the person's size and the joint placed
    uniformly inside. The pose is unchanged; ``hidden`` says which labelled joints got covered."""
    image = np.array(image, copy=True)
    kp = np.array(keypoints, dtype=np.float64, copy=True)
    labelled = np.flatnonzero(kp[:, 2] > 0)
    if labelled.size == 0:
        return Occlusion(image, kp, np.zeros((0, 4)), np.zeros(len(kp), dtype=bool))
    scale = _person_size(kp)
    n = int(rng.integers(count[0], count[1] + 1))
    joints = rng.choice(labelled, size=n)
    wh = rng.uniform(size[0], size[1], size=(n, 2)) * scale
    offset = rng.random((n, 2)) * wh
    x0y0 = kp[joints, :2] - offset
    boxes = np.stack([_clip_box(np.concatenate([a, a + b]), image) for a, b in zip(x0y0, wh)])
    for box in boxes:
        _fill(image, box, rng)
    return Occlusion(image, kp, boxes, _inside(kp, boxes))
