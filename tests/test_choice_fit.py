"""The per-joint choice fitted to one estimator (posefix.choice, posefix fit-choice)."""
import json

import numpy as np
import pytest
from scipy.optimize import approx_fprime

from posefix import SAMPLE_DIR
from posefix.choice import NUMERIC, FittedChoice, choose, features, fit_choice, person_scale
from posefix.cli import main
from posefix.errors import InputError
from posefix.images import decode
from posefix.keypoints import NUM_KEYPOINTS, ks
from posefix.refiner import Refiner
from posefix.synth.cocoio import load_ground_truth, load_results
from posefix.weights import load_weights

REAL = SAMPLE_DIR / "real_estimators"
TRAIN_GT = SAMPLE_DIR / "person_keypoints_train10.json"
TRAIN_IMAGES = SAMPLE_DIR / "train_images"
VAL_GT = SAMPLE_DIR / "person_keypoints_val_sample.json"


def _world(rng, n=300, k=NUM_KEYPOINTS):
    """Persons whose correction is right exactly where the input head says the input is wrong."""
    gt = np.zeros((n, k, 3))
    gt[..., :2] = rng.uniform(100, 400, (n, k, 2))
    gt[..., 2] = 2
    area = np.full(n, 150.0 ** 2)
    wrong = rng.random((n, k)) < 0.3
    poses = gt.copy()
    poses[..., :2] += np.where(wrong[..., None], rng.normal(0, 25, (n, k, 2)), rng.normal(0, 1.5, (n, k, 2)))
    poses[..., 2] = rng.uniform(0.2, 1.0, (n, k))
    xy = gt[..., :2] + rng.normal(0, 6, (n, k, 2))  # a correction: better than wrong joints, worse than right ones
    input_conf = np.where(wrong, rng.uniform(0.0, 0.4, (n, k)), rng.uniform(0.6, 1.0, (n, k)))
    conf = rng.uniform(0.3, 0.9, (n, k))
    return poses, xy, conf, input_conf, gt, area


def test_features_match_a_plain_loop():
    rng = np.random.default_rng(0)
    poses, xy, conf, input_conf, _, _ = _world(rng, n=7)
    poses[0, 3, 2] = 0
    poses[1, 5, :2] = np.nan
    f = features(poses, xy, conf, input_conf)
    for p in range(len(poses)):
        ok = [j for j in range(NUM_KEYPOINTS) if poses[p, j, 2] > 0 and np.isfinite(poses[p, j, :2]).all()]
        w = max(poses[p, j, 0] for j in ok) - min(poses[p, j, 0] for j in ok)
        h = max(poses[p, j, 1] for j in ok) - min(poses[p, j, 1] for j in ok)
        scale = np.sqrt(w * h) if len(ok) >= 2 and np.sqrt(w * h) > 1 else 1.0
        assert person_scale(poses)[p] == pytest.approx(scale)
        for j in range(NUM_KEYPOINTS):
            given = np.nan_to_num(poses[p, j, :2])
            move = min(np.hypot(*(xy[p, j] - given)) / scale, 10.0)
            present = float(j in ok)
            want = [np.log(conf[p, j] / (1 - conf[p, j])), np.log(input_conf[p, j] / (1 - input_conf[p, j])),
                    min(max(np.nan_to_num(poses[p, j, 2]), 0), 1), present, np.log(move + 1e-2)]
            np.testing.assert_allclose(f[p, j], want, rtol=1e-9, atol=1e-9)


def test_the_fitted_rule_takes_the_correction_where_it_is_closer():
    rng = np.random.default_rng(1)
    poses, xy, conf, input_conf, gt, area = _world(rng)
    rule = fit_choice(poses, xy, conf, input_conf, gt, area)
    gain = ks(xy, gt, area) - ks(poses, gt, area)
    take = rule.logit(poses, xy, conf, input_conf) > 0
    # the rule gains more KS than keeping every input joint (0) or taking every correction, on unseen persons
    p2, xy2, c2, i2, gt2, a2 = _world(np.random.default_rng(2))
    gain2 = ks(xy2, gt2, a2) - ks(p2, gt2, a2)
    take2 = rule.logit(p2, xy2, c2, i2) > 0
    assert np.where(take2, gain2, 0).mean() > max(0.0, gain2.mean()) + 0.05
    assert 0.15 < take.mean() < 0.5
    assert rule.info["ks_gain_fitted"] == pytest.approx(np.where(take, gain, 0).mean())
    assert rule.info["ks_gain_oracle"] >= rule.info["ks_gain_fitted"]


def test_nothing_to_gain_means_every_input_joint_is_kept():
    rng = np.random.default_rng(3)
    poses, xy, conf, input_conf, gt, area = _world(rng)
    poses[..., :2] = gt[..., :2] + rng.normal(0, 0.5, poses[..., :2].shape)  # inputs right, corrections worse
    rule = fit_choice(poses, xy, conf, input_conf, gt, area)
    chosen, _ = choose(poses, xy, conf, input_conf, 0.0, rule)
    assert (chosen == poses[..., :2]).all(-1).mean() > 0.99


