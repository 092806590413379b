import numpy as np
import pytest

from posefix.synth.occlusion import ANKLES, HIPS, KNEES, occlude_rectangles, shorten_legs

from .conftest import make_crowd


def _person(seed, labelled=1.0):
    gt, _, _, _ = make_crowd(np.random.default_rng(seed), 1, 0, labelled=labelled, height=(150, 250))
    kp = gt[0]
    kp[..., :2] -= kp[kp[:, 2] > 0, :2].min(0) - 40  # into a 400 × 400 image
    return kp


def _image(seed):
    return np.random.default_rng(seed).integers(0, 255, size=(400, 400, 3), dtype=np.uint8)


def _covered(shape, boxes):
    mask = np.zeros(shape[:2], dtype=bool)
    for x0, y0, x1, y1 in np.round(boxes).astype(int):
        mask[y0:y1, x0:x1] = True
    return mask


def _inside(kp, boxes):
    """Labelled joints of the original pose inside any (x0, y0, x1, y1) box, by plain loops."""
    return np.array([v > 0 and any(x0 <= x < x1 and y0 <= y < y1 for x0, y0, x1, y1 in boxes) for x, y, v in kp])


@pytest.mark.parametrize("seed", range(20))
def test_shorten_legs(seed):
    kp, img = _person(seed), _image(seed)
    kp_before, img_before = kp.copy(), img.copy()
    out = shorten_legs(img, kp, np.random.default_rng(seed))
    assert np.array_equal(kp, kp_before) and np.array_equal(img, img_before)  # inputs untouched
    for hip, knee, ankle in zip(HIPS, KNEES, ANKLES):
        thigh = (np.linalg.norm(out.keypoints[knee, :2] - out.keypoints[hip, :2])
                 / np.linalg.norm(kp[knee, :2] - kp[hip, :2]))
        shin = (np.linalg.norm(out.keypoints[ankle, :2] - out.keypoints[knee, :2])
                / np.linalg.norm(kp[ankle, :2] - kp[knee, :2]))
        assert 0.5 - 1e-9 <= thigh <= 0.8 + 1e-9 and 0.5 - 1e-9 <= shin <= 0.8 + 1e-9
    assert np.array_equal(out.keypoints[:11], kp[:11])  # upper body unchanged
    covered = _covered(img.shape, out.boxes)
    assert np.array_equal(out.image[~covered], img[~covered])  # only the cutout changed
    assert covered.any()
    # hidden = labelled joints inside the cutout; the ankles always are.
    assert out.hidden[15] and out.hidden[16]
    assert np.array_equal(out.hidden, _inside(kp, out.boxes))


def test_shorten_legs_without_legs_is_identity():
    kp = _person(1)
    kp[11:, 2] = 0
    out = shorten_legs(_image(1), kp, np.random.default_rng(0))
    assert np.array_equal(out.keypoints, kp) and not out.hidden.any() and out.boxes.shape == (0, 4)


@pytest.mark.parametrize("seed", range(20))
def test_occlude_rectangles(seed):
    kp, img = _person(seed, labelled=0.8), _image(seed).astype(np.float32) / 255
    out = occlude_rectangles(img, kp, np.random.default_rng(seed), count=(1, 3))
    assert 1 <= len(out.boxes) <= 3
    assert np.array_equal(out.keypoints, kp)
    covered = _covered(img.shape, out.boxes)
    assert np.array_equal(out.image[~covered], img[~covered])
    assert out.image.dtype == img.dtype and 0 <= out.image.min() and out.image.max() <= 1
    assert np.array_equal(out.hidden, _inside(kp, out.boxes))
    assert out.hidden.any()  # each rectangle is placed over a labelled joint


def test_occlusion_is_reproducible():
    kp, img = _person(3), _image(3)
    a = occlude_rectangles(img, kp, np.random.default_rng(9))
    b = occlude_rectangles(img, kp, np.random.default_rng(9))
    assert np.array_equal(a.image, b.image) and np.array_equal(a.boxes, b.boxes)
