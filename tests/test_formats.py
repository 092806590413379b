"""Estimator formats: each file built here from known COCO-17 poses reads back as those poses in pixels,
refined joints are written back at the mapped positions with everything else kept, and malformed input is
an InputError naming the entry and field."""
import copy
import json
import math
import subprocess
import sys

import numpy as np
import pytest

from posefix.errors import InputError
from posefix.formats import (
    FORMATS,
    LAYOUTS,
    from_coco17,
    image_file,
    image_ids,
    image_sizes,
    read_estimates,
    to_coco17,
    write_coco_results,
)

from .conftest import FIGURE

# The mappings of the estimators reference (docs: shared/reference/estimators.md), typed independently:
# COCO joint j ← index in the format's layout.
BLAZEPOSE_FROM_COCO = {0: 0, 1: 2, 2: 5, 3: 7, 4: 8, 5: 11, 6: 12, 7: 13, 8: 14, 9: 15, 10: 16, 11: 23, 12: 24,
                       13: 25, 14: 26, 15: 27, 16: 28}
BODY25_FROM_COCO = {0: 0, 1: 16, 2: 15, 3: 18, 4: 17, 5: 5, 6: 2, 7: 6, 8: 3, 9: 7, 10: 4, 11: 12, 12: 9, 13: 13,
                    14: 10, 15: 14, 16: 11}
# OpenPose COCO-18: 0 Nose 1 Neck 2 RShoulder 3 RElbow 4 RWrist 5 LShoulder 6 LElbow 7 LWrist 8 RHip 9 RKnee
# 10 RAnkle 11 LHip 12 LKnee 13 LAnkle 14 REye 15 LEye 16 REar 17 LEar.
COCO18_FROM_COCO = {0: 0, 1: 15, 2: 14, 3: 17, 4: 16, 5: 5, 6: 2, 7: 6, 8: 3, 9: 7, 10: 4, 11: 11, 12: 8, 13: 12,
                    14: 9, 15: 13, 16: 10}
PARTS = ["nose", "leftEye", "rightEye", "leftEar", "rightEar", "leftShoulder", "rightShoulder", "leftElbow",
         "rightElbow", "leftWrist", "rightWrist", "leftHip", "rightHip", "leftKnee", "rightKnee", "leftAnkle",
         "rightAnkle"]
SIZES = {"a.jpg": (640, 480), "b.png": (320, 400)}


def _poses(rng, n, size=(640, 480)):
    """n COCO-17 poses (n, 17, 3) inside an image of ``size``: x, y pixels and a score in (0.2, 1]."""
    w, h = size
    height = rng.uniform(0.4, 0.7, n) * h
    centre = np.stack([rng.uniform(0.3, 0.7, n) * w, rng.uniform(0.4, 0.6, n) * h], axis=1)
    kp = np.zeros((n, 17, 3))
    kp[..., :2] = FIGURE * height[:, None, None] + centre[:, None]
    kp[..., 2] = rng.uniform(0.2, 1.0, (n, 17))
    return kp


def _write(tmp_path, doc, name="est.json"):
    path = tmp_path / name
    path.write_text(json.dumps(doc))
    return path


def _refine(poses, rng):
    """A stand-in refiner: every joint moved a little, a new confidence."""
    return poses[..., :2] + rng.normal(0, 3, poses[..., :2].shape), rng.uniform(0, 1, poses.shape[:2])


def _raises(path, fmt, field, **kw) -> InputError:
    with pytest.raises(InputError) as e:
        read_estimates(path, fmt, **kw)
    assert e.value.field == field, str(e.value)
    return e.value


def _mean_present(s):
    return s[s > 0].mean() if (s > 0).any() else 0.0


# Layouts.

def test_layout_tables_match_the_estimators_reference():
    assert LAYOUTS["coco17"].coco_index == tuple(range(17))
    for name, table, n in (("blazepose33", BLAZEPOSE_FROM_COCO, 33), ("body25", BODY25_FROM_COCO, 25),
                           ("coco18", COCO18_FROM_COCO, 18)):
        layout = LAYOUTS[name]
        assert len(layout.names) == n and layout.name == name
        assert layout.coco_index == tuple(table[j] for j in range(17))
    body25 = LAYOUTS["body25"]
    assert [body25.names[body25.coco_index[j]] for j in (1, 5, 6, 15)] == ["LEye", "LShoulder", "RShoulder", "LAnkle"]
    blaze = LAYOUTS["blazepose33"]
    assert [blaze.names[blaze.coco_index[j]] for j in (1, 4, 12)] == ["left_eye", "right_ear", "right_hip"]


def test_to_and_from_coco17_touch_only_the_mapped_keypoints():
    rng = np.random.default_rng(0)
    layout = LAYOUTS["blazepose33"]
    native = rng.normal(size=(2, 33, 5))
    coco = to_coco17(native, layout)
    assert coco.shape == (2, 17, 5)
    for j, k in BLAZEPOSE_FROM_COCO.items():
        np.testing.assert_array_equal(coco[:, j], native[:, k])
    refined = rng.normal(size=(2, 17, 3))
    out = from_coco17(refined, native, layout)
    mapped = list(BLAZEPOSE_FROM_COCO.values())
    others = [k for k in range(33) if k not in mapped]
    np.testing.assert_array_equal(out[:, others], native[:, others])
    np.testing.assert_array_equal(out[:, mapped, :3], refined)
    np.testing.assert_array_equal(out[:, mapped, 3:], native[:, mapped, 3:])
    assert not np.shares_memory(out, native)
    with pytest.raises(ValueError):
        to_coco17(native, LAYOUTS["body25"])
    with pytest.raises(ValueError):
        from_coco17(refined[:1], native, layout)


