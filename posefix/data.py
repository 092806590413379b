"""Training samples: COCO persons with a synthesized input pose, cropped the way the test crops.

Glossary: P persons, K = 17 joints, (H, W) the model's input size. A sample is drawn for a
(epoch, index) pair with a generator seeded by (seed, epoch, index), so any step of any run can be
reproduced, whatever the number of workers or processes.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from . import codec
from .choice import matched_person
from .config import DataConfig
from .errors import InputError
from .formats import image_ids, load_estimates, write_coco_results
from .images import coco_image_path, decode
from .keypoints import PARTNER
from .model import ModelConfig
from .synth.coco import MIN_AREA, overlaps
from .synth.cocoio import load_ground_truth
from .synth.dataset import file_sha256, load_arrays, read_manifest
from .synth.occlusion import ANKLES, KNEES, occlude_rectangles, shorten_legs
from .synth.profile import Profile
from .synth.synthesize import synthesize


def check_generated(path, annotations) -> dict:
    """The manifest of the dataset directory ``path`` (data.train_dataset), after checking that it is complete,
    of still images, and made from the file ``annotations`` (its SHA-256)."""
    if not (Path(path) / "manifest.json").is_file():
        raise InputError("data.train_dataset", f"{path} is not a posefix synth dataset directory (no manifest.json)")
    m = read_manifest(path)
    if not m.get("complete") or m.get("kind") != "stills":
        raise InputError("data.train_dataset", f"{path} is not a complete dataset of still images "
                         "(finish it by running its posefix synth command again)")
    if m["gt"]["sha256"] != file_sha256(Path(annotations)):
        raise InputError("data.train_dataset", f"{path} was made from other annotations than "
                         f"data.train_annotations ({annotations})")
    return m


class GeneratedDataset(torch.utils.data.Dataset):
    """The records of a ``posefix synth`` dataset directory as a map-style torch Dataset: ``dataset[i]`` is a
    dict of ``keypoints`` (K, 3) float32, ``outcome`` (K,) int64 (an index into OUTCOMES, -1 where the GT
    joint is unlabelled), ``image_id``, ``annotation_id`` and ``variant`` (int64 scalars), and, for
    sequences, ``frame`` and ``track_id``. The records are read once into arrays."""

    def __init__(self, path):
        self.arrays = load_arrays(path)
        self.arrays["keypoints"] = self.arrays["keypoints"].astype(np.float32)

    def __len__(self) -> int:
        return int(self.arrays["variant"].size)

    def __getitem__(self, i: int) -> dict:
        out = {k: torch.as_tensor(v[i]) for k, v in self.arrays.items() if k != "outcome"}
        out["outcome"] = torch.as_tensor(self.arrays["outcome"][i].astype(np.int64))
        return out


class GeneratedInputs:
    """Each training person's V input poses from a dataset directory: ``pose(person, variant)`` (K, 3) with
    v = 1, persons in the order of ``annotation_ids``."""

    def __init__(self, path, annotation_ids):
        a = load_arrays(path)
        self.variants = int(a["variant"].max()) + 1
        row = {int(x): r for r, x in enumerate(annotation_ids)}
        self.poses = np.zeros((len(row), self.variants, a["keypoints"].shape[1], 3), dtype=np.float32)
        seen = np.zeros((len(row), self.variants), dtype=bool)
        for k, (ann, v) in enumerate(zip(a["annotation_id"].tolist(), a["variant"].tolist())):
            r = row.get(ann)
            if r is not None:
                self.poses[r, v] = a["keypoints"][k]
                seen[r, v] = True
        if not seen.all():
            r = int(np.argwhere(~seen)[0, 0])
            raise InputError("data.train_dataset", f"{path} has no input for annotation {int(annotation_ids[r])}")
        self.poses[..., 2] = 1.0

    def pose(self, person: int, variant: int) -> np.ndarray:
        return self.poses[person, variant].astype(np.float64)


class PersonCrops(torch.utils.data.Dataset):
    """The labelled, non-crowd persons of a COCO person-keypoints file.

    ``dataset[(epoch, index)]`` gives a dict: ``image`` (3, H, W) float in [0, 1], ``input`` (K, 3)
    the input pose in crop pixels (v = 1 where present): synthesized, or with ``data.train_results`` the
    estimator's pose matched to the person, with probability ``data.train_results_prob``, ``target`` (K, 2) the
    GT joints in crop pixels, ``target_valid`` (K,) bool (labelled and inside the crop), ``area`` () the
    person's COCO area in crop pixels², ``calibration`` () bool: the person is one of the
    ``data.calibration_split`` share (drawn by ``seed``) that trains only the confidence heads.
    """

    def __init__(self, annotations, images_dir, model: ModelConfig, data: DataConfig, profile: Profile | None,
                 seed: int, augment: bool = True):
        self.gt = load_ground_truth(annotations)
        self.images_dir = images_dir
        self.images = {im["id"]: im for im in self.gt.doc["images"]}
        self.persons = np.flatnonzero(~self.gt.crowd & (self.gt.keypoints[..., 2] > 0).any(-1))
        self.ov, self.near = overlaps(self.gt)
        self.model, self.data, self.profile, self.seed, self.augment = model, data, profile, seed, augment
        self.calibration = np.zeros(self.persons.size, dtype=bool)
        held = round(data.calibration_split * self.persons.size)
        self.calibration[np.random.default_rng([seed, 7]).permutation(self.persons.size)[:held]] = True
        self.real = real_inputs(self.gt, data.train_results, data.train_results_format, images_dir) \
            if data.train_results else {}
        self.generated = GeneratedInputs(data.train_dataset, self.gt.ids[self.persons]) if data.train_dataset else None

    def __len__(self) -> int:
        return self.persons.size

    def __getitem__(self, key):
        epoch, index = key
        rng = np.random.default_rng([self.seed, epoch, index])
        i = self.persons[index]
        gt = self.gt
        near = self.near[i]
        if self.generated is not None:
            inp = self.generated.pose(index, int(rng.integers(self.generated.variants)))
        else:
            res = synthesize(gt.keypoints[i][None], [max(gt.areas[i], MIN_AREA)], rng,
                             others=gt.keypoints[near][None], others_area=np.maximum(gt.areas[near], MIN_AREA)[None],
                             ov=self.ov[i:i + 1], profile=self.profile)
            inp = res.keypoints[0].copy()
        inp[:, 2] = 1.0
        if self.real and rng.random() < self.data.train_results_prob and i in self.real:
            inp = self.real[i].copy()
        h, w = self.model.input_size
        affine, flip = self.crop_affine(inp, rng)  # (1, 2, 3) crop → image
        # The configured training set's own file names, read where they point (data.train_images is no --images).
        image = decode(coco_image_path(self.images_dir, self.images[int(gt.image_ids[i])], allow_outside=True))
        crop = codec.warp_crops(image[None].float().div_(255), torch.zeros(1, dtype=torch.long),
                                affine.float(), (h, w))[0]  # (3, H, W)
        to_crop = codec.invert_affine(affine)
        inp_c = codec.apply_affine(torch.from_numpy(inp)[None], to_crop)[0].numpy()
        tgt_c = codec.apply_affine(torch.from_numpy(gt.keypoints[i])[None], to_crop)[0].numpy()
        if flip:
            crop = crop.flip(-1)
            inp_c, tgt_c = (codec.flip_keypoints(torch.from_numpy(p)[None], w)[0].numpy() for p in (inp_c, tgt_c))
            labelled = gt.keypoints[i, PARTNER, 2] > 0
        else:
            labelled = gt.keypoints[i, :, 2] > 0
        inp_c = np.concatenate([inp_c, np.ones((inp_c.shape[0], 1))], axis=1)
        if self.augment and (self.data.leg_shortening_prob or self.data.occluder_prob):
            crop, inp_c = self._occlude(crop, inp_c, tgt_c, labelled, rng)
        inside = (tgt_c[:, 0] >= 0) & (tgt_c[:, 0] <= w - 1) & (tgt_c[:, 1] >= 0) & (tgt_c[:, 1] <= h - 1)
        scale = float(torch.linalg.det(to_crop[0, :, :2]).abs().item())  # crop px² per image px²
        return {"image": crop, "input": torch.from_numpy(inp_c).float(), "target": torch.from_numpy(tgt_c).float(),
                "target_valid": torch.from_numpy(labelled & inside),
                "area": torch.tensor(max(gt.areas[i], MIN_AREA) * scale, dtype=torch.float32),
                "calibration": torch.tensor(bool(self.calibration[index]))}

    def crop_affine(self, pose: np.ndarray, rng: np.random.Generator) -> tuple[torch.Tensor, bool]:
        """The crop → image affine (1, 2, 3) float64 of the crop around ``pose`` (K, 3) image pixels, and whether
        to mirror it: the crop inference takes (``codec.person_crop_affine``, as ``Refiner.prepare``), with
        augmentation scaled, turned and mirrored at random (drawn from ``rng``)."""
        scale, rotation, flip = 1.0, None, False
        if self.augment:
            d = self.data
            scale = float(np.clip(rng.normal(1.0, d.scale_factor), 1 - d.scale_factor, 1 + d.scale_factor))
            if rng.random() < d.rotation_prob:
                rotation = float(np.clip(rng.normal(0.0, d.rotation_factor), -2 * d.rotation_factor,
                                         2 * d.rotation_factor))
            flip = rng.random() < d.flip_prob
        keypoints = torch.as_tensor(np.asarray(pose, dtype=np.float64))[None]
        return codec.person_crop_affine(keypoints, self.model.input_size, scale, rotation), flip

    def _occlude(self, crop, inp_c, tgt_c, labelled, rng):
        """Lower-body occlusion on the crop: the cutout goes over the GT legs, the input legs shrink."""
        img = crop.permute(1, 2, 0).numpy()
        gt_pose = np.concatenate([tgt_c, labelled[:, None].astype(float)], axis=1)
        if rng.random() < self.data.leg_shortening_prob:
            occ = shorten_legs(img, gt_pose, rng)
            img = occ.image
            legs = np.array(KNEES + ANKLES)
            inp_c[legs, :2] = inp_c[legs, :2] + (occ.keypoints[legs, :2] - tgt_c[legs])
        if rng.random() < self.data.occluder_prob:
            img = occlude_rectangles(img, gt_pose, rng).image
        return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1), inp_c


def real_inputs(gt, path, fmt: str, images_dir) -> dict[int, np.ndarray]:
    """An estimator's results on the training images (``path`` in format ``fmt``), matched to the GT persons of
    ``gt`` as COCO evaluation matches them: {GT person index: (K, 3) pose in image pixels, v = 1 where the
    estimator gave the joint, else 0}, for the persons with a labelled joint. An unmatched result is left out."""
    coco_images = {im["id"]: im for im in gt.doc["images"]}
    est = load_estimates(path, fmt, images_dir, coco_images, allow_outside=True)
    given = est.keypoints
    results = write_coco_results(est, given[..., :2], given[..., 2], est.scores, image_ids(est, coco_images))
    out = {}
    for n, g in enumerate(matched_person(gt, results)):
        if g is not None and g not in out and (gt.keypoints[g, :, 2] > 0).any():
            pose = given[n].copy()
            present = np.isfinite(pose[:, :2]).all(-1) & (pose[:, 2] > 0)
            pose[:, :2] = np.where(present[:, None], pose[:, :2], 0.0)
            pose[:, 2] = present
            out[g] = pose
    return out


class StepBatches(torch.utils.data.Sampler):
    """Batches of (epoch, index) keys for steps start .. stop, this process's share of each global
    batch: epoch e visits the persons in the order of a permutation seeded by (seed, e)."""

    def __init__(self, n: int, batch_size: int, seed: int, start: int, stop: int, rank: int = 0, world: int = 1):
        (self.n, self.batch, self.seed, self.start, self.stop, self.rank,
         self.world) = n, batch_size, seed, start, stop, rank, world
        self._perms: dict[int, np.ndarray] = {}

    def _key(self, position: int):
        epoch, offset = divmod(position, self.n)
        if epoch not in self._perms:
            self._perms = {epoch: np.random.default_rng([self.seed, 1_000_003, epoch]).permutation(self.n)}
        return epoch, int(self._perms[epoch][offset])

    def __iter__(self):
        for step in range(self.start, self.stop):
            first = (step * self.world + self.rank) * self.batch
            yield [self._key(p) for p in range(first, first + self.batch)]

    def __len__(self) -> int:
        return max(self.stop - self.start, 0)

