"""The real-time table: refiners against a MobileNetV3-Large classifier and BlazePose full, side by side.

    python benchmarks/bench_realtime.py [--models realtime-cpu realtime-cpu-small cpu-small ...]
                                        [--core 0] [--refine-persons 512] [--rounds 3] [--json PATH]
                                        [--blazepose-python /work/venv-mp/bin/python]

For each model (a preset's name, or BACKBONE@HxW with a light head of 64 channels; untrained weights, whose
speed is a trained model's) on real crops of the bundled COCO val sample (the real top-down estimator's
persons, cut as the refiner cuts them), in one process one after another:

  latency   ms per person at batch 1 on one thread, the process pinned to one core (``--core``)
  b8, b32   persons/s at batch 8 and 32 on two threads and both cores
  × yard    the batch-1 latency over the yardstick's: a plain torchvision MobileNetV3-Large classifier at
            224×224, timed on the same core in the same process, call by call in turn with the refiner (torch
            eager for the torch rows, ONNX Runtime fp32 for the ONNX rows)
  refine/s  ``posefix refine --backend onnxruntime`` end to end (JPEG decoding, cropping, the model, writing
            the JSON), on ``--refine-persons`` persons of the sample's real results cycled over its images,
            two threads: what it prints (its refinement loop) and persons over the subprocess's whole wall time

Backends: ``torch`` (eager fp32, BatchNorm folded, contiguous), ``torch-cl`` (the same, channels_last),
``ort-fp32`` and ``ort-int8`` (ONNX Runtime's CPU provider; int8 statically quantised on 64 real crops).
Each timing is the best of ``--repeat`` calls (6 × that at batch 1) after a warm-up; the whole table is measured
``--rounds`` times and each cell reported as its median over rounds (the host may be shared: ratios within one
round are side by side, and the JSON keeps every round).

BlazePose full (MediaPipe's pose landmarker, ``model_complexity=1``) runs in a subprocess of
``--blazepose-python`` — a separate virtual environment with ``mediapipe`` installed, since mediapipe pins its
own numpy (see docs/deployment.md) — pinned to the same core, on the sample's images: the per-frame latency in
video mode (the landmark model on the tracked region, the steady state of a real-time stream) and in still-image
mode (person detector + landmarks on every frame). Without that interpreter the row is reported as unmeasured.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torchvision
from bench_backends import RESULTS, refine_cli
from common import machine, timed, write

from posefix import SAMPLE_DIR
from posefix.config import PRESETS, load_config
from posefix.model import ModelConfig, PoseFixNet
from posefix.onnx_backend import OnnxModel, calibration_crops, export_onnx, quantize_int8
from posefix.refiner import Refiner
from posefix.weights import export_weights

BACKENDS = ("torch", "torch-cl", "ort-fp32", "ort-int8")
BLAZEPOSE = Path(__file__).with_name("blazepose_latency.py")


def model_config(spec: str) -> ModelConfig:
    """A preset's model, or BACKBONE@HxW (σ 7 at 256 rows, scaled with the height; a 64-channel head)."""
    if spec in PRESETS:
        return load_config(preset=spec).model
    backbone, _, size = spec.partition("@")
    h, w = (int(v) for v in size.split("x"))
    return ModelConfig(backbone=backbone, input_size=(h, w), sigma=7.0 * h / 256, head_channels=64)


def pinned(cores: set[int]):
    os.sched_setaffinity(0, cores)


