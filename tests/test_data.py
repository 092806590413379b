"""Training samples: crops, targets and augmentation agree with the image; batches are reproducible."""
import json

import numpy as np
import pytest
import torch

from posefix import SAMPLE_DIR, codec
from posefix.config import DataConfig
from posefix.data import PersonCrops, StepBatches
from posefix.images import decode
from posefix.keypoints import NUM_KEYPOINTS, PARTNER
from posefix.model import ModelConfig, PoseFixNet
from posefix.refiner import Refiner
from posefix.viz import write_png

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
            image[0, round(y) - 2:round(y) + 3, round(x) - 2:round(x) + 3] = 8 + 14 * j
            image[1, round(y) - 2:round(y) + 3, round(x) - 2:round(x) + 3] = 255
    write_png(image, tmp_path / "000000000001.png")
    doc = {"images": [{"id": 1, "file_name": "000000000001.png", "height": h, "width": w}],
           "annotations": [{"id": 10, "image_id": 1, "category_id": 1, "iscrowd": 0,
                            "keypoints": kp.reshape(-1).tolist(),
                            "num_keypoints": 15, "area": 180.0 * 60, "bbox": [100, 50, 120, 180]}],
           "categories": [{"id": 1, "name": "person"}]}
    (tmp_path / "gt.json").write_text(json.dumps(doc))
    model = ModelConfig(backbone="resnet18", input_size=(128, 96), sigma=3.0)
    return PersonCrops(tmp_path / "gt.json", tmp_path, model, DataConfig(**data), None, seed=0), kp


@pytest.mark.parametrize("epoch", range(12))
def test_targets_land_on_their_joints_in_the_crop(tmp_path, epoch):
    ds, _kp = _dataset(tmp_path, rotation_prob=1.0, flip_prob=0.5)
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
        code = round((value - 8) / 14)
        is_flip = code == PARTNER[j] and code != j
        assert code == j or is_flip, (j, code)
        if code != PARTNER[j]:
            flipped = is_flip if flipped is None else flipped
            assert flipped == is_flip


