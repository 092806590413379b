"""Faults: a process killed at any moment loses nothing and leaves no partial output; a bad model file or
last.pt is refused in one line."""
import json
import math
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from posefix import SAMPLE_DIR
from posefix.cli import main
from posefix.config import load_config
from posefix.model import ModelConfig, PoseFixNet
from posefix.train import train
from posefix.weights import export_weights

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


# Bad model files: one line naming the file and the field, exit 2, in every command that loads one.

def _one_error_line(capsys, argv) -> str:
    capsys.readouterr()
    rc = main([str(a) for a in argv])  # an exception escaping main fails the test: no traceback
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and err.startswith("posefix: error: "), (argv, rc, err)
    return err


GOOD_CONFIG = {"backbone": "resnet18", "input_size": [64, 64], "sigma": 2.0, "num_keypoints": 17, "head_channels": 16,
               "input_prior": True}
BAD_METADATA = {  # posefix_model_config as a checkpoint could hold it, and what the error must say
    "bad JSON": ("{not json", "posefix_model_config: is not valid JSON"),
    "a JSON list": ("[1, 2]", "posefix_model_config: must be a JSON object of the model's settings, got list"),
    "a JSON string": ('"resnet18"', "posefix_model_config: must be a JSON object"),
    "JSON nested too deep": ("[" * 100_000 + "]" * 100_000, "posefix_model_config: is not valid JSON"),
    "an unknown key": (json.dumps({**GOOD_CONFIG, "bogus": 1}), "posefix_model_config.bogus: unknown key"),
    "a NaN sigma": (json.dumps({**GOOD_CONFIG, "sigma": math.nan}), "posefix_model_config.sigma: must be a positive"),
    "a float size": (json.dumps({**GOOD_CONFIG, "input_size": [64.5, 64]}), "posefix_model_config.input_size: "),
    "a scalar size": (json.dumps({**GOOD_CONFIG, "input_size": 64}), "posefix_model_config.input_size: "),
    "an oversized head": (json.dumps({**GOOD_CONFIG, "head_channels": 4097}), "posefix_model_config.head_channels: "),
    "18 keypoints": (json.dumps({**GOOD_CONFIG, "num_keypoints": 18}), "posefix_model_config.num_keypoints: "),
}


@pytest.fixture(scope="module")
def bad_models(tmp_path_factory):
    """A good checkpoint's tensors under each bad metadata, random bytes, and inputs for every command."""
    from safetensors.torch import load_file, save_file

    from .videos import make_sample_video

    d = tmp_path_factory.mktemp("bad_models")
    torch.manual_seed(0)
    good = d / "good.safetensors"
    export_weights(PoseFixNet(ModelConfig(**{**GOOD_CONFIG, "input_size": (64, 64)})), good, {})
    state = load_file(str(good))
    files = {}
    for n, (name, (meta, message)) in enumerate(BAD_METADATA.items()):
        files[name] = (d / f"bad{n}.safetensors", message)
        save_file(state, str(files[name][0]), metadata={"posefix_model_config": meta})
    rng = np.random.default_rng(11)
    files["random bytes"] = (d / "random.safetensors", "checkpoint: not a safetensors file")
    files["random bytes"][0].write_bytes(rng.bytes(4096))
    files["no metadata"] = (d / "plain.safetensors", "checkpoint: has no posefix model config")
    save_file(state, str(files["no metadata"][0]))
    image = torch.zeros((3, 96, 96), dtype=torch.uint8)
    make_sample_video(image, d / "clip.mp4", num_frames=2, size=(64, 64))
    poses = [{"image_id": f, "category_id": 1, "keypoints": [20.0, 30.0, 0.9] * 17, "score": 0.9} for f in range(2)]
    (d / "poses.json").write_text(json.dumps(poses))
    assert main(["index", "build", "--results", str(SAMPLE_DIR / "topdown_keypoints_val4.json"),
                 "--out", str(d / "poses.index")]) == 0
    return d, good, files


def _commands(d, ckpt):
    results = SAMPLE_DIR / "topdown_keypoints_val4.json"
    refine = ["refine", "--checkpoint", ckpt, "--images", IMAGES, "--input", results, "--out", d / "out.json",
              "--quiet"]
    return {
        "refine": refine,
        "refine --backend onnxruntime": [*refine, "--backend", "onnxruntime"],
        "refine --ray": [*refine, "--ray", "--actors", "1"],
        "refine-video": ["refine-video", "--checkpoint", ckpt, "--video", d / "clip.mp4", "--input",
                         d / "poses.json", "--out", d / "video.json", "--quiet"],
        "serve": ["serve", "--checkpoint", ckpt, "--port", "0", "--device", "cpu"],
        "export": ["export", "--checkpoint", ckpt, "--onnx", d / "out.onnx"],
        "demo --checkpoint": ["demo", "--checkpoint", ckpt, "--out", d / "demo"],
        "search --checkpoint": ["search", "--index", d / "poses.index", "--query", results, "--images", IMAGES,
                                "--checkpoint", ckpt, "-k", "2", "--out", d / "matches.json"],
    }