def blazepose(python: str, core: int, frames: int) -> dict:
    if not Path(python).is_file():
        return {"unmeasured": f"no interpreter {python} (a virtual environment with mediapipe; docs/deployment.md)"}
    images = sorted((SAMPLE_DIR / "images").glob("*.jpg"))[:8]
    proc = subprocess.run(["taskset", "-c", str(core), python, str(BLAZEPOSE), "--frames", str(frames),
                           *map(str, images)], capture_output=True, text=True, check=False, timeout=600)
    if proc.returncode != 0:
        return {"unmeasured": (proc.stderr.strip().splitlines() or ["failed"])[-1][:300]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


class Yardstick:
    """A plain torchvision MobileNetV3-Large classifier at 224×224, batch 1: torch eager and ONNX Runtime fp32."""

    def __init__(self):
        import warnings

        import onnxruntime as ort

        self.net = torchvision.models.mobilenet_v3_large(weights=None).eval()
        self.x = torch.rand(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
        with tempfile.TemporaryDirectory(prefix="posefix-yard-") as tmp:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(self.net, (self.x,), f"{tmp}/yard.onnx", dynamo=True, input_names=["x"],
                                  verbose=False)
            options = ort.SessionOptions()
            options.intra_op_num_threads = 1
            options.log_severity_level = 3
            self.session = ort.InferenceSession(f"{tmp}/yard.onnx", options, providers=["CPUExecutionProvider"])

    def torch_call(self):
        with torch.no_grad():
            return self.net(self.x)

    def ort_call(self):
        return self.session.run(None, {"x": self.x.numpy()})


def interleaved(calls: dict, repeat: int) -> dict:
    """Each call's best time over ``repeat`` rounds in which every call runs once, in turn (after one warm-up
    each): on a shared host all of them see the same moments of load, so their ratios stay side by side."""
    for fn in calls.values():
        fn()
    best = dict.fromkeys(calls, float("inf"))
    for _ in range(repeat):
        for name, fn in calls.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def one_model(name: str, model: PoseFixNet, fp32: bytes, int8: bytes, image: np.ndarray, kp: np.ndarray,
              yardstick: Yardstick, args, all_cores: set[int]) -> list[dict]:
    """The model on each backend: batch 1 on one thread and core, interleaved call by call with the yardstick's
    torch and ONNX Runtime runs; then batch 8 and 32 on all cores."""
    rows = []
    for backend in args.backends:
        row = {"model": name, "backbone": model.cfg.backbone, "size": list(model.cfg.input_size),
               "head_channels": model.cfg.head_channels, "backend": backend}
        for threads, batches in ((1, (1,)), (len(all_cores), (8, 32))):
            pinned({args.core} if threads == 1 else all_cores)
            torch.set_num_threads(threads)
            if backend.startswith("torch"):
                refiner = Refiner(model, device="cpu", channels_last=backend == "torch-cl")

                def call(x, k, refiner=refiner):
                    return refiner.infer(x, k)
            else:  # OnnxModel takes torch's thread count
                session = OnnxModel(int8 if backend == "ort-int8" else fp32)

                def call(x, k, session=session):
                    return session(x, keypoints=k)
            for b in batches:
                pick = np.arange(b) % len(image)
                x, k = torch.from_numpy(image[pick]), torch.from_numpy(kp[pick])
                if b == 1:
                    best = interleaved({"model": lambda x=x, k=k, call=call: call(x, k),
                                        "yard_torch": yardstick.torch_call, "yard_ort": yardstick.ort_call},
                                       args.repeat * 6)
                    row["latency_ms"] = 1e3 * best["model"]
                    row["yardstick_torch_ms"] = 1e3 * best["yard_torch"]
                    row["yardstick_ort_fp32_ms"] = 1e3 * best["yard_ort"]
                else:
                    row[f"b{b}_per_s"] = b / timed(lambda x=x, k=k, call=call: call(x, k), args.repeat)
        same = row["yardstick_ort_fp32_ms" if backend.startswith("ort") else "yardstick_torch_ms"]
        row["x_yardstick"] = row["latency_ms"] / same
        row["x_yardstick_torch"] = row["latency_ms"] / row["yardstick_torch_ms"]
        rows.append(row)
        print(f"{name:28s} {backend:9s} {row['latency_ms']:7.2f} ms {row['x_yardstick']:5.2f}x yard "
              f"(yard torch {row['yardstick_torch_ms']:.2f} ms, ORT {row['yardstick_ort_fp32_ms']:.2f} ms) "
              f"{row['b8_per_s']:7.1f}/s {row['b32_per_s']:7.1f}/s", flush=True)
    pinned(all_cores)
    torch.set_num_threads(len(all_cores))
    return rows


def int8_ratios(models: dict, args, all_cores: set[int], batch: int = 32) -> list[dict]:
    """torch fp32 (channels-last and contiguous), ONNX Runtime fp32 and int8 at ``batch`` on all cores, call by
    call in turn (``interleaved``): persons/s and each over the better torch fp32."""
    pinned(all_cores)
    torch.set_num_threads(len(all_cores))
    rows = []
    print(f"int8 against torch fp32, batch {batch}, {len(all_cores)} threads, interleaved:")
    for name, (model, fp32, int8, image, kp) in models.items():
        pick = np.arange(batch) % len(image)
        x, k = torch.from_numpy(image[pick]), torch.from_numpy(kp[pick])
        cl, plain = Refiner(model, device="cpu", channels_last=True), Refiner(model, device="cpu")
        a, b = OnnxModel(fp32), OnnxModel(int8)
        best = interleaved({"torch-cl": lambda: cl.infer(x, k), "torch": lambda: plain.infer(x, k),  # noqa: B023 (called at once)
                            "ort-fp32": lambda: a(x, keypoints=k), "ort-int8": lambda: b(x, keypoints=k)},  # noqa: B023
                           args.repeat * 2)
        torch_best = min(best["torch-cl"], best["torch"])
        row = {"model": name, "batch": batch, **{f"{key}_per_s": batch / t for key, t in best.items()},
               **{f"{key}_x_torch": torch_best / t for key, t in best.items()}}
        rows.append(row)
        print(f"  {name:28s} " + "  ".join(f"{key} {batch / t:6.1f}/s ({torch_best / t:.2f}x)"
                                             for key, t in best.items()), flush=True)
    return rows


def decoding(repeat: int) -> list[dict]:
    """JPEG decoding of the sample's images, one thread: torchvision's decoder (deprecated) and posefix's
    (Pillow) at full size, and Pillow at 1/2 and 1/4 by DCT scaling; median over the images of each one's best
    of ``repeat``."""
    import warnings

    from torchvision.io import ImageReadMode, decode_image

    from posefix.images import decode_encoded

    files = sorted((SAMPLE_DIR / "images").glob("*.jpg"))
    torch.set_num_threads(1)
    ways = {"torchvision full": None, "posefix full": 1, "posefix 1/2": 2, "posefix 1/4": 4}
    rows = []
    for name, reduce in ways.items():
        times = []
        for path in files:
            data = path.read_bytes()
            if reduce is None:
                buffer = torch.frombuffer(bytearray(data), dtype=torch.uint8)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    times.append(timed(lambda b=buffer: decode_image(b, mode=ImageReadMode.RGB), repeat))
            else:
                times.append(timed(lambda d=data, r=reduce: decode_encoded(d, reduce=r), repeat))
        rows.append({"decoder": name, "median_ms": 1e3 * statistics.median(times), "images": len(files)})
    full = rows[1]["median_ms"]
    print("JPEG decoding, one thread, median over the sample's images:")
    for row in rows:
        row["x_posefix_full"] = row["median_ms"] / full
        print(f"  {row['decoder']:18s} {row['median_ms']:7.2f} ms  {row['x_posefix_full']:.2f}x")
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["realtime-cpu", "realtime-cpu-small", "cpu-small",
                                                   "shufflenet_v2_x1_0@256x192"])
    p.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    p.add_argument("--core", type=int, default=0, help="the core batch-1 latency and BlazePose are pinned to")
    p.add_argument("--refine-persons", type=int, default=512, help="posefix refine end to end (0: skip)")
    p.add_argument("--refine-models", nargs="+", default=["realtime-cpu", "cpu-small"])
    p.add_argument("--calibration-persons", type=int, default=64)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--blazepose-python", default="/work/venv-mp/bin/python")
    p.add_argument("--blazepose-frames", type=int, default=100)
    p.add_argument("--json", default=str(Path(__file__).resolve().parent / "results" / "bench_realtime.json"))
    p.add_argument("--only-int8-and-decoding", action="store_true",
                   help="skip the rounds, BlazePose and refine: only the int8 ratios and the decoding rows")
    args = p.parse_args()
    all_cores = os.sched_getaffinity(0)
    if args.core not in all_cores:
        raise SystemExit(f"--core {args.core} is not one of this process's cores {sorted(all_cores)}")
    import onnxruntime

    report = {"machine": {**machine("cpu"), "onnxruntime": onnxruntime.__version__, "cores": sorted(all_cores)},
              "args": vars(args), "rounds": [], "refine": [], "blazepose": []}
    models = {}
    for spec in args.models:
        torch.manual_seed(0)
        model = PoseFixNet(model_config(spec))
        crops, points = calibration_crops(Refiner(model), SAMPLE_DIR / "images", RESULTS, args.calibration_persons)
        int8 = quantize_int8(export_onnx(model, for_int8=True), crops, points).SerializeToString()
        models[spec] = (model, export_onnx(model).SerializeToString(), int8, crops, points)
    yardstick = Yardstick()
    for r in range(0 if args.only_int8_and_decoding else args.rounds):
        print(f"round {r + 1}/{args.rounds} (latency: batch 1, one thread, core {args.core}; b8, b32: persons/s, "
              f"{len(all_cores)} threads)", flush=True)
        rows = []
        for spec, parts in models.items():
            rows += one_model(spec, *parts, yardstick, args, all_cores)
        report["rounds"].append(rows)
        report["blazepose"].append(blazepose(args.blazepose_python, args.core, args.blazepose_frames))
        print(f"BlazePose full on core {args.core}: {report['blazepose'][-1]}", flush=True)
    if args.refine_persons and not args.only_int8_and_decoding:
        with tempfile.TemporaryDirectory(prefix="posefix-realtime-") as tmp:
            tmp = Path(tmp)
            for spec in args.refine_models:
                if spec not in models:
                    continue
                model, fp32, int8 = models[spec][:3]
                files = {"FP32": str(tmp / "fp32.onnx"), "INT8": str(tmp / "int8.onnx")}
                for key, blob in (("FP32", fp32), ("INT8", int8)):
                    Path(files[key]).write_bytes(blob)
                checkpoint = tmp / "model.safetensors"
                export_weights(model, checkpoint, {})
                for backend, cli in (("ort-fp32", ["--onnx", "FP32"]), ("ort-int8", ["--onnx", "INT8"])):
                    for _ in range(args.rounds):
                        t0 = time.perf_counter()
                        printed = refine_cli(checkpoint, [*cli, "--backend", "onnxruntime"], files,
                                             args.refine_persons, tmp)
                        wall = args.refine_persons / (time.perf_counter() - t0)
                        report["refine"].append({"model": spec, "backend": backend, "printed_per_s": printed,
                                                 "wall_per_s": wall, "persons": args.refine_persons})
                        print(f"posefix refine {spec} {backend}: {printed:.1f} persons/s (its loop), "
                              f"{wall:.1f}/s with start-up", flush=True)
    report["int8"] = int8_ratios(models, args, all_cores)
    report["decoding"] = decoding(args.repeat * 4)
    summary = summarise(report)
    report["summary"] = summary
    write(args.json, report)


def summarise(report: dict) -> list[dict]:
    """Each (model, backend)'s median over rounds, printed as the table."""
    cells: dict[tuple, dict[str, list]] = {}
    for rows in report["rounds"]:
        for row in rows:
            key = (row["model"], row.get("backend", ""))
            for k, v in row.items():
                if isinstance(v, float):
                    cells.setdefault(key, {}).setdefault(k, []).append(v)
    out = []
    print("\nmedian over rounds:")
    print(f"{'model':28s} {'backend':9s} {'b1 ms':>8s} {'x yard':>7s} {'yard ms':>8s} {'b8/s':>8s} {'b32/s':>8s}")
    for (name, backend), values in cells.items():
        med = {k: statistics.median(v) for k, v in values.items()}
        out.append({"model": name, "backend": backend, **med})
        yard = med["yardstick_ort_fp32_ms" if backend.startswith("ort") else "yardstick_torch_ms"]
        print(f"{name:28s} {backend:9s} {med['latency_ms']:8.2f} {med['x_yardstick']:7.2f} {yard:8.2f} "
              f"{med['b8_per_s']:8.1f} {med['b32_per_s']:8.1f}")
    refine: dict[tuple, list] = {}
    for row in report["refine"]:
        refine.setdefault((row["model"], row["backend"]), []).append(row)
    for (name, backend), rows in refine.items():
        med = {k: statistics.median(r[k] for r in rows) for k in ("printed_per_s", "wall_per_s")}
        out.append({"model": name, "backend": backend, "refine_" + "printed_per_s": med["printed_per_s"],
                    "refine_wall_per_s": med["wall_per_s"]})
        print(f"posefix refine {name} {backend}: {med['printed_per_s']:.1f} persons/s "
              f"({med['wall_per_s']:.1f}/s with start-up)")
    bp = [b for b in report["blazepose"] if "video_ms" in b]
    if bp:
        print(f"BlazePose full: video {statistics.median(b['video_ms'] for b in bp):.2f} ms/frame, "
              f"still {statistics.median(b['still_ms'] for b in bp):.2f} ms/frame")
    elif report["blazepose"]:
        print(f"BlazePose full: unmeasured ({report['blazepose'][0].get('unmeasured')})")
    return out


if __name__ == "__main__":
    sys.exit(main())
