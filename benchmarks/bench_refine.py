"""Refinement in process: persons/s, where each person's time goes, and how far that is from the arithmetic limit.

    python benchmarks/bench_refine.py [--device cpu|cuda] [--backbones resnet50] [--sizes 256x192 384x288]
                                      [--batches 1 8 32] [--variants fp32 rendered ...] [--json PATH]

The persons are the bundled COCO val sample's annotated persons (their GT with seeded jitter as the input
pose), cycled over their real JPEG images until a batch is full. For each backbone, crop size, variant and
batch size, the stages of ``posefix.refiner.Refiner`` are timed one after another (the device synchronised
after each):

  decode   the batch's JPEG files → uint8 tensors (torchvision.io, ``posefix.images.decode``);
  crop     boxes and affines from the input poses, bilinear crops on the device, poses into crop pixels;
  model    the refiner's forward pass (which renders the input pose: its 1-D Gaussian factors) and soft-argmax;
  back     refined coordinates to the host and through each crop's affine back into image pixels;
  render   of the model's time, the part that renders the input pose, timed alone on the same batch: the 1-D
           Gaussian factors (``codec.gaussian_axes``) for the fused-stem variants, the 17 full-resolution maps
           (``codec.render_heatmaps``) for ``rendered``. It is inside ``model``, not added to the sum.

``serial/s`` is persons over the four stages' sum; ``piped/s`` is what ``refine_images`` (the offline
path: decoding in ``--workers`` background threads while the model runs) delivers over many batches; on a
fast GPU, JPEG decoding on the CPU (about 1.7 ms per 640×480 image per core) can bound it. ``floor/s`` is the
arithmetic limit: the device's measured matrix-multiply peak in the variant's dtype over the model's
multiply-adds per person (counted by torch's FlopCounterMode); ``of floor`` is piped/s over it.

Variants: ``fp32`` (fused stem, the default path), ``rendered`` (fp32, 17 rendered full-resolution maps
into the stem: the plain path), ``cl`` (fp32 channels_last), ``bf16`` (bfloat16 autocast), ``bf16-cl``,
``bf16-cl-compile`` (torch.compile, default mode) and ``bf16-cl-cudagraphs`` (torch.compile
"reduce-overhead": CUDA graphs). A variant that fails to build or run is reported as failed, not hidden.
Defaults: on a CPU fp32, rendered and cl, batches 1 8 32; on a GPU every variant, batches 1 16 64 256 1024.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from common import machine, write
from torch.utils.flop_counter import FlopCounterMode

from posefix import SAMPLE_DIR, codec
from posefix.images import decode
from posefix.model import ModelConfig, PoseFixNet
from posefix.refine import refine_images
from posefix.refiner import Refiner
from posefix.runtime import keep_freed_memory

SIGMA = {(256, 192): 7.0, (384, 288): 9.0}
VARIANTS = {  # name: (precision, channels_last, fused_stem, compile mode or None)
    "fp32": ("fp32", False, True, None),
    "rendered": ("fp32", False, False, None),
    "cl": ("fp32", True, True, None),
    "bf16": ("bf16", False, True, None),
    "bf16-cl": ("bf16", True, True, None),
    "bf16-cl-compile": ("bf16", True, True, "default"),
    "bf16-cl-cudagraphs": ("bf16", True, True, "reduce-overhead"),
}
PORT = "the earlier port: 27–30 persons/s on an RTX 2070 SUPER (batch 16, 384×288, ResNet-50)"


def sample_jobs(seed: int = 0) -> list[tuple[Path, np.ndarray]]:
    """(image file, input poses (P, 17, 3)) for each bundled val image with annotated persons."""
    gt = json.loads((SAMPLE_DIR / "person_keypoints_val_sample.json").read_text())
    rng = np.random.default_rng(seed)
    files = {im["id"]: SAMPLE_DIR / "images" / im["file_name"] for im in gt["images"]}
    persons: dict[int, list] = {}
    for ann in gt["annotations"]:
        if ann["num_keypoints"] > 0 and files[ann["image_id"]].exists():
            kp = np.array(ann["keypoints"], dtype=np.float64).reshape(17, 3)
            size = max(ann["bbox"][2], ann["bbox"][3])
            kp[:, :2] += rng.normal(0, 0.03 * size, (17, 2))
            kp[:, 2] = (kp[:, 2] > 0).astype(np.float64)
            persons.setdefault(ann["image_id"], []).append(kp)
    return [(files[i], np.stack(p)) for i, p in persons.items()]


def batch_jobs(jobs, persons: int, start: int = 0):
    """Jobs cycled from ``start`` until they hold ``persons`` persons (the last one trimmed)."""
    out, n, i = [], 0, start
    while n < persons:
        path, poses = jobs[i % len(jobs)]
        take = poses[:persons - n]
        out.append((path, take))
        n += len(take)
        i += 1
    return out


def matmul_peak(device: torch.device, dtype: torch.dtype, sync) -> float:
    """Measured FLOP/s of a large square matrix product in ``dtype`` (best of a few). On a GPU a float32
    product is timed with TF32 allowed, as cuDNN runs the model's float32 convolutions by default
    (``torch.backends.cudnn.allow_tf32``): the floor is that of the arithmetic the model really gets."""
    n = 8192 if device.type == "cuda" else 4096
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = device.type == "cuda" and torch.backends.cudnn.allow_tf32
    try:
        best = float("inf")
        for _ in range(4):
            if sync:
                sync()
            t0 = time.perf_counter()
            for _ in range(10 if device.type == "cuda" else 2):
                a @ b
            if sync:
                sync()
            best = min(best, (time.perf_counter() - t0) / (10 if device.type == "cuda" else 2))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    return 2 * n ** 3 / best


def flops_per_person(model: PoseFixNet, size, device) -> float:
    image = torch.rand(2, 3, *size, device=device)
    kp = torch.tensor([[[size[1] / 2, size[0] / 2, 1.0]] * 17] * 2, device=device)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(image, keypoints=kp)
    return counter.get_total_flops() / 2 / image.shape[0]  # multiply-adds per person


def build(backbone, size, variant, device, batch_size):
    precision, channels_last, fused, mode = VARIANTS[variant]
    torch.manual_seed(0)
    model = PoseFixNet(ModelConfig(backbone=backbone, input_size=size, sigma=SIGMA.get(size, 7.0)))
    model.fused_stem = fused
    refiner = Refiner(model, device=device, batch_size=batch_size, precision=precision, channels_last=channels_last)
    if mode is not None:
        torch._dynamo.reset()  # a fresh compilation per row: no recompile limit reached, no stale CUDA graphs
        refiner.model = torch.compile(refiner.model, mode=mode)
    return refiner


def render_seconds(refiner: Refiner, kp_crop: torch.Tensor, fused: bool, sync, repeat: int) -> float:
    """Best-of-``repeat`` seconds of rendering one batch's input poses as the model does (after a warm-up)."""
    cfg = refiner.cfg
    render = codec.gaussian_axes if fused else codec.render_heatmaps
    best = float("inf")
    for _ in range(repeat + 1):
        t0 = time.perf_counter()
        render(kp_crop, cfg.input_size, cfg.sigma)
        if sync:
            sync()
        best = min(best, time.perf_counter() - t0)
    return best