def test_formats_module_needs_no_torch():
    code = "import sys, posefix.formats; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# COCO results.

def test_coco_results_read_and_write_back_every_field(tmp_path):
    rng = np.random.default_rng(1)
    poses = _poses(rng, 3)
    doc = [{"image_id": 7 + i // 2, "category_id": 1, "keypoints": poses[i].reshape(-1).tolist(), "score": 0.5 + i,
            "bbox": [1, 2, 3, 4], "center": [5.0, 6.0], "scale": [1.0, 2.0], "mine": {"a": i}} for i in range(3)]
    est = read_estimates(_write(tmp_path, doc), "coco")
    assert est.format == "coco" and est.layout is LAYOUTS["coco17"] and not est.needs_image_size
    assert est.image_keys == [7, 7, 8]
    np.testing.assert_allclose(est.keypoints, poses)
    np.testing.assert_allclose(est.scores, [0.5, 1.5, 2.5])
    xy, conf = _refine(poses, rng)
    out = write_coco_results(est, xy, conf, [0.1, 0.2, 0.3], [7, 7, 8])
    for i, r in enumerate(out):
        assert {k: v for k, v in r.items() if k not in ("keypoints", "score")} == \
            {k: v for k, v in doc[i].items() if k not in ("keypoints", "score")}
        np.testing.assert_allclose(np.reshape(r["keypoints"], (17, 3)), np.concatenate([xy[i], conf[i, :, None]], 1))
        assert r["score"] == [0.1, 0.2, 0.3][i]
    assert write_coco_results(est, xy, conf, np.ones(3))[2]["image_id"] == 8  # integer keys are the ids
    json.dumps(out, allow_nan=False)


def test_coco_malformed_results_name_the_result_and_field(tmp_path):
    poses = _poses(np.random.default_rng(2), 3)
    good = [{"image_id": 1, "keypoints": p.reshape(-1).tolist(), "score": 1.0} for p in poses]
    bad = copy.deepcopy(good)
    bad[1]["keypoints"] = bad[1]["keypoints"][:50]
    bad[2]["score"] = math.nan
    path = _write(tmp_path, bad)
    _raises(path, "coco", "results[1].keypoints")
    est = read_estimates(path, "coco", skip_invalid=True)
    assert len(est.records) == 1 and len(est.skipped) == 2
    assert "results[1].keypoints" in est.skipped[0] and "results[2].score" in est.skipped[1]
    _raises(_write(tmp_path, {"image_id": 1}, "obj.json"), "coco", "results")
    _raises(tmp_path / "missing.json", "coco", "results")


# MoveNet.

def _movenet_single(poses, keys):
    return [{"image": key, "keypoints": [[y / SIZES[key][1], x / SIZES[key][0], s] for x, y, s in p]}
            for p, key in zip(poses, keys, strict=True)]


def test_movenet_singlepose_reads_pixels_and_writes_back_normalised(tmp_path):
    rng = np.random.default_rng(3)
    keys = ["a.jpg", "b.png", "a.jpg"]
    poses = np.concatenate([_poses(rng, 1, SIZES[k]) for k in keys])
    poses[0, 3, 2] = 0.0
    doc = _movenet_single(poses, keys)
    doc[1]["keypoints"] = [[doc[1]["keypoints"]]]  # the model's [1, 1, 17, 3] output as it comes
    doc[2]["frame"] = 12
    est = read_estimates(_write(tmp_path, doc), "movenet", image_sizes=SIZES)
    assert est.needs_image_size and est.image_keys == keys
    np.testing.assert_allclose(est.keypoints, poses, atol=1e-9)
    np.testing.assert_allclose(est.scores, [_mean_present(p[:, 2]) for p in poses])
    np.testing.assert_allclose(est.native[0, :, [1, 0]].T * SIZES["a.jpg"], poses[0, :, :2], atol=1e-9)
    xy, conf = _refine(poses, rng)
    out = write_coco_results(est, xy, conf, est.scores, [1, 2, 1])
    for i, r in enumerate(out):
        w, h = SIZES[keys[i]]
        assert r["source_format"] == "movenet" and r["image"] == keys[i] and r["category_id"] == 1
        rows = np.asarray(r["source_keypoints"]).reshape(17, 3)
        np.testing.assert_allclose(rows, np.stack([xy[i, :, 1] / h, xy[i, :, 0] / w, conf[i]], 1))
    assert np.shape(out[1]["source_keypoints"]) == (1, 1, 17, 3)
    assert out[2]["source_fields"] == {"frame": 12} and "source_fields" not in out[0]
    assert doc[0]["keypoints"][0][0] == est.records[0]["keypoints"][0][0]  # the records are not modified


def test_movenet_multipose_rows_keep_their_box_and_score(tmp_path):
    rng = np.random.default_rng(4)
    poses = _poses(rng, 3, (800, 600))
    rows = [[v for x, y, s in p for v in (y / 600, x / 800, s)] + [0.1, 0.2, 0.9, 0.8, 0.3 + 0.1 * i]
            for i, p in enumerate(poses)]
    doc = [{"image": 5, "people": [rows[:2]]},  # the model's [1, 6, 56] output, nested as it comes
           {"image": "c.jpg", "width": 800, "height": 600, "people": [rows[2]]}]
    est = read_estimates(_write(tmp_path, doc), "movenet", image_sizes={5: (800, 600)})
    assert est.image_keys == [5, 5, "c.jpg"]
    np.testing.assert_allclose(est.keypoints, poses, atol=1e-9)
    np.testing.assert_allclose(est.scores, [0.3, 0.4, 0.5])
    np.testing.assert_allclose(est.sizes, [[800, 600]] * 3)
    xy, conf = _refine(poses, rng)
    out = write_coco_results(est, xy, conf, est.scores, [5, 5, 6])
    for i, r in enumerate(out):
        row = r["source_keypoints"]
        assert len(row) == 56 and row[51:] == rows[i][51:]
        np.testing.assert_allclose(np.reshape(row[:51], (17, 3)), np.stack([xy[i, :, 1] / 600, xy[i, :, 0] / 800,
                                                                           conf[i]], 1))
    assert out[2]["source_fields"] == {"width": 800, "height": 600}


