"""``posefix synth`` as a user runs it."""
import json
import subprocess
import sys

import numpy as np
import pytest

from posefix.cli import main
from posefix.keypoints import SIGMAS
from posefix.synth.cocoio import load_ground_truth, load_synth_labels
from posefix.synth.diagnose import classify

from .conftest import VAL_GT, profile_doc_with_misses


def run(*args):
    return subprocess.run([sys.executable, "-m", "posefix", *args], capture_output=True, text=True, check=False)


def test_version_and_help():
    r = run("--version")
    assert r.returncode == 0 and r.stdout.startswith("posefix ")
    r = run("--help")
    assert r.returncode == 0 and "synth" in r.stdout


def test_synth_on_the_bundled_sample(tmp_path, capsys):
    out, labels = tmp_path / "synth.json", tmp_path / "labels.json"
    assert main(["synth", "--gt", str(VAL_GT), "--out", str(out), "--seed", "3", "--labels", str(labels)]) == 0
    results, planted = json.loads(out.read_text()), load_synth_labels(labels, out)
    gt = load_ground_truth(VAL_GT)
    persons = [i for i in range(gt.ids.size) if not gt.crowd[i] and (gt.keypoints[i, :, 2] > 0).any()]
    assert len(results) == len(planted) == len(persons)
    for r, lab, i in zip(results, planted, persons):
        assert r["image_id"] == gt.image_ids[i] and lab["gt_id"] == gt.ids[i] and r["category_id"] == 1
        kp = np.array(r["keypoints"]).reshape(17, 3)
        assert 0 < r["score"] <= 1 and np.all((kp[:, 2] > 0) & (kp[:, 2] <= 1))
        vis = gt.keypoints[i, :, 2] > 0
        assert [name == "unlabelled" for name in lab["labels"]] == list(~vis)
        # Every labelled joint classifies as planted against all GT persons of its image.
        others = np.flatnonzero((gt.image_ids == gt.image_ids[i]) & (gt.ids != gt.ids[i]) & ~gt.crowd)
        got = classify(kp[None], gt.keypoints[i:i + 1], gt.areas[i:i + 1], gt.keypoints[others][None],
                       gt.areas[others][None])[0]
        names = ["good", "jitter", "inversion", "swap", "miss"]
        assert [names[c] for c in got[vis]] == [n for n, v in zip(lab["labels"], vis) if v]
        # A good joint lies within KS 0.85 of its GT joint.
        good = np.array([n == "good" for n in lab["labels"]])
        d2 = ((kp[:, :2] - gt.keypoints[i, :, :2]) ** 2).sum(1)
        assert np.all(np.exp(-d2 / (2 * gt.areas[i] * (2 * SIGMAS) ** 2))[good] >= 0.85)
    assert "synthesized" in capsys.readouterr().out


def test_same_seed_same_file(tmp_path):
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        assert main(["synth", "--gt", str(VAL_GT), "--out", str(tmp_path / f"{name}.json"), "--seed", str(seed)]) == 0
    a, b, c = ((tmp_path / f"{n}.json").read_bytes() for n in "abc")
    assert a == b and a != c


def test_custom_profile(tmp_path):
    doc = profile_doc_with_misses(1.0)
    prof = tmp_path / "all_miss.json"
    prof.write_text(json.dumps(doc))
    labels = tmp_path / "labels.json"
    assert main(["synth", "--gt", str(VAL_GT), "--out", str(tmp_path / "o.json"), "--profile", str(prof),
                 "--labels", str(labels)]) == 0
    names = {n for entry in load_synth_labels(labels, tmp_path / "o.json") for n in entry["labels"]}
    assert names == {"miss", "unlabelled"}


@pytest.mark.parametrize("content,field", [
    ("{not json", "not valid JSON"),
    ('{"images": [], "annotations": 3}', "annotations: missing or not a list"),
    ('{"images": [{"id": 1}], "annotations": [{"id": 1, "image_id": 2, "keypoints": [], "bbox": [0,0,1,1]}]}',
     r"annotations\[0\].image_id"),
    ('{"images": [{"id": 1}], "annotations": [{"id": 1, "image_id": 1, "keypoints": [1, 2, 3], "bbox": [0,0,1,1]}]}',
     r"annotations\[0\].keypoints: must be a list of 51 numbers"),
])
def test_malformed_annotations_give_one_line_and_no_output(tmp_path, content, field):
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    out = tmp_path / "out.json"
    r = run("synth", "--gt", str(bad), "--out", str(out))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("posefix: error: ") and str(bad) in lines[0]
    import re
    assert re.search(field, lines[0])
    assert not out.exists() and list(tmp_path.iterdir()) == [bad]


def test_refuses_to_overwrite_its_input(tmp_path):
    gt = tmp_path / "gt.json"
    gt.write_bytes(VAL_GT.read_bytes())
    r = run("synth", "--gt", str(gt), "--out", str(gt))
    assert r.returncode == 2 and "refusing to overwrite" in r.stderr
    assert gt.read_bytes() == VAL_GT.read_bytes()


def test_bad_arguments(tmp_path):
    r = run("synth", "--gt", str(VAL_GT), "--out", str(tmp_path / "o.json"), "--seed", "-1")
    assert r.returncode == 2 and "--seed" in r.stderr
    r = run("synth", "--gt", str(tmp_path / "missing.json"), "--out", str(tmp_path / "o.json"))
    assert r.returncode == 2 and "file not found" in r.stderr and not (tmp_path / "o.json").exists()


def test_a_stale_labels_file_is_refused_naming_both_files(tmp_path, monkeypatch):
    """The labels name their results by hash: labels left from another run, or from a run stopped between
    its two writes, are refused with one line naming both files."""
    from posefix.errors import InputError
    from posefix.synth import cocoio

    out, labels = tmp_path / "synth.json", tmp_path / "labels.json"
    assert main(["synth", "--gt", str(VAL_GT), "--out", str(out), "--labels", str(labels), "--seed", "1"]) == 0
    first = load_synth_labels(labels, out)
    assert len(first) == len(json.loads(out.read_text()))
    # A later run without --labels leaves the old labels beside new results.
    assert main(["synth", "--gt", str(VAL_GT), "--out", str(out), "--seed", "2"]) == 0
    with pytest.raises(InputError) as e:
        load_synth_labels(labels, out)
    msg = str(e.value)
    assert "\n" not in msg and str(labels) in msg and str(out) in msg and "results_sha256" in msg
    # A run stopped after writing the results, before the labels: new results, old labels.
    assert main(["synth", "--gt", str(VAL_GT), "--out", str(out), "--labels", str(labels), "--seed", "3"]) == 0
    pair = (out.read_bytes(), labels.read_bytes())
    real, calls = cocoio.write_bytes_atomic, []

    def killed_before_labels(path, data):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real(path, data)

    monkeypatch.setattr(cocoio, "write_bytes_atomic", killed_before_labels)
    assert main(["synth", "--gt", str(VAL_GT), "--out", str(out), "--labels", str(labels), "--seed", "4"]) == 130
    monkeypatch.undo()
    assert out.read_bytes() != pair[0] and labels.read_bytes() == pair[1]
    with pytest.raises(InputError, match="results_sha256"):
        load_synth_labels(labels, out)
    # The matching pair loads; labels that are not a labels file are named.
    out.write_bytes(pair[0])
    assert load_synth_labels(labels, out) == json.loads(pair[1])["labels"]
    labels.write_text("[]")
    with pytest.raises(InputError, match="not a posefix synth labels file"):
        load_synth_labels(labels, out)
