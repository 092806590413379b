"""``posefix refine`` end to end on real images, in every input format."""
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from posefix import SAMPLE_DIR
from posefix.cli import main
from posefix.engine import export_weights
from posefix.model import ModelConfig, PoseFixNet
from synth.cocoio import load_ground_truth
from synth.diagnose import keypoint_ap

GT = SAMPLE_DIR / "person_keypoints_val_sample.json"
RESULTS = SAMPLE_DIR / "topdown_keypoints_val4.json"
IMAGES = SAMPLE_DIR / "images"
# Estimators' own orders, typed in from their documentation: COCO joint j sits at index MAP[j].
BLAZEPOSE = [0, 2, 5, 7, 8, 11, 12, 13, 14, 15, 16, 23, 24, 25, 26, 27, 28]
BODY25 = [0, 16, 15, 18, 17, 5, 2, 6, 3, 7, 4, 12, 9, 13, 10, 14, 11]
POSENET = ["nose", "leftEye", "rightEye", "leftEar", "rightEar", "leftShoulder", "rightShoulder", "leftElbow",
           "rightElbow", "leftWrist", "rightWrist", "leftHip", "rightHip", "leftKnee", "rightKnee", "leftAnkle",
           "rightAnkle"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = PoseFixNet(ModelConfig(backbone="resnet18", input_size=(128, 96), sigma=3.5, head_channels=32))
    with torch.no_grad():
        model.final.weight.normal_(std=0.5)
    path = tmp_path_factory.mktemp("ckpt") / "model.safetensors"
    export_weights(model, path, {})
    return path


def _sizes():
    gt = load_ground_truth(GT)
    return {im["id"]: (im["width"], im["height"]) for im in gt.doc["images"]}


def _write_formats(tmp_path):
    """The real estimator's results on image 785 in every format, persons in the same order."""
    results = [r for r in json.loads(RESULTS.read_text()) if r["image_id"] == 785]
    w, h = _sizes()[785]
    name = "000000000785.jpg"
    kps = [np.array(r["keypoints"]).reshape(17, 3) for r in results]
    files = {"coco": tmp_path / "coco.json"}
    files["coco"].write_text(json.dumps(results))
    movenet = [{"image": name, "keypoints": [[k[j, 1] / h, k[j, 0] / w, k[j, 2]] for j in range(17)]} for k in kps]
    files["movenet"] = tmp_path / "movenet.json"
    files["movenet"].write_text(json.dumps(movenet))
    blaze = []
    for k in kps:
        lm = [[0.5, 0.5, 0.0, 0.3, 1.0] for _ in range(33)]  # landmarks COCO lacks: kept, never used
        for j, b in enumerate(BLAZEPOSE):
            lm[b] = [k[j, 0] / w, k[j, 1] / h, -0.1, k[j, 2], 1.0]
        blaze.append({"image": name, "landmarks": lm})
    files["blazepose"] = tmp_path / "blazepose.json"
    files["blazepose"].write_text(json.dumps(blaze))
    poses = [{"score": r["score"], "keypoints": [{"part": p, "position": {"x": k[j, 0], "y": k[j, 1]}, "score": k[j, 2]}
                                                  for j, p in reversed(list(enumerate(POSENET)))]}
             for r, k in zip(results, kps)]
    files["posenet"] = tmp_path / "posenet.json"
    files["posenet"].write_text(json.dumps([{"image": name, "poses": poses}]))
    people = []
    for k in kps:
        flat = np.zeros((25, 3))
        for j, b in enumerate(BODY25):
            flat[b] = k[j]
        flat[1] = [5.0, 6.0, 0.7]  # the neck, which COCO lacks
        people.append({"pose_keypoints_2d": flat.reshape(-1).tolist()})
    (tmp_path / "openpose").mkdir()
    files["openpose"] = tmp_path / "openpose"
    (files["openpose"] / "000000000785_keypoints.json").write_text(json.dumps({"version": 1.3, "people": people}))
    return files, results


def test_every_format_gives_the_same_refinement(tmp_path, checkpoint):
    files, results = _write_formats(tmp_path)
    refined = {}
    for fmt, path in files.items():
        out = tmp_path / f"refined_{fmt}.json"
        assert main(["refine", "--checkpoint", str(checkpoint), "--images", str(IMAGES), "--input", str(path),
                     "--out", str(out), "--format", fmt, "--quiet"]) == 0
        refined[fmt] = json.loads(out.read_text())
        assert len(refined[fmt]) == len(results)
        assert all(r["image_id"] == 785 for r in refined[fmt])
    base = np.array([r["keypoints"] for r in refined["coco"]])
    for fmt, res in refined.items():
        np.testing.assert_allclose(np.array([r["keypoints"] for r in res]), base, atol=1e-3, err_msg=fmt)
    # Nothing given is dropped: the formats' extra keypoints come back untouched.
    blaze = refined["blazepose"][0]["source_keypoints"]
    assert blaze[1][:3] == [0.5, 0.5, 0.0]
    body = np.array(refined["openpose"][0]["source_keypoints"]).reshape(25, 3)
    np.testing.assert_allclose(body[1], [5.0, 6.0, 0.7])
    np.testing.assert_allclose(body[BODY25, :2], base[0].reshape(17, 3)[:, :2], atol=1e-3)
    # COCO input keeps its other fields.
    assert all("center" in r and "scale" in r for r in refined["coco"])
    gt = load_ground_truth(GT)
    assert keypoint_ap(gt, refined["coco"]) is not None


def test_same_input_same_output_and_it_evaluates(tmp_path, checkpoint):
    outs = []
    for n in range(2):
        out = tmp_path / f"r{n}.json"
        assert main(["refine", "--checkpoint", str(checkpoint), "--images", str(IMAGES), "--input", str(RESULTS),
                     "--out", str(out), "--flip-test", "--batch-size", "7", "--quiet"]) == 0
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]
    refined = json.loads(outs[0])
    gt = load_ground_truth(GT)
    ap = keypoint_ap(gt, refined)
    assert 0 < ap <= 1
    original = json.loads(RESULTS.read_text())
    for r, o in zip(refined, original):
        conf = np.array(r["keypoints"][2::3])
        assert np.all((conf >= 0) & (conf <= 1))
        assert r["score"] <= o["score"] + 1e-9  # input score × mean refined confidence