def test_movenet_without_image_sizes_is_a_clear_error(tmp_path):
    poses = _poses(np.random.default_rng(5), 2)
    path = _write(tmp_path, _movenet_single(poses, ["a.jpg", "b.png"]))
    e = _raises(path, "movenet", "entries[0].image")
    assert "image_sizes" in str(e) and "'a.jpg'" in str(e)
    e = _raises(path, "movenet", "entries[1].image", image_sizes={"a.jpg": (640, 480)})
    est = read_estimates(path, "movenet", image_sizes={"a.jpg": (640, 480)}, skip_invalid=True)
    assert est.image_keys == ["a.jpg"] and len(est.skipped) == 1 and "entries[1].image" in est.skipped[0]
    _raises(path, "movenet", "image_sizes['a.jpg']", image_sizes={"a.jpg": (640, 0), "b.png": (1, 1)})
    sizes = {k: np.array(v) for k, v in SIZES.items()}  # e.g. read from the image headers
    np.testing.assert_allclose(read_estimates(path, "movenet", image_sizes=sizes).keypoints, poses, atol=1e-9)


@pytest.mark.parametrize("change, field", [
    (lambda d: d[1].pop("image"), "entries[1].image"),
    (lambda d: d[1].update(image=True), "entries[1].image"),
    (lambda d: d[1]["keypoints"].pop(), "entries[1].keypoints"),
    (lambda d: d[1]["keypoints"][4].append(0.5), "entries[1].keypoints[4]"),
    (lambda d: d[1]["keypoints"][4].__setitem__(0, math.inf), "entries[1].keypoints[4]"),
    (lambda d: d[1]["keypoints"][4].__setitem__(2, -0.5), "entries[1].keypoints[4]"),
    (lambda d: d[1]["keypoints"][4].__setitem__(1, "0.5"), "entries[1].keypoints[4]"),
    (lambda d: d[1].update(people=[]), "entries[1]"),
    (lambda d: d[1].update(meta={"t": [1.0, math.nan]}), "entries[1].meta.t[1]"),
    (lambda d: d.__setitem__(1, [1, 2]), "entries[1]"),
    (lambda d: d.append({"image": "a.jpg", "people": [[0.5] * 55]}), "entries[2].people[0]"),
    (lambda d: d.append({"image": "a.jpg", "people": {"0": 1}}), "entries[2].people"),
    (lambda d: d.append({"image": "z.jpg", "width": -3, "height": 4, "keypoints": d[0]["keypoints"]}),
     "entries[2].width"),
    (lambda d: d.append({"image": "a.jpg", "width": 641, "height": 480, "keypoints": d[0]["keypoints"]}),
     "entries[2].width"),
])
def test_movenet_malformed_entries_name_the_entry_and_field(tmp_path, change, field):
    doc = _movenet_single(_poses(np.random.default_rng(6), 2), ["a.jpg", "b.png"])
    change(doc)
    path = _write(tmp_path, doc)
    _raises(path, "movenet", field, image_sizes=SIZES)
    est = read_estimates(path, "movenet", image_sizes=SIZES, skip_invalid=True)
    assert len(est.skipped) == 1 and field in est.skipped[0] and len(est.records) == len(doc) - 1


# BlazePose.

def _blazepose_doc(rng, poses, keys):
    """Entries of 33 landmarks: COCO joints placed by the reference table, the rest random; visibility is
    the COCO score."""
    doc = []
    for p, key in zip(poses, keys, strict=True):
        w, h = SIZES[key]
        lm = np.concatenate([rng.uniform(0, 1, (33, 2)), rng.normal(0, 0.3, (33, 1)), rng.uniform(0, 1, (33, 2))], 1)
        for j, k in BLAZEPOSE_FROM_COCO.items():
            lm[k, :2] = p[j, 0] / w, p[j, 1] / h
            lm[k, 3] = p[j, 2]
        doc.append({"image": key, "landmarks": lm.tolist()})
    return doc


