"""Exact 2-D keypoint trajectories from motion capture, with estimator-like errors added, and the lag of a
smoother on their fastest motion.

A BVH clip (CMU Graphics Lab Motion Capture Database, mocap.cs.cmu.edu, ``../shared/data/mocap``) is read and
its joints placed by forward kinematics (:mod:`posefix.temporal.mocap`), resampled from 120 to 30 frames/s
and projected through a pinhole camera seen from the side (the performer ~240 px tall in a 640 × 480 frame).
COCO joints: shoulders, elbows, wrists, hips, knees, ankles and the nose at the Head joint; eyes and ears are
left unlabelled. Errors added, seeded: per joint a score drawn from the range MoveNet gives here, Gaussian
jitter of standard deviation 0.0025 / score² of the person's size (what MoveNet Thunder's frame-to-frame noise
measures on video_sample's train clips), and 1 % of joints replaced by a spike of 0.2-0.5 person sizes.

"The data used in this project was obtained from mocap.cs.cmu.edu. The database was created with funding from
NSF EIA-0196217."
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from posefix.temporal.mocap import load_bvh, world_positions

# COCO index → BVH joint name (nose at the head; eyes and ears unlabelled)
COCO_JOINTS = {0: "Head", 5: "LeftShoulder", 6: "RightShoulder", 7: "LeftElbow", 8: "RightElbow", 9: "LeftWrist",
               10: "RightWrist", 11: "LeftHip", 12: "RightHip", 13: "LeftKnee", 14: "RightKnee", 15: "LeftAnkle",
               16: "RightAnkle"}


def joint_positions(path) -> tuple[list[str], np.ndarray, float]:
    """Every joint's position (F, J, 3) in the file's units, by forward kinematics, and the frame time."""
    skeleton = load_bvh(path)
    pos, _ = world_positions(skeleton)
    return skeleton.names, pos, skeleton.frame_time


def project_clip(path, fps: float = 30.0, height_px: float = 240.0, size=(640, 480)):
    """GT COCO keypoints (F, 17, 3) at ``fps`` (v = 2 for the labelled joints), seen from the side."""
    names, pos, frame_time = joint_positions(path)
    step = max(round(1.0 / (fps * frame_time)), 1)
    pos = pos[::step]
    sel = {k: names.index(v) for k, v in COCO_JOINTS.items()}
    p3 = np.zeros((len(pos), 17, 3))
    for k, j in sel.items():
        p3[:, k] = pos[:, j]
    lab = np.zeros(17, dtype=bool)
    lab[list(sel)] = True
    # camera on the performer's side (looking along −X at the path's centre), Y up
    centre = p3[:, lab].reshape(-1, 3).mean(0)
    extent = np.ptp(p3[:, lab, 1])
    dist = 6.0 * max(extent, 1e-6) + np.ptp(p3[:, lab, 0])
    cam = centre + np.array([dist, 0.0, 0.0])
    rel = p3 - cam
    depth = -rel[..., 0]
    focal = height_px * dist / max(extent, 1e-6)
    x = size[0] / 2 + focal * (-rel[..., 2]) / depth
    y = size[1] / 2 - focal * rel[..., 1] / depth
    kp = np.stack([x, y, np.where(lab, 2.0, 0.0)[None].repeat(len(pos), 0)], -1)
    return kp


def add_errors(gt: np.ndarray, rng: np.random.Generator, spike_rate: float = 0.01):
    """Estimator-like output (F, 17, 3) from GT (module docstring): scores, jitter by score, spikes."""
    lab = gt[..., 2] > 0
    box = gt[..., :2].max(1) - gt[..., :2].min(1)
    scale = np.sqrt(np.prod(box, -1))[:, None, None]
    score = rng.uniform(0.3, 0.9, gt.shape[:2])
    sd = 0.0025 / score ** 2
    xy = gt[..., :2] + rng.normal(0.0, 1.0, gt[..., :2].shape) * sd[..., None] * scale
    spike = rng.random(gt.shape[:2]) < spike_rate
    ang = rng.uniform(0, 2 * np.pi, gt.shape[:2])
    mag = rng.uniform(0.2, 0.5, gt.shape[:2])[..., None] * scale
    xy = np.where(spike[..., None], xy + mag * np.stack([np.cos(ang), np.sin(ang)], -1), xy)
    return np.concatenate([xy, np.where(lab, score, 0.0)[..., None]], -1)


def lag_frames(out: np.ndarray, gt: np.ndarray, centre: int, half: int = 8) -> float:
    """The time shift τ (frames, to 0.05) that best aligns ``out`` with gt(t − τ) over frames centre ± half:
    positive where the output lags behind."""
    t = np.arange(max(centre - half, 3), min(centre + half + 1, len(gt) - 3))
    best, arg = np.inf, 0.0
    for tau in np.arange(-3.0, 3.0001, 0.05):
        src = t - tau
        lo = np.floor(src).astype(int)
        f = (src - lo)[:, None]
        g = gt[lo] * (1 - f) + gt[np.minimum(lo + 1, len(gt) - 1)] * f
        err = ((out[t] - g) ** 2).sum()
        if err < best:
            best, arg = err, tau
    return float(arg)


def mocap_table(folder, names, seed: int = 0, fastest: int = 5, weights=None) -> dict:
    """Per clip and smoother (causal / offline), with the raw output: the lag (frames) on the ``fastest`` joint
    motions (mean and worst), the acceleration error and the mean error, in % of the person's size."""
    from posefix.temporal import make_smoother, refine_poses

    rows = {}
    print("\n| mocap clip | method | lag mean (frames) | lag worst | accel ×100 | error ×100 |\n"
          "| --- | --- | --- | --- | --- | --- |")
    for path in sorted(Path(folder).glob("*.bvh")):
        gt = project_clip(path)
        rng = np.random.default_rng(seed)
        noisy = add_errors(gt, rng)
        lab = gt[0, :, 2] > 0
        box = gt[..., :2][:, lab].max(1) - gt[..., :2][:, lab].min(1)
        scale = np.sqrt(np.prod(box, -1))
        speed = np.linalg.norm(np.diff(gt[..., :2], axis=0), axis=-1)  # (F-1, 17)
        speed[:, ~lab] = 0
        # the fastest motions: peaks of speed, one per joint, the `fastest` highest
        peaks = sorted(((speed[:, j].max(), int(speed[:, j].argmax()), j) for j in np.flatnonzero(lab)), reverse=True)
        peaks = peaks[:fastest]
        methods = [("raw", None, False)] + [(f"{n} {'causal' if c else 'offline'}", n, c) for n in names
                                           for c in (True, False)]
        frame = np.arange(len(gt))
        for label, name, causal in methods:
            if name is None:
                out = noisy[..., :2]
            else:
                out = refine_poses(noisy, make_smoother(name, weights=weights), frame=frame,
                                   track=np.ones(len(gt), np.int64), causal=causal).xy
            lags = [lag_frames(out[:, j], gt[:, j, :2], c) for _, c, j in peaks]
            a_o = out[2:] - 2 * out[1:-1] + out[:-2]
            a_g = gt[2:, :, :2] - 2 * gt[1:-1, :, :2] + gt[:-2, :, :2]
            acc = (np.linalg.norm(a_o - a_g, axis=-1)[:, lab] / scale[1:-1, None]).mean() * 100
            err = (np.linalg.norm(out - gt[..., :2], axis=-1)[:, lab] / scale[:, None]).mean() * 100
            rows.setdefault(path.stem, {})[label] = {"lag_mean": float(np.mean(lags)),
                                                      "lag_worst": float(max(lags, key=abs)),
                                                      "accel": float(acc), "error": float(err)}
            print(f"| {path.stem} | {label} | {np.mean(lags):+.2f} | {max(lags, key=abs):+.2f} | {acc:.2f} | "
                  f"{err:.2f} |", flush=True)
    return rows
