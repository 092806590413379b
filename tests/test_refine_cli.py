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
from posefix.model import ModelConfig, PoseFixNet
from posefix.synth.cocoio import load_ground_truth
from posefix.synth.diagnose import keypoint_ap
from posefix.weights import export_weights

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


def _run(capsys, *args) -> tuple[int, str, str]:
    """``posefix ARGS`` in process: (exit status, stdout, stderr); an exception escaping ``main`` fails the test."""
    capsys.readouterr()
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("posefix: error: "), err
    return lines[0]


def test_a_huge_keypoint_is_a_named_invalid_row(tmp_path, checkpoint, capsys):
    results = json.loads(RESULTS.read_text())
    results[5]["keypoints"][3] = 1e308  # finite, and beyond any image
    results[9]["keypoints"][0] = -1e300
    path = tmp_path / "huge.json"
    path.write_text(json.dumps(results))
    out = tmp_path / "out.json"
    base = ("refine", "--checkpoint", checkpoint, "--images", IMAGES, "--input", path, "--out", out, "--quiet")
    rc, _, err = _run(capsys, *base)
    assert rc == 2 and "results[5].keypoints: element 3 is 1e+308" in _one_line(err) and not out.exists()
    rc, printed, _ = _run(capsys, *base, "--skip-invalid")
    assert rc == 0 and "skipped 2 invalid entries" in printed and "results[5].keypoints" in printed
    refined = json.loads(out.read_text())
    assert len(refined) == len(results) - 2
    # At the bound (±1e9, x and y, whole persons or single joints) the refinement stays finite.
    rng = np.random.default_rng(3)
    results = json.loads(RESULTS.read_text())[:12]
    for r in results:
        kp = np.array(r["keypoints"]).reshape(17, 3)
        mask = rng.random((17, 2)) < 0.3
        kp[:, :2][mask] = rng.choice([-1e9, 1e9], size=int(mask.sum()))
        r["keypoints"] = kp.reshape(-1).tolist()
    results[0]["keypoints"][0::3] = [1e9] * 17
    results[1]["keypoints"][1::3] = [-1e9] * 17
    path.write_text(json.dumps(results))
    out.unlink()
    rc, _, err = _run(capsys, "refine", "--checkpoint", checkpoint, "--images", IMAGES, "--input", path, "--out", out,
                      "--quiet", "--output", "raw")
    assert rc == 0, err
    refined = json.loads(out.read_text())  # strict JSON: NaN or inf would not parse back as numbers
    assert len(refined) == 12
    assert np.isfinite([r["keypoints"] for r in refined]).all() and np.isfinite([r["score"] for r in refined]).all()


def _outside_setup(tmp_path):
    """Images with 785 named ``../outside/secret.jpg`` (a real JPEG out of --images), 40083 by the absolute path of
    a text file out of it, 196141 through a symbolic link out of it, and 197388 in place."""
    images, outside = tmp_path / "images", tmp_path / "outside"
    images.mkdir()
    outside.mkdir()
    shutil.copy(IMAGES / "000000000785.jpg", outside / "secret.jpg")
    (outside / "notes.jpg").write_text("root:x:0:0:SECRET-TOKEN:/root:/bin/bash\n")
    shutil.copy(IMAGES / "000000196141.jpg", outside / "third.jpg")
    (images / "link.jpg").symlink_to(outside / "third.jpg")
    shutil.copy(IMAGES / "000000197388.jpg", images / "000000197388.jpg")
    gt = json.loads(GT.read_text())
    names = {785: "../outside/secret.jpg", 40083: str(outside / "notes.jpg"), 196141: "link.jpg"}
    for im in gt["images"]:
        im["file_name"] = names.get(im["id"], im["file_name"])
    annotations = tmp_path / "annotations.json"
    annotations.write_text(json.dumps(gt))
    return images, annotations, names


