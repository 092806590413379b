"""Temporal refinement measured against exact ground truth.

On video_sample's clips (a moving virtual camera over COCO photos, real MoveNet / BlazePose outputs with
tracked crops; ``../shared/data/video_sample``) for each estimator, overall and per camera kind (slow / fast
/ shake): keypoint AP over all frames (pycocotools), mean OKS, the acceleration error (SmoothNet's, normalised
by sqrt of the GT area, ×100; the README's definition), the share of joints with KS < 0.5, for the raw
output, every smoother of :data:`posefix.temporal.SMOOTHERS` through the whole temporal refinement, causal and
offline, and plain per-track SG9 / MA9 references (the README's). On the mocap clips (``../shared/data/mocap``,
projected through a virtual camera, with estimator-like jitter added): the lag on the fastest motion, in
frames, and the acceleration error. Then the classical path's speed in person-frames/s on one core.

    python benchmarks/bench_temporal.py                       # the measuring clips
    python benchmarks/bench_temporal.py --split train         # the clips defaults are chosen on
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common
from posefix.keypoints import SIGMAS
from posefix.temporal import SMOOTHERS, make_smoother, refine_poses
from posefix.temporal.registry import needs_weights

HERE = Path(__file__).resolve().parent
# ../shared/data beside the repository (or beside the folder of worktrees that holds it)
DATA = next((p / "shared" / "data" for p in HERE.parents[1:3] if (p / "shared" / "data").is_dir()),
            HERE.parents[1] / "shared" / "data")
KINDS = ("slow", "fast", "shake")


def load_split(root: Path):
    gt = json.loads((root / "gt.json").read_text())
    clips = json.loads((root / "clips.json").read_text())["clips"]
    kind = {c["clip_id"]: c["kind"] for c in clips}
    return gt, kind


def results_arrays(results):
    ids = np.array([r["image_id"] for r in results], dtype=np.int64)
    kp = np.array([r["keypoints"] for r in results], dtype=np.float64).reshape(-1, 17, 3)
    track = np.array([r.get("track_id", 0) for r in results], dtype=np.int64)
    return ids // 1000, ids % 1000, track, kp


def to_results(video, frame, track, xy, score):
    out = []
    kp = np.concatenate([xy, score[..., None]], -1).reshape(len(xy), 51)
    for i in range(len(xy)):
        s = score[i]
        out.append({"image_id": int(video[i] * 1000 + frame[i]), "category_id": 1, "track_id": int(track[i]),
                    "keypoints": kp[i].tolist(), "score": float(s[s > 0].mean()) if (s > 0).any() else 0.0})
    return out


def plain_reference(name, video, frame, track, kp):
    """The README's references: per track, split where frames have no result; all 17 joints' x/y."""
    from scipy.signal import savgol_filter

    xy = kp[..., :2].copy()
    key = np.lexsort((frame, track, video))
    v, f, t = video[key], frame[key], track[key]
    brk = np.flatnonzero((np.diff(v) != 0) | (np.diff(t) != 0) | (np.diff(f) != 1)) + 1
    for seg in np.split(key, brk):
        y = xy[seg]
        if name == "SG9":
            if len(seg) >= 9:
                y = savgol_filter(y, 9, 2, axis=0, mode="interp")
            elif len(seg) >= 3:
                y = savgol_filter(y, len(seg) - (1 - len(seg) % 2), min(2, len(seg) - 2), axis=0, mode="interp")
        else:
            c = np.cumsum(np.concatenate([np.zeros((1,) + y.shape[1:]), y]), 0)
            i = np.arange(len(seg))
            lo, hi = np.maximum(i - 4, 0), np.minimum(i + 5, len(seg))
            y = (c[hi] - c[lo]) / (hi - lo)[:, None, None]
        xy[seg] = y
    return xy


def metrics(gt, kind_of, results, kinds=KINDS):
    """AP (pycocotools), OKS, KS<0.5 share and the acceleration error, overall and per camera kind."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = gt
        coco.createIndex()
        dt = coco.loadRes(results) if results else None
    res_by = {(r["image_id"], r["track_id"]): np.array(r["keypoints"]).reshape(17, 3) for r in results}
    var = (2 * SIGMAS) ** 2
    rows = []  # per GT person-frame: kind, oks, ks (17,), labelled (17,), key
    gtp = {}
    for a in gt["annotations"]:
        g = np.array(a["keypoints"], dtype=np.float64).reshape(17, 3)
        gtp[(a["image_id"], a["track_id"])] = (g, a["area"])
    for (img, tid), (g, area) in gtp.items():
        lab = g[:, 2] > 0
        if not lab.any() or (img, tid) not in res_by:
            continue
        d2 = ((res_by[(img, tid)][:, :2] - g[:, :2]) ** 2).sum(-1)
        ks = np.exp(-d2 / (2 * max(area, 1e-9) * var))
        rows.append((kind_of[img // 1000], ks[lab].mean(), (ks[lab] < 0.5)))
    acc = []
    for (img, tid), (g, area) in gtp.items():
        keys = [(img - 1, tid), (img, tid), (img + 1, tid)]
        if not all(k in res_by and k in gtp for k in keys):
            continue
        gs = [gtp[k][0] for k in keys]
        lab = (gs[0][:, 2] > 0) & (gs[1][:, 2] > 0) & (gs[2][:, 2] > 0)
        if not lab.any():
            continue
        ps = [res_by[k][:, :2] for k in keys]
        ap = ps[2] - 2 * ps[1] + ps[0]
        ag = gs[2][:, :2] - 2 * gs[1][:, :2] + gs[0][:, :2]
        e = np.linalg.norm(ap - ag, axis=-1)[lab] / np.sqrt(max(area, 1e-9)) * 100
        acc.append((kind_of[img // 1000], e))
    out = {}
    for k in ("all",) + tuple(kinds):
        imgs = [i["id"] for i in gt["images"] if k == "all" or kind_of[i["id"] // 1000] == k]
        ap = 0.0
        if not imgs:
            out[k] = {"AP": float("nan"), "OKS": float("nan"), "KS<0.5": float("nan"), "accel": float("nan"),
                      "accel_med": float("nan")}
            continue
        if dt is not None:
            with contextlib.redirect_stdout(io.StringIO()):
                ev = COCOeval(coco, dt, "keypoints")
                ev.params.imgIds = imgs
                ev.evaluate()
                ev.accumulate()
                ev.summarize()
            ap = max(float(ev.stats[0]), 0.0)
        sel = [r for r in rows if k == "all" or r[0] == k]
        chosen = [e for kk, e in acc if k == "all" or kk == k]
        es = np.concatenate(chosen) if chosen else np.zeros(0)
        out[k] = {"AP": ap, "OKS": float(np.mean([r[1] for r in sel])) if sel else 0.0,
                  "KS<0.5": float(np.concatenate([r[2] for r in sel]).mean()) if sel else 0.0,
                  "accel": float(es.mean()) if len(es) else 0.0, "accel_med": float(np.median(es)) if len(es) else 0.0}
    return out


def methods(names, weights=None):
    """(row name, function of (video, frame, track, kp) → results) for raw, each smoother and the references."""
    rows = [("raw", lambda v, f, t, kp: to_results(v, f, t, kp[..., :2], kp[..., 2]))]
    for name in names:
        smoother = make_smoother(name, weights=weights)
        for causal in (True, False):
            def run(v, f, t, kp, smoother=smoother, causal=causal):
                r = refine_poses(kp, smoother, video=v, frame=f, track=t, causal=causal)
                res = to_results(v, f, r.track, r.xy, r.score)
                return res + to_results(r.added_video, r.added_frame, r.added_track, r.added_xy, r.added_score)
            rows.append((f"{name} {'causal' if causal else 'offline'}", run))
    for ref in ("SG9", "MA9"):
        rows.append((f"plain {ref}", lambda v, f, t, kp, ref=ref: to_results(
            v, f, t, plain_reference(ref, v, f, t, kp), kp[..., 2])))
    return rows


def speed(names, persons: int = 20_000, seed: int = 0, weights=None):
    """Person-frames/s of each smoother's whole refinement (given track ids, offline and causal) on one core."""
    rng = np.random.default_rng(seed)
    tracks, frames = persons // 100, 100
    base = rng.uniform(50, 400, (tracks, 1, 17, 2)) + np.cumsum(rng.normal(0, 2, (tracks, frames, 1, 2)), 1)
    kp = np.concatenate([base + rng.normal(0, 2, base.shape), rng.uniform(0.1, 1, (tracks, frames, 17, 1))], -1)
    video = np.zeros(tracks * frames, dtype=np.int64)
    frame = np.tile(np.arange(frames), tracks)
    track = np.repeat(np.arange(1, tracks + 1), frames)
    kp = kp.reshape(-1, 17, 3)
    out = {}
    for name in names:
        sm = make_smoother(name, weights=weights)
        for causal in (False, True):
            secs = common.timed(lambda sm=sm, causal=causal: refine_poses(kp, sm, video=video, frame=frame,
                                                                           track=track, causal=causal), repeat=2)
            out[f"{name} {'causal' if causal else 'offline'}"] = len(kp) / secs
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(DATA / "video_sample"), help="video_sample's folder")
    ap.add_argument("--mocap", default=str(DATA / "mocap"), help="the mocap clips' folder")
    ap.add_argument("--split", choices=("measure", "train"), default="measure",
                    help="measure: the clips at the folder's root; train: train/")
    ap.add_argument("--estimators", nargs="*", default=None, help="estimator files (default: all _coco.json)")
    ap.add_argument("--smoothers", nargs="*", default=None,
                    help="registered smoothers (default: every one, the learned one with --temporal-weights)")
    ap.add_argument("--temporal-weights", metavar="FILE", help="passed to every smoother's factory as weights=")
    ap.add_argument("--no-speed", action="store_true")
    ap.add_argument("--out", default=str(HERE / "results" / "temporal.json"))
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    root = Path(args.data) / ("train" if args.split == "train" else "")
    gt, kind = load_split(root)
    names = args.smoothers if args.smoothers is not None else \
        [n for n in SMOOTHERS if n != "none" and (args.temporal_weights or not needs_weights(n))] + ["none"]
    files = sorted((root / "estimators" / "tracked").glob("*_coco.json"))
    if args.estimators:
        files = [f for f in files if any(e in f.name for e in args.estimators)]
    report = {"machine": common.machine(), "split": args.split, "clips": {}, "mocap": {}, "speed": {}}
    header = "| estimator | method | AP | OKS | KS<0.5 | accel | accel med | " \
             + " | ".join(f"{k}: AP / OKS / accel" for k in KINDS) + " |"
    print(header)
    print("|" + " --- |" * (header.count("|") - 1))
    for file in files:
        est = file.name.removesuffix("_coco.json")
        v, f, t, kp = results_arrays(json.loads(file.read_text()))
        report["clips"][est] = {}
        for name, fn in methods(names, args.temporal_weights):
            m = metrics(gt, kind, fn(v, f, t, kp))
            report["clips"][est][name] = m
            a = m["all"]
            print(f"| {est} | {name} | {a['AP']:.3f} | {a['OKS']:.3f} | {a['KS<0.5']:.3f} | {a['accel']:.2f} | "
                  f"{a['accel_med']:.2f} | " + " | ".join(
                      f"{m[k]['AP']:.3f} / {m[k]['OKS']:.3f} / {m[k]['accel']:.2f}" for k in KINDS) + " |",
                  flush=True)
    mocap_dir = Path(args.mocap)
    if mocap_dir.is_dir():
        from benchmarks.mocap_clips import mocap_table

        report["mocap"] = mocap_table(mocap_dir, names, weights=args.temporal_weights)
    if not args.no_speed:
        report["speed"] = speed(names, weights=args.temporal_weights)
        print("\n| smoother | person-frames/s (one core) |\n| --- | --- |")
        for k, val in report["speed"].items():
            print(f"| {k} | {val:,.0f} |")
    common.write(args.out, report)
    return 0


if __name__ == "__main__":
    t0 = time.perf_counter()
    rc = main()
    print(f"({time.perf_counter() - t0:.0f} s)")
    sys.exit(rc)