def test_blazepose_maps_33_landmarks_and_keeps_the_others(tmp_path):
    rng = np.random.default_rng(7)
    keys = ["a.jpg", "b.png", "b.png"]
    poses = np.concatenate([_poses(rng, 1, SIZES[k]) for k in keys])
    doc = _blazepose_doc(rng, poses, keys)
    doc[1]["landmarks"] = [dict(zip(("x", "y", "z", "visibility", "presence"), lm, strict=True))
                           for lm in doc[1]["landmarks"]]  # MediaPipe's landmark objects
    doc[2]["landmarks"] = [lm[:4] for lm in doc[2]["landmarks"]]  # no presence
    doc[2]["world_landmarks"] = [[0.0, 1.0, 2.0]] * 33
    given = copy.deepcopy(doc)
    est = read_estimates(_write(tmp_path, doc), "blazepose", image_sizes=SIZES)
    assert est.layout is LAYOUTS["blazepose33"] and est.native.shape == (3, 33, 5)
    np.testing.assert_allclose(est.keypoints, poses, atol=1e-9)
    np.testing.assert_allclose(est.scores, [_mean_present(p[:, 2]) for p in poses])
    assert np.isnan(est.native[2, :, 4]).all() and not np.isnan(est.native[:2]).any()
    xy, conf = _refine(poses, rng)
    out = write_coco_results(est, xy, conf, est.scores, [1, 2, 2])
    mapped = {k: j for j, k in BLAZEPOSE_FROM_COCO.items()}
    for i, r in enumerate(out):
        w, h = SIZES[keys[i]]
        assert r["image"] == keys[i] and r["source_format"] == "blazepose"
        for k, (lm, orig) in enumerate(zip(r["source_keypoints"], given[i]["landmarks"], strict=True)):
            if k not in mapped:
                assert lm == orig
                continue
            j = mapped[k]
            v = [lm[n] for n in ("x", "y", "z", "visibility")] if isinstance(lm, dict) else lm[:4]
            o = [orig[n] for n in ("x", "y", "z", "visibility")] if isinstance(orig, dict) else orig[:4]
            np.testing.assert_allclose(v, [xy[i, j, 0] / w, xy[i, j, 1] / h, o[2], conf[i, j]])
            assert (lm["presence"] == orig["presence"]) if isinstance(lm, dict) else lm[4:] == orig[4:]
    assert out[2]["source_fields"] == {"world_landmarks": [[0.0, 1.0, 2.0]] * 33}
    assert doc == given


@pytest.mark.parametrize("change, field", [
    (lambda d: d[3]["landmarks"][12].append(0.5), "entries[3].landmarks[12]"),
    (lambda d: d[3]["landmarks"].__setitem__(12, [0.1, 0.2, 0.3]), "entries[3].landmarks[12]"),
    (lambda d: d[3]["landmarks"][12].__setitem__(1, math.nan), "entries[3].landmarks[12]"),
    (lambda d: d[3]["landmarks"][12].__setitem__(3, 1.5), "entries[3].landmarks[12]"),
    (lambda d: d[3]["landmarks"].__setitem__(12, {"x": 0.1, "y": 0.2, "z": 0.0}),
     "entries[3].landmarks[12].visibility"),
    (lambda d: d[3]["landmarks"].__setitem__(12, None), "entries[3].landmarks[12]"),
    (lambda d: d[3]["landmarks"].pop(), "entries[3].landmarks"),
    (lambda d: d[3].pop("landmarks"), "entries[3].landmarks"),
    (lambda d: d[3].update(image=None), "entries[3].image"),
    (lambda d: d[3].update(image="unknown.jpg"), "entries[3].image"),
])
def test_blazepose_malformed_entries_name_the_entry_and_field(tmp_path, change, field):
    rng = np.random.default_rng(8)
    keys = ["a.jpg", "b.png", "a.jpg", "b.png"]
    doc = _blazepose_doc(rng, np.concatenate([_poses(rng, 1, SIZES[k]) for k in keys]), keys)
    change(doc)
    path = _write(tmp_path, doc)
    _raises(path, "blazepose", field, image_sizes=SIZES)
    est = read_estimates(path, "blazepose", image_sizes=SIZES, skip_invalid=True)
    assert len(est.records) == 3 and len(est.skipped) == 1 and field in est.skipped[0]


# PoseNet.

def _posenet_pose(p, score, order):
    return {"score": score, "keypoints": [{"part": PARTS[j], "position": {"x": p[j, 0], "y": p[j, 1]},
                                           "score": p[j, 2]} for j in order]}


def test_posenet_parts_by_name_in_any_order(tmp_path):
    rng = np.random.default_rng(9)
    poses = _poses(rng, 3)
    order = rng.permutation(17)
    missing = int(order[-1])
    doc = [{"image": "a.jpg", "poses": [_posenet_pose(poses[0], 0.7, order[:-1]), _posenet_pose(poses[1], 0.6, order)]},
           {"image": "b.png", "poses": []},
           {"image": 3, "poses": [{"keypoints": [{"name": "left_" + PARTS[j][4:].lower() if PARTS[j].startswith("left")
                                                  else "right_" + PARTS[j][5:].lower() if PARTS[j].startswith("right")
                                                  else PARTS[j], "x": poses[2, j, 0], "y": poses[2, j, 1],
                                                  "score": poses[2, j, 2]} for j in range(17)],
                                   "box": {"xMin": 1}}]}]  # @tensorflow-models/pose-detection's form
    est = read_estimates(_write(tmp_path, doc), "posenet")
    assert est.image_keys == ["a.jpg", "a.jpg", 3]
    expected = poses.copy()
    expected[0, missing] = 0.0
    np.testing.assert_allclose(est.keypoints, expected)
    np.testing.assert_allclose(est.scores, [0.7, 0.6, _mean_present(poses[2, :, 2])])
    xy, conf = _refine(poses, rng)
    out = write_coco_results(est, xy, conf, [0.5, 0.4, 0.3], [1, 1, 3])
    for i, r in enumerate(out):
        kps = r["source_keypoints"]
        assert len(kps) == 17
        for kp in kps:
            name = kp.get("part", kp.get("name"))
            j = PARTS.index(name) if name in PARTS else [p.lower() for p in PARTS].index(name.replace("_", ""))
            pos = kp.get("position", kp)
            np.testing.assert_allclose([pos["x"], pos["y"], kp["score"]], [xy[i, j, 0], xy[i, j, 1], conf[i, j]])
    assert [kp["part"] for kp in out[0]["source_keypoints"]] == [PARTS[j] for j in order]  # missing part appended
    assert [kp["part"] for kp in out[1]["source_keypoints"]] == [PARTS[j] for j in order]
    assert out[0]["source_fields"] == {"score": 0.7} and out[0]["score"] == 0.5
    assert out[2]["source_fields"] == {"box": {"xMin": 1}} and set(out[2]["source_keypoints"][0]) == \
        {"name", "x", "y", "score"}