def test_image_names_out_of_images_are_refused_unless_allowed(tmp_path, checkpoint, capsys):
    images, annotations, names = _outside_setup(tmp_path)
    results = json.loads(RESULTS.read_text())
    out = tmp_path / "out.json"
    base = ("refine", "--checkpoint", checkpoint, "--images", images, "--input", RESULTS, "--out", out, "--quiet",
            "--annotations", annotations)
    rc, _, err = _run(capsys, *base)
    line = _one_line(err)
    assert rc == 2 and "'../outside/secret.jpg': image: leads outside the image directory" in line
    assert "--allow-outside-images" in line and not out.exists()
    rc, printed, _ = _run(capsys, *base, "--skip-invalid")
    assert rc == 0 and "skipped 3 images that cannot be read (--skip-invalid), their persons left out: " in printed
    for name in names.values():
        assert f"'{name}': image: leads outside" in printed
    assert {r["image_id"] for r in json.loads(out.read_text())} == {197388}
    # Allowed, they are read; the text file is no image, and none of its bytes is shown.
    out.unlink()
    rc, _, err = _run(capsys, *base, "--allow-outside-images")
    line = _one_line(err)
    assert rc == 2 and line.endswith("notes.jpg: image: not a JPEG, PNG, GIF or WebP image") and not out.exists()
    rc, printed, err = _run(capsys, *base, "--allow-outside-images", "--skip-invalid")
    assert rc == 0 and "skipped 1 image that cannot be read" in printed and "notes.jpg: image: not a JPEG" in printed
    assert "SECRET" not in printed + err and "726f6f74" not in (printed + err).replace(" ", "")
    got = json.loads(out.read_text())
    assert {r["image_id"] for r in got} == {785, 196141, 197388}
    assert len(got) == sum(r["image_id"] != 40083 for r in results)


def test_every_command_reading_images_refuses_names_out_of_them(tmp_path, checkpoint, capsys):
    images, annotations, _ = _outside_setup(tmp_path)
    movenet = json.loads((SAMPLE_DIR / "real_estimators" / "movenet_thunder_native.json").read_text())
    shutil.copy(IMAGES / "000000000785.jpg", tmp_path / "outside" / "000000000785.jpg")
    away = "../outside/000000000785.jpg"  # its stem still names image 785 of the annotations
    for e in movenet:
        e["image"] = away if e["image"] == "000000000785.jpg" else e["image"]
    movenet = [e for e in movenet if e["image"] in (away, "000000197388.jpg")]
    mn = tmp_path / "movenet.json"
    mn.write_text(json.dumps(movenet))
    index = tmp_path / "poses.index"
    assert _run(capsys, "index", "build", "--results", RESULTS, "--out", index)[0] == 0
    commands = {
        "viz": ("viz", "--images", images, "--results", RESULTS, "--annotations", annotations, "--out", tmp_path / "v",
                "--max-images", "1"),  # image 785 only
        "synth fit": ("synth", "fit", "--gt", GT, "--results", mn, "--format", "movenet", "--images", images,
                      "--out", tmp_path / "profile.json"),
        "index build": ("index", "build", "--results", mn, "--format", "movenet", "--images", images,
                        "--out", tmp_path / "mn.index"),
        "search": ("search", "--index", index, "--query", mn, "--format", "movenet", "--images", images, "-k", "2",
                   "--checkpoint", checkpoint, "--out", tmp_path / "matches.json"),
    }
    for name, args in commands.items():
        rc, _, err = _run(capsys, *args)
        refused = "../outside/secret.jpg" if name == "viz" else away
        assert rc == 2 and f"'{refused}'" in _one_line(err) and "leads outside" in err, name
        rc, _, err = _run(capsys, *args, "--allow-outside-images")
        assert rc == 0, (name, err)


def _damaged_png() -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 48, 3), dtype=np.uint8)).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    data[data.index(b"IDAT") + 20] ^= 0xFF  # its image data no longer match their CRC
    return bytes(data)


