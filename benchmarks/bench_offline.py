"""Offline refinement of a COCO-val-sized input: the wall time of `posefix refine` over a whole val pass.

    python benchmarks/bench_offline.py [--instances 64000] [--backbone resnet50] [--input-size 384 288]
        [--device cpu|cuda] [--precision fp32|bf16] [--channels-last] [--batch-size 64] [--workers 2]
        [--seconds S] [--seed 0] [--json PATH]

The input: a COCO keypoint results file of ``--instances`` persons (64,000 by default) on about 5,000
images, 12.8 persons per image on average with a negative-binomial spread (a top-down estimator's output
on COCO val2017, duplicate and low-score detections included). Every image is one of the bundled
sample's val2017 photographs (``posefix/sample/images``, reached through ``%012d.jpg`` symbolic links,
as `posefix refine` finds COCO images; links out of the directory, read as `--allow-outside-images` reads
them), and each of its persons is one of that photograph's labelled GT persons with errors synthesized
by ``posefix.synth.coco.synthesize_coco`` at the published rates (its real neighbours in the photograph shape the
swaps and misses). It is generated, seeded, in a separate process into a temporary directory, and timed.

The measured path is the one `posefix refine` runs, in process, with a random-weight ``PoseFixNet``
exported by ``posefix.weights.export_weights``: ``posefix.formats.read_estimates`` reads and validates the
JSON, ``Refiner.from_checkpoint`` loads the weights, ``posefix.refine.refine_estimates`` refines through
``posefix.refine.refine_images``, which decodes each image once in background threads and batches persons
across images, and applies the per-joint choice and the instance scores; ``write_coco_results`` and
``write_json_atomic`` write the output. The weights do not change the work done. On a device that cannot
refine every person in ``--seconds`` (120 s by default on a CPU; no limit on a GPU) the images are refined
in file order until the time is up (an image is not started that would end after it at the rate so far),
and the refinement of the whole input is projected: the first batch as measured, the rest at the persons/s
of the batches after it. Reading, loading and the output are always measured on the whole input (persons
not refined keep their input keypoints, so the output has a full run's size). Peak RSS is that of the
refining process alone.

The reference: PoseFix's own implementation (TensorFlow; its released model a ResNet-152 at 384x288)
took 7 h 27 min 54 s for a COCO val2017 pass on one GTX 1080 Ti (mks0601/PoseFix_RELEASE issue #16). The
full GPU figure, every person refined, nothing projected:

    python benchmarks/bench_offline.py --device cuda [--precision bf16 --channels-last] [--backbone resnet152]

With ``--ray`` (the ray extra) the same input is refined three times, every person each time, side by side:
in process as above, then by ``posefix.distributed.refine_images_ray`` on a local Ray with 1 and with 2
actors (the machine's CPUs split between them; on a GPU, the GPUs; Ray is started before the first run and idles
through the in-process one), in blocks of up to 16 images, 8 blocks
an actor at least. Each run's persons/s is taken over the whole run and after its first result (a model
call in process, a block on Ray: the actors' start and the model's first call left out); the Ray start is
timed apart. ``--seconds`` does not apply there.

    python benchmarks/bench_offline.py --ray --instances 2000 --backbone resnet18 --input-size 256 192
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from common import machine, timed, write

COCO_VAL_INSTANCES = 64_000  # persons in a COCO val2017 results file, on its 5,000 images
PERSONS_PER_IMAGE = COCO_VAL_INSTANCES / 5000
SPREAD = 1.5  # negative-binomial shape of the persons per image: sd about 10 at the mean above
REFERENCE_S = 7 * 3600 + 27 * 60 + 54  # PoseFix_RELEASE, COCO val2017, one GTX 1080 Ti
CPU_SECONDS = 120.0


def _peak_rss_mb() -> float:
    """This process's peak RSS: VmHWM where /proc has it (getrusage's figure on Linux carries over the
    parent's peak into a spawned child), else getrusage's."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _rss_mb() -> float | None:
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def persons_per_image(rng: np.random.Generator, instances: int) -> np.ndarray:
    """Persons on each image, at least one, 12.8 on average, summing to ``instances``."""
    mean = PERSONS_PER_IMAGE - 1
    counts = np.zeros(0, dtype=np.int64)
    while counts.sum() < instances:
        draw = 1 + rng.negative_binomial(SPREAD, SPREAD / (SPREAD + mean), size=max(64, int(instances / mean)))
        counts = np.concatenate([counts, draw])
    total = np.cumsum(counts)
    last = int(np.searchsorted(total, instances))
    counts = counts[:last + 1]
    counts[-1] -= total[last] - instances
    return counts