@pytest.mark.parametrize("change, field", [
    (lambda d: d[0]["poses"][1]["keypoints"][3].update(part="leftEey"), "entries[0].poses[1].keypoints[3].part"),
    (lambda d: d[0]["poses"][1]["keypoints"][3].update(part=d[0]["poses"][1]["keypoints"][2]["part"]),
     "entries[0].poses[1].keypoints[3]"),
    (lambda d: d[0]["poses"][1]["keypoints"][3]["position"].pop("x"), "entries[0].poses[1].keypoints[3].position.x"),
    (lambda d: d[0]["poses"][1]["keypoints"][3].update(position=[1, 2]), "entries[0].poses[1].keypoints[3].position"),
    (lambda d: d[0]["poses"][1]["keypoints"][3].update(score=None), "entries[0].poses[1].keypoints[3].score"),
    (lambda d: d[0]["poses"][1]["keypoints"][3].update(score=1.5), "entries[0].poses[1].keypoints[3].score"),
    (lambda d: d[0]["poses"][1].update(score=math.nan), "entries[0].poses[1].score"),
    (lambda d: d[0]["poses"][1].update(keypoints={}), "entries[0].poses[1].keypoints"),
    (lambda d: d[0]["poses"].__setitem__(1, "pose"), "entries[0].poses[1]"),
])
def test_posenet_malformed_poses_name_the_pose_and_field(tmp_path, change, field):
    poses = _poses(np.random.default_rng(10), 3)
    doc = [{"image": "a.jpg", "poses": [_posenet_pose(p, 0.5, range(17)) for p in poses]}]
    change(doc)
    path = _write(tmp_path, doc)
    _raises(path, "posenet", field)
    est = read_estimates(path, "posenet", skip_invalid=True)
    assert len(est.records) == 2 and len(est.skipped) == 1 and field in est.skipped[0]


# OpenPose.

def _openpose_person(rng, p, table, n):
    """An OpenPose person of n keypoints: COCO joints placed by the reference table, the others random,
    a joint of score 0 written as OpenPose's (0, 0, 0)."""
    kp = np.concatenate([rng.uniform(0, 500, (n, 2)), rng.uniform(0.1, 1, (n, 1))], 1)
    for j, k in table.items():
        kp[k] = p[j] if p[j, 2] > 0 else 0.0
    return {"person_id": [-1], "pose_keypoints_2d": kp.reshape(-1).tolist(), "face_keypoints_2d": [1.0, 2.0, 0.5]}


def test_openpose_directory_of_body25_files(tmp_path):
    rng = np.random.default_rng(11)
    poses = _poses(rng, 3)
    poses[1, 4, 2] = 0.0  # not found
    d = tmp_path / "json"
    d.mkdir()
    files = {"img2_keypoints.json": [poses[2]], "img1_keypoints.json": [poses[0], poses[1]], "empty_keypoints.json": []}
    people = {}
    for name, ps in files.items():
        people[name] = [_openpose_person(rng, p, BODY25_FROM_COCO, 25) for p in ps]
        (d / name).write_text(json.dumps({"version": 1.3, "people": people[name]}))
    (d / "notes.json").write_text("not OpenPose")
    est = read_estimates(d, "openpose")
    assert est.layout is LAYOUTS["body25"] and est.image_keys == ["img1", "img1", "img2"]
    expected = poses.copy()
    expected[1, 4] = 0.0
    np.testing.assert_allclose(est.keypoints, expected)
    np.testing.assert_allclose(est.scores, [_mean_present(p[:, 2]) for p in expected])
    xy, conf = _refine(poses, rng)
    out = write_coco_results(est, xy, conf, est.scores, [1, 1, 2])
    given = people["img1_keypoints.json"] + people["img2_keypoints.json"]
    mapped = {k: j for j, k in BODY25_FROM_COCO.items()}
    for i, r in enumerate(out):
        assert r["file"] == est.image_keys[i] and r["source_format"] == "openpose"
        assert r["source_fields"] == {"version": 1.3, "person_id": [-1], "face_keypoints_2d": [1.0, 2.0, 0.5]}
        src = np.reshape(r["source_keypoints"], (25, 3))
        orig = np.reshape(given[i]["pose_keypoints_2d"], (25, 3))
        for k in range(25):
            j = mapped.get(k)
            want = orig[k] if j is None else [xy[i, j, 0], xy[i, j, 1], conf[i, j]]
            np.testing.assert_allclose(src[k], want, rtol=0, atol=0 if j is None else 1e-12)


def test_openpose_single_coco18_file_and_mixed_layouts(tmp_path):
    rng = np.random.default_rng(12)
    poses = _poses(rng, 2)
    path = tmp_path / "frame_000000000007_keypoints.json"
    path.write_text(json.dumps({"people": [_openpose_person(rng, p, COCO18_FROM_COCO, 18) for p in poses]}))
    est = read_estimates(path, "openpose")
    assert est.layout is LAYOUTS["coco18"] and est.image_keys == ["frame_000000000007"] * 2
    np.testing.assert_allclose(est.keypoints, poses)
    assert est.native.shape == (2, 18, 3)

    d = tmp_path / "mixed"
    d.mkdir()
    (d / "a_keypoints.json").write_text(json.dumps({"people": [_openpose_person(rng, poses[0], BODY25_FROM_COCO, 25)]}))
    (d / "b_keypoints.json").write_text(json.dumps({"people": [_openpose_person(rng, poses[1], COCO18_FROM_COCO, 18)]}))
    for skip in (False, True):
        with pytest.raises(InputError) as e:
            read_estimates(d, "openpose", skip_invalid=skip)
        assert e.value.field == "people[0].pose_keypoints_2d" and e.value.source.endswith("b_keypoints.json")
        assert "coco18" in str(e.value) and "body25" in str(e.value)


