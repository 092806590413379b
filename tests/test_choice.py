"""The per-joint choice between the input joint and the refined one, its fields in the outputs, real
estimators' outputs, and the fitted-profile path."""
import json

import numpy as np
import pytest
import torch

from posefix import SAMPLE_DIR
from posefix._proto import pb2
from posefix.choice import choose, kept_input
from posefix.cli import main
from posefix.formats import LAYOUTS
from posefix.images import decode
from posefix.model import INPUT_CONFIDENCE_INIT, ModelConfig, PoseFixNet
from posefix.refiner import Refiner
from posefix.serve.responses import build_response
from posefix.synth.cocoio import load_ground_truth, load_results
from posefix.weights import export_weights, load_weights

CFG = ModelConfig(backbone="resnet18", input_size=(128, 96), sigma=3.5, head_channels=32)
GT = SAMPLE_DIR / "person_keypoints_val_sample.json"
IMAGES = SAMPLE_DIR / "images"
REAL = SAMPLE_DIR / "real_estimators"
RESULTS = SAMPLE_DIR / "topdown_keypoints_val4.json"


def _poses_785():
    rows = [r for r in json.loads(RESULTS.read_text()) if r["image_id"] == 785]
    return np.array([r["keypoints"] for r in rows], dtype=np.float64).reshape(-1, 17, 3)


def _moving(seed=0) -> PoseFixNet:
    """A refiner that moves joints, and whose input-confidence head is not at its initial state."""
    torch.manual_seed(seed)
    model = PoseFixNet(CFG)
    with torch.no_grad():
        model.final.weight.normal_(std=0.5)
        model.confidence.weight.normal_(std=0.2)
        model.input_confidence.weight.normal_(std=0.2)
        model.input_confidence.bias.zero_()
    return model


@pytest.mark.parametrize("flip_test", [False, True])
def test_an_untrained_refiner_returns_the_input_exactly(flip_test):
    torch.manual_seed(0)
    model = PoseFixNet(CFG)
    with torch.no_grad():  # the correction moves joints: the raw output is not the input
        model.final.weight.normal_(std=2.0)
    poses = _poses_785()
    image = decode(IMAGES / "000000000785.jpg")
    index = np.zeros(len(poses), dtype=np.int64)
    xy, conf = Refiner(model, flip_test=flip_test).refine([image], index, poses)
    assert np.array_equal(xy, poses[..., :2])
    assert kept_input(poses, xy).all()
    np.testing.assert_allclose(conf, 1 / (1 + np.exp(-INPUT_CONFIDENCE_INIT)), rtol=1e-6)
    raw, _ = Refiner(model, output="raw", flip_test=flip_test).refine([image], index, poses)
    assert np.abs(raw - poses[..., :2]).max() > 0.5
    assert not kept_input(poses, raw).any()


def test_choose_equals_a_plain_loop():
    rng = np.random.default_rng(3)
    poses = rng.uniform(0, 500, (40, 17, 3))
    poses[rng.random((40, 17)) < 0.1, 0] = np.nan
    poses[rng.random((40, 17)) < 0.2, 2] = 0  # absent joints
    xy = rng.uniform(0, 500, (40, 17, 2))
    conf, input_conf = rng.random((40, 17)), rng.random((40, 17))
    for margin in (0.0, 0.2, -0.1):
        got_xy, got_conf = choose(poses, xy, conf, input_conf, margin)
        for p in range(40):
            for j in range(17):
                refined = conf[p, j] > input_conf[p, j] + margin or not np.isfinite(poses[p, j, :2]).all()
                want = xy[p, j] if refined else poses[p, j, :2]
                assert np.array_equal(got_xy[p, j], want)
                kept_conf = input_conf[p, j] if poses[p, j, 2] > 0 else 0.0
                assert got_conf[p, j] == (conf[p, j] if refined else kept_conf)


def test_the_choice_is_the_input_or_the_raw_refinement_joint_by_joint():
    model = _moving()
    poses = _poses_785()
    image = decode(IMAGES / "000000000785.jpg")
    index = np.zeros(len(poses), dtype=np.int64)
    xy, conf = Refiner(model, choice_margin=0.0).refine([image], index, poses)
    raw, raw_conf = Refiner(model, output="raw").refine([image], index, poses)
    kept = kept_input(poses, xy)
    assert 0.1 < kept.mean() < 0.9  # both kinds, so the checks below can fail
    assert np.array_equal(xy[kept], poses[..., :2][kept])
    np.testing.assert_allclose(xy[~kept], raw[~kept], atol=1e-9)
    np.testing.assert_allclose(conf[~kept], raw_conf[~kept], atol=1e-6)
    assert (conf[kept] >= raw_conf[kept] - 1e-6).all()  # kept where the input joint was more likely right
    # A large margin keeps every input joint; a very negative one takes every refined joint.
    assert kept_input(poses, Refiner(model, choice_margin=2.0).refine([image], index, poses)[0]).all()
    assert not kept_input(poses, Refiner(model, choice_margin=-2.0).refine([image], index, poses)[0]).any()


