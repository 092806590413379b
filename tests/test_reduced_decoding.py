"""Reduced decoding: a JPEG decoded at 1/r of its size where every crop of its persons samples it at least that
coarsely, its crops the full-size decoding's."""
import io
import math

import numpy as np
import pytest
import torch
from PIL import Image

from posefix.images import decode, decode_reduced
from posefix.model import ModelConfig, PoseFixNet
from posefix.refine import refine_images
from posefix.refiner import Refiner

CFG = ModelConfig(backbone="resnet18", input_size=(128, 96), sigma=3.5, head_channels=32, input_prior=False)
HEIGHT, WIDTH = 1500, 2000  # a phone photo's size


def _person(cx: float, cy: float, height: float) -> np.ndarray:
    """17 joints spread over a box of ``height`` × 0.75 ``height`` (the crop's aspect) centred on (cx, cy)."""
    rng = np.random.default_rng(0)
    u = rng.uniform(-0.5, 0.5, (17, 2))
    u[0], u[1] = (-0.5, -0.5), (0.5, 0.5)  # the box's corners: its size exactly
    xy = np.array([cx, cy]) + u * np.array([0.75 * height, height])
    return np.concatenate([xy, np.ones((17, 1))], 1)


def _plain_step(pose: np.ndarray, crop_height: int) -> float:
    """Image pixels between two crop pixels: the joints' box ×1.2 (its aspect already the crop's), ×1.25."""
    return (pose[:, 1].max() - pose[:, 1].min()) * 1.2 * 1.25 / crop_height


@pytest.fixture(scope="module")
def refiner():
    torch.manual_seed(0)
    return Refiner(PoseFixNet(CFG), device="cpu", batch_size=4, output="raw")


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    """A smooth JPEG with a bright Gaussian blob, whose position the crops must keep."""
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float64)
    picture = 90 + 40 * np.sin(x / 97.0) * np.cos(y / 131.0)
    picture += 120 * np.exp(-((x - 900.0) ** 2 + (y - 700.0) ** 2) / (2 * 50.0 ** 2))
    rgb = np.stack([picture, picture * 0.8 + 20, 255 - picture], -1).clip(0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, "JPEG", quality=95)
    path = tmp_path_factory.mktemp("photo") / "photo.jpg"
    path.write_bytes(buffer.getvalue())
    return path


def test_the_reduction_is_the_largest_the_crops_allow(refiner):
    big, small = _person(950, 750, 1100), _person(300, 300, 120)
    for poses in ([big], [big, small], [small]):
        step = min(_plain_step(p, CFG.input_size[0]) for p in poses)
        want = max(r for r in (1, 2, 4, 8) if r <= max(step, 1))
        assert refiner.decode_reduction(np.stack(poses)) == want
    absent = big.copy()
    absent[:, 2] = 0
    assert refiner.decode_reduction(absent[None]) == 8  # nobody to crop: the image is only checked
    assert refiner.decode_reduction(np.zeros((0, 17, 3))) == 8
    off = Refiner(refiner.model, refiner.options, reduced_decoding=False)
    assert off.decode_reduction(np.stack([big])) == 1


@pytest.mark.parametrize("reduce", [2, 4, 8])
def test_crops_of_a_reduced_decoding_are_the_full_decodings(refiner, photo, reduce):
    full = decode(photo)
    reduced, applied = decode_reduced(photo, reduce)
    assert applied == reduce and reduced.shape[1:] == (math.ceil(HEIGHT / reduce), math.ceil(WIDTH / reduce))
    poses = torch.as_tensor(np.stack([_person(950, 750, 1100), _person(900, 760, 900)]))
    index = np.zeros(2, dtype=np.int64)
    want, _, affine, _ = refiner.crop([full], index, poses, poses)
    got, _, affine_reduced, _ = refiner.crop([reduced], index, poses, poses, reductions=[reduce])
    assert torch.equal(affine, affine_reduced)  # the keypoints map back through the full image's affine
    assert (got - want).abs().mean() < 0.01  # in [0, 1]: DCT scaling is a box filter, the crop step ≥ reduce

    def centroid(crops):  # of the blob's bright part in each crop, crop pixels
        weight = (crops[:, 0] - 0.6).clamp_min(0)  # (P, H, W): the background stays below 0.6
        v, u = torch.meshgrid(torch.arange(crops.shape[2]), torch.arange(crops.shape[3]), indexing="ij")
        total = weight.sum((1, 2))
        return torch.stack([(weight * u).sum((1, 2)) / total, (weight * v).sum((1, 2)) / total], -1)

    # A reduced pixel i is centred on r·i + (r - 1)/2 of the full image: taken as r·i, the blobs would move by
    # (r - 1)/2 image pixels, 0.04-0.3 crop pixels here.
    assert (centroid(got) - centroid(want)).abs().max() < 0.03


def test_refine_images_decodes_files_at_the_reduction_and_tensors_as_given(refiner, photo):
    seen = []

    class Spy:
        def __getattr__(self, name):
            return getattr(refiner, name)

        def refine(self, images, image_index, poses, crop_poses=None, reductions=None):
            seen.append(([tuple(im.shape[1:]) for im in images], reductions))
            return refiner.refine(images, image_index, poses, crop_poses, reductions)

    big, small = _person(950, 750, 1100), _person(300, 300, 120)
    jobs = [("big", photo, big[None]), ("both", photo, np.stack([big, small])), ("tensor", decode(photo), big[None])]
    out = {key: xy for key, xy, _ in refine_images(Spy(), jobs, workers=1)}
    assert seen[0] == ([(188, 250), (HEIGHT, WIDTH), (HEIGHT, WIDTH)], (8, 1, 1))
    # the same refinement as from the full-size image, within what the coarser decoding moves
    want = {key: xy for key, xy, _ in refine_images(Refiner(refiner.model, refiner.options, reduced_decoding=False),
                                                     jobs, workers=1)}
    assert np.allclose(out["both"], want["both"]) and np.allclose(out["tensor"], want["tensor"])
    assert np.abs(out["big"] - want["big"]).max() < 2.0  # image pixels, for a person 1100 pixels tall


@pytest.mark.parametrize("flag, want", [([], True), (["--reduced-decoding"], True), (["--no-reduced-decoding"], False)])
def test_the_flag_reaches_the_options(flag, want):
    from posefix.cli import build_parser, refine_options

    for command in (["refine", "--images", "d", "--input", "in.json", "--out", "out.json"],
                    ["fit-choice", "--checkpoint", "c", "--images", "d", "--input", "i", "--annotations", "a",
                     "--out", "o"]):
        args = build_parser().parse_args([*command, *flag])
        assert refine_options(args).reduced_decoding is want


def test_a_reduction_that_is_not_a_boolean_is_refused():
    from posefix.errors import InputError
    from posefix.options import RefineOptions

    with pytest.raises(InputError, match="reduced_decoding"):
        RefineOptions(reduced_decoding="yes")
