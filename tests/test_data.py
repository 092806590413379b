"""Training samples: crops, targets and augmentation agree with the image; batches are reproducible."""
import json

import numpy as np
import pytest
import torch
from torchvision.io import write_png

from posefix.config import DataConfig
from posefix.data import PersonCrops, StepBatches
from posefix.model import ModelConfig
from posefix.synth.keypoints import PARTNER

from .conftest import FIGURE


def _dataset(tmp_path, **data):
    """One person on a black 240×320 image with a bright dot at each labelled joint; the dot's colour
    encodes the joint (red = 8 + 14·j), so a crop shows where each joint went."""
    h, w = 240, 320
    kp = np.zeros((17, 3))
    kp[:, :2] = FIGURE * 180 + [160, 120]
    kp[:, 2] = 2
    kp[[3, 4], 2] = 0  # ears unlabelled
    image = torch.zeros(3, h, w, dtype=torch.uint8)
    for j, (x, y, v) in enumerate(kp):
        if v:
            image[0, int(round(y)) - 2:int(round(y)) + 3, int(round(x)) - 2:int(round(x)) + 3] = 8 + 14 * j
            image[1, int(round(y)) - 2:int(round(y)) + 3, int(round(x)) - 2:int(round(x)) + 3] = 255
    write_png(image, str(tmp_path / "000000000001.png"))
    doc = {"images": [{"id": 1, "file_name": "000000000001.png", "height": h, "width": w}],
           "annotations": [{"id": 10, "image_id": 1, "category_id": 1, "iscrowd": 0, "keypoints": kp.reshape(-1).tolist(),
                            "num_keypoints": 15, "area": 180.0 * 60, "bbox": [100, 50, 120, 180]}],
           "categories": [{"id": 1, "name": "person"}]}
    (tmp_path / "gt.json").write_text(json.dumps(doc))
    model = ModelConfig(backbone="resnet18", input_size=(128, 96), sigma=3.0)
    return PersonCrops(tmp_path / "gt.json", tmp_path, model, DataConfig(**data), None, seed=0), kp


@pytest.mark.parametrize("epoch", range(12))
def test_targets_land_on_their_joints_in_the_crop(tmp_path, epoch):
    ds, kp = _dataset(tmp_path, rotation_prob=1.0, flip_prob=0.5)
    s = ds[(epoch, 0)]
    crop, target, valid = s["image"], s["target"], s["target_valid"]
    h, w = crop.shape[1:]
    assert valid.sum() > 8 and not valid[3] and not valid[4]
    flipped = None
    for j in np.flatnonzero(valid.numpy()):
        x, y = target[j].round().long().tolist()
        if not (1 <= x < w - 1 and 1 <= y < h - 1):
            continue
        red = crop[0, y - 1:y + 2, x - 1:x + 2]
        green = crop[1, y - 1:y + 2, x - 1:x + 2]
        assert green.max() > 0.5, (j, x, y)  # a dot is there
        # ... and it is this joint's dot (or, after a flip, its partner's: the sides swap)
        value = (red[green > 0.5] / green[green > 0.5]).median().item() * 255  # interpolation scales both alike
        code = int(round((value - 8) / 14))
        is_flip = code == PARTNER[j] and code != j
        assert code == j or is_flip, (j, code)
        if code != PARTNER[j]:
            flipped = is_flip if flipped is None else flipped
            assert flipped == is_flip


def test_samples_are_reproducible_and_vary_by_epoch(tmp_path):
    ds, _ = _dataset(tmp_path)
    a, b, c = ds[(0, 0)], ds[(0, 0)], ds[(1, 0)]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["input"], c["input"])
    assert a["image"].shape == (3, 128, 96) and a["input"].shape == (17, 3) and a["area"] > 0


def test_occlusion_options_change_the_image_and_the_legs(tmp_path):
    plain, _ = _dataset(tmp_path, rotation_prob=0.0, flip_prob=0.0, scale_factor=0.0)
    occluded, _ = _dataset(tmp_path, rotation_prob=0.0, flip_prob=0.0, scale_factor=0.0, leg_shortening_prob=1.0)
    a, b = plain[(0, 0)], occluded[(0, 0)]
    assert not torch.equal(a["image"], b["image"])
    assert torch.equal(a["input"][:11], b["input"][:11]) and not torch.equal(a["input"][13:], b["input"][13:])
    assert torch.equal(a["target"], b["target"])


def test_step_batches_cover_each_epoch_and_split_between_processes():
    n, batch = 10, 3
    single = [k for step in StepBatches(n, batch, seed=1, start=0, stop=10) for k in step]
    for epoch in range(3):
        assert sorted(i for e, i in single if e == epoch) == list(range(n))
    ranks = [list(StepBatches(n, batch, seed=1, start=0, stop=5, rank=r, world=2)) for r in range(2)]
    merged = [k for step in zip(*ranks) for part in step for k in part]
    assert merged == single[:len(merged)]
    resumed = list(StepBatches(n, batch, seed=1, start=4, stop=10))
    assert resumed == list(StepBatches(n, batch, seed=1, start=0, stop=10))[4:]
