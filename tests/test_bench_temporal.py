"""benchmarks/bench_temporal.py and its mocap clips, on tiny synthetic data (no ../shared)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import bench_temporal, mocap_clips
from posefix.temporal import SMOOTHERS
from posefix.temporal.registry import needs_weights


def _dataset(root: Path, rng, noise: float):
    """Two clips (slow, fast) of one walking person each: gt.json, clips.json, an estimator's results."""
    images, anns, results, clips = [], [], [], []
    base = rng.uniform(-40, 40, (17, 2)) + [160, 120]
    for clip, kind, speed in ((1, "slow", 0.5), (2, "fast", 12.0)):
        clips.append({"clip_id": clip, "kind": kind})
        for f in range(20):
            image_id = clip * 1000 + f
            images.append({"id": image_id, "width": 320, "height": 240, "file_name": f"{image_id}.jpg"})
            xy = base + [speed * f, 0.0]
            kp = np.concatenate([xy, np.full((17, 1), 2.0)], -1)
            anns.append({"id": image_id * 100, "image_id": image_id, "category_id": 1, "iscrowd": 0,
                         "track_id": clip, "keypoints": kp.reshape(-1).tolist(), "num_keypoints": 17,
                         "area": 80.0 * 80.0, "bbox": [0, 0, 80, 80]})
            est = np.concatenate([xy + rng.normal(0, noise, xy.shape), np.full((17, 1), 0.8)], -1)
            results.append({"image_id": image_id, "category_id": 1, "keypoints": est.reshape(-1).tolist(),
                            "score": 0.8, "track_id": clip})
    (root / "estimators" / "tracked").mkdir(parents=True)
    (root / "gt.json").write_text(json.dumps({"images": images, "annotations": anns,
                                              "categories": [{"id": 1, "name": "person"}]}))
    (root / "clips.json").write_text(json.dumps({"clips": clips}))
    (root / "estimators" / "tracked" / "toy_coco.json").write_text(json.dumps(results))


def test_the_bench_measures_every_registered_smoother_and_exact_input_scores_perfectly(tmp_path):
    _dataset(tmp_path, np.random.default_rng(0), noise=0.0)
    out = tmp_path / "r.json"
    assert bench_temporal.main(["--data", str(tmp_path), "--mocap", str(tmp_path / "none"), "--no-speed",
                                "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["clips"]["toy"]
    names = {f"{n} {m}" for n in SMOOTHERS if not needs_weights(n) for m in ("causal", "offline")}
    assert names | {"raw", "plain SG9", "plain MA9"} == set(rows)
    raw = rows["raw"]
    for kind in ("all", "slow", "fast"):
        assert raw[kind]["AP"] == pytest.approx(1.0) and raw[kind]["OKS"] == pytest.approx(1.0)
        assert raw[kind]["accel"] == pytest.approx(0.0, abs=1e-9) and raw[kind]["KS<0.5"] == 0.0
    # constant velocity: the smoothers leave exact input exact offline
    assert rows["body offline"]["all"]["accel"] == pytest.approx(0.0, abs=1e-6)


def test_the_bench_measures_the_learned_smoother_given_its_weights(tmp_path):
    from posefix.temporal.learned import NetConfig, TemporalNet, save_weights

    _dataset(tmp_path, np.random.default_rng(0), noise=0.0)
    weights = tmp_path / "w.safetensors"
    net = TemporalNet(NetConfig(window=5, hidden=8, blocks=0))  # untrained: the body smoother's output
    save_weights(weights, net, net)
    out = tmp_path / "r.json"
    assert bench_temporal.main(["--data", str(tmp_path), "--mocap", str(tmp_path / "none"), "--no-speed",
                                "--smoothers", "learned", "body", "--temporal-weights", str(weights),
                                "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["clips"]["toy"]
    for mode in ("offline", "causal"):
        for kind in ("all", "slow", "fast"):
            assert rows[f"learned {mode}"][kind]["AP"] == pytest.approx(rows[f"body {mode}"][kind]["AP"], abs=1e-6)


def test_the_bench_sees_jitter_and_the_smoother_removing_it(tmp_path):
    _dataset(tmp_path, np.random.default_rng(1), noise=2.0)
    out = tmp_path / "r.json"
    assert bench_temporal.main(["--data", str(tmp_path), "--mocap", str(tmp_path / "none"), "--no-speed",
                                "--smoothers", "sg9", "body", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["clips"]["toy"]
    raw = rows["raw"]["all"]
    assert raw["accel"] > 2 * rows["sg9 offline"]["all"]["accel"] > 0
    assert raw["accel"] > rows["body offline"]["all"]["accel"] > 0
    assert raw["AP"] < rows["sg9 offline"]["all"]["AP"] and raw["OKS"] < rows["body offline"]["all"]["OKS"]


def test_lag_measures_a_known_delay():
    t = np.arange(60, dtype=np.float64)
    gt = np.stack([np.sin(t / 5.0) * 50, np.cos(t / 7.0) * 30], -1)
    delayed = np.stack([np.sin((t - 1.5) / 5.0) * 50, np.cos((t - 1.5) / 7.0) * 30], -1)
    assert mocap_clips.lag_frames(delayed, gt, 30) == pytest.approx(1.5, abs=0.06)
    assert mocap_clips.lag_frames(gt, gt, 30) == pytest.approx(0.0, abs=1e-9)
