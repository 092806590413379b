"""Faults: a process killed at any moment loses nothing and leaves no partial output."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from posefix import SAMPLE_DIR
from posefix.config import load_config
from posefix.engine import export_weights
from posefix.model import ModelConfig, PoseFixNet
from posefix.train import train

GT = str(SAMPLE_DIR / "person_keypoints_val_sample.json")
IMAGES = str(SAMPLE_DIR / "images")
TRAIN = [f"data.train_annotations={GT}", f"data.train_images={IMAGES}", "model.input_size=[64, 64]",
         "model.sigma=2.0", "model.head_channels=16", "train.batch_size=4", "train.log_every=1", "data.workers=0",
         "train.lr_milestones=[]", "train.checkpoint_every=1"]


def _listing(directory):
    return sorted(p.name for p in directory.iterdir())


@pytest.mark.slow
def test_refine_killed_at_random_moments_leaves_no_partial_output(tmp_path):
    torch.manual_seed(0)
    ckpt = tmp_path / "model.safetensors"
    export_weights(PoseFixNet(ModelConfig(backbone="resnet18", input_size=(128, 96), sigma=3.5, head_channels=32)),
                   ckpt, {})
    results = json.loads((SAMPLE_DIR / "topdown_keypoints_val4.json").read_text()) * 8  # 584 persons
    inp = tmp_path / "input.json"
    inp.write_text(json.dumps(results))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "refined.json"
    cmd = [sys.executable, "-m", "posefix", "refine", "--checkpoint", str(ckpt), "--images", IMAGES,
           "--input", str(inp), "--out", str(out), "--quiet", "--batch-size", "32"]
    rng = np.random.default_rng(0)
    for delay in rng.uniform(0.5, 4.0, size=4):
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        assert not out.exists() or json.loads(out.read_text()) is not None  # absent, or whole
        assert all(name == "refined.json" or name.endswith(".posefix-tmp") for name in _listing(out_dir))
    assert subprocess.run(cmd, capture_output=True, timeout=600, check=False).returncode == 0
    assert len(json.loads(out.read_text())) == len(results)
    assert _listing(out_dir) == ["refined.json"]  # the rerun removed what the killed runs left


def test_checkpoint_write_interrupted_keeps_the_last_complete_one(tmp_path, monkeypatch):
    run = tmp_path / "run"
    cfg = load_config(preset="cpu-small", overrides=[*TRAIN, "train.max_steps=2"])
    train(cfg, run, progress=False)
    before = (run / "last.pt").read_bytes()
    real_save = torch.save

    def torn_save(obj, f, *args, **kwargs):  # writes part of the file, then the process "dies"
        real_save(obj, f, *args, **kwargs)
        with open(f, "r+b") as handle:
            handle.truncate(1000)
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", torn_save)
    longer = load_config(preset="cpu-small", overrides=[*TRAIN, "train.max_steps=4"])
    with pytest.raises(KeyboardInterrupt):
        train(longer, run, resume=True, progress=False)
    monkeypatch.setattr(torch, "save", real_save)
    assert (run / "last.pt").read_bytes() == before  # the torn write never replaced it
    assert torch.load(run / "last.pt", weights_only=True)["step"] == 2
    train(longer, run, resume=True, progress=False)
    assert torch.load(run / "last.pt", weights_only=True)["step"] == 4
    assert not [p for p in run.iterdir() if p.name.endswith(".posefix-tmp")]


@pytest.mark.slow
def test_training_killed_at_random_moments_resumes(tmp_path):
    run = tmp_path / "run"
    args = [sys.executable, "-m", "posefix", "train", "--preset", "cpu-small", "--out", str(run)]
    for s in [*TRAIN, "train.max_steps=40"]:
        args += ["--set", s]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    rng = np.random.default_rng(1)
    for delay in rng.uniform(3.0, 8.0, size=3):
        resume = ["--resume"] if (run / "last.pt").exists() else []
        proc = subprocess.Popen(args + resume, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        if (run / "last.pt").exists():
            torch.load(run / "last.pt", weights_only=True)  # always a whole checkpoint
    resume = ["--resume"] if (run / "last.pt").exists() else []
    r = subprocess.run(args + resume, capture_output=True, text=True, timeout=600, env=env, check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    assert torch.load(run / "last.pt", weights_only=True)["step"] == 40
    assert (run / "model.safetensors").is_file()
