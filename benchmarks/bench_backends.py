"""The refiner's backends side by side: torch eager against ONNX Runtime (fp32, int8), persons/s.

    python benchmarks/bench_backends.py [--models r18-128x96 r50-256x192] [--batches 1 8 32]
                                        [--backends torch-cl ort-fp32 ort-int8 ...] [--refine-persons 512]
                                        [--repeat 3] [--json PATH]

For each model (backbone and crop size; untrained weights, whose speed is a trained model's) the refiner is
exported once (``posefix.onnx_backend.export_onnx``) and quantised to int8 on 64 real crops of the bundled
COCO val sample (the real top-down estimator's persons, cut as the refiner cuts them). Then each backend runs
the model on the same batches of those real crops (cycled to the batch size), best of ``--repeat`` after a
warm-up, all in one process one after another, so the ratios are side by side:

  torch-cl      torch eager fp32, channels_last, BatchNorm folded (``Refiner(..., channels_last=True)``)
  torch         torch eager fp32, contiguous
  ort-fp32      ONNX Runtime, CPU execution provider, the fp32 graph
  ort-int8      ONNX Runtime, CPU execution provider, the statically quantised graph (QDQ, int8 convolutions)
  ort-cuda-fp32 ONNX Runtime, CUDA execution provider (a GPU; inputs and outputs through the host)
  ort-trt-fp16  ONNX Runtime, TensorRT execution provider with fp16 engines (a GPU)
  torch-cuda-bf16  torch on the GPU, bf16 autocast, channels_last

A backend whose provider is missing is reported as unavailable, not hidden. With ``--refine-persons N``,
``posefix refine`` itself also runs end to end once per backend (a subprocess: JPEG decoding in threads,
cropping, the model, writing the JSON) on N persons of the sample's real estimator results cycled over
their images, batch 32; ``refine/s`` is what it prints (its refinement loop, without start-up).
Defaults: torch-cl, ort-fp32, ort-int8 (and the GPU backends where CUDA is available), batches 1 8 32.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from common import machine, timed, write

from posefix import SAMPLE_DIR
from posefix.model import ModelConfig, PoseFixNet
from posefix.onnx_backend import OnnxModel, calibration_crops, export_onnx, quantize_int8, save_model
from posefix.refiner import Refiner
from posefix.weights import export_weights

MODELS = {"r18-64x64": ("resnet18", (64, 64), 2.0, 32), "r18-128x96": ("resnet18", (128, 96), 3.5, 128),
          "r50-256x192": ("resnet50", (256, 192), 7.0, 256),
          "r50-384x288": ("resnet50", (384, 288), 9.0, 256), "r152-384x288": ("resnet152", (384, 288), 9.0, 256)}
CPU_BACKENDS = ["torch-cl", "ort-fp32", "ort-int8"]
GPU_BACKENDS = ["torch-cuda-bf16", "ort-cuda-fp32", "ort-trt-fp16"]
RESULTS = SAMPLE_DIR / "topdown_keypoints_val4.json"


def runner(name: str, model: PoseFixNet, fp32: bytes, int8: bytes):
    """(call(image, keypoints), the refine CLI's backend arguments (the files filled in later)) for a backend."""
    if name.startswith("torch"):
        cuda = "cuda" in name
        refiner = Refiner(model, device="cuda" if cuda else "cpu", precision="bf16" if "bf16" in name else "fp32",
                          channels_last=name.endswith("-cl") or cuda)

        def call(image, kp):
            image, kp = image.to(refiner.device), kp.to(refiner.device)
            out = refiner.infer(image, kp)
            if cuda:
                torch.cuda.synchronize()
            return out
        args = ["--device", "cuda", "--precision", "bf16", "--channels-last"] if cuda else \
            (["--channels-last"] if name.endswith("-cl") else [])
        return call, args
    provider = {"ort-fp32": "cpu", "ort-int8": "cpu", "ort-cuda-fp32": "cuda", "ort-trt-fp16": "tensorrt"}[name]
    session = OnnxModel(int8 if name == "ort-int8" else fp32, "cpu", provider, fp16=name.endswith("fp16"))
    return (lambda image, kp: session(image, keypoints=kp)), \
        ["--onnx", "INT8" if name == "ort-int8" else "FP32", "--provider", provider]


def refine_cli(checkpoint: Path, args: list[str], files: dict, persons: int, tmp: Path) -> float:
    """persons/s that ``posefix refine`` prints, on ``persons`` persons of the sample's real results."""
    results = json.loads(RESULTS.read_text())
    cycled = [results[i % len(results)] for i in range(persons)]
    inputs = tmp / "inputs.json"
    inputs.write_text(json.dumps(cycled))
    args = [files.get(a, a) for a in args]
    base = [] if "--onnx" in args else ["--checkpoint", str(checkpoint)]
    proc = subprocess.run([sys.executable, "-m", "posefix", "refine", *base, *args, "--images",
                           str(SAMPLE_DIR / "images"), "--input", str(inputs), "--out", str(tmp / "refined.json"),
                           "--batch-size", "32", "--quiet"], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr.strip().splitlines()[-1])
    return float(re.search(r"\(([\d.]+) persons/s\)", proc.stdout).group(1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["r18-128x96", "r50-256x192"], choices=list(MODELS))
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8, 32])
    p.add_argument("--backends", nargs="+", default=None,
                   choices=["torch", "torch-cl", "ort-fp32", "ort-int8", *GPU_BACKENDS])
    p.add_argument("--refine-persons", type=int, default=512, help="posefix refine end to end (0: skip)")
    p.add_argument("--calibration-persons", type=int, default=64)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--json", default="benchmarks/results/bench_backends.json")
    args = p.parse_args()
    backends = args.backends or CPU_BACKENDS + (GPU_BACKENDS if torch.cuda.is_available() else [])
    report = {"machine": machine("cuda" if torch.cuda.is_available() else "cpu"), "rows": [], "refine": []}
    import onnxruntime

    report["machine"]["onnxruntime"] = onnxruntime.__version__
    report["machine"]["onnxruntime_providers"] = onnxruntime.get_available_providers()
    print(f"{'model':13s} {'backend':16s} " + " ".join(f"{'b' + str(b) + '/s':>9s}" for b in args.batches)
          + f" {'x torch':>8s}")
    for name in args.models:
        backbone, size, sigma, head = MODELS[name]
        torch.manual_seed(0)
        model = PoseFixNet(ModelConfig(backbone=backbone, input_size=size, sigma=sigma, head_channels=head))
        fp32 = export_onnx(model)
        image, kp = calibration_crops(Refiner(model), SAMPLE_DIR / "images", RESULTS, args.calibration_persons)
        int8 = quantize_int8(export_onnx(model, for_int8=True), image, kp)
        reference = None
        with tempfile.TemporaryDirectory(prefix="posefix-bench-") as tmp:
            tmp = Path(tmp)
            files = {"FP32": str(tmp / "fp32.onnx"), "INT8": str(tmp / "int8.onnx")}
            save_model(fp32, files["FP32"])
            save_model(int8, files["INT8"])
            checkpoint = tmp / "model.safetensors"
            export_weights(model, checkpoint, {})
            for backend in backends:
                row = {"model": name, "backbone": backbone, "size": list(size), "backend": backend}
                try:
                    call, cli_args = runner(backend, model, fp32.SerializeToString(), int8.SerializeToString())
                    for b in args.batches:
                        rows = np.arange(b) % len(image)
                        x, k = torch.from_numpy(image[rows]), torch.from_numpy(kp[rows])
                        row[f"b{b}_per_s"] = b / timed(lambda: call(x, k), args.repeat)  # noqa: B023
                    if args.refine_persons:
                        row["refine_per_s"] = refine_cli(checkpoint, cli_args, files, args.refine_persons, tmp)
                except Exception as e:  # noqa: BLE001 — a backend that cannot run here is reported, not hidden
                    row["unavailable"] = str(e).splitlines()[0][:200]
                if backend == "torch-cl" and "unavailable" not in row:
                    reference = row
                last = f"b{args.batches[-1]}_per_s"
                if reference is not None and last in row:
                    row["x_torch_last_batch"] = row[last] / reference[last]
                report["rows"].append(row)
                cells = " ".join(f"{row[f'b{b}_per_s']:9.1f}" if f"b{b}_per_s" in row else f"{'-':>9s}"
                                 for b in args.batches)
                ratio = f"{row['x_torch_last_batch']:8.2f}" if "x_torch_last_batch" in row else f"{'-':>8s}"
                extra = f"  refine {row['refine_per_s']:.1f}/s" if "refine_per_s" in row else ""
                print(f"{name:13s} {backend:16s} {cells} {ratio}{extra}"
                      + (f"  unavailable: {row['unavailable']}" if "unavailable" in row else ""), flush=True)
    write(args.json, report)


if __name__ == "__main__":
    main()
