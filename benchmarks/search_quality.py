"""Retrieval quality of pose similarity search on the real persons of the bundled COCO samples.

Every labelled, non-crowd GT person of the samples (the val and the train sample together) is indexed (its
labelled joints with confidence 1). For each, posefix synthesizes an erroneous copy of the person's labelled
joints and searches with it; a query succeeds when the original person is its nearest pose (rank 1), or among
the first 5. Queries:

- jitter, every joint: every labelled joint jittered (keypoint similarity 0.5-0.85 to the truth); also with
  the joints the GT does not label placed plausibly by the synthesis, as an estimator would report them (the
  original lacks them: they count as missing there);
- jitter, published rates: the published PoseFix profile with only its jitter (the other errors left out);
- mirrored: the every-joint jitter query mirrored (x flipped, left and right swapped), searched without and
  with ``mirror`` (with it, the original must be found; without it, a mirror image is another pose);
- published errors: the published profile whole (jitter, inversions, swaps with overlapping persons, misses),
  and with inversions and swaps three times as likely (at most 0.3 a joint), searched as synthesized and, given
  ``--checkpoint``, refined first on their images (``--val-images``, ``--train-images``; a sample without images
  is left out of the refined figures).

    python benchmarks/search_quality.py [--checkpoint model.safetensors --train-images DIR] [--json out.json]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import machine, write
from posefix import SAMPLE_DIR
from posefix.search import PoseIndex, mirror
from posefix.synth.coco import synthesize_coco
from posefix.synth.cocoio import load_ground_truth
from posefix.synth.profile import ERRORS, published_profile

SAMPLES = {"val": SAMPLE_DIR / "person_keypoints_val_sample.json",
           "train": SAMPLE_DIR / "person_keypoints_train_sample.json"}


def profiles():
    pub = published_profile()
    k = 17
    every = pub.with_tables({e: np.full((k, len(pub.outcomes[e].bins)), 1.0 if e == "jitter" else 0.0)
                             for e in ERRORS}, name="jitter-every-joint")
    jitter = pub.with_tables({e: np.zeros((k, len(pub.outcomes[e].bins))) for e in ERRORS if e != "jitter"},
                             name="published-jitter")
    heavy = pub.with_tables({e: np.minimum(pub.outcomes[e].table * 3, 0.3) for e in ("inversion", "swap")},
                            name="published-inversions-swaps-x3")
    return every, jitter, pub, heavy


def persons(gt):
    """Rows of the labelled, non-crowd persons, in annotation order (synthesize_coco's order)."""
    return np.flatnonzero(~gt.crowd & (gt.keypoints[..., 2] > 0).any(-1))


def synthesized(gts, profile, seed, unlabelled=False):
    """Per sample, the synthesized copies (P, 17, 3) of its persons: their labelled joints (``unlabelled``: all
    17, the others placed plausibly)."""
    out = {}
    for s, (name, gt) in enumerate(gts.items()):
        results, _ = synthesize_coco(gt, np.random.default_rng([seed, s]), profile)
        kp = np.array([r["keypoints"] for r in results]).reshape(-1, 17, 3)
        if not unlabelled:
            kp[..., 2] *= gt.keypoints[persons(gt), :, 2] > 0
        out[name] = kp
    return out


def rates(index, queries: dict, truth: dict, mirror_too=False) -> dict:
    row = {}
    for name, q in queries.items():
        m = index.search(q, 5, mirror_too=mirror_too)
        hit = m.rows == truth[name][:, None]
        row[name] = {"queries": len(q), "rank1": float(hit[:, 0].mean()), "top5": float(hit.any(1).mean())}
    n = sum(r["queries"] for r in row.values())
    row["all"] = {"queries": n, **{k: sum(r[k] * r["queries"] for r in row.values()) / n for k in ("rank1", "top5")}}
    return row


def refine(checkpoint, gts, queries, images: dict):
    from posefix.images import coco_image_path
    from posefix.refine import refine_images
    from posefix.refiner import Refiner

    refiner = Refiner.from_checkpoint(checkpoint, device="cpu")
    out = {}
    for name, q in queries.items():
        if images.get(name) is None:
            continue
        gt = gts[name]
        rows = persons(gt)
        by_image: dict = {}
        for i, r in enumerate(rows):
            by_image.setdefault(int(gt.image_ids[r]), []).append(i)
        files = {im["id"]: coco_image_path(images[name], im) for im in gt.doc["images"]}
        refined = q.copy()
        jobs = ((img, files[img], q[idx]) for img, idx in by_image.items())
        for img, xy, conf in refine_images(refiner, jobs):
            refined[by_image[img], :, :2], refined[by_image[img], :, 2] = xy, conf
        out[name] = refined
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", help="a refiner: also search with the queries refined first")
    p.add_argument("--val-images", default=str(SAMPLE_DIR / "images"))
    p.add_argument("--train-images", help="the train sample's images (not bundled)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json")
    args = p.parse_args(argv)

    gts = {name: load_ground_truth(path) for name, path in SAMPLES.items()}
    originals = {name: gt.keypoints[persons(gt)].copy() for name, gt in gts.items()}
    for kp in originals.values():
        kp[..., 2] = (kp[..., 2] > 0).astype(float)
    all_poses = np.concatenate(list(originals.values()))
    offsets = np.cumsum([0] + [len(v) for v in originals.values()])
    truth = {name: offsets[i] + np.arange(len(v)) for i, (name, v) in enumerate(originals.items())}
    index = PoseIndex.build(all_poses, method="exact")
    every, jitter, pub, heavy = profiles()
    report = {"machine": machine(), "index_poses": len(index), "persons": {k: len(v) for k, v in originals.items()},
              "seed": args.seed, "rows": {}}
    rows = report["rows"]
    t0 = time.perf_counter()
    q_every = synthesized(gts, every, args.seed)
    rows["jitter, every joint"] = rates(index, q_every, truth)
    rows["jitter, every joint, --mirror"] = rates(index, q_every, truth, True)
    rows["jitter, every joint, unlabelled joints placed"] = rates(index, synthesized(gts, every, args.seed, True),
                                                                  truth)
    rows["jitter, published rates"] = rates(index, synthesized(gts, jitter, args.seed + 1), truth)
    flipped = {k: mirror(v) for k, v in q_every.items()}
    rows["mirrored, without --mirror"] = rates(index, flipped, truth)
    rows["mirrored, --mirror"] = rates(index, flipped, truth, True)
    images = {"val": args.val_images, "train": args.train_images}
    for label, profile, seed in (("published errors", pub, args.seed + 2),
                                 ("inversions and swaps x3", heavy, args.seed + 3)):
        q = synthesized(gts, profile, seed)
        rows[f"{label}, as synthesized"] = rates(index, q, truth)
        if args.checkpoint:
            refined = refine(args.checkpoint, gts, q, images)
            rows[f"{label}, as synthesized (refined subset)"] = rates(index, {k: q[k] for k in refined}, truth)
            rows[f"{label}, refined first"] = rates(index, refined, truth)
    report["seconds"] = time.perf_counter() - t0
    print(f"pose search on the bundled samples: {len(index)} GT persons indexed "
          f"({', '.join(f'{k} {v}' for k, v in report['persons'].items())}); rank-1 / top-5 rate of finding the "
          "original")
    print(f"{'queries':50s} {'n':>5s} {'rank 1':>8s} {'top 5':>8s}   per sample rank 1")
    for name, r in rows.items():
        per = "  ".join(f"{k} {v['rank1'] * 100:5.1f}%" for k, v in r.items() if k != "all")
        a = r["all"]
        print(f"{name:50s} {a['queries']:5d} {a['rank1'] * 100:7.1f}% {a['top5'] * 100:7.1f}%   {per}")
    if args.json:
        write(args.json, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
