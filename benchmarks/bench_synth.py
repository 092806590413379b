"""Synthesis throughput: the vectorised synthesizer against the plain per-joint rejection sampler.

Both run the same rules on the same real COCO persons (the bundled train + val sample), side by side
in one process on one core. Then the whole pipeline (`synth.coco.synthesize_coco`: overlaps, synthesis,
results) on a COCO-train2017-sized set made by repeating the sample's images.

    python benchmarks/bench_synth.py [--persons 150000] [--reference-persons 240] [--json out.json]
"""
from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # one core, as the reference figures are

import argparse
import json
import platform
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from posefix import SAMPLE_DIR
from synth.coco import MIN_AREA, overlaps, synthesize_coco
from synth.cocoio import load_ground_truth
from synth.reference import synthesize_reference
from synth.synthesize import synthesize


def sample_persons():
    """Real persons with their overlapping labelled persons, grouped by overlap count."""
    groups = {}
    for name in ("person_keypoints_train_sample.json", "person_keypoints_val_sample.json"):
        gt = load_ground_truth(SAMPLE_DIR / name)
        ov, near = overlaps(gt)
        for i in np.flatnonzero(~gt.crowd & (gt.keypoints[..., 2] > 0).any(-1)):
            m = near[i].size
            groups.setdefault(min(m, 3), []).append((gt.keypoints[i], max(gt.areas[i], MIN_AREA),
                                                     gt.keypoints[near[i][:3]], np.maximum(gt.areas[near[i][:3]], MIN_AREA), ov[i]))
    return groups


def stack(persons, m, count):
    idx = np.resize(np.arange(len(persons)), count)
    gt = np.stack([persons[i][0] for i in idx])
    area = np.array([persons[i][1] for i in idx])
    others = np.stack([persons[i][2][:m] for i in idx]) if m else np.zeros((count, 0, 17, 3))
    others_area = np.stack([persons[i][3][:m] for i in idx]) if m else np.zeros((count, 0))
    ov = np.array([persons[i][4] for i in idx])
    return gt, area, others, others_area, ov


def timed(fn, repeat=3):
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def big_ground_truth(target_persons: int):
    """The sample's train + val images repeated (new image and annotation ids) to ``target_persons``."""
    base = [load_ground_truth(SAMPLE_DIR / n) for n in
            ("person_keypoints_train_sample.json", "person_keypoints_val_sample.json")]
    labelled = sum(int((~g.crowd & (g.keypoints[..., 2] > 0).any(-1)).sum()) for g in base)
    copies = -(-target_persons // labelled)
    parts = {k: [] for k in ("ids", "image_ids", "keypoints", "areas", "boxes", "crowd")}
    offset = 0
    for c in range(copies):
        for g in base:
            parts["ids"].append(g.ids + offset)
            parts["image_ids"].append(g.image_ids + offset)
            for k in ("keypoints", "areas", "boxes", "crowd"):
                parts[k].append(getattr(g, k))
            offset += 10 ** 7
    arrays = {k: np.concatenate(v) for k, v in parts.items()}
    return replace(base[0], image_ids_all=frozenset(arrays["image_ids"].tolist()), doc={}, **arrays), labelled * copies


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--persons", type=int, default=150_000, help="size of the COCO-scale run (150000)")
    ap.add_argument("--reference-persons", type=int, default=240, help="persons per overlap bin for the plain sampler")
    ap.add_argument("--json", default=str(Path(__file__).parent / "results" / "synth.json"))
    args = ap.parse_args()

    groups = sample_persons()
    rows = []
    print(f"{'overlapping persons':>20} | {'plain sampler ms/person':>23} | {'vectorised ms/person':>20} | {'speed-up':>8}")
    print("-" * 82)
    for m in sorted(groups):
        n_ref = args.reference_persons
        gt, area, others, others_area, ov = stack(groups[m], m, n_ref)
        t_ref = timed(lambda a=(gt, area, others, others_area, ov):
                      synthesize_reference(a[0], a[1], np.random.default_rng(0), a[2], a[3], a[4]), 1)
        big = stack(groups[m], m, 20_000)
        t_vec = timed(lambda b=big: synthesize(b[0], b[1], np.random.default_rng(0), b[2], b[3], b[4]))
        ms_ref, ms_vec = 1e3 * t_ref / n_ref, 1e3 * t_vec / 20_000
        rows.append({"overlapping": m if m < 3 else "3+", "reference_ms_per_person": ms_ref,
                     "vectorised_ms_per_person": ms_vec, "speedup": ms_ref / ms_vec,
                     "sample_persons": len(groups[m])})
        print(f"{rows[-1]['overlapping']!s:>20} | {ms_ref:23.3f} | {ms_vec:20.4f} | {ms_ref / ms_vec:7.0f}×")

    gt, n_persons = big_ground_truth(args.persons)
    t0 = time.perf_counter()
    results, _ = synthesize_coco(gt, np.random.default_rng(0))
    t_all = time.perf_counter() - t0
    assert len(results) == n_persons
    print(f"\nwhole pipeline (overlaps + synthesis + results), {n_persons} persons on "
          f"{len(gt.image_ids_all)} images: {t_all:.1f} s = {n_persons / t_all:,.0f} persons/s")

    report = {
        "benchmark": "synthesis", "rows": rows,
        "coco_scale": {"persons": n_persons, "images": len(gt.image_ids_all), "seconds": t_all,
                       "persons_per_s": n_persons / t_all},
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "python": platform.python_version(), "numpy": np.__version__, "threads": 1},
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2))
    print(f"numbers written to {args.json}")


if __name__ == "__main__":
    main()