def test_the_fit_minimises_its_stated_loss():
    """The optimum's gradient vanishes: compare with a finite-difference gradient of the plain loss."""
    rng = np.random.default_rng(4)
    poses, xy, conf, input_conf, gt, area = _world(rng, n=60)
    rule = fit_choice(poses, xy, conf, input_conf, gt, area, l2=1.0)
    gain = (ks(xy, gt, area) - ks(poses, gt, area)).reshape(-1)
    z = ((features(poses, xy, conf, input_conf) - rule.mean) / rule.std).reshape(-1, len(NUMERIC))
    joint = np.tile(np.arange(NUM_KEYPOINTS), len(poses))
    y, w = (gain > 0).astype(float), np.abs(gain)

    def plain(theta):
        total = 0.0
        for i in range(len(y)):
            t = z[i] @ theta[:len(NUMERIC)] + theta[len(NUMERIC)] + theta[len(NUMERIC) + 1 + joint[i]]
            p = 1 / (1 + np.exp(-t))
            total += w[i] * -(y[i] * np.log(p) + (1 - y[i]) * np.log(1 - p))
        return (total + (theta ** 2).sum() - theta[len(NUMERIC)] ** 2) / w.sum()  # the intercept is free

    theta = np.concatenate([rule.weights, [rule.intercept], rule.joint_bias])
    assert np.abs(approx_fprime(theta, plain, 1e-6)).max() < 1e-3
    assert plain(theta) < plain(theta * 0.9) and plain(theta) < plain(np.zeros_like(theta))


def test_the_rule_round_trips_and_bad_metadata_is_refused():
    rng = np.random.default_rng(5)
    rule = fit_choice(*_world(rng, n=40))
    again = FittedChoice.from_json(rule.to_json())
    poses, xy, conf, input_conf, _, _ = _world(rng, n=5)
    np.testing.assert_array_equal(again.logit(poses, xy, conf, input_conf), rule.logit(poses, xy, conf, input_conf))
    assert again.margin == rule.margin
    doc = json.loads(rule.to_json())
    bad = [("not json", "is not JSON"), ("[1, 2]", "JSON object"), (json.dumps({**doc, "version": 9}), "version"),
           (json.dumps({**doc, "weights": [1.0]}), "feature means"), (json.dumps({**doc, "std": [0.0] * 5}), "std"),
           (json.dumps({k: v for k, v in doc.items() if k != "mean"}), "incomplete"),
           (json.dumps({**doc, "margin": 3.0}), "margin")]
    for text, message in bad:
        with pytest.raises(InputError, match=message):
            FittedChoice.from_json(text)