def test_weights_without_the_input_confidence_head_load_and_keep_every_input_joint(tmp_path):
    from safetensors.torch import load_file, save_file

    model = _moving()
    path = tmp_path / "model.safetensors"
    export_weights(model, path, {"step": 1})
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    state = {k: v for k, v in load_file(str(path)).items() if not k.startswith("input_confidence.")}
    old = tmp_path / "old.safetensors"
    save_file(state, str(old), metadata=meta)
    loaded = load_weights(old)
    for name, value in state.items():
        assert torch.equal(loaded.state_dict()[name], value)
    poses = _poses_785()
    image = decode(IMAGES / "000000000785.jpg")
    index = np.zeros(len(poses), dtype=np.int64)
    xy, _ = Refiner(loaded, choice_margin=0.0).refine([image], index, poses)  # the heads' own comparison
    assert np.array_equal(xy, poses[..., :2])
    np.testing.assert_allclose(Refiner(loaded, output="raw").refine([image], index, poses)[0],
                               Refiner(model, output="raw").refine([image], index, poses)[0], atol=1e-9)


def test_without_a_fitted_choice_refine_returns_the_input_and_says_so(tmp_path, capsys):
    """A checkpoint whose choice was not fitted to an estimator keeps every input joint by default, and
    refine says why in one line; --choice-margin 0 (the heads' own choice) and a fitted rule take corrections."""
    from posefix.choice import METADATA_KEY, NUMERIC, FittedChoice
    from posefix.weights import has_fitted_choice
    path = tmp_path / "model.safetensors"
    export_weights(_moving(), path, {"step": 1})
    assert not has_fitted_choice(path)
    original = np.array([r["keypoints"] for r in json.loads(RESULTS.read_text())]).reshape(-1, 17, 3)

    def refine(checkpoint, *flags):
        out = tmp_path / "out.json"
        assert main(["refine", "--checkpoint", str(checkpoint), "--images", str(IMAGES), "--input", str(RESULTS),
                     "--out", str(out), "--quiet", *flags]) == 0
        doc = json.loads(out.read_text())
        return np.array([r["keypoints"] for r in doc]).reshape(-1, 17, 3), capsys.readouterr().out

    kept, printed = refine(path)
    np.testing.assert_array_equal(kept[..., :2], original[..., :2])
    assert printed.count("note: the checkpoint's choice is not fitted") == 1
    heads, printed = refine(path, "--choice-margin", "0")
    assert (heads[..., :2] != original[..., :2]).any() and "note:" not in printed
    n = len(NUMERIC)
    rule = FittedChoice(np.zeros(n), np.ones(n), np.zeros(n), 3.0, np.zeros(17), margin=0.0)  # p = 0.95: take
    fitted = tmp_path / "fitted.safetensors"
    export_weights(_moving(), fitted, {"step": 1, METADATA_KEY: rule.to_json()})
    assert has_fitted_choice(fitted)
    taken, printed = refine(fitted)
    assert (taken[..., :2] != original[..., :2]).all(-1).mean() > 0.9 and "note:" not in printed


def test_coco_results_say_which_joint_was_kept(tmp_path):
    path = tmp_path / "model.safetensors"
    export_weights(_moving(), path, {"step": 1})
    for fmt, src in (("coco", RESULTS), ("movenet", REAL / "movenet_thunder_native.json")):
        outs = {}
        for output in ("choice", "raw"):
            outs[output] = tmp_path / f"{fmt}_{output}.json"
            assert main(["refine", "--checkpoint", str(path), "--images", str(IMAGES), "--input", str(src),
                         "--annotations", str(GT), "--format", fmt, "--out", str(outs[output]), "--output", output,
                         "--choice-margin", "0", "--quiet"]) == 0
        chosen = json.loads(outs["choice"].read_text())
        raw = json.loads(outs["raw"].read_text())
        sources = np.array([r["keypoint_source"] for r in chosen])
        assert set(np.unique(sources)) == {"input", "refined"}
        assert all(s == "refined" for r in raw for s in r["keypoint_source"])
        if fmt == "coco":
            original = np.array([r["keypoints"] for r in json.loads(src.read_text())]).reshape(-1, 17, 3)
        else:
            from posefix.cli import as_coco_results

            original = np.array([r["keypoints"] for r in as_coco_results(src, fmt, IMAGES, load_ground_truth(GT))])
            original = original.reshape(-1, 17, 3)
        got = np.array([r["keypoints"] for r in chosen]).reshape(-1, 17, 3)
        same = (got[..., :2] == original[..., :2]).all(-1)
        assert np.array_equal(same, sources == "input")