def test_a_bad_checkpoint_is_one_line_in_every_command(bad_models, capsys):
    d, _, files = bad_models
    for kind, (path, message) in files.items():
        for command, argv in _commands(d, path).items():
            err = _one_error_line(capsys, argv)
            assert f"{path}: {message}" in err, (kind, command, err)
    assert not any((d / name).exists() for name in ("out.json", "video.json", "out.onnx", "matches.json"))
    # The good checkpoint's tensors load in each of them (the bad ones differ in their metadata alone).
    assert main(["export", "--checkpoint", str(bad_models[1]), "--onnx", str(d / "good.onnx")]) == 0


def test_an_onnx_file_with_bad_metadata_is_one_line(bad_models, capsys):
    import onnx

    d, good, _ = bad_models
    assert main(["export", "--checkpoint", str(good), "--onnx", str(d / "meta.onnx")]) == 0
    model = onnx.load(str(d / "meta.onnx"))
    cases = {name: ("posefix_model_config", meta, message) for name, (meta, message) in BAD_METADATA.items()}
    cases["outputs not JSON"] = ("posefix_outputs", "{", "posefix_outputs: must be a JSON list")
    cases["outputs a number"] = ("posefix_outputs", "3", "posefix_outputs: must be a JSON list")
    for n, (name, (key, value, message)) in enumerate(cases.items()):
        bad = onnx.ModelProto()
        bad.CopyFrom(model)
        next(p for p in bad.metadata_props if p.key == key).value = value
        path = d / f"bad{n}.onnx"
        onnx.save(bad, str(path))
        refine = ["refine", "--onnx", path, "--images", IMAGES, "--input", SAMPLE_DIR / "topdown_keypoints_val4.json",
                  "--out", d / "out.json", "--quiet"]
        for argv in (refine, ["serve", "--onnx", path, "--port", "0", "--device", "cpu"]):
            err = _one_error_line(capsys, argv)
            assert f"{path}: {message}" in err, (name, err)


class _Marker:
    """Unpickled, it would create a file: the test that a resume never runs what a last.pt holds."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def _fresh_last_pt(path, cfg, step=1, head=None):
    """A last.pt as posefix train writes it, of the model ``cfg`` describes (one Adam step taken, so the optimizer
    holds its moments); ``head`` changes the model's head width."""
    from dataclasses import replace

    from posefix.train import _lr_factor, save_checkpoint

    model_cfg = cfg.model if head is None else replace(cfg.model, head_channels=head)
    model = PoseFixNet(model_cfg)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.train.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_factor(cfg.train.lr_milestones, cfg.train.max_steps))
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    save_checkpoint(path, model, optimizer, scheduler, step, cfg)


def test_a_bad_last_pt_is_one_line_and_nothing_runs_or_is_written(tmp_path, capsys):
    cfg = load_config(preset="cpu-small", overrides=[*TRAIN, "train.max_steps=1"])
    run = tmp_path / "run"
    run.mkdir()
    last = run / "last.pt"
    argv = ["train", "--preset", "cpu-small", "--out", run, "--resume"]
    for s in [*TRAIN, "train.max_steps=1"]:
        argv += ["--set", s]
    good = tmp_path / "good.pt"
    _fresh_last_pt(good, cfg)
    marker = tmp_path / "ran"

    def edited(edit):
        state = torch.load(good, weights_only=True)
        edit(state)
        torch.save(state, last)

    def moment(state):
        first = next(iter(state["optimizer"]["state"].values()))
        first["exp_avg"] = torch.zeros(3)

    cases = {
        "random bytes": (lambda: last.write_bytes(np.random.default_rng(5).bytes(5000)), "last.pt: not a checkpoint"),
        "cut short": (lambda: last.write_bytes(good.read_bytes()[:1000]), "last.pt: not a checkpoint"),
        "a list": (lambda: torch.save([1, 2, 3], last), "last.pt: not a checkpoint of posefix train (it holds a list"),
        "an object": (lambda: last.write_bytes(pickle.dumps({"model": _Marker(marker)})), "last.pt: not a checkpoint"),
        "no optimizer": (lambda: edited(lambda s: s.pop("optimizer")), "optimizer: missing"),
        "a string step": (lambda: edited(lambda s: s.update(step="2")), "step: must be a non-negative integer"),
        "a bad rng": (lambda: edited(lambda s: s.update(torch_rng=torch.zeros(3))), "torch_rng: must be the state"),
        "a string lr": (lambda: edited(lambda s: s["optimizer"]["param_groups"][0].update(lr="fast")),
                        "optimizer.param_groups: not as this run's optimizer has them"),
        "a moment of another shape": (lambda: edited(moment), "optimizer.state: holds values that do not fit"),
        "a scheduler of another kind": (lambda: edited(lambda s: s["scheduler"].update(base_lrs="x")),
                                        "scheduler.base_lrs: missing or not as"),
        "another model": (lambda: _fresh_last_pt(last, cfg, head=32), "model: does not fit this run's model"),
    }
    for name, (write, message) in cases.items():
        write()
        before = last.read_bytes()
        err = _one_error_line(capsys, argv)
        assert f"{last}: resume: " in err and message in err, (name, err)
        assert last.read_bytes() == before and sorted(p.name for p in run.iterdir()) == ["last.pt"], name
    assert not marker.exists()
    # The checkpoint they were made from resumes (at its last step: nothing left to train, the weights written).
    last.write_bytes(good.read_bytes())
    assert main([str(a) for a in argv]) == 0
    assert (run / "model.safetensors").is_file()