def test_skip_invalid_skips_unreadable_images_and_refines_the_rest_as_without_them(tmp_path, checkpoint, capsys):
    """8 images (the 4 photographs twice), 4 of them unreadable: missing, a truncated JPEG, a damaged PNG, a text
    file. Refined with --skip-invalid in batches of 7 (persons split across calls and images), the rest come out as
    a run on the readable images alone gives them; each unreadable one is reported by name, none of its bytes."""
    results = json.loads(RESULTS.read_text())
    ids = sorted({r["image_id"] for r in results})
    images = tmp_path / "images"
    images.mkdir()
    doubled = []
    for copy in (0, 1):
        for r in results:
            doubled.append({**r, "image_id": r["image_id"] + copy * 10 ** 7})
        for i in ids:
            shutil.copy(IMAGES / f"{i:012d}.jpg", images / f"{i + copy * 10 ** 7:012d}.jpg")
    bad = {ids[0]: "file not found", ids[1] + 10 ** 7: "cannot decode", ids[2]: "a corrupt PNG",
           ids[3] + 10 ** 7: "not a JPEG"}
    files = {i: images / f"{i:012d}.jpg" for i in bad}
    files[ids[0]].unlink()
    files[ids[1] + 10 ** 7].write_bytes(files[ids[1] + 10 ** 7].read_bytes()[:3000])
    files[ids[2]].write_bytes(_damaged_png())
    files[ids[3] + 10 ** 7].write_text("SECRET-TOKEN " * 10)
    inp, good = tmp_path / "input.json", tmp_path / "good.json"
    inp.write_text(json.dumps(doubled))
    good.write_text(json.dumps([r for r in doubled if r["image_id"] not in bad]))
    out, want = tmp_path / "out.json", tmp_path / "want.json"
    base = ("refine", "--checkpoint", checkpoint, "--images", images, "--out", out, "--quiet", "--batch-size", "7")
    rc, _, err = _run(capsys, *base, "--input", inp)
    line = _one_line(err)
    assert rc == 2 and not out.exists()
    assert f"{files[ids[0]]}: image: file not found" in line  # the first image of the input
    rc, printed, err = _run(capsys, *base, "--input", inp, "--skip-invalid")
    assert rc == 0, err
    summary = printed.strip().splitlines()
    assert summary[0].startswith(f"refined {sum(r['image_id'] not in bad for r in doubled)} persons on 4 images")
    assert summary[1].startswith("skipped 4 images that cannot be read (--skip-invalid), their persons left out: ")
    for i, problem in bad.items():
        assert f"{files[i]}: image: {problem}" in summary[1]
    assert "SECRET" not in printed + err
    assert _run(capsys, "refine", "--checkpoint", checkpoint, "--images", images, "--out", want, "--quiet",
                "--batch-size", "7", "--input", good)[0] == 0
    got, expected = json.loads(out.read_text()), json.loads(want.read_text())
    assert [r["image_id"] for r in got] == [r["image_id"] for r in expected]
    np.testing.assert_allclose([r["keypoints"] for r in got], [r["keypoints"] for r in expected], rtol=0, atol=1e-6)
    np.testing.assert_allclose([r["score"] for r in got], [r["score"] for r in expected], rtol=0, atol=1e-9)
    assert [r["keypoint_source"] for r in got] == [r["keypoint_source"] for r in expected]


def test_shared_options_are_the_same_in_every_command():
    """An option several commands share (posefix.cli's *_arg functions) parses alike in each: same default,
    type, choices and action, whatever the command's own help or requiredness."""
    import argparse

    from posefix.cli import build_parser
    from posefix.cliargs import FORMAT_NAMES

    def commands(parser, prefix=""):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield f"{prefix}{name}", sub
                    yield from commands(sub, f"{prefix}{name} ")

    shared = ("--checkpoint", "--images", "--annotations", "--format", "--flip-test", "--batch-size", "--workers",
              "--skip-invalid", "--quiet", "--precision", "--channels-last", "--allow-outside-images", "--output",
              "--choice-margin")
    seen: dict = {}
    for name, sub in commands(build_parser()):
        for action in sub._actions:
            option = next((o for o in action.option_strings if o in shared), None)
            if option is not None:
                kind = (type(action), action.default, action.type, tuple(action.choices or ()))
                seen.setdefault(option, {})[name] = kind
    assert set(seen) == set(shared)
    for option, kinds in seen.items():
        assert len(kinds) >= 2 and len(set(kinds.values())) == 1, (option, kinds)
    assert set(seen["--format"]) == {"synth fit", "refine", "fit-choice", "refine-video", "index build",
                                     "index add", "search"}
    assert seen["--format"]["refine"][1:] == ("coco", None, FORMAT_NAMES)