def test_openpose_malformed_people_name_the_file_and_field(tmp_path):
    rng = np.random.default_rng(13)
    poses = _poses(rng, 3)
    d = tmp_path / "json"
    d.mkdir()
    people = [_openpose_person(rng, p, BODY25_FROM_COCO, 25) for p in poses]
    people[1]["pose_keypoints_2d"] = people[1]["pose_keypoints_2d"][:72]
    (d / "x_keypoints.json").write_text(json.dumps({"people": people}))
    (d / "y_keypoints.json").write_text("{broken")
    (d / "z_keypoints.json").write_text(json.dumps({"people": [{"pose_keypoints_2d": [math.nan] * 75}]}))
    with pytest.raises(InputError) as e:
        read_estimates(d, "openpose")
    assert e.value.field == "people[1].pose_keypoints_2d" and e.value.source == str(d / "x_keypoints.json")
    assert "75 or 54 numbers" in str(e.value)
    est = read_estimates(d, "openpose", skip_invalid=True)
    assert est.image_keys == ["x", "x"] and len(est.skipped) == 3
    assert "x_keypoints.json: people[1].pose_keypoints_2d" in est.skipped[0]
    assert "y_keypoints.json" in est.skipped[1] and "not valid JSON" in est.skipped[1]
    assert "z_keypoints.json: people[0].pose_keypoints_2d" in est.skipped[2]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="no \\*_keypoints.json"):
        read_estimates(empty, "openpose")
    with pytest.raises(InputError):  # a single file given is the whole input, not a skippable entry
        read_estimates(d / "y_keypoints.json", "openpose", skip_invalid=True)


# Every malformation is an InputError.

def _valid_docs(rng):
    poses = _poses(rng, 2)
    extra = {"box": [1.5, {"t": 2.5}]}
    coco = [{"image_id": 1, "keypoints": p.reshape(-1).tolist(), "score": 0.5, **extra} for p in poses]
    movenet = _movenet_single(poses, ["a.jpg", "a.jpg"]) + [
        {"image": "b.png", "people": [[0.5] * 56], **extra}]
    movenet[0].update(extra)
    blazepose = _blazepose_doc(rng, poses, ["a.jpg", "b.png"])
    blazepose[1]["landmarks"][3] = {"x": 0.1, "y": 0.2, "z": 0.3, "visibility": 0.4, **extra}
    posenet = [{"image": "a.jpg", "poses": [{**_posenet_pose(p, 0.5, range(17)), **extra} for p in poses], **extra}]
    openpose = {"people": [_openpose_person(rng, p, BODY25_FROM_COCO, 25) for p in poses], **extra}
    return {"coco": coco, "movenet": movenet, "blazepose": blazepose, "posenet": posenet, "openpose": openpose}


def _paths(doc, prefix=()):
    yield prefix
    children = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else ()
    for k, v in children:
        yield from _paths(v, (*prefix, k))


@pytest.mark.parametrize("fmt", FORMATS)
def test_any_malformation_is_an_input_error(tmp_path, fmt):
    rng = np.random.default_rng(14)
    base = _valid_docs(rng)[fmt]
    paths = list(_paths(base))
    junk = [None, "x", math.nan, -math.inf, [], {}, True, -1, [[0.5] * 3] * 2, 1e308]
    name = "p_keypoints.json" if fmt == "openpose" else "est.json"
    for trial in range(300):
        doc = copy.deepcopy(base)
        where = paths[rng.integers(len(paths))]
        if not where:
            doc = junk[trial % len(junk)]
        else:
            parent = doc
            for k in where[:-1]:
                parent = parent[k]
            if rng.random() < 0.2:
                del parent[where[-1]]
            else:
                parent[where[-1]] = junk[rng.integers(len(junk))]
        path = _write(tmp_path, doc, name)
        strict_failed = False
        for skip in (False, True):
            try:
                est = read_estimates(path, fmt, image_sizes=SIZES, skip_invalid=skip)
            except InputError:
                strict_failed = True
                continue
            assert bool(est.skipped) == (skip and strict_failed)
            p = len(est.records)
            assert np.isfinite(est.keypoints).all() and est.keypoints.shape == (p, 17, 3)
            out = write_coco_results(est, est.keypoints[..., :2], est.keypoints[..., 2], est.scores, np.arange(p))
            json.dumps(out, allow_nan=False)



# The registry.

def _persons(fmt, doc, stem):
    """Each person of a native document as (image key, its keypoints as given, the other fields of the person
    and its entry), in file order."""
    def rest(d, *drop):
        return {k: v for k, v in d.items() if k not in drop}

    if fmt == "openpose":
        return [(stem, p["pose_keypoints_2d"], {**rest(doc, "people"), **rest(p, "pose_keypoints_2d")})
                for p in doc["people"]]
    if fmt == "coco":
        return [(e["image_id"], e["keypoints"], rest(e, "image_id", "keypoints")) for e in doc]
    if fmt == "movenet":
        return [(e["image"], e["keypoints"], rest(e, "image", "keypoints")) if "keypoints" in e else
                (e["image"], row, rest(e, "image", "people")) for e in doc for row in e.get("people", [None])]
    if fmt == "blazepose":
        return [(e["image"], e["landmarks"], rest(e, "image", "landmarks")) for e in doc]
    return [(e["image"], pose["keypoints"], {**rest(e, "image", "poses"), **rest(pose, "keypoints")})
            for e in doc for pose in e["poses"]]