def test_without_augmentation_training_crops_as_inference(tmp_path, monkeypatch):
    """A sample without augmentation is the crop Refiner.crop takes around the same input pose: the same
    affine, the same pixels and the same input keypoints in crop pixels."""
    ds, _ = _dataset(tmp_path, rotation_prob=1.0, flip_prob=1.0, scale_factor=0.3)
    ds.augment = False
    poses = []
    crop_affine = ds.crop_affine
    monkeypatch.setattr(ds, "crop_affine", lambda pose, rng: (poses.append(pose.copy()), crop_affine(pose, rng))[1])
    sample = ds[(0, 0)]
    pose = torch.from_numpy(poses[0])[None]  # the synthesized input pose, in image pixels
    refiner = Refiner(PoseFixNet(ds.model))
    image = decode(tmp_path / "000000000001.png")
    crops, kp_crop, affine, ok = refiner.crop([image], np.zeros(1, dtype=np.int64), pose, pose)
    assert ok.all()
    torch.testing.assert_close(crop_affine(poses[0], np.random.default_rng(0))[0], affine, rtol=0, atol=0)
    torch.testing.assert_close(sample["image"], crops[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(sample["input"], kp_crop[0], rtol=0, atol=1e-4)


def test_crop_affines_of_training_and_inference_agree_on_any_pose(tmp_path):
    """Poses with absent joints too; with augmentation the crop keeps inference's centre, only scaled and turned."""
    ds, _ = _dataset(tmp_path, rotation_prob=1.0, scale_factor=0.3)
    rng = np.random.default_rng(1)
    poses = np.concatenate([rng.uniform(0, 300, (6, NUM_KEYPOINTS, 2)),
                            (rng.random((6, NUM_KEYPOINTS, 1)) < 0.6).astype(float)], -1)
    poses[0, :, 2], poses[0, 5, 2] = 0, 1  # a single present joint
    refiner = Refiner(PoseFixNet(ds.model))
    images = [torch.zeros(3, 240, 320, dtype=torch.uint8)]
    kp = torch.from_numpy(poses)
    inference = refiner.crop(images, np.zeros(6, dtype=np.int64), kp, kp)[2]
    h, w = ds.model.input_size
    centre = torch.tensor([[[(w - 1) / 2, (h - 1) / 2]]], dtype=torch.float64)
    for n, pose in enumerate(poses):
        ds.augment = False
        torch.testing.assert_close(ds.crop_affine(pose, rng)[0][0], inference[n], rtol=0, atol=0)
        ds.augment = True
        augmented = ds.crop_affine(pose, rng)[0]
        assert not torch.allclose(augmented[0], inference[n])
        torch.testing.assert_close(codec.apply_affine(centre, augmented),
                                   codec.apply_affine(centre, inference[n:n + 1]))


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


TRAIN10 = SAMPLE_DIR / "person_keypoints_train10.json"


def _train10(**data):
    model = ModelConfig(backbone="resnet18", input_size=(128, 96), sigma=3.0)
    results = SAMPLE_DIR / "real_estimators" / "movenet_thunder_train10_native.json"
    cfg = DataConfig(**{"train_results": str(results), "train_results_format": "movenet", **data})
    return PersonCrops(TRAIN10, SAMPLE_DIR / "train_images", model, cfg, None, seed=0, augment=False)


def test_an_estimators_results_are_matched_to_their_own_persons():
    """The persons' estimator poses are COCO's greedy matching, done plainly here: the results in order of score,
    each taking the unmatched labelled person of its image of highest OKS, at OKS >= 0.1 (MoveNet Thunder on the
    bundled train images)."""
    from posefix.formats import image_ids, read_estimates
    from posefix.keypoints import ks
    ds = _train10()
    gt = ds.gt
    images = {im["id"]: im for im in gt.doc["images"]}
    est = read_estimates(SAMPLE_DIR / "real_estimators" / "movenet_thunder_train10_native.json", "movenet",
                         {im["file_name"]: (im["width"], im["height"]) for im in images.values()})
    ids = image_ids(est, images)
    expected, taken = {}, set()
    for n in np.argsort(-est.scores, kind="stable"):
        best, best_oks = None, 0.1
        for g in np.flatnonzero((gt.image_ids == ids[n]) & ~gt.crowd):
            labelled = gt.keypoints[g, :, 2] > 0
            if g in taken or not labelled.any():
                continue
            oks = ks(est.keypoints[n][None, :, :2], gt.keypoints[g][None, :, :2], gt.areas[g][None])[0][labelled].mean()
            if oks >= best_oks:
                best, best_oks = g, oks
        if best is not None:
            taken.add(best)
            expected[best] = est.keypoints[n]
    assert len(expected) >= 0.6 * ds.persons.size
    assert sorted(ds.real) == sorted(expected)
    for g, pose in ds.real.items():
        np.testing.assert_allclose(pose[:, :2], expected[g][:, :2])
        np.testing.assert_array_equal(pose[:, 2], expected[g][:, 2] > 0)


def test_training_inputs_are_the_estimators_poses_at_the_given_rate():
    """With probability 1 a matched person's input is the estimator's pose (in crop pixels, back in the image it is
    the pose given); with probability 0 the samples are those of training without results, draw for draw."""
    always, never = _train10(train_results_prob=1.0), _train10(train_results_prob=0.0)
    plain = PersonCrops(TRAIN10, never.images_dir, never.model, DataConfig(), None, seed=0, augment=False)
    for index, g in enumerate(always.persons):
        s = always[(0, index)]
        if g in always.real:
            affine, _ = always.crop_affine(always.real[g], np.random.default_rng(0))
            back = codec.apply_affine(s["input"][None].double(), affine)[0].numpy()
            present = always.real[g][:, 2] > 0
            np.testing.assert_allclose(back[present, :2], always.real[g][present, :2], atol=1e-3)
        other = never[(0, index)]
        reference = plain[(0, index)]
        for key in reference:
            torch.testing.assert_close(other[key], reference[key], rtol=0, atol=0)


@pytest.mark.parametrize(("key", "value", "field"), [
    ("train_results", "no/such/file.json", "data.train_results"),
    ("train_results_format", "yolo", "data.train_results_format"),
    ("train_results_prob", 1.5, "data.train_results_prob")])
def test_bad_training_results_settings_name_their_key(tmp_path, key, value, field):
    from posefix.config import load_config
    from posefix.errors import InputError
    from posefix.train import train
    settings = {"train_results": str(SAMPLE_DIR / "real_estimators" / "movenet_thunder_train10_native.json"),
                "train_results_format": "movenet", key: value}
    cfg = load_config(preset="cpu-small", overrides=[f"data.train_annotations={TRAIN10}",
                                                     f"data.train_images={SAMPLE_DIR / 'train_images'}"]
                      + [f"data.{k}={v}" for k, v in settings.items()])
    with pytest.raises(InputError, match=field.replace(".", r"\.")):
        train(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_the_calibration_split_is_the_given_share_drawn_by_the_seed():
    def flags(seed, split):
        ds = PersonCrops(TRAIN10, SAMPLE_DIR / "train_images", ModelConfig(backbone="resnet18", input_size=(128, 96)),
                         DataConfig(calibration_split=split), None, seed=seed, augment=False)
        return ds, np.array([bool(ds[(0, i)]["calibration"]) for i in range(len(ds))])

    ds, a = flags(0, 0.25)
    assert a.sum() == round(0.25 * len(ds)) and a.any() and not a.all()
    assert (flags(0, 0.25)[1] == a).all() and (flags(1, 0.25)[1] != a).any()
    assert not flags(0, 0.0)[1].any()


def test_training_inputs_from_a_generated_dataset(tmp_path):
    """With data.train_dataset each sample's input is one of that person's generated variants (back in the image
    it is that variant's pose), drawn by (seed, epoch, index); the torch Dataset reads the same records."""
    from posefix.data import GeneratedDataset
    from posefix.synth.dataset import load_arrays, write_dataset
    write_dataset(TRAIN10, tmp_path / "d", 3, seed=2)
    ds = _train10(train_results="", train_dataset=str(tmp_path / "d"))
    arr = load_arrays(tmp_path / "d")
    used = set()
    for epoch in range(4):
        for index, g in enumerate(ds.persons):
            s = ds[(epoch, index)]
            rows = np.flatnonzero(arr["annotation_id"] == ds.gt.ids[g])
            assert rows.size == 3
            hits = []
            for v in range(3):  # back through the crop of variant v's pose (no augmentation), is it that pose?
                pose = arr["keypoints"][rows[arr["variant"][rows] == v][0]]
                affine, _ = ds.crop_affine(pose, np.random.default_rng(0))
                back = codec.apply_affine(s["input"][None].double(), affine)[0].numpy()
                if np.allclose(back[:, :2], pose[:, :2], atol=1e-3):
                    hits.append(v)
            assert len(hits) == 1
            used.update(hits)
    assert used == {0, 1, 2}
    torch_ds = GeneratedDataset(tmp_path / "d")
    assert len(torch_ds) == arr["variant"].size
    item = torch_ds[5]
    assert item["keypoints"].shape == (17, 3) and item["outcome"].shape == (17,)
    np.testing.assert_allclose(item["keypoints"].numpy(), arr["keypoints"][5], rtol=1e-6)


def test_train_from_a_generated_dataset(tmp_path):
    from posefix.config import load_config
    from posefix.errors import InputError
    from posefix.synth.dataset import write_dataset
    from posefix.train import train
    write_dataset(TRAIN10, tmp_path / "d", 2, seed=0)
    write_dataset(SAMPLE_DIR / "person_keypoints_val_sample.json", tmp_path / "other", 1, seed=0)
    base = [f"data.train_annotations={TRAIN10}", f"data.train_images={SAMPLE_DIR / 'train_images'}",
            "model.input_size=[64, 64]", "model.sigma=2.0", "model.head_channels=16", "train.batch_size=4",
            "train.log_every=1", "data.workers=0", "train.lr_milestones=[]", "train.max_steps=2"]
    cfg = load_config(preset="cpu-small", overrides=base + [f"data.train_dataset={tmp_path / 'd'}"])
    train(cfg, tmp_path / "run", progress=False)
    assert (tmp_path / "run" / "model.safetensors").exists()
    bad = load_config(preset="cpu-small", overrides=base + [f"data.train_dataset={tmp_path / 'other'}"])
    with pytest.raises(InputError, match=r"data\.train_dataset"):
        train(bad, tmp_path / "bad", progress=False)