def test_the_proto_says_which_keypoint_was_kept():
    layout = LAYOUTS["blazepose33"]
    rng = np.random.default_rng(0)
    native = np.concatenate([rng.uniform(0, 100, (2, 33, 2)), rng.random((2, 33, 1))], axis=-1)
    request = pb2.RefinePoseRequest(format=pb2.KEYPOINT_FORMAT_BLAZEPOSE_33)
    for person in native:
        request.persons.add().keypoints.extend(pb2.Keypoint(x=x, y=y, score=s) for x, y, s in person)
    kept = rng.random((2, 17)) < 0.5
    xy, conf = rng.uniform(0, 100, (2, 17, 2)), rng.random((2, 17))
    response = build_response(request, layout, native, xy, conf, kept)
    coco = list(layout.coco_index)
    for p, person in enumerate(response.persons):
        flags = np.array([k.kept_input for k in person.keypoints])
        refined = np.array([k.refined for k in person.keypoints])
        assert np.array_equal(flags[coco], kept[p])
        assert flags[~refined].all() and refined.sum() == 17


def _real_input(name, gt):
    from posefix.cli import as_coco_results

    fmt = "blazepose" if name.startswith("blazepose") else "movenet"
    return fmt, as_coco_results(REAL / name, fmt, IMAGES, gt)


def test_real_outputs_are_read_as_documented():
    """MoveNet keypoints outside the image are kept; BlazePose's presence (0 throughout) is not used, its
    visibility is the score; MultiPose rows of person score 0 are all kept, with score 0; a person an
    estimator missed is not invented."""
    gt = load_ground_truth(GT)
    sizes = {im["id"]: (im["width"], im["height"]) for im in gt.doc["images"]}
    _, thunder = _real_input("movenet_thunder_native.json", gt)
    native = json.loads((REAL / "movenet_thunder_native.json").read_text())
    kp = np.array([r["keypoints"] for r in thunder]).reshape(-1, 17, 3)
    wh = np.array([sizes[r["image_id"]] for r in thunder], dtype=np.float64)
    outside = (kp[..., 0] < 0) | (kp[..., 1] < 0) | (kp[..., 0] > wh[:, None, 0]) | (kp[..., 1] > wh[:, None, 1])
    assert outside.sum() > 0
    yx = np.array([e["keypoints"] for e in native])  # (y, x, score) fractions
    np.testing.assert_allclose(kp[..., 0], yx[..., 1] * wh[:, None, 0], rtol=1e-9)
    _, blaze = _real_input("blazepose_full_native.json", gt)
    landmarks = json.loads((REAL / "blazepose_full_native.json").read_text())
    assert all(lm[4] == 0 for e in landmarks for lm in e["landmarks"])
    assert len(blaze) == len(landmarks) < sum(1 for a in gt.doc["annotations"] if a["num_keypoints"] > 0)
    nose = np.array([r["keypoints"][2] for r in blaze])
    np.testing.assert_allclose(nose, [e["landmarks"][0][3] for e in landmarks])
    _, multi = _real_input("movenet_multipose_native.json", gt)
    rows = [row for e in json.loads((REAL / "movenet_multipose_native.json").read_text()) for row in e["people"]]
    assert len(multi) == len(rows)
    np.testing.assert_allclose([r["score"] for r in multi], [row[-1] for row in rows])
    assert sum(row[-1] == 0 for row in rows) > 0


def test_the_fitted_profile_path_runs_end_to_end(tmp_path, capsys):
    """Fit a profile to an estimator's output on labelled images, train on it, refine that estimator."""
    train_gt = SAMPLE_DIR / "person_keypoints_train10.json"
    profile = tmp_path / "thunder.profile.json"
    assert main(["synth", "fit", "--gt", str(train_gt), "--results", str(REAL / "movenet_thunder_train10_native.json"),
                 "--format", "movenet", "--images", str(SAMPLE_DIR / "train_images"), "--out", str(profile)]) == 0
    fitted = json.loads(profile.read_text())
    assert "fitted an error profile" in capsys.readouterr().out
    run = tmp_path / "run"
    assert main(["train", "--preset", "cpu-small", "--out", str(run), "--set", f"data.train_annotations={train_gt}",
                 "--set", f"data.train_images={SAMPLE_DIR / 'train_images'}", "--set", f"data.profile={profile}",
                 "--set", "train.max_steps=2", "--set", "train.batch_size=4", "--set", "data.workers=0"]) == 0
    assert json.loads((run / "config.toml").read_text().split("profile = ")[1].splitlines()[0]) == str(profile)
    out = tmp_path / "refined.json"
    assert main(["refine", "--checkpoint", str(run / "model.safetensors"), "--images", str(IMAGES),
                 "--input", str(REAL / "movenet_thunder_native.json"), "--annotations", str(GT), "--format", "movenet",
                 "--out", str(out), "--quiet"]) == 0
    refined = load_results(out, load_ground_truth(GT))
    assert len(refined) == len(json.loads((REAL / "movenet_thunder_native.json").read_text()))
    from posefix.synth.profile import load_profile

    assert fitted != load_profile(None).to_dict()  # fitted to this estimator, not the published tables