def _same(a, b) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-12)
    return a == b and type(a) is type(b)


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_round_trips_its_native_document(tmp_path, fmt):
    """Read, then written back with the joints as read: every person comes back as the document gave it."""
    docs = _valid_docs(np.random.default_rng(16))
    assert set(docs) == set(FORMATS)
    doc = docs[fmt]
    est = read_estimates(_write(tmp_path, doc, "p_keypoints.json"), fmt, image_sizes=SIZES)
    assert est.format == fmt and est.needs_image_size == (fmt in ("movenet", "blazepose"))
    p = len(est.records)
    out = write_coco_results(est, est.keypoints[..., :2], est.keypoints[..., 2], est.scores, image_ids(est))
    json.dumps(out, allow_nan=False)
    if fmt == "coco":
        assert all(r.pop("category_id") == 1 for r in out)
        back = [(r["image_id"], r["keypoints"], {k: v for k, v in r.items() if k not in ("image_id", "keypoints")})
                for r in out]
    else:
        assert all(r["source_format"] == fmt and r["category_id"] == 1 for r in out)
        key = "file" if fmt == "openpose" else "image"
        back = [(r[key], r["source_keypoints"], r.get("source_fields", {})) for r in out]
    given = _persons(fmt, doc, "p")
    assert len(back) == len(given) == p > 1
    for i, (b, g) in enumerate(zip(back, given)):
        assert _same(b, g), (i, b, g)


def test_image_sizes_for_normalised_formats_only(tmp_path):
    from PIL import Image

    Image.new("RGB", (31, 17)).save(tmp_path / "a.png")
    doc = [{"image": "a.png"}, {"image": 7}, {"image": "a.png"}, {"image": "../b.png"}, {"image": [1]}, 3]
    path = _write(tmp_path, doc)
    for fmt in FORMATS:
        sizes = image_sizes(path, fmt, tmp_path, {7: {"id": 7, "width": 640, "height": 480}})
        if fmt not in ("movenet", "blazepose"):
            assert sizes is None
            continue
        assert sizes.keys() == {"a.png", 7, "../b.png"}
        assert tuple(sizes["a.png"]) == (31, 17) and tuple(sizes[7]) == (640, 480)
        assert isinstance(sizes["../b.png"], InputError)
        assert image_sizes(path, fmt, size=(8, 6)) == {"a.png": (8, 6), 7: (8, 6), "../b.png": (8, 6)}
        unread = image_sizes(path, fmt, tmp_path / "none", {7: {"id": 7, "width": 640, "height": 480}})
        assert "a.png" not in unread and tuple(unread[7]) == (640, 480)  # left out, reported when needed

def test_cli_format_choices_are_the_registry():
    import argparse

    from posefix.cli import build_parser

    def walk(parser, path=()):
        for action in parser._actions:
            if "--format" in action.option_strings:
                yield " ".join(path), action.choices
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield from walk(sub, (*path, name))

    found = dict(walk(build_parser()))
    assert {"synth fit", "refine", "fit-choice", "refine-video", "index build", "index add", "search"} <= set(found)
    for command, choices in found.items():
        assert list(choices) == list(FORMATS), command

def test_unknown_format_and_bad_image_sizes(tmp_path):
    path = _write(tmp_path, [])
    _raises(path, "alphapose", "format")
    _raises(path, "movenet", "image_sizes", image_sizes=[(1, 2)])
    est = read_estimates(path, "blazepose")
    assert est.keypoints.shape == (0, 17, 3) and est.native.shape == (0, 33, 5)
    assert write_coco_results(est, np.zeros((0, 17, 2)), np.zeros((0, 17)), np.zeros(0), []) == []


def test_write_coco_results_checks_its_arrays(tmp_path):
    poses = _poses(np.random.default_rng(15), 2)
    est = read_estimates(_write(tmp_path, [{"image": "a.jpg", "poses": [_posenet_pose(p, 0.5, range(17))
                                                                        for p in poses]}]), "posenet")
    with pytest.raises(ValueError):
        write_coco_results(est, poses[:1, :, :2], poses[:1, :, 2], [1.0], [1])
    with pytest.raises(InputError, match="image_id"):
        write_coco_results(est, poses[..., :2], poses[..., 2], [1.0, 1.0])
    bad = poses[..., :2].copy()
    bad[0, 0, 0] = math.nan
    with pytest.raises(ValueError):
        write_coco_results(est, bad, poses[..., 2], [1.0, 1.0], [1, 1])


# Image files and ids.

def test_image_file_for_ids_names_and_stems(tmp_path):
    images = {3: {"id": 3, "file_name": "COCO_val2014_000000000003.jpg"}, 4: "four.png"}
    assert image_file(tmp_path, 3, images) == tmp_path / "COCO_val2014_000000000003.jpg"
    assert image_file(tmp_path, 4, images) == tmp_path / "four.png"
    assert image_file(tmp_path, 5, images) == tmp_path / "000000000005.jpg"
    assert image_file(tmp_path, 785) == tmp_path / "000000000785.jpg"
    assert image_file(tmp_path, "sub/a.PNG") == tmp_path / "sub/a.PNG"
    assert image_file(tmp_path, "frame.001") == tmp_path / "frame.001.jpg"
    (tmp_path / "img1.png").write_bytes(b"")
    (tmp_path / "img2.jpeg").write_bytes(b"")
    (tmp_path / "img2.png").write_bytes(b"")
    assert image_file(tmp_path, "img1") == tmp_path / "img1.png"
    assert image_file(tmp_path, "img2") == tmp_path / "img2.jpeg"
    assert image_file(tmp_path, "img3") == tmp_path / "img3.jpg"



