"""Training the learned temporal refiner (posefix.temporal.learned) on sequences of an estimator's per-frame
output against exact per-frame ground truth, and on motion capture projected through moving virtual cameras
with estimator-like errors planted over time.

Glossary as in posefix.temporal.learned; a Sequence holds one person's track.
"""
from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import InputError
from ..fileio import read_json
from ..keypoints import NUM_KEYPOINTS, PARTNER, SIGMAS
from ..synth.sequences import SequenceParams, synthesize_tracks
from .core import TemporalOptions, correct, fill_gaps, person_scale
from .learned import LearnedSmoother, NetConfig, TemporalNet, save_weights, window_features
from .mocap import Camera, camera_path, coco_joints, load_bvh, project

# A frame whose reported joints lie on average further than this many person sizes from the truth is an input
# but never a target (see lost_frames).
LOST = 0.5


@dataclass
class Sequence:
    xy: np.ndarray        # (T, K, 2) the estimator's (or planted) keypoints
    score: np.ndarray     # (T, K)
    present: np.ndarray   # (T, K) reported
    gt: np.ndarray        # (T, K, 2) the truth
    labelled: np.ndarray  # (T, K) the truth is labelled


def frame_keys(images: list[dict], field: str = "images") -> dict[int, tuple[int, int]]:
    """image id → (video, frame): PoseTrack's vid_id / frame_id, or clip_id / frame."""
    keys = {}
    for i, im in enumerate(images):
        video = im.get("vid_id", im.get("clip_id"))
        frame = im.get("frame_id", im.get("frame"))
        if not isinstance(video, int) or not isinstance(frame, int):
            raise InputError(f"{field}[{i}]", "needs integer vid_id and frame_id (or clip_id and frame)")
        keys[im["id"]] = (video, frame)
    return keys


def sequences_from_files(gt_path, results_path) -> list[Sequence]:
    """One Sequence per GT track that has results: results are matched to the GT by image_id and track_id;
    frames without a result of the track are absent."""
    gt = read_json(gt_path, "ground truth")
    results = read_json(results_path, "results")
    keys = frame_keys(gt["images"], f"{gt_path}: images")
    truth: dict[tuple, dict[int, np.ndarray]] = defaultdict(dict)
    for a in gt["annotations"]:
        video, frame = keys[a["image_id"]]
        truth[(video, a["track_id"])][frame] = np.asarray(a["keypoints"], float).reshape(NUM_KEYPOINTS, 3)
    found: dict[tuple, dict[int, np.ndarray]] = defaultdict(dict)
    for i, r in enumerate(results):
        if r.get("image_id") not in keys or "track_id" not in r:
            raise InputError(f"{results_path}: [{i}]", "needs an image_id of the ground truth and a track_id")
        video, frame = keys[r["image_id"]]
        found[(video, r["track_id"])][frame] = np.asarray(r["keypoints"], float).reshape(NUM_KEYPOINTS, 3)
    out = []
    for key, frames in sorted(truth.items()):
        if key not in found:
            continue
        first, last = min(frames), max(frames)
        t = last - first + 1
        seq = Sequence(np.zeros((t, NUM_KEYPOINTS, 2)), np.zeros((t, NUM_KEYPOINTS)),
                       np.zeros((t, NUM_KEYPOINTS), bool), np.zeros((t, NUM_KEYPOINTS, 2)),
                       np.zeros((t, NUM_KEYPOINTS), bool))
        for f, kp in frames.items():
            seq.gt[f - first], seq.labelled[f - first] = kp[:, :2], kp[:, 2] > 0
        for f, kp in found[key].items():
            if first <= f <= last:
                seq.xy[f - first], seq.score[f - first] = kp[:, :2], kp[:, 2]
                seq.present[f - first] = kp[:, 2] > 0
        seq.labelled &= ~lost_frames(seq, LOST)[:, None]
        out.append(seq)
    return out


def lost_frames(seq: Sequence, limit: float = 1.0) -> np.ndarray:
    """(T,) frames whose reported joints lie on average more than ``limit`` person sizes from the truth: the
    estimator followed someone or something else there, which no temporal refinement can undo, so these frames
    are inputs but never targets."""
    both = seq.present & seq.labelled
    hi = np.where(seq.labelled[..., None], seq.gt, -np.inf).max(axis=1)
    lo = np.where(seq.labelled[..., None], seq.gt, np.inf).min(axis=1)
    ext = np.where(np.isfinite(hi - lo), hi - lo, 0.0)
    size = np.sqrt(np.maximum(ext[:, 0] * ext[:, 1], 1.0))
    dist = np.linalg.norm(seq.xy - seq.gt, axis=-1)
    mean = (dist * both).sum(1) / np.maximum(both.sum(1), 1)
    return (mean / size > limit) & both.any(1)


