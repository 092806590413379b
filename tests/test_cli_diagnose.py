"""``posefix diagnose`` and ``posefix synth fit`` as a user runs them."""
import json
import subprocess
import sys

from posefix.cli import main
from posefix.synth.cocoio import load_ground_truth, load_results, load_synth_labels
from posefix.synth.diagnose import diagnose
from posefix.synth.profile import load_profile

from .conftest import VAL_GT, VAL_RESULTS


def test_diagnose_writes_the_report_and_charts(tmp_path, capsys):
    out, plots = tmp_path / "report.json", tmp_path / "charts"
    assert main(["diagnose", "--gt", str(VAL_GT), "--results", str(VAL_RESULTS), "--out", str(out),
                 "--plots", str(plots)]) == 0
    report = json.loads(out.read_text())
    gt = load_ground_truth(VAL_GT)
    assert report == json.loads(json.dumps(diagnose(gt, load_results(VAL_RESULTS, gt), source=str(VAL_RESULTS))))
    assert len(report["detections"]) == len(json.loads(VAL_RESULTS.read_text()))
    pngs = sorted(plots.glob("*.png"))
    assert len(pngs) == 3 and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    printed = capsys.readouterr().out
    assert f"AP {report['summary']['ap']['original']:.3f}" in printed


def test_diagnose_of_synthesized_inputs_finds_what_was_planted(tmp_path):
    synth_out, labels, report = tmp_path / "s.json", tmp_path / "l.json", tmp_path / "r.json"
    assert main(["synth", "--gt", str(VAL_GT), "--out", str(synth_out), "--labels", str(labels), "--seed", "4"]) == 0
    assert main(["diagnose", "--gt", str(VAL_GT), "--results", str(synth_out), "--out", str(report)]) == 0
    planted = load_synth_labels(labels, synth_out)
    found = json.loads(report.read_text())["detections"]
    agree = total = 0
    for p, d in zip(planted, found):
        if d["matched_gt"] != p["gt_id"]:
            continue  # COCO matched the synthesized pose to another person (or to none)
        for a, b in zip(p["labels"], d["labels"]):
            if a != "unlabelled":
                total += 1
                agree += a == b
    assert total > 300 and agree == total


def test_synth_fit_writes_a_profile_synth_accepts(tmp_path):
    synth_out, profile = tmp_path / "s.json", tmp_path / "p.json"
    assert main(["synth", "--gt", str(VAL_GT), "--out", str(synth_out)]) == 0
    assert main(["synth", "fit", "--gt", str(VAL_GT), "--results", str(synth_out), "--out", str(profile)]) == 0
    fitted = load_profile(profile)
    assert fitted.outcomes["jitter"].counts.sum() > 0
    assert main(["synth", "--gt", str(VAL_GT), "--out", str(tmp_path / "again.json"), "--profile", str(profile)]) == 0


def test_malformed_results_give_one_line(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"image_id": 785, "keypoints": [0.0] * 50, "score": 1.0}]))
    out = tmp_path / "r.json"
    r = subprocess.run([sys.executable, "-m", "posefix", "diagnose", "--gt", str(VAL_GT), "--results", str(bad),
                        "--out", str(out)], capture_output=True, text=True, check=False)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "results[0].keypoints" in r.stderr and not out.exists()