def stage_times(refiner: Refiner, jobs, sync, repeat: int, fused: bool = True) -> dict:
    """Best-of-``repeat`` seconds of each stage for one batch (after a warm-up); ``render`` is part of ``model``."""
    paths = [p for p, _ in jobs]
    poses = torch.as_tensor(np.concatenate([p for _, p in jobs]))
    index = np.concatenate([np.full(len(p), i) for i, (_, p) in enumerate(jobs)])
    best = {k: float("inf") for k in ("decode", "crop", "model", "back")}
    for _ in range(repeat + 1):
        t0 = time.perf_counter()
        images = [decode(p) for p in paths]
        t1 = time.perf_counter()
        with torch.no_grad():
            crops, kp_crop, affine, _ = refiner.crop(images, index, poses, poses)
            if sync:
                sync()
            t2 = time.perf_counter()
            coords, conf = refiner.infer(crops, kp_crop)
            if sync:
                sync()
            t3 = time.perf_counter()
            refiner.to_image(coords, affine)
            conf.cpu()
        t4 = time.perf_counter()
        for k, t in zip(best, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            best[k] = min(best[k], t)
    with torch.no_grad():
        best["render"] = render_seconds(refiner, kp_crop, fused, sync, repeat)
    return best


def piped_rate(refiner: Refiner, jobs, seconds: float, batches: int, workers: int) -> float:
    """Persons/s of ``refine_images`` over at least ``batches`` batches and at least ``seconds`` s, counted per
    model call from the end of the first (thread start-up, first decodes, allocator warm-up left out)."""
    if not any(len(poses) for _, poses in jobs):
        raise ValueError("jobs: no persons to refine")
    stream = ((n, *jobs[(n + 3) % len(jobs)]) for n in itertools.count())  # the jobs, cycled without end
    count = {"t0": None, "persons": 0}

    def on_call(persons: int) -> None:
        if count["t0"] is None:
            count["t0"] = time.perf_counter()  # the first call is done: count from here
        else:
            count["persons"] += persons

    for _ in refine_images(refiner, stream, workers=workers, lookahead=4 * workers, progress=on_call):
        if (count["t0"] is not None and count["persons"] >= refiner.batch_size * max(batches, 1)
                and time.perf_counter() - count["t0"] >= seconds):
            break
    return count["persons"] / (time.perf_counter() - count["t0"])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--backbones", nargs="+", default=["resnet50"])
    ap.add_argument("--sizes", nargs="+", default=["256x192", "384x288"])
    ap.add_argument("--batches", type=int, nargs="+", default=None)
    ap.add_argument("--variants", nargs="+", default=None, choices=list(VARIANTS))
    ap.add_argument("--repeat", type=int, default=None, help="timed repeats per stage (default 2 CPU, 10 GPU)")
    ap.add_argument("--piped-seconds", type=float, default=None, help="at least this long per piped figure "
                    "(default 0 on a CPU: 2 batches; 5 s on a GPU)")
    ap.add_argument("--workers", type=int, default=None, help="image decoding threads of the piped figure "
                    "(default 2 on a CPU, as posefix refine; every core on a GPU, where decoding can bound it)")
    ap.add_argument("--default-malloc", action="store_true", help="leave glibc's malloc as it is (the posefix "
                    "command keeps freed memory for reuse: posefix.runtime.keep_freed_memory)")
    ap.add_argument("--json", default=str(Path(__file__).parent / "results" / "refine.json"))
    args = ap.parse_args()
    kept = False if args.default_malloc else keep_freed_memory()
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    sync = torch.cuda.synchronize if gpu else None
    batches = args.batches or ([1, 16, 64, 256, 1024] if gpu else [1, 8, 32])
    variants = args.variants or (list(VARIANTS) if gpu else ["fp32", "rendered", "cl"])
    repeat = args.repeat or (10 if gpu else 2)
    piped_seconds = args.piped_seconds if args.piped_seconds is not None else (5.0 if gpu else 0.0)
    sizes = [tuple(int(v) for v in s.lower().split("x")) for s in args.sizes]
    workers = args.workers or ((os.cpu_count() or 2) if gpu else 2)
    jobs = sample_jobs()
    info = machine(args.device)
    info["keep_freed_memory"] = kept
    info["decode_workers"] = workers
    peaks = {"fp32": matmul_peak(device, torch.float32, sync)}
    if any(VARIANTS[v][0] == "bf16" for v in variants):
        peaks["bf16"] = matmul_peak(device, torch.bfloat16, sync)
    print(f"device {device} ({info.get('gpu', info['processor'])}, {info['torch_threads']} threads); "
          "matmul peak " + ", ".join(f"{k} {v / 1e12:.2f} TFLOP/s" for k, v in peaks.items()))
    print(f"{'model':>16} {'variant':>18} {'batch':>5} | {'decode':>7} {'crop':>7} {'model':>8} {'back':>7} "
          f"{'(render)':>8} ms/person"
          f" | {'serial/s':>8} {'piped/s':>8} | {'GMAC':>5} {'floor/s':>8} {'of floor':>8}")
    rows = []
    for backbone in args.backbones:
        for size in sizes:
            macs = None
            for variant in variants:
                for n in batches:
                    label = f"{backbone} {size[0]}x{size[1]}"
                    row = {"backbone": backbone, "size": list(size), "variant": variant, "batch": n}
                    try:
                        refiner = build(backbone, size, variant, device, n)
                        if macs is None:
                            plain = PoseFixNet(ModelConfig(backbone=backbone, input_size=size)).to(device).eval()
                            macs = flops_per_person(plain, size, device)
                            del plain
                        times = stage_times(refiner, batch_jobs(jobs, n), sync, repeat, fused=VARIANTS[variant][2])
                        piped = piped_rate(refiner, jobs, piped_seconds, 2 if not gpu else 8, workers)
                    except Exception as e:  # noqa: BLE001 (a variant that does not hold up is reported)
                        row["failed"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]
                        rows.append(row)
                        print(f"{label:>16} {variant:>18} {n:5d} | failed: {row['failed']}")
                        continue
                    peak = peaks[VARIANTS[variant][0]]
                    floor = peak / (2 * macs)
                    per = {k: 1e3 * v / n for k, v in times.items()}
                    serial = n / sum(v for k, v in times.items() if k != "render")
                    row.update({f"{k}_ms": v for k, v in per.items()})
                    row.update({"serial_per_s": serial, "piped_per_s": piped, "gmac_per_person": macs / 1e9,
                                "peak_flops": peak, "floor_per_s": floor, "of_floor": piped / floor})
                    rows.append(row)
                    print(f"{label:>16} {variant:>18} {n:5d} | {per['decode']:7.2f} {per['crop']:7.2f} "
                          f"{per['model']:8.2f} {per['back']:7.3f} {per['render']:8.4f}           | "
                          f"{serial:8.1f} {piped:8.1f} | "
                          f"{macs / 1e9:5.2f} {floor:8.1f} {100 * piped / floor:7.1f}%")
                    del refiner
                    if gpu:
                        torch.cuda.empty_cache()
    if gpu:
        print(f"for scale, {PORT}")
    write(args.json, {"benchmark": "refine", "rows": rows, "peaks": peaks, "machine": info,
                      "reference": PORT})


if __name__ == "__main__":
    main()
