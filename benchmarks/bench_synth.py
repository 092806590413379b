"""Synthesis throughput: the vectorised synthesizer against the plain per-joint rejection sampler.

Both run the same rules on the same real COCO persons (the bundled train + val sample), side by side
in one process on one core. Then the whole pipeline (`posefix.synth.coco.synthesize_coco`: overlaps, synthesis,
results) on a COCO-train2017-sized set made by repeating the sample's images; then `posefix synth` itself,
end to end in a subprocess (reading the annotations, writing results and labels), on a generated file of
about 40,000 persons, and on crowd images of 93 and 930 persons each, with its peak RSS. ``--baseline-tree``
runs the same commands from another posefix source tree (e.g. ``git archive`` of an earlier commit) side by
side; every CLI run is capped in address space (``--memory-limit-gb``) and time (``--timeout``).

Then ``posefix synth --out DIR --variants V`` (dataset directories) at COCO-train scale (150,000 persons × 10
variants) and at other sizes, with peak RSS, to show that memory does not grow with the dataset.

    python benchmarks/bench_synth.py [--persons 150000] [--reference-persons 240] [--cli-persons 40000]
        [--crowd 93 930] [--baseline-tree DIR] [--dataset-sizes 150000x10 150000x2 37500x10] [--only-datasets]
        [--json out.json]
"""
from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # one core, as the reference figures are

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from posefix import SAMPLE_DIR
from posefix.synth.coco import MIN_AREA, overlaps, synthesize_coco
from posefix.synth.cocoio import load_ground_truth
from posefix.synth.reference import synthesize_reference
from posefix.synth.synthesize import synthesize


def sample_persons():
    """Real persons with their overlapping labelled persons, grouped by overlap count."""
    groups = {}
    for name in ("person_keypoints_train_sample.json", "person_keypoints_val_sample.json"):
        gt = load_ground_truth(SAMPLE_DIR / name)
        ov, near = overlaps(gt)
        for i in np.flatnonzero(~gt.crowd & (gt.keypoints[..., 2] > 0).any(-1)):
            m = near[i].size
            groups.setdefault(min(m, 3), []).append((gt.keypoints[i], max(gt.areas[i], MIN_AREA),
                                                     gt.keypoints[near[i][:3]],
                                                     np.maximum(gt.areas[near[i][:3]], MIN_AREA), ov[i]))
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


def annotations_doc(target_persons: int) -> tuple[dict, int]:
    """A COCO annotations document: the sample's train + val images that have a labelled person, repeated
    (new ids) to ``target_persons`` labelled persons. Returns it and its labelled, non-crowd person count."""
    docs = []
    for name in ("person_keypoints_train_sample.json", "person_keypoints_val_sample.json"):
        d = json.loads((SAMPLE_DIR / name).read_text())
        labelled = [a for a in d["annotations"] if not a.get("iscrowd") and any(a["keypoints"][2::3])]
        keep = {a["image_id"] for a in labelled}
        docs.append(([im for im in d["images"] if im["id"] in keep],
                     [a for a in d["annotations"] if a["image_id"] in keep], len(labelled)))
    per_copy = sum(d[2] for d in docs)
    copies = -(-target_persons // per_copy)
    images, anns = [], []
    for c in range(copies):
        for k, (ims, part, _) in enumerate(docs):
            offset = (2 * c + k) * 10 ** 7
            images += [{**im, "id": im["id"] + offset} for im in ims]
            anns += [{**a, "id": a["id"] + offset, "image_id": a["image_id"] + offset} for a in part]
    return {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "person"}]}, per_copy * copies


