"""``posefix train``: resume, torchrun, the CLI, and learning on real persons."""
import json
import os
import subprocess
import sys

import pytest

from posefix import SAMPLE_DIR
from posefix.cli import main
from posefix.config import load_config
from posefix.train import train

GT = str(SAMPLE_DIR / "person_keypoints_val_sample.json")
IMAGES = str(SAMPLE_DIR / "images")
DATA = [f"data.train_annotations={GT}", f"data.train_images={IMAGES}"]
TINY = ["model.input_size=[64, 64]", "model.sigma=2.0", "model.head_channels=16", "train.batch_size=4",
        "train.log_every=1", "data.workers=0", "train.lr_milestones=[]"]


def _losses(run):
    return {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if r["event"] == "train"}


def test_resume_continues_where_it_stopped(tmp_path):
    whole = load_config(preset="cpu-small", overrides=DATA + TINY + ["train.max_steps=6"])
    train(whole, tmp_path / "whole", progress=False)
    first = load_config(preset="cpu-small", overrides=DATA + TINY + ["train.max_steps=3"])
    train(first, tmp_path / "broken", progress=False)
    train(whole, tmp_path / "broken", resume=True, progress=False)
    a, b = _losses(tmp_path / "whole"), _losses(tmp_path / "broken")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-5, abs=1e-6), step


def test_cli_lists_presets_and_reports_bad_input(tmp_path, capsys):
    assert main(["train", "--list-presets"]) == 0
    assert "cpu-small" in capsys.readouterr().out
    assert main(["train", "--preset", "cpu-small", "--set", "train.max_stepz=1", "--out", str(tmp_path / "r")]) == 2
    assert "train.max_stepz" in capsys.readouterr().err
    assert main(["train", "--preset", "cpu-small", "--out", str(tmp_path / "r")]) == 2
    assert "data.train_annotations: is required" in capsys.readouterr().err
    bad = ["--set", f"data.train_annotations={tmp_path / 'none.json'}", "--set", f"data.train_images={IMAGES}"]
    assert main(["train", "--preset", "cpu-small", *bad, "--out", str(tmp_path / "r")]) == 2
    assert "is not a file" in capsys.readouterr().err


def test_cli_train_writes_the_run_dir_and_refuses_to_clobber_it(tmp_path, capsys):
    run = tmp_path / "run"
    args = ["train", "--preset", "cpu-small", "--out", str(run)]
    for s in DATA + TINY + ["train.max_steps=2", f"data.val_annotations={GT}", f"data.val_images={IMAGES}",
                            "data.val_max_persons=8"]:
        args += ["--set", s]
    assert main(args) == 0
    assert {p.name for p in run.iterdir()} >= {"config.toml", "metrics.jsonl", "last.pt", "model.safetensors",
                                               "calibration.json"}
    assert "refined AP" in capsys.readouterr().out
    import torch

    state = torch.load(run / "last.pt", weights_only=True)
    assert state["step"] == 2
    assert main(args) == 2 and "already holds a run" in capsys.readouterr().err


def test_torchrun_two_processes_on_cpu(tmp_path):
    run = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           "-m", "posefix", "train", "--preset", "cpu-small", "--out", str(run)]
    for s in DATA + TINY + ["train.max_steps=3"]:
        cmd += ["--set", s]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["world_size"] == 2 and records[-1] == {"event": "end", "step": 3}
    assert (run / "model.safetensors").is_file()


@pytest.mark.slow
def test_refiner_learns_to_fix_synthesized_errors(handful_run):
    """A minute and a half of CPU training on a handful of real persons: refined AP on fresh synthesized inputs
    of those persons rises well above the inputs' AP."""
    import numpy as np

    from posefix.evaluate import refine_synthesized
    from posefix.model import INPUT_CONFIDENCE_INIT
    from posefix.refiner import Refiner
    from posefix.synth.cocoio import load_ground_truth
    from posefix.weights import load_weights

    gt_path, checkpoint = handful_run
    heads = load_weights(checkpoint)  # both confidence heads trained: the input head left its start
    weight, bias = heads.input_confidence.weight.detach(), heads.input_confidence.bias.detach()
    assert float(weight.abs().max()) > 1e-3
    assert abs(float(bias.mean()) - INPUT_CONFIDENCE_INIT) > 1e-3
    refiner = Refiner.from_checkpoint(checkpoint, choice_margin=0.0)  # the heads' own choice
    gt = load_ground_truth(gt_path)
    pairs = [refine_synthesized(refiner, gt, IMAGES, seed=100 + s) for s in range(5)]
    before = np.array([p["input_ap"] for p in pairs])
    after = np.array([p["refined_ap"] for p in pairs])
    assert after.mean() > before.mean() + 0.04, (before, after)
    assert (after > before).sum() >= 4, (before, after)


def test_demo_runs_end_to_end(tmp_path, capsys):
    import numpy as np

    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--steps", "3"]) == 0
    printed = capsys.readouterr().out
    assert "person_keypoints_train10.json" in printed  # trained on the train images, not on the val persons
    for name, rows in (("synthesized inputs", 4), ("real top-down estimator", 3),
                       ("MoveNet Thunder (--format movenet)", 4), ("BlazePose full (--format blazepose)", 4)):
        # input, raw, heads (the heads' choice), and fitted where the train images have the same kind of input
        assert sum(line.startswith(name) for line in printed.splitlines()) == rows
    assert printed.count("fitted the choice on") == 3
    for name in ("synth_results.json", "refined_synth_results_raw.json", "refined_synth_results_heads.json",
                 "refined_movenet_thunder_native_heads.json", "refined_topdown_keypoints_val4_heads.json",
                 "refined_movenet_thunder_native_fitted.json", "refined_blazepose_full_native_fitted.json"):
        assert isinstance(json.loads((out / name).read_text()), list)
    refined = json.loads((out / "refined_topdown_keypoints_val4_heads.json").read_text())
    original = json.loads((SAMPLE_DIR / "topdown_keypoints_val4.json").read_text())
    assert len(refined) == len(original)
    assert [r["image_id"] for r in refined] == [r["image_id"] for r in original]
    assert len(list((out / "overlays").glob("*.png"))) == 4
    for r in refined:
        conf = np.array(r["keypoints"][2::3])
        assert np.all((conf >= 0) & (conf <= 1)) and len(r["keypoint_source"]) == 17
    # A second run reuses the trained refiner instead of training again.
    assert main(["demo", "--out", str(out), "--steps", "3"]) == 0
    assert "reusing the refiner" in capsys.readouterr().out