def mirrored(seq: Sequence) -> Sequence:
    """The sequence mirrored left to right: x negated and each left joint swapped with its right partner."""
    flip = np.array([-1.0, 1.0])
    return Sequence(seq.xy[:, PARTNER] * flip, seq.score[:, PARTNER], seq.present[:, PARTNER],
                    seq.gt[:, PARTNER] * flip, seq.labelled[:, PARTNER])


# ---------------------------------------------------------------------------------------------- mocap


def mocap_sequences(bvh_paths, count: int, length: int, rng: np.random.Generator) -> list[Sequence]:
    """``count`` sequences of ``length`` frames cut from the clips at 30 or 15 fps, each seen by a random
    camera (view, size, motion), with estimator-like errors over time planted by
    :func:`posefix.synth.sequences.synthesize_tracks` (the published error profile, the bundled durations)."""
    clips = []
    for path in bvh_paths:
        skeleton = load_bvh(path)
        joints, labelled = coco_joints(skeleton)
        clips.append((joints, labelled, max(1, round(1 / 30 / skeleton.frame_time))))
    gts = np.zeros((count, length, NUM_KEYPOINTS, 3))
    for i in range(count):
        joints, labelled, step = clips[rng.integers(len(clips))]
        step *= int(rng.choice([1, 1, 2]))
        span = length * step
        if len(joints) <= span:
            raise InputError("mocap", f"a clip is shorter than {length} frames at this rate")
        start = rng.integers(0, len(joints) - span)
        seg = joints[start:start + span:step]
        cam = Camera(yaw=rng.uniform(-180, 180), pitch=rng.uniform(-5, 25), height_px=rng.uniform(40, 260),
                     distance=rng.uniform(2.5, 8))
        path = camera_path(length, str(rng.choice(["still", "slow", "fast", "shake"])), cam.size, rng)
        gts[i, ..., :2] = project(seg, labelled, cam, path)
        gts[i, ..., 2] = 2 * labelled
    lab = gts[..., 2] > 0
    hi = np.where(lab[..., None], gts[..., :2], -np.inf).max(axis=2)
    lo = np.where(lab[..., None], gts[..., :2], np.inf).min(axis=2)
    area = np.maximum(np.prod(hi - lo, axis=-1), 1.0)  # the labelled joints' box
    planted = synthesize_tracks(gts, area, SequenceParams.default(), rng)
    kp = planted.keypoints
    return [Sequence(kp[i, ..., :2], kp[i, ..., 2], kp[i, ..., 2] > 0, gts[i, ..., :2], lab[i])
            for i in range(count)]


# ---------------------------------------------------------------------------------------------- training