def test_keep_input_below_keeps_unconfident_keypoints(tmp_path, checkpoint):
    out = tmp_path / "kept.json"
    assert main(["refine", "--checkpoint", str(checkpoint), "--images", str(IMAGES), "--input", str(RESULTS),
                 "--out", str(out), "--keep-input-below", "1.01", "--quiet"]) == 0
    kept = json.loads(out.read_text())
    original = json.loads(RESULTS.read_text())
    for r, o in zip(kept, original):
        # Every refined confidence is below 1.01; where it is also below the input score, the input stays.
        a, b = np.array(r["keypoints"]).reshape(17, 3), np.array(o["keypoints"]).reshape(17, 3)
        same = np.all(a == b, axis=1)
        assert np.all(same | (a[:, 2] >= b[:, 2]))


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "posefix", *map(str, args)], capture_output=True, text=True,
                          check=False, timeout=300)


def test_bad_input_is_named_and_leaves_no_output(tmp_path, checkpoint):
    bad = json.loads(RESULTS.read_text())
    bad[5]["keypoints"] = bad[5]["keypoints"][:50]
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(bad))
    out = tmp_path / "out.json"
    r = _cli("refine", "--checkpoint", checkpoint, "--images", IMAGES, "--input", path, "--out", out)
    assert r.returncode == 2 and "results[5].keypoints" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not out.exists()
    r = _cli("refine", "--checkpoint", checkpoint, "--images", IMAGES, "--input", path, "--out", out,
             "--skip-invalid", "--quiet")
    assert r.returncode == 0 and "skipped 1" in r.stdout
    assert len(json.loads(out.read_text())) == len(bad) - 1
    # A missing image and a corrupt one are reported by name.
    images = tmp_path / "images"
    images.mkdir()
    for f in IMAGES.glob("*.jpg"):
        shutil.copy(f, images / f.name)
    (images / "000000040083.jpg").unlink()
    out2 = tmp_path / "out2.json"
    r = _cli("refine", "--checkpoint", checkpoint, "--images", images, "--input", RESULTS, "--out", out2, "--quiet")
    assert r.returncode == 2 and "000000040083.jpg" in r.stderr and "not found" in r.stderr and not out2.exists()
    (images / "000000040083.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    r = _cli("refine", "--checkpoint", checkpoint, "--images", images, "--input", RESULTS, "--out", out2, "--quiet")
    assert r.returncode == 2 and "000000040083.jpg" in r.stderr and "cannot decode" in r.stderr and not out2.exists()