def crowd_doc(per_image: int, images: int, seed: int = 0) -> dict:
    """Crowd images: ``per_image`` of the sample's labelled persons each, scaled to 120 px boxes and laid on
    a jittered grid 60 px apart, so that each overlaps its neighbours (box IoU >= 0.1) but not the rest."""
    rng = np.random.default_rng(seed)
    src = [a for n in ("person_keypoints_train_sample.json", "person_keypoints_val_sample.json")
           for a in json.loads((SAMPLE_DIR / n).read_text())["annotations"]
           if not a.get("iscrowd") and any(a["keypoints"][2::3]) and a["bbox"][3] > 1]
    cols = int(np.ceil(np.sqrt(per_image)))
    doc = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "person"}]}
    for im in range(images):
        doc["images"].append({"id": im + 1, "file_name": f"crowd_{im:06d}.jpg", "width": cols * 60 + 120,
                              "height": -(-per_image // cols) * 110 + 120})
        for k in range(per_image):
            a = src[int(rng.integers(len(src)))]
            x, y, w, h = a["bbox"]
            s = 120.0 / h
            cx, cy = 60 + 60 * (k % cols) + rng.uniform(-15, 15), 60 + 110 * (k // cols) + rng.uniform(-15, 15)
            kp = np.array(a["keypoints"], dtype=np.float64).reshape(17, 3)
            kp[:, 0] = np.where(kp[:, 2] > 0, (kp[:, 0] - x - w / 2) * s + cx, 0)
            kp[:, 1] = np.where(kp[:, 2] > 0, (kp[:, 1] - y - h / 2) * s + cy, 0)
            doc["annotations"].append({
                "id": len(doc["annotations"]) + 1, "image_id": im + 1, "category_id": 1, "iscrowd": 0,
                "keypoints": np.round(kp, 2).ravel().tolist(), "num_keypoints": int((kp[:, 2] > 0).sum()),
                "bbox": [cx - w * s / 2, cy - 60.0, w * s, 120.0], "area": float(a["area"] * s * s)})
    return doc


def run_dataset_cli(gt: Path, out: Path, variants: int, limit_gb: float, timeout: float,
                    tree: str | None = None) -> dict:
    """``posefix synth --gt GT --out DIR --variants V`` in a subprocess on one core, from source tree ``tree``
    (default this one): wall and CPU time, peak RSS."""
    cap = int(limit_gb * 2 ** 30)
    peak = out.parent / "peak.txt"
    peak.unlink(missing_ok=True)
    start = (f"import atexit, resource, runpy, sys; resource.setrlimit(resource.RLIMIT_AS, ({cap}, {cap})); "
             f"atexit.register(lambda: open({str(peak)!r}, 'w').write(next(line.split()[1] for line "
             "in open('/proc/self/status') if line.startswith('VmHWM')))); sys.argv = ['posefix'] + sys.argv[1:]; "
             "runpy.run_module('posefix', run_name='__main__')")
    env = {**os.environ, "PYTHONPATH": str(Path(tree or Path(__file__).resolve().parent.parent).resolve())}
    import resource
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    try:
        r = subprocess.run([sys.executable, "-c", start, "synth", "--gt", str(gt), "--out", str(out), "--variants",
                            str(variants)], env=env, cwd=out.parent, capture_output=True, text=True, timeout=timeout,
                           check=False)
        ok, why = r.returncode == 0, (r.stderr.strip().splitlines() or [""])[-1][:120]
    except subprocess.TimeoutExpired:
        ok, why = False, "timed out"
    seconds = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    records = json.loads((out / "manifest.json").read_text())["records"] if ok else 0
    size = sum(f.stat().st_size for f in out.glob("shard-*")) if out.exists() else 0
    return {"ok": ok, "seconds": seconds, "cpu_seconds": cpu, "person_variants": records,
            "person_variants_per_s": records / seconds if ok else None,
            "person_variants_per_cpu_s": records / cpu if ok and cpu > 0 else None,
            "peak_rss_mb": int(peak.read_text()) / 1024 if peak.exists() else None, "shard_mb": size / 2 ** 20,
            "error": "" if ok else why}


def dataset_section(args) -> list[dict]:
    """`posefix synth --variants` end to end at COCO-train scale, and at other sizes to show memory is flat;
    with ``--baseline-tree``, each size from that tree too, one after the other."""
    import shutil
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        print(f"\n`posefix synth --out DIR --variants V` end to end (subprocess, one core; "
              f"{args.memory_limit_gb:g} GB address-space cap)")
        trees = [("baseline", args.baseline_tree)] * bool(args.baseline_tree) + [("this", None)]
        print(f"{'tree':>8} | {'persons':>8} | {'variants':>8} | {'person-variants':>15} | {'s':>7} | {'p-v/s':>8} | "
              f"{'CPU s':>7} | {'p-v/CPU s':>9} | {'peak RSS MB':>11} | {'shards MB':>9}")
        print("-" * 121)
        for persons, variants in args.dataset_sizes:
            doc, n = annotations_doc(persons)
            gt = tmp / "gt.json"
            gt.write_text(json.dumps(doc))
            for label, tree in trees:
                out = tmp / "ds"
                shutil.rmtree(out, ignore_errors=True)
                r = run_dataset_cli(gt, out, variants, args.memory_limit_gb, args.dataset_timeout, tree)
                rows.append({"tree": label, "persons": n, "images": len(doc["images"]), "variants": variants, **r})
                _print_dataset_row(label, n, variants, r)
                shutil.rmtree(out, ignore_errors=True)
    return rows


def _print_dataset_row(label, n, variants, r):
    rate = f"{r['person_variants_per_s']:8,.0f}" if r["ok"] else f"{'-':>8}"
    cpu_rate = f"{r['person_variants_per_cpu_s']:9,.0f}" if r["person_variants_per_cpu_s"] else f"{'-':>9}"
    rss = f"{r['peak_rss_mb']:11,.0f}" if r["peak_rss_mb"] else f"{'-':>11}"
    print(f"{label:>8} | {n:8d} | {variants:8d} | {r['person_variants']:15,d} | {r['seconds']:7.1f} | {rate} | "
          f"{r['cpu_seconds']:7.1f} | {cpu_rate} | {rss} | "
          f"{r['shard_mb']:9.1f}{'' if r['ok'] else '  (' + r['error'] + ')'}")


def run_cli(tree: str, gt: Path, workdir: Path, limit_gb: float, timeout: float) -> dict:
    """``posefix synth --gt GT --out ... --labels ...`` from source tree ``tree`` in a subprocess: wall time,
    peak RSS, and whether it finished within the address-space and time limits."""
    out, labels = workdir / "out.json", workdir / "labels.json"
    cap = int(limit_gb * 2 ** 30)
    peak = workdir / "peak.txt"
    peak.unlink(missing_ok=True)
    # The child caps its own address space, then runs the CLI; at exit it writes its
    # peak RSS (VmHWM: wait4's figure would include the benchmark's own memory, inherited at the fork).
    start = (f"import atexit, resource, runpy, sys; resource.setrlimit(resource.RLIMIT_AS, ({cap}, {cap})); "
             f"atexit.register(lambda: open({str(peak)!r}, 'w').write(next(line.split()[1] for line "
             "in open('/proc/self/status') if line.startswith('VmHWM')))); sys.argv = ['posefix'] + sys.argv[1:]; "
             "runpy.run_module('posefix', run_name='__main__')")
    env = {**os.environ, "PYTHONPATH": str(tree)}
    log = workdir / "stderr.txt"
    t0 = time.perf_counter()
    with open(log, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-c", start, "synth", "--gt", str(gt), "--out", str(out),
                                 "--labels", str(labels)], env=env, cwd=workdir, stdout=subprocess.DEVNULL,
                                stderr=err)  # cwd: no source tree on sys.path before ``tree``
    timed_out = False
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if time.perf_counter() - t0 > timeout and not timed_out:
            proc.kill()
            timed_out = True
        time.sleep(0.02)
    seconds = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    ok = proc.returncode == 0
    persons = len(json.loads(out.read_text())) if ok else 0
    why = "" if ok else ("timed out" if timed_out else
                         (log.read_text(errors="replace").strip().splitlines() or ["failed"])[-1][:120])
    for f in (out, labels):
        f.unlink(missing_ok=True)
    peak_kb = int(peak.read_text()) if peak.exists() else usage.ru_maxrss  # killed: wait4's upper bound
    return {"ok": ok, "seconds": seconds, "persons": persons, "persons_per_s": persons / seconds if ok else None,
            "peak_rss_mb": peak_kb / 1024, "error": why}


def cli_section(args) -> list[dict]:
    """`posefix synth` end to end on the generated files, for this tree and the baseline tree."""
    trees = [("this tree", str(Path(__file__).resolve().parent.parent))]
    if args.baseline_tree:
        trees.insert(0, ("baseline", str(Path(args.baseline_tree).resolve())))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cases = []
        if args.cli_persons:
            doc, n = annotations_doc(args.cli_persons)
            cases.append((f"{n} persons on {len(doc['images'])} images", doc))
        for per_image in args.crowd:
            images = max(1, args.crowd_persons // per_image)
            cases.append((f"crowd: {per_image} persons/image x {images}", crowd_doc(per_image, images)))
        print(f"\n`posefix synth` end to end (subprocess; --labels; {args.memory_limit_gb:g} GB address-space cap, "
              f"{args.timeout:g} s limit)")
        print(f"{'input':>40} | {'tree':>9} | {'s':>7} | {'persons/s':>9} | {'peak RSS MB':>11}")
        print("-" * 90)
        for name, doc in cases:
            gt = tmp / "gt.json"
            gt.write_text(json.dumps(doc))
            for tree_name, tree in trees:
                r = run_cli(tree, gt, tmp, args.memory_limit_gb, args.timeout)
                rows.append({"input": name, "tree": tree_name, "path": tree,
                             "annotations": len(doc["annotations"]), "images": len(doc["images"]), **r})
                rate = f"{r['persons_per_s']:9,.0f}" if r["ok"] else f"{'-':>9}"
                note = "" if r["ok"] else f"  ({r['error']})"
                print(f"{name:>40} | {tree_name:>9} | {r['seconds']:7.2f} | {rate} | {r['peak_rss_mb']:11,.0f}{note}")
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--persons", type=int, default=150_000, help="size of the COCO-scale run (150000)")
    ap.add_argument("--reference-persons", type=int, default=240, help="persons per overlap bin for the plain sampler")
    ap.add_argument("--cli-persons", type=int, default=40_000, help="persons of the end-to-end CLI run (0: none)")
    ap.add_argument("--crowd", type=int, nargs="*", default=[93, 930], help="persons per image of the crowd runs")
    ap.add_argument("--crowd-persons", type=int, default=1860, help="persons in all of each crowd run (1860)")
    ap.add_argument("--baseline-tree", metavar="DIR", help="also run the CLI from this posefix source tree")
    ap.add_argument("--memory-limit-gb", type=float, default=8.0, help="address-space cap of each CLI run (8)")
    ap.add_argument("--timeout", type=float, default=120.0, help="time limit of each CLI run, s (120)")
    ap.add_argument("--no-kernels", action="store_true", help="only the CLI runs")
    ap.add_argument("--dataset-sizes", type=lambda t: tuple(int(x) for x in t.split("x")), nargs="*",
                    default=[(150_000, 10), (150_000, 2), (37_500, 10)], metavar="PERSONSxVARIANTS",
                    help="dataset runs (150000x10 150000x2 37500x10; none: skip)")
    ap.add_argument("--dataset-timeout", type=float, default=1200.0, help="time limit of each dataset run, s")
    ap.add_argument("--only-datasets", action="store_true", help="only the dataset runs")
    ap.add_argument("--json", default=str(Path(__file__).parent / "results" / "synth.json"))
    args = ap.parse_args()
    report = {"benchmark": "synthesis"}
    if not args.no_kernels and not args.only_datasets:
        report.update(kernels(args))
    if not args.only_datasets:
        report["cli"] = cli_section(args)
    report["datasets"] = dataset_section(args)
    report["machine"] = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                         "python": platform.python_version(), "numpy": np.__version__, "threads": 1}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2))
    print(f"numbers written to {args.json}")


def kernels(args) -> dict:

    groups = sample_persons()
    rows = []
    print(f"{'overlapping persons':>20} | {'plain sampler ms/person':>23} | "
          f"{'vectorised ms/person':>20} | {'speed-up':>8}")
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

    return {"rows": rows, "coco_scale": {"persons": n_persons, "images": len(gt.image_ids_all), "seconds": t_all,
                                         "persons_per_s": n_persons / t_all}}


if __name__ == "__main__":
    main()
