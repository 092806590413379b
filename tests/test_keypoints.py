"""What a valid keypoint is (posefix.keypoints' validators), checked where keypoints come in."""
import json
import math

import numpy as np
import pytest

from posefix.errors import InputError
from posefix.keypoints import KEYPOINT_BOUND, NUM_KEYPOINTS, check_poses, is_number, keypoint_list, present
from posefix.synth.cocoio import load_ground_truth, validate_results

K = NUM_KEYPOINTS


@pytest.mark.parametrize("x, number", [(0, True), (-3.5, True), (1e308, True), (True, False), (None, False),
                                       ("1", False), (math.nan, False), (-math.inf, False), (10 ** 400, False),
                                       ([1], False)])
def test_a_number_is_a_finite_int_or_float(x, number):
    assert is_number(x) is number
    assert is_number(x, KEYPOINT_BOUND) is (number and abs(x) <= KEYPOINT_BOUND)


def test_keypoint_lists():
    values = np.arange(3 * K, dtype=float).tolist()
    values[4] = 7  # an int among the floats
    np.testing.assert_array_equal(keypoint_list(values, "f"), np.array(values).reshape(K, 3))
    assert keypoint_list([1, 2, 3, 4, 5, 6], "f", k=2).shape == (2, 3)
    for value, got in (([0.0] * 50, "50 numbers"), ("x", "str"), (None, "NoneType")):
        with pytest.raises(InputError) as e:
            keypoint_list(value, "results[2].keypoints", "r.json")
        assert str(e.value) == (f"r.json: results[2].keypoints: must be a list of {3 * K} numbers (x, y, v for {K} "
                                f"keypoints), got {got}")
    for bad in (math.nan, math.inf, None, True, "3", 10 ** 400):
        value = [0.0] * (3 * K)
        value[7] = bad
        with pytest.raises(InputError, match=r"^f: entry 7 is .*, not a finite number$"):
            keypoint_list(value, "f")
    value = [0.0] * (3 * K)
    value[5] = 2e9
    assert keypoint_list(value, "f")[1, 2] == 2e9  # no bound by default
    with pytest.raises(InputError, match=r"^f: entry 5 is 2000000000.0, not a finite number \(within ±1e9\)$"):
        keypoint_list(value, "f", bound=KEYPOINT_BOUND)
    with pytest.raises(InputError, match=r"^f: must be a list of 6 numbers \(x, y, score for 2 keypoints\)"):
        keypoint_list([1], "f", k=2, what="x, y, score")


def test_coco_files_are_checked_by_it(tmp_path):
    kp = [0] * (3 * K)
    kp[3] = 10 ** 400  # beyond float64: an InputError, no OverflowError
    doc = {"images": [{"id": 1}], "annotations": [{"id": 1, "image_id": 1, "keypoints": kp, "bbox": [0, 0, 1, 1]}]}
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(InputError, match=r"annotations\[0\]\.keypoints: entry 3 is 1000.*, not a finite number$"):
        load_ground_truth(path)
    with pytest.raises(InputError, match=r"^r: results\[0\]\.keypoints: entry 3 is "):
        validate_results([{"image_id": 1, "keypoints": kp, "score": 1.0}], "r")
    with pytest.raises(InputError, match=r"results\[0\]\.keypoints: must be a list of 51 numbers .*got 3 numbers"):
        validate_results([{"image_id": 1, "keypoints": [1, 2, 3], "score": 1.0}], "r")


def _poses(n=3, k=K, seed=0):
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.uniform(0, 100, (n, k, 2)), rng.uniform(0.1, 1, (n, k, 1))], -1)


def test_check_poses():
    poses = _poses()
    assert check_poses(poses, "p") is poses
    np.testing.assert_array_equal(check_poses(poses.tolist(), "p"), poses)
    for shape in ((3, K), (3, K, 2), (3, K + 1, 3)):
        with pytest.raises(InputError, match=rf"^p: must be poses of shape \(N, {K}, 3\) \(x, y, score\), got shape"):
            check_poses(np.zeros(shape), "p")
    assert check_poses(np.zeros((2, 33, 3)), "p", k=None).shape == (2, 33, 3)
    bad = poses.copy()
    bad[2, 4, 1], bad[2, 6, 0] = math.nan, math.inf
    with pytest.raises(InputError, match=r"^persons\[2\]\.keypoints\[4\]\.y: must be finite, got nan$"):
        check_poses(bad, "persons")
    assert check_poses(bad, "persons", finite=False) is bad  # non-finite x, y: absent joints
    big = poses.copy()
    big[1, 0, 2] = 2e9
    check_poses(big, "p")
    with pytest.raises(InputError,
                       match=r"^p\[1\]\.keypoints\[0\]\.score: must be finite \(within ±1e9\), got 2000000000.0$"):
        check_poses(big, "p", bound=KEYPOINT_BOUND)


@pytest.mark.parametrize("x, y, inside", [(-100, 20, True), (-101, 20, False), (200, 20, True), (200.5, 20, False),
                                          (50, -40, True), (50, -40.5, False), (50, 80, True), (50, 81, False)])
def test_check_poses_bounds_present_keypoints_by_the_image(x, y, inside):
    poses = _poses(2)
    poses[..., 1] *= 0.4  # within the 100×40 image
    poses[1, 3, :2] = x, y
    if inside:
        check_poses(poses, "p", image_size=(40, 100))
    else:
        with pytest.raises(InputError, match=rf"^p\[1\]\.keypoints\[3\]: \({x:g}, {y:g}\) is more than the image's "
                                             r"own size outside the 100×40 image \(x, y in pixels\?\)$"):
            check_poses(poses, "p", image_size=(40, 100))
    poses[1, 3, 2] = 0  # an absent keypoint may lie anywhere
    check_poses(poses, "p", image_size=(40, 100))


def test_service_persons_give_the_same_errors():
    """persons_array's checks of a request's keypoints are check_poses' (same fields, same problems)."""
    from posefix._proto import pb2
    from posefix.serve.validation import Limits, persons_array

    def request(poses):
        return [pb2.Person(keypoints=[pb2.Keypoint(x=x, y=y, score=s) for x, y, s in p.tolist()]) for p in poses]

    cases = []
    for change in (lambda p: None, lambda p: p.__setitem__((1, 5, 0), math.nan),
                   lambda p: p.__setitem__((0, 2, 2), -math.inf), lambda p: p.__setitem__((1, 9, 1), 1000.0),
                   lambda p: p.__setitem__((0, 16, 0), -250.0)):
        poses = _poses(2, seed=len(cases)).astype(np.float32).astype(np.float64)
        change(poses)
        cases.append(poses)
    for poses in cases:
        try:
            expected = persons_array(request(poses), pb2.KEYPOINT_FORMAT_COCO_17, (120, 200), Limits())
        except InputError as e:
            with pytest.raises(InputError) as ours:
                check_poses(poses, "persons", image_size=(120, 200))
            assert str(ours.value) == str(e)
        else:
            np.testing.assert_array_equal(check_poses(poses, "persons", image_size=(120, 200)), expected)


def test_present():
    poses = _poses(2)
    poses[0, 1, 2], poses[1, 2, 0], poses[1, 3, 1] = 0, math.nan, -math.inf
    expected = np.ones((2, K), dtype=bool)
    expected[0, 1] = expected[1, 2] = expected[1, 3] = False
    np.testing.assert_array_equal(present(poses), expected)
    np.testing.assert_array_equal(present(poses[1]), expected[1])
