"""Pose similarity search at scale: build time, query latency (p50/p99) and recall@10 of the approximate index.

The poses are synthesized by posefix from the bundled samples' labelled persons (val and train, 191): each copy
is one person with the published PoseFix errors (posefix.synth.synthesize: jitter, inversions, misses; no swaps, as the
copies have no overlapping persons), scaled by 0.5-2 and moved by up to 500 pixels. The queries are other such
copies (another seed). For each size: the exact index (numpy, every pose ranked) and the approximate one
(faiss IVF-Flat, sqrt(N) lists, candidates re-ranked by the exact distance) at several ``nprobe``; build time
(embedding, and for IVF k-means training and adding), one query at a time (p50, p99 of the queries), recall@10
of the approximate answer against the exact one, and the index file's save and load times.

    python benchmarks/bench_search.py [--sizes 10000 100000 1000000] [--queries 100] [--json out.json]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import machine, write
from posefix import SAMPLE_DIR
from posefix.search import PoseIndex
from posefix.synth.cocoio import load_ground_truth
from posefix.synth.synthesize import synthesize

SAMPLES = (SAMPLE_DIR / "person_keypoints_val_sample.json", SAMPLE_DIR / "person_keypoints_train_sample.json")


def sample_persons():
    kp, area = [], []
    for path in SAMPLES:
        gt = load_ground_truth(path)
        rows = np.flatnonzero(~gt.crowd & (gt.keypoints[..., 2] > 0).any(-1))
        kp.append(gt.keypoints[rows])
        area.append(np.maximum(gt.areas[rows], 1.0))
    return np.concatenate(kp), np.concatenate(area)


def synthesized_poses(n: int, seed: int, chunk: int = 200_000) -> np.ndarray:
    """n poses (n, 17, 3): synthesized copies of the sample persons, each scaled and moved at random."""
    gt, area = sample_persons()
    rng = np.random.default_rng(seed)
    out = np.empty((n, 17, 3))
    for lo in range(0, n, chunk):
        m = min(chunk, n - lo)
        who = rng.integers(0, len(gt), m)
        poses = synthesize(gt[who], area[who], rng).keypoints
        scale = rng.uniform(0.5, 2.0, (m, 1, 1))
        poses[..., :2] = poses[..., :2] * scale + rng.uniform(-500, 500, (m, 1, 2))
        out[lo:lo + m] = poses
    return out


def latencies(index, queries, k, exact):
    times, rows = [], []
    for q in queries:
        t0 = time.perf_counter()
        m = index.search(q[None], k, exact=exact)
        times.append(time.perf_counter() - t0)
        rows.append(m.rows[0])
    return np.array(times), np.array(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    p.add_argument("--queries", type=int, default=100)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--nprobe", type=int, nargs="+", default=[8, 32, 128])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="faiss' OpenMP threads (default: faiss' own, one per core)")
    p.add_argument("--json")
    args = p.parse_args(argv)
    if args.threads:
        import faiss

        faiss.omp_set_num_threads(args.threads)

    report = {"machine": machine(), "queries": args.queries, "k": args.k, "faiss_threads": args.threads, "rows": []}
    queries = synthesized_poses(args.queries, args.seed + 1)
    print(f"pose search on poses synthesized from the samples' persons; {args.queries} queries, one at a time, "
          f"k = {args.k}")
    print(f"{'poses':>9s} {'method':14s} {'build s':>8s} {'p50 ms':>8s} {'p99 ms':>8s} {'recall@10':>9s} "
          f"{'save s':>7s} {'load s':>7s}")
    for n in args.sizes:
        t0 = time.perf_counter()
        poses = synthesized_poses(n, args.seed)
        synth_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        exact = PoseIndex.build(poses, method="exact")
        exact.embedding  # noqa: B018 — the embedding is the exact index's build
        build_exact = time.perf_counter() - t0
        t0 = time.perf_counter()
        approx = PoseIndex.build(poses, method="ivf")
        build_ivf = time.perf_counter() - t0
        times, truth = latencies(exact, queries, args.k, True)
        results = [("exact", build_exact, times, 1.0, exact)]
        for nprobe in args.nprobe:
            approx.nprobe = nprobe
            t_ann, rows = latencies(approx, queries, args.k, False)
            recall = float(np.mean([len(set(a) & set(b)) / args.k for a, b in zip(rows, truth)]))
            results.append((f"ivf nprobe {nprobe}", build_ivf, t_ann, recall, approx))
        with tempfile.TemporaryDirectory() as tmp:
            files = {}
            for name, index in (("exact", exact), ("ivf", approx)):
                path = Path(tmp) / f"{name}.index"
                t0 = time.perf_counter()
                index.save(path)
                save_s = time.perf_counter() - t0
                t0 = time.perf_counter()
                PoseIndex.load(path)
                files[name] = (save_s, time.perf_counter() - t0, path.stat().st_size)
        for method, build, t, recall, index in results:
            save_s, load_s, size = files["exact" if method == "exact" else "ivf"]
            row = {"poses": n, "method": method, "build_s": build, "p50_ms": float(np.percentile(t, 50) * 1e3),
                   "p99_ms": float(np.percentile(t, 99) * 1e3), "recall_at_10": recall, "save_s": save_s,
                   "load_s": load_s, "file_bytes": size, "synthesis_s": synth_s,
                   "lists": int(index._ann.nlist) if method != "exact" else None}
            report["rows"].append(row)
            print(f"{n:9d} {method:14s} {build:8.2f} {row['p50_ms']:8.1f} {row['p99_ms']:8.1f} {recall:9.3f} "
                  f"{save_s:7.2f} {load_s:7.2f}", flush=True)
        del poses, exact, approx
    if args.json:
        write(args.json, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
