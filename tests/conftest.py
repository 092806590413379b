from pathlib import Path

import numpy as np
import pytest

from posefix import SAMPLE_DIR
from synth.keypoints import NUM_KEYPOINTS

VAL_GT = SAMPLE_DIR / "person_keypoints_val_sample.json"
TRAIN_GT = SAMPLE_DIR / "person_keypoints_train_sample.json"
VAL_RESULTS = SAMPLE_DIR / "topdown_keypoints_val4.json"

# A plain standing figure, unit height, used to build synthetic persons (independent of synth.TEMPLATE).
FIGURE = np.array([
    [0.00, -0.34], [0.03, -0.37], [-0.03, -0.37], [0.08, -0.35], [-0.08, -0.35],
    [0.13, -0.20], [-0.13, -0.20], [0.19, -0.02], [-0.19, -0.02], [0.21, 0.14], [-0.21, 0.14],
    [0.09, 0.15], [-0.09, 0.15], [0.10, 0.40], [-0.10, 0.40], [0.10, 0.64], [-0.10, 0.64],
])


@pytest.fixture
def sample_dir() -> Path:
    return SAMPLE_DIR


def make_crowd(rng, n, m, labelled=0.85, spread=0.35, height=(80.0, 300.0)):
    """n persons, each with m overlapping persons: gt (n, K, 3), area (n,), others (n, m, K, 3), others_area (n, m)."""
    h = rng.uniform(*height, size=n)
    centre = rng.uniform(300, 700, size=(n, 1, 2))
    gt = np.zeros((n, NUM_KEYPOINTS, 3))
    gt[..., :2] = FIGURE * h[:, None, None] + centre + rng.normal(0, 0.015, (n, NUM_KEYPOINTS, 2)) * h[:, None, None]
    gt[..., 2] = np.where(rng.random((n, NUM_KEYPOINTS)) < labelled, 2, 0)
    gt[gt[..., 2].sum(1) == 0, 0, 2] = 2
    area = (h / 1.8) ** 2
    scale = rng.uniform(0.7, 1.3, size=(n, m))
    others = np.zeros((n, m, NUM_KEYPOINTS, 3))
    shift = rng.normal(0, spread, (n, m, 1, 2)) * h[:, None, None, None]
    others[..., :2] = FIGURE * (h[:, None] * scale)[..., None, None] + centre[:, None] + shift
    others[..., 2] = np.where(rng.random((n, m, NUM_KEYPOINTS)) < labelled, 2, 0)
    return gt, area, others, area[:, None] * scale ** 2