def test_image_names_leading_out_of_the_directory_are_refused(tmp_path):
    """Every way a name can point out of the image directory is refused by name, after resolving ``..`` and
    symbolic links; names that stay inside (``sub/../a.jpg``, a link to a file inside) are not."""
    from posefix.images import coco_image_path

    images, outside = tmp_path / "images", tmp_path / "outside"
    (images / "sub").mkdir(parents=True)
    outside.mkdir()
    (images / "a.jpg").write_bytes(b"")
    (outside / "secret.jpg").write_bytes(b"")
    (images / "out.jpg").symlink_to(outside / "secret.jpg")
    (images / "outdir").symlink_to(outside, target_is_directory=True)
    (images / "in.jpg").symlink_to(images / "a.jpg")
    names = {3: {"file_name": "../outside/secret.jpg"}, 4: {"file_name": str(outside / "secret.jpg")}}
    refused = [("../outside/secret.jpg", None), (str(outside / "secret.jpg"), None), ("out.jpg", None),
               ("outdir/secret.jpg", None), ("sub/../../outside/secret.jpg", None), ("../outside/secret", None),
               (3, names), (4, names)]
    for key, coco in refused:
        with pytest.raises(InputError, match="leads outside the image directory .*--allow-outside-images"):
            image_file(images, key, coco)
        assert image_file(images, key, coco, allow_outside=True).resolve().parent == outside.resolve()
    with pytest.raises(InputError, match=r"^'\.\./outside/secret\.jpg': image: leads outside"):
        image_file(images, "../outside/secret.jpg")
    with pytest.raises(InputError, match="leads outside"):
        coco_image_path(images, {"id": 3, "file_name": "../outside/secret.jpg"})
    assert coco_image_path(images, {"id": 3, "file_name": "../outside/secret.jpg"}, allow_outside=True) \
        == images / "../outside/secret.jpg"
    assert image_file(images, "sub/../a.jpg") == images / "sub/../a.jpg"
    assert image_file(images, "in.jpg") == images / "in.jpg"
    assert image_file(images, "a") == images / "a.jpg"
    with pytest.raises(InputError, match="not a usable file name"):
        image_file(images, "a\x00.jpg")


def test_coco_keypoints_beyond_1e9_are_invalid_rows(tmp_path):
    """A finite but huge keypoint (1e308) is an invalid row, named, and skipped with skip_invalid, as in every
    other format; ±1e9 itself is read."""
    rng = np.random.default_rng(7)
    results = [{"image_id": i, "category_id": 1, "keypoints": rng.uniform(0, 500, 51).tolist(), "score": 0.9}
               for i in range(20)]
    bad = sorted(rng.choice(20, size=5, replace=False).tolist())
    for i, value in zip(bad, (1e308, -1e308, 1e10, 1e9 * (1 + 1e-15), -5e20)):
        results[i]["keypoints"][int(rng.integers(51))] = value
    edge = next(i for i in range(20) if i not in bad)
    results[edge]["keypoints"][:3] = [1e9, -1e9, 0.5]
    path = _write(tmp_path, results)
    with pytest.raises(InputError, match=rf"results\[{bad[0]}\]\.keypoints: element \d+ is .*within ±1e9"):
        read_estimates(path, "coco")
    est = read_estimates(path, "coco", skip_invalid=True)
    assert [m.split(": ")[1] for m in est.skipped] == [f"results[{i}].keypoints" for i in bad]
    assert est.image_keys == [i for i in range(20) if i not in bad]
    assert est.keypoints[est.image_keys.index(edge), 0].tolist() == [1e9, -1e9, 0.5]

def test_image_ids_from_keys(tmp_path):
    poses = _poses(np.random.default_rng(16), 1)
    doc = [{"image": k, "poses": [_posenet_pose(poses[0], 0.5, range(17))]} for k in ("b.jpg", 7, "a.jpg", "b.jpg")]
    est = read_estimates(_write(tmp_path, doc), "posenet")
    np.testing.assert_array_equal(image_ids(est), [8, 7, 9, 8])
    coco_images = {11: {"file_name": "a.jpg"}, 12: {"file_name": "b.png"}}
    np.testing.assert_array_equal(image_ids(est, {**coco_images, 13: "b.jpg"}), [13, 7, 11, 13])
    with pytest.raises(InputError, match="'b.jpg'"):
        image_ids(est, {11: {"file_name": "a.jpg"}})
    est.image_keys = ["b", 7, "a", "b"]  # OpenPose stems match the file names' stems
    np.testing.assert_array_equal(image_ids(est, coco_images), [12, 7, 11, 12])


@pytest.mark.parametrize("fmt, doc", [
    ("movenet", [{"image": 1, "keypoints": [[0.5, 0.5, 10 ** 400]] + [[0.5, 0.5, 0.5]] * 16}]),
    ("blazepose", [{"image": 1, "landmarks": [{"x": 10 ** 400, "y": 0.5, "z": 0.0, "visibility": 0.9}] * 33}]),
])
def test_an_integer_beyond_float64_is_an_input_error_naming_its_field(tmp_path, fmt, doc):
    path = tmp_path / "big.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(InputError, match=r"entries\[0\]\.(keypoints|landmarks)\[0\]"):
        read_estimates(path, fmt, {1: (10, 10)})