def generate(directory: str, instances: int, seed: int) -> dict:
    """Write ``directory``/images (links to the sample's photographs) and ``directory``/input.json;
    return what was made and how long each step took."""
    from dataclasses import replace

    from posefix import SAMPLE_DIR
    from posefix.fileio import write_json_atomic
    from posefix.synth.coco import synthesize_coco
    from posefix.synth.cocoio import load_ground_truth

    directory = Path(directory)
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    gt = load_ground_truth(SAMPLE_DIR / "person_keypoints_val_sample.json")
    files = {im["id"]: SAMPLE_DIR / "images" / im["file_name"] for im in gt.doc["images"]}
    labelled = ~gt.crowd & (gt.keypoints[..., 2] > 0).any(-1)
    photos = np.array(sorted({int(i) for i in gt.image_ids[labelled]}), dtype=np.int64)
    rows = [np.flatnonzero(gt.image_ids == p) for p in photos]  # every annotation of the photograph
    people = np.array([int(labelled[r].sum()) for r in rows], dtype=np.int64)

    counts = persons_per_image(rng, instances)
    n_images = counts.size
    photo = rng.integers(photos.size, size=n_images)
    rounds = -(-counts // people[photo])  # whole copies of the photograph's persons, synthesized anew each
    copy_image = np.repeat(np.arange(n_images), rounds)
    take = np.concatenate([rows[photo[i]] for i in copy_image])
    copy_of_row = np.repeat(np.arange(copy_image.size), [rows[photo[i]].size for i in copy_image])
    big = replace(gt, ids=np.arange(take.size, dtype=np.int64), image_ids=copy_of_row,
                  keypoints=gt.keypoints[take], areas=gt.areas[take], boxes=gt.boxes[take], crowd=gt.crowd[take],
                  image_ids_all=frozenset(range(copy_image.size)), doc={})
    synthesized, _ = synthesize_coco(big, rng)
    image_of = copy_image[np.array([r["image_id"] for r in synthesized], dtype=np.int64)]
    first = np.searchsorted(image_of, image_of)  # each image's persons are contiguous, images in order
    keep = np.flatnonzero(np.arange(image_of.size) - first < counts[image_of])
    assert keep.size == instances
    results = []
    for n in keep:
        r = synthesized[n]
        kp = np.asarray(r["keypoints"]).reshape(17, 3)
        xy = kp[kp[:, 2] > 0, :2] if (kp[:, 2] > 0).any() else kp[:, :2]
        lo, hi = xy.min(0), xy.max(0)
        w, h = hi - lo
        w, h = max(w, h * 0.75), max(h, w / 0.75)
        results.append({"image_id": int(image_of[n]) + 1, "category_id": 1, "keypoints": r["keypoints"],
                        "score": r["score"], "center": ((lo + hi) / 2).tolist(),
                        "scale": [1.25 * w / 200, 1.25 * h / 200]})
    t_synth = time.perf_counter() - t0

    t0 = time.perf_counter()
    images = directory / "images"
    images.mkdir()
    for i in range(n_images):
        os.symlink(files[int(photos[photo[i]])], images / f"{i + 1:012d}.jpg")
    t_links = time.perf_counter() - t0
    t0 = time.perf_counter()
    write_json_atomic(directory / "input.json", results)
    t_write = time.perf_counter() - t0
    return {"instances": instances, "images": int(n_images), "photographs": int(photos.size),
            "gt_persons": int(people.sum()), "synthesized": len(synthesized),
            "persons_per_image": {"mean": float(counts.mean()), "sd": float(counts.std()),
                                  "median": float(np.median(counts)), "max": int(counts.max())},
            "synthesis_s": t_synth, "links_s": t_links, "write_s": t_write,
            "input_mb": (directory / "input.json").stat().st_size / 2 ** 20, "peak_rss_mb": _peak_rss_mb()}


def decode_ms(images_dir: Path) -> float:
    """Decoding one of the sample's photographs, on one thread, ms (median image)."""
    import torch

    from posefix.images import decode

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        per = [timed(lambda p=p: decode(p), 3) for p in sorted(images_dir.glob("*.jpg"))]
    finally:
        torch.set_num_threads(threads)
    return 1e3 * float(np.median(per))


def refine_offline(work: Path, checkpoint: Path, args, seconds: float | None) -> dict:
    """`posefix refine --format coco` on work/input.json, stopping new images once ``seconds`` are up."""
    from tqdm import tqdm

    from posefix.fileio import write_json_atomic
    from posefix.formats import image_file, image_ids, read_estimates, write_coco_results
    from posefix.options import RefineOptions
    from posefix.refine import by_image, refine_estimates, refine_images
    from posefix.refiner import Refiner
    from posefix.runtime import keep_freed_memory

    out = {"keep_freed_memory": keep_freed_memory(),  # as the posefix command does for refine
           "rss_before_read_mb": _rss_mb(), "load_average_before": os.getloadavg()[0]}
    t0 = time.perf_counter()
    est = read_estimates(work / "input.json", "coco")
    out["read_s"] = time.perf_counter() - t0
    out["rss_after_read_mb"] = _rss_mb()

    t0 = time.perf_counter()
    refiner = Refiner.from_checkpoint(checkpoint, RefineOptions(device=args.device, batch_size=args.batch_size,
                                                                precision=args.precision,
                                                                channels_last=args.channels_last))
    out["load_s"] = time.perf_counter() - t0

    model_s = [0.0]
    plain_refine = refiner.refine

    def refine_timed(*a, **k):
        t = time.perf_counter()
        try:
            return plain_refine(*a, **k)
        finally:
            model_s[0] += time.perf_counter() - t

    refiner.refine = refine_timed

    n = len(est.image_keys)
    groups = by_image(est.image_keys)
    sources = {key: image_file(work / "images", key, allow_outside=True) for key in groups}  # links to the sample
    t_start = time.perf_counter()
    deadline = t_start + seconds if seconds else float("inf")
    handed = [0]  # persons given to refine_images
    batches = [(t_start, 0)]  # (when, persons refined by then) after each model batch

    def in_time(jobs):
        # refine_images reads images ahead of the model, so an image is handed over only while the
        # persons already handed over and its own can be refined before the deadline at the rate of the
        # batches after the first (which also pays for first-touch allocations).
        for key, source, poses in jobs:
            now = time.perf_counter()
            if now >= deadline:
                return
            if len(batches) > 2:
                (t1, p1), (t, p) = batches[1], batches[-1]
                if t + (handed[0] - p + len(poses)) * (t - t1) / (p - p1) > deadline:
                    return
            handed[0] += len(poses)
            yield key, source, poses

    def progress(k):
        batches.append((time.perf_counter(), batches[-1][1] + k))
        bar.update(k)

    def run(jobs):  # refine_images as posefix refine runs it, on the images that fit in the time
        return refine_images(refiner, in_time(jobs), workers=args.workers, progress=progress)

    cpu = os.times()
    with tqdm(total=n, unit="person", file=sys.stderr, mininterval=0.5, disable=None) as bar:
        refined = refine_estimates(refiner, est, sources, run=run)  # persons not refined keep their input
    out["refine_s"] = time.perf_counter() - t_start
    out["refine_user_s"], out["refine_sys_s"] = os.times().user - cpu.user, os.times().system - cpu.system
    out["refine_calls_s"] = model_s[0]
    out["persons_refined"] = int(refined.refined.sum())
    out["images_refined"] = sum(bool(refined.refined[rows[0]]) for rows in groups.values())
    out["batches"] = [[t - t_start, p] for t, p in batches[1:]]

    t0 = time.perf_counter()
    results = write_coco_results(est, refined.xy, refined.conf, refined.scores, image_ids(est), refined.kept)
    out["build_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    write_json_atomic(work / "refined.json", results)
    out["write_s"] = time.perf_counter() - t0
    out["output_mb"] = (work / "refined.json").stat().st_size / 2 ** 20
    out["persons"], out["images"] = n, len(groups)
    out["peak_rss_mb"] = _peak_rss_mb()
    return out


def _after_first(points) -> float:
    """Persons/s after the first result, from (seconds, persons done by then) points: the rate a long run
    keeps, once the model is loaded and has run once."""
    (t0, p0), (t1, p1) = points[0], points[-1]
    return (p1 - p0) / (t1 - t0) if t1 > t0 else p1 / t1


def refine_ray(work: Path, checkpoint: Path, args, actors: int) -> dict:
    """``refine_images_ray`` over every person of work/input.json with ``actors`` actors."""
    import torch

    from posefix.distributed import refine_images_ray
    from posefix.formats import image_file, read_estimates
    from posefix.options import RefineOptions

    est = read_estimates(work / "input.json", "coco")
    groups: dict = {}
    for i, key in enumerate(est.image_keys):
        groups.setdefault(key, []).append(i)
    jobs = [(key, image_file(work / "images", key, allow_outside=True), est.keypoints[rows])
            for key, rows in groups.items()]
    gpus = min(torch.cuda.device_count() / actors, 1.0) if args.device == "cuda" else 0.0
    points, load = [], os.getloadavg()[0]
    t_start = time.perf_counter()

    def progress(k):
        points.append((time.perf_counter() - t_start, (points[-1][1] if points else 0) + k))

    images, block = 0, max(1, min(16, len(jobs) // (8 * actors)))  # 8 blocks an actor at least
    options = RefineOptions(device=args.device, batch_size=args.batch_size, precision=args.precision,
                            channels_last=args.channels_last)
    for _ in refine_images_ray(checkpoint, jobs, options, actors=actors, images_per_block=block, num_gpus=gpus,
                               workers=args.workers, progress=progress, show_progress=False):
        images += 1
    elapsed = time.perf_counter() - t_start
    return {"actors": actors, "persons": int(points[-1][1]), "images": images, "images_per_block": block,
            "refine_s": elapsed,
            "first_result_s": points[0][0], "persons_per_s": points[-1][1] / elapsed,
            "persons_per_s_after_first": _after_first(points), "load_average_before": load}


def compare_ray(work: Path, checkpoint: Path, args) -> dict:
    """In process, then on a local Ray with 1 and 2 actors, every person each time; prints the table."""
    import logging

    import ray

    t0 = time.perf_counter()
    ray.init(include_dashboard=False, logging_level=logging.WARNING)  # first: a busy host may not start it in time
    start_s = time.perf_counter() - t0
    try:
        base = refine_offline(work, checkpoint, args, 0.0)
        rows = [{"run": "in process (posefix refine)", "persons": base["persons_refined"],
                 "refine_s": base["refine_s"], "first_result_s": base["batches"][0][0],
                 "persons_per_s": base["persons_refined"] / base["refine_s"],
                 "persons_per_s_after_first": _after_first(base["batches"]),
                 "load_average_before": base["load_average_before"]}]
        for actors in (1, 2):
            print(f"refining on Ray with {actors} actor(s) ...", file=sys.stderr)
            run = refine_ray(work, checkpoint, args, actors)
            rows.append({"run": f"Ray Data, {actors} actor{'s' if actors > 1 else ''}", **run})
    finally:
        ray.shutdown()
    ref = rows[0]["persons_per_s_after_first"]
    print(f"\n{'run':30s} {'persons':>8s} {'seconds':>8s} {'first':>7s} {'persons/s':>10s} {'after 1st':>10s} "
          f"{'vs in process':>14s} {'load':>5s}")
    for r in rows:
        r["ratio_to_in_process"] = r["persons_per_s_after_first"] / ref
        print(f"{r['run']:30s} {r['persons']:8d} {r['refine_s']:8.1f} {r['first_result_s']:7.1f} "
              f"{r['persons_per_s']:10.1f} {r['persons_per_s_after_first']:10.1f} "
              f"{r['ratio_to_in_process']:13.2f}x {r['load_average_before']:5.1f}")
    print(f"\nRay started in {start_s:.1f} s (not in the runs' seconds); 'first': seconds to the first refined "
          "image (the actors' start included); 'after 1st': persons/s after the first result (a model call in "
          "process, a block of images on Ray)")
    return {"rows": rows, "ray_start_s": start_s, "ray": ray.__version__}


def _hms(s: float) -> str:
    if s >= 3600:
        m = round(s / 60)
        return f"{m // 60} h {m % 60:02d} min"
    s = round(s)
    return f"{s // 60} min {s % 60:02d} s"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--instances", type=int, default=64_000, help="persons in the input (64000)")
    ap.add_argument("--backbone", default="resnet50", help="resnet18/34/50/101/152 (resnet50)")
    ap.add_argument("--input-size", type=int, nargs=2, default=[384, 288], metavar=("H", "W"),
                    help="the model's input size (384 288)")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--precision", default="fp32", choices=("fp32", "bf16"),
                    help="the model's arithmetic, as posefix refine --precision (fp32)")
    ap.add_argument("--channels-last", action="store_true", help="NHWC memory layout, as posefix refine's")
    ap.add_argument("--batch-size", type=int, default=64, help="persons per model call (64, the CLI's)")
    ap.add_argument("--workers", type=int, default=2, help="image decoding threads (2, the CLI's)")
    ap.add_argument("--seconds", type=float, default=None,
                    help=f"stop refining new images after this long ({CPU_SECONDS:g} on cpu; "
                         "cuda: no limit); 0 = refine every person")
    ap.add_argument("--seed", type=int, default=0, help="seed of the generated input (0)")
    ap.add_argument("--ray", action="store_true", help="also refine on a local Ray with 1 and 2 actors, side by side")
    ap.add_argument("--json", default=None, help="where to write the numbers (results/offline.json; "
                    "results/offline_ray.json with --ray)")
    args = ap.parse_args()
    if args.json is None:
        args.json = str(Path(__file__).parent / "results" / ("offline_ray.json" if args.ray else "offline.json"))
    if args.instances < 1:
        ap.error("--instances must be at least 1")
    if args.seconds is not None and args.seconds < 0:
        ap.error("--seconds must not be negative")
    seconds = args.seconds if args.seconds is not None else (CPU_SECONDS if args.device == "cpu" else 0.0)

    import torch

    from posefix import SAMPLE_DIR
    from posefix.model import ModelConfig, PoseFixNet
    from posefix.weights import export_weights

    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is available")
    h, w = args.input_size
    cfg = ModelConfig(backbone=args.backbone, input_size=(h, w), sigma=9.0 if h >= 384 else 7.0 * h / 256)
    with tempfile.TemporaryDirectory(prefix="posefix-offline-") as tmp:
        work = Path(tmp)
        print(f"generating {args.instances:,} persons (seed {args.seed}) in {work} ...", file=sys.stderr)
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            gen = pool.submit(generate, tmp, args.instances, args.seed).result()
        torch.manual_seed(args.seed)
        checkpoint = work / "model.safetensors"
        export_weights(PoseFixNet(cfg), checkpoint, {"benchmark": "random weights"})
        if args.ray:
            print(f"refining in process on {args.device} ({args.backbone} {h}x{w} {args.precision}, batch "
                  f"{args.batch_size}, every person) ...", file=sys.stderr)
            report = compare_ray(work, checkpoint, args)
            write(args.json, {"benchmark": "offline_ray", "config": {
                "instances": args.instances, "backbone": args.backbone, "input_size": [h, w], "device": args.device,
                "precision": args.precision, "batch_size": args.batch_size, "workers": args.workers,
                "seed": args.seed}, "generation": gen, **report, "machine": machine(args.device)})
            return
        print(f"refining on {args.device} ({args.backbone} {h}x{w} {args.precision}, batch {args.batch_size}"
              + (f", at most {seconds:g} s" if seconds else ", every person") + ") ...", file=sys.stderr)
        run = refine_offline(work, checkpoint, args, seconds)
    dec_ms = decode_ms(SAMPLE_DIR / "images")

    n, done = run["persons"], run["persons_refined"]
    complete = done == n
    rate = done / run["refine_s"]
    # After the first batch: the rate a long run keeps (where there are later batches to measure it).
    (t1, p1), (t2, p2) = run["batches"][0], run["batches"][-1]
    steady = (p2 - p1) / (t2 - t1) if p2 > p1 else rate
    refine_all_s = run["refine_s"] if complete else t1 + (n - p1) / steady
    fixed_s = run["read_s"] + run["load_s"] + run["build_s"] + run["write_s"]
    wall_s = fixed_s + refine_all_s
    # The reference is a COCO val2017 pass: a smaller or larger input is scaled to its size.
    scale = COCO_VAL_INSTANCES / n
    val_s = run["load_s"] + scale * (fixed_s - run["load_s"]) + (
        refine_all_s if n == COCO_VAL_INSTANCES else t1 + (COCO_VAL_INSTANCES - p1) / steady)
    ratio = REFERENCE_S / val_s
    info = machine(args.device)
    where = info.get("gpu") or f"{info['processor']}, {info['cpu_count']} cores, {info['torch_threads']} torch threads"
    kind = "measured" if complete else "PROJECTED"
    ppi = gen["persons_per_image"]

    print(f"\noffline refinement, {n:,} persons on {run['images']:,} images ({ppi['mean']:.1f} per image, "
          f"sd {ppi['sd']:.1f}, max {ppi['max']}; {gen['photographs']} sample photographs, "
          f"{gen['gt_persons']} GT persons)")
    layout = ", channels_last" if args.channels_last else ""
    print(f"device {args.device} ({where}); {args.backbone} {h}x{w} {args.precision}{layout}, random weights; "
          f"batch {args.batch_size}, {args.workers} decode threads; load average {run['load_average_before']:.1f} "
          "before refining\n")
    print(f"{'stage':44s} {'seconds':>10s}  note")
    print("-" * 100)
    rows = [
        ("generate: synthesize persons", gen["synthesis_s"],
         f"{gen['synthesized']:,} synthesized, {n:,} kept; separate process"),
        ("generate: link images", gen["links_s"], f"{gen['images']:,} links to the sample's photographs"),
        ("generate: write input JSON", gen["write_s"], f"{gen['input_mb']:.0f} MB"),
        ("read + validate input (read_estimates)", run["read_s"], f"{n:,} persons"),
        ("load checkpoint", run["load_s"], ""),
        (f"refine {done:,} persons on {run['images_refined']:,} images", run["refine_s"],
         f"{rate:.1f} persons/s; {steady:.1f} after the first batch ({p1} persons, {t1:.1f} s)"),
        ("  in Refiner.refine (crops, heatmaps, model)", run["refine_calls_s"],
         f"{len(run['batches'])} model calls (full batches but the last), "
         f"{done / len(run['batches']):.1f} persons on average "
         + f"(at most {args.batch_size})"),
        ("  elsewhere (waiting for decoded images...)", run["refine_s"] - run["refine_calls_s"],
         f"decoding takes {dec_ms:.1f} ms/image on one thread, in {args.workers} threads beside the model"),
        ("  CPU time while refining", run["refine_user_s"] + run["refine_sys_s"],
         f"user {run['refine_user_s']:.1f} s, system {run['refine_sys_s']:.1f} s: "
         + f"{(run['refine_user_s'] + run['refine_sys_s']) / run['refine_s']:.1f} cores busy on average"),
        ("build output records", run["build_s"], f"{n:,} persons"),
        ("write output JSON (atomic)", run["write_s"], f"{run['output_mb']:.0f} MB"),
    ]
    for name, s, note in rows:
        print(f"{name:44s} {s:10.1f}  {note}")
    print("-" * 100)
    if not complete:
        print(f"{f'refine all {n:,} persons':44s} {refine_all_s:10.0f}  PROJECTED: the first batch, then "
              f"{steady:.1f} persons/s on {args.device} ({100 * done / n:.1f}% refined)")
    print(f"{f'wall time, {n:,} persons':44s} {wall_s:10.0f}  {_hms(wall_s)}, {kind} on {args.device} ({where})")
    if n != COCO_VAL_INSTANCES:
        kind = "PROJECTED"
        print(f"{f'wall time, {COCO_VAL_INSTANCES:,} persons':44s} {val_s:10.0f}  {_hms(val_s)}, PROJECTED "
              f"(scaled from {n:,}) on {args.device}")
    print(f"{'reference PoseFix, COCO val2017':44s} {REFERENCE_S:10.0f}  {_hms(REFERENCE_S)} on one GTX 1080 Ti")
    print(f"{'reference / this':44s} {ratio:9.2f}x  "
          + ("faster" if ratio >= 1 else "slower") + f" than the reference ({kind.lower()}, {args.device})")
    print(f"peak RSS: refining process {run['peak_rss_mb']:,.0f} MB (before reading the input "
          f"{run['rss_before_read_mb'] or 0:,.0f} MB, after {run['rss_after_read_mb'] or 0:,.0f} MB); "
          f"generating process {gen['peak_rss_mb']:,.0f} MB")

    write(args.json, {
        "benchmark": "offline",
        "config": {"instances": args.instances, "backbone": args.backbone, "input_size": [h, w],
                   "sigma": cfg.sigma, "device": args.device, "precision": args.precision,
                   "channels_last": args.channels_last, "batch_size": args.batch_size,
                   "workers": args.workers, "seconds": seconds or None, "seed": args.seed},
        "generation": gen,
        "refine": {**run, "persons_per_s": rate, "persons_per_s_after_first_batch": steady, "complete": complete,
                   "decode_ms_per_image": dec_ms},
        "wall": {"seconds": wall_s, "projected": not complete, "refine_s": refine_all_s, "other_s": fixed_s,
                 "coco_val_seconds": val_s, "coco_val_projected": not complete or n != COCO_VAL_INSTANCES},
        "reference": {"seconds": REFERENCE_S, "what": "PoseFix_RELEASE, COCO val2017, one GTX 1080 Ti "
                      "(mks0601/PoseFix_RELEASE issue #16)", "ratio": ratio},
        "machine": info,
    })


if __name__ == "__main__":
    main()