@pytest.fixture(scope="module")
def fitted(checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("fitted") / "fitted.safetensors"
    assert main(["fit-choice", "--checkpoint", str(checkpoint), "--images", str(TRAIN_IMAGES), "--input",
                 str(REAL / "movenet_thunder_train10_native.json"), "--format", "movenet",
                 "--annotations", str(TRAIN_GT), "--out", str(out)]) == 0
    return out


def test_fit_choice_writes_a_checkpoint_whose_choice_is_the_rule(checkpoint, fitted, poses_785, capsys):
    model = load_weights(fitted)
    assert isinstance(model.fitted_choice, FittedChoice)
    assert getattr(load_weights(checkpoint), "fitted_choice", None) is None
    base, with_rule = Refiner.from_checkpoint(checkpoint), Refiner.from_checkpoint(fitted)
    for name, value in base.model.state_dict().items():  # the weights themselves are unchanged
        assert value.equal(with_rule.model.state_dict()[name])
    image = [decode(SAMPLE_DIR / "images" / "000000000785.jpg")]
    index = np.zeros(len(poses_785), dtype=np.int64)
    xy, conf, input_conf = with_rule.refine_parts(image, index, poses_785)
    want = choose(poses_785, xy, conf, input_conf, model.fitted_choice.margin, model.fitted_choice)
    got = with_rule.refine(image, index, poses_785)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    assert model.fitted_choice.info["format"] == "movenet"
    # its margin: the largest whose AP on the fitting images is within half an AP point of the best
    aps = model.fitted_choice.info["ap_by_margin"]
    best = max(aps.values())
    assert model.fitted_choice.margin == max(float(m) for m, a in aps.items() if a >= best - 0.005)
    assert aps["1.0"] == pytest.approx(model.fitted_choice.info["ap_input"])  # margin 1: the input itself
    assert with_rule.choice_margin == model.fitted_choice.margin
    assert Refiner.from_checkpoint(fitted, choice_margin=0.0).choice_margin == 0.0


def test_refine_with_a_fitted_checkpoint_reports_its_sources(fitted, tmp_path):
    out = tmp_path / "refined.json"
    assert main(["refine", "--checkpoint", str(fitted), "--images", str(SAMPLE_DIR / "images"), "--input",
                 str(REAL / "movenet_thunder_native.json"), "--format", "movenet", "--annotations", str(VAL_GT),
                 "--out", str(out), "--quiet"]) == 0
    rows = load_results(out, load_ground_truth(VAL_GT))
    sources = {s for r in rows for s in r["keypoint_source"]}
    assert sources <= {"input", "refined"} and "input" in sources


def test_fit_choice_refuses_bad_input(checkpoint, tmp_path, capsys):
    base = ["fit-choice", "--checkpoint", str(checkpoint), "--images", str(TRAIN_IMAGES), "--format", "movenet",
            "--annotations", str(TRAIN_GT)]
    missing = tmp_path / "missing.json"
    assert main(base + ["--input", str(missing), "--out", str(tmp_path / "o.safetensors")]) == 2
    assert "missing.json" in capsys.readouterr().err
    inp = str(REAL / "movenet_thunder_train10_native.json")
    assert main(base + ["--input", inp, "--out", str(checkpoint)]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    # results on images whose persons the annotations do not have: nothing to fit on, and nothing written
    assert main(["fit-choice", "--checkpoint", str(checkpoint), "--images", str(SAMPLE_DIR / "images"), "--input",
                 str(REAL / "movenet_thunder_native.json"), "--format", "movenet", "--annotations", str(TRAIN_GT),
                 "--out", str(tmp_path / "none.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("posefix: error:") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "none.safetensors").exists()


def test_the_fitted_rule_travels_into_onnx(fitted, poses_785):
    pytest.importorskip("onnxruntime")
    from posefix.onnx_backend import OnnxModel, export_onnx

    proto = export_onnx(load_weights(fitted))
    model = OnnxModel(proto.SerializeToString(), "cpu")
    assert model.fitted_choice.to_json() == load_weights(fitted).fitted_choice.to_json()
    image = [decode(SAMPLE_DIR / "images" / "000000000785.jpg")]
    index = np.zeros(len(poses_785), dtype=np.int64)
    ort_xy, _ = Refiner(model).refine(image, index, poses_785)
    torch_xy, _ = Refiner.from_checkpoint(fitted).refine(image, index, poses_785)
    kept_ort = (ort_xy == poses_785[..., :2]).all(-1)
    kept_torch = (torch_xy == poses_785[..., :2]).all(-1)
    assert (kept_ort == kept_torch).mean() > 0.95  # the same rule; fp32 differences may flip a joint at its edge


@pytest.mark.slow
def test_a_refiner_trained_here_with_its_fitted_choice_is_never_worse_on_real_estimators(handful_run, tmp_path):
    """The documented path on real outputs: a small refiner trained in the test session (on a handful of val
    images' persons), its choice fitted to each estimator's own output on the bundled train images
    (fit-choice), then the val images it did not train on refined through the estimator's --format. AP of
    the chosen output >= AP of the input as given (--choice-margin 1 keeps every input joint and score), on
    MoveNet Thunder and BlazePose."""
    from posefix.synth.diagnose import keypoint_ap

    handful, checkpoint = handful_run
    seen = {im["id"] for im in json.loads(handful.read_text())["images"]}
    doc = json.loads(VAL_GT.read_text())
    held = {"images": [im for im in doc["images"] if im["id"] not in seen],
            "annotations": [a for a in doc["annotations"] if a["image_id"] not in seen],
            "categories": doc["categories"]}
    (tmp_path / "held_out.json").write_text(json.dumps(held))
    gt = load_ground_truth(tmp_path / "held_out.json")
    for fmt, fit_on, held_out in (("movenet", "movenet_thunder_train10_native.json", "movenet_thunder_native.json"),
                                  ("blazepose", "blazepose_full_train10_native.json", "blazepose_full_native.json")):
        fitted = tmp_path / f"{fmt}.safetensors"
        assert main(["fit-choice", "--checkpoint", str(checkpoint), "--images", str(TRAIN_IMAGES), "--input",
                     str(REAL / fit_on), "--format", fmt, "--annotations", str(TRAIN_GT), "--out", str(fitted)]) == 0
        aps = {}
        for name, extra in (("input", ["--choice-margin", "1"]), ("chosen", [])):
            out = tmp_path / f"{fmt}_{name}.json"
            assert main(["refine", "--checkpoint", str(fitted), "--images", str(SAMPLE_DIR / "images"), "--input",
                         str(REAL / held_out), "--format", fmt, "--annotations", str(VAL_GT), "--out", str(out),
                         "--quiet", *extra]) == 0
            rows = [r for r in json.loads(out.read_text()) if r["image_id"] not in seen]
            (tmp_path / "rows.json").write_text(json.dumps(rows))
            rows = load_results(tmp_path / "rows.json", gt)
            if name == "input":
                assert all(s == "input" for r in rows for s in r["keypoint_source"])
            aps[name] = keypoint_ap(gt, rows)
        assert len(rows) > 20 and aps["chosen"] >= aps["input"], (fmt, len(rows), aps)