def prepared(seq: Sequence, window: int, causal: bool, smoother: LearnedSmoother):
    """One sequence as the smoother meets it in :func:`posefix.temporal.core.refine_tracks` (corrected, gaps
    filled): its windows' features, the truth's u and the labelled mask, each (T, K, W, ...)."""
    options = TemporalOptions()
    xy, score, present = seq.xy[None], seq.score[None], seq.present[None]
    scale = person_scale(xy, present, causal)
    xy, score, present, _ = correct(xy, score, present, scale, causal, options)
    xy, score, present, _ = fill_gaps(xy, score, present, causal, options)
    xy, score, present, scale = xy[0], score[0], present[0], scale[0]
    base = smoother.base_output(xy, score, present, scale, causal)
    f, frames, centre, size = window_features(xy, base, score, present, window, causal)
    u = (seq.gt[frames] - centre[frames][:, :, None]) / size[:, None, None, None]  # (T, W, K, 2)
    raw = np.arange(len(xy))[:, None] + np.arange(window)[None] - (window - 1 if causal else window // 2)
    lab = seq.labelled[frames] & ((raw >= 0) & (raw < len(xy)))[..., None]
    return f, u.transpose(0, 2, 1, 3).astype(np.float32), lab.transpose(0, 2, 1)


def _batch(seqs: list[Sequence], window: int, causal: bool, n: int, rng: np.random.Generator, cache: dict,
           smoother: LearnedSmoother):
    """n windows drawn uniformly over the sequences' frames: features, truth u, labelled mask."""
    idx = rng.integers(0, len(seqs), n)
    feats, target, mask = [], [], []
    for s in np.unique(idx):
        if s not in cache:
            cache[s] = prepared(seqs[s], window, causal, smoother)
        f, u, lab = cache[s]
        rows = rng.integers(0, len(f), int((idx == s).sum()))
        feats.append(f[rows])
        target.append(u[rows])
        mask.append(lab[rows])
    return (torch.from_numpy(np.concatenate(feats)), torch.from_numpy(np.concatenate(target)),
            torch.from_numpy(np.concatenate(mask)))


_SIGMA = torch.tensor(SIGMAS / SIGMAS.mean(), dtype=torch.float32)[:, None]  # (K, 1)


def loss_fn(feats, delta, target, mask, causal: bool):
    """L1 of the corrected positions against the truth (units of the person's size and the joint's COCO σ
    relative to the mean σ, as keypoint similarity weighs them) over labelled joints,
    plus L1 of their acceleration; the causal network's last frame weighs as much as the rest together."""
    pred = feats[..., :2] + delta
    err = ((pred - target).abs().sum(-1) / _SIGMA)  # (N, K, W), in units of the joint's COCO σ
    w = mask.float()
    if causal:
        w = w.clone()
        w[..., -1] *= w.shape[-1]
    pos = (err * w).sum() / w.sum().clamp(min=1)
    acc_pred = pred[..., 2:, :] - 2 * pred[..., 1:-1, :] + pred[..., :-2, :]
    acc_true = target[..., 2:, :] - 2 * target[..., 1:-1, :] + target[..., :-2, :]
    m3 = (mask[..., 2:] & mask[..., 1:-1] & mask[..., :-2]).float()
    acc = ((acc_pred - acc_true).abs().sum(-1) / _SIGMA * m3).sum() / m3.sum().clamp(min=1)
    return pos + acc


def train(seqs: list[Sequence], config: NetConfig, causal: bool, steps: int, seed: int, batch: int = 256,
          lr: float = 1e-3, log=None) -> TemporalNet:
    """Train one network (offline or causal) with Adam and cosine decay. Reproducible for a seed."""
    if not seqs:
        raise InputError("sequences", "no training sequences")
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    net = TemporalNet(config)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1), pct_start=0.1)
    cache: dict = {}
    smoother = LearnedSmoother(net, net)
    start = time.perf_counter()
    for step in range(steps):
        feats, target, mask = _batch(seqs, config.window, causal, batch, rng, cache, smoother)
        loss = loss_fn(feats, net(feats), target, mask, causal)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if log and (step % 200 == 0 or step == steps - 1):
            log(f"{'causal' if causal else 'offline'} step {step + 1}/{steps} loss {loss.item():.4f} "
                f"({time.perf_counter() - start:.0f} s)")
    return net.eval()


def train_smoother(seqs: list[Sequence], config: NetConfig, steps: int, seed: int, log=None) -> LearnedSmoother:
    offline = train(seqs, config, False, steps, seed, log=log)
    causal = train(seqs, config, True, steps, seed + 1, log=log)
    return LearnedSmoother(offline, causal)


def training_sequences(gt_path, results_paths, mocap_paths, mocap_count: int, seed: int, length: int = 48,
                       mirror: bool = True) -> list[Sequence]:
    """The training set: every results file's tracks against ``gt_path`` (the results carry the GT's
    ``track_id``), each also mirrored where ``mirror``, and ``mocap_count`` motion-capture sequences of
    ``length`` frames with planted errors."""
    seqs = [s for path in results_paths for s in sequences_from_files(gt_path, path)]
    if mirror:
        seqs += [mirrored(s) for s in seqs]
    if mocap_count and mocap_paths:
        seqs += mocap_sequences(mocap_paths, mocap_count, length, np.random.default_rng(seed))
    return seqs


def train_temporal(out, seqs: list[Sequence], config: NetConfig, steps: int, seed: int, log=None) -> LearnedSmoother:
    """Train the offline and the causal network and write both to ``out`` (safetensors, atomically)."""
    smoother = train_smoother(seqs, config, steps, seed, log=log)
    save_weights(out, smoother.nets[False], smoother.nets[True],
                 {"steps": steps, "seed": seed, "sequences": len(seqs)})
    return smoother
