"""``posefix refine`` is the library's refinement, parsed and printed: its output file is what
:func:`posefix.refine.refine_estimates` gives for the same inputs, written as COCO results, and its instance
scores follow the stated rule."""
import json

import numpy as np
import pytest
from PIL import Image

from posefix import SAMPLE_DIR
from posefix.cli import main
from posefix.formats import image_file, image_ids, read_estimates, write_coco_results
from posefix.refine import by_image, refine_estimates
from posefix.refiner import Refiner
from posefix.synth.cocoio import load_ground_truth

from .conftest import VAL_GT, VAL_RESULTS

IMAGES = SAMPLE_DIR / "images"
REAL = SAMPLE_DIR / "real_estimators"

# (format, input, flags of posefix refine beyond the common ones)
CASES = {"coco choice": ("coco", VAL_RESULTS, ["--choice-margin", "0"]),
         "coco raw, keep input below": ("coco", VAL_RESULTS, ["--output", "raw", "--keep-input-below", "0.5"]),
         "movenet multipose, margin": ("movenet", REAL / "movenet_multipose_native.json",
                                       ["--choice-margin", "-0.05", "--batch-size", "7"]),
         "blazepose raw, flip test": ("blazepose", REAL / "blazepose_full_native.json",
                                      ["--output", "raw", "--flip-test"])}


def _flag(flags, name, default=None, kind=str):
    return kind(flags[flags.index(name) + 1]) if name in flags else default


@pytest.mark.parametrize("case", list(CASES))
def test_refine_writes_what_the_library_call_returns(checkpoint, tmp_path, case, capsys):
    fmt, path, flags = CASES[case]
    out = tmp_path / "refined.json"
    assert main(["refine", "--checkpoint", str(checkpoint), "--images", str(IMAGES), "--input", str(path),
                 "--annotations", str(VAL_GT), "--format", fmt, "--out", str(out), "--quiet", *flags]) == 0
    assert f"-> {out}" in capsys.readouterr().out
    written = json.loads(out.read_text())

    # The same through the library, on the same images and poses.
    coco_images = {im["id"]: im for im in load_ground_truth(VAL_GT).doc["images"]}
    sizes = None
    if fmt in ("movenet", "blazepose"):  # normalised coordinates: each image's size, from its file
        sizes = {}
        for entry in json.loads(path.read_text()):
            with Image.open(IMAGES / entry["image"]) as im:
                sizes[entry["image"]] = im.size
    est = read_estimates(path, fmt, sizes)
    refiner = Refiner.from_checkpoint(checkpoint, batch_size=_flag(flags, "--batch-size", 64, int),
                                      flip_test="--flip-test" in flags, output=_flag(flags, "--output", "choice"),
                                      choice_margin=_flag(flags, "--choice-margin", None, float))
    sources = {key: image_file(IMAGES, key, coco_images) for key in by_image(est.image_keys)}
    refined = refine_estimates(refiner, est, sources, keep_input_below=_flag(flags, "--keep-input-below", None, float))
    assert refined.refined.all()
    assert written == write_coco_results(est, refined.xy, refined.conf, refined.scores, image_ids(est, coco_images),
                                         refined.kept)

    # What the file says, checked on its own: the sources and the instance scores' rule.
    given = est.keypoints
    keypoints = np.array([r["keypoints"] for r in written]).reshape(-1, 17, 3)
    sources = np.array([r["keypoint_source"] for r in written]) == "input"
    np.testing.assert_array_equal(sources, (keypoints[..., :2] == given[..., :2]).all(-1))
    present = given[..., 2] > 0
    assert (~sources & present).any()  # the refiner corrected joints: equal files mean equal refinement
    scores = np.array([r["score"] for r in written])
    if _flag(flags, "--output", "choice") == "choice":
        np.testing.assert_array_equal(scores, est.scores)  # the input's own
    else:  # the input's × the mean refined confidence of its present joints
        mean = (keypoints[..., 2] * present).sum(1) / np.maximum(present.sum(1), 1)
        np.testing.assert_allclose(scores, est.scores * mean, rtol=1e-12)
        assert (scores < est.scores).any()
