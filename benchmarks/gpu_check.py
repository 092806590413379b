"""Everything posefix does on a GPU, in one run of under eight minutes, written to one results file.

    python benchmarks/gpu_check.py [--json benchmarks/results/gpu_check.json] [--budget-s 450]
    python benchmarks/gpu_check.py --dry-run --json /tmp/gpu_check.json   # every step, on the CPU, tiny sizes

Steps, in order (each one's outcome, figures and seconds recorded; an error is recorded and the run goes on;
a step that would start past ``--budget-s`` is skipped with that reason):

  cuda_tests   pytest on tests/test_gpu.py and test_onnx.py's CUDA provider test (passed / failed / skipped)
  throughput   the refiner in process, R-50 256×192, bf16 autocast, channels-last, BatchNorm folded, at
               batch 64, 128, 256, 512 and 1024: persons/s and peak memory, on the device named
  onnxruntime  the same model exported to ONNX, run by ONNX Runtime's CUDA provider (fp32) and TensorRT
               provider (fp16 engines) at batch 64: persons/s; a provider this onnxruntime lacks is skipped
               with the reason
  refine       ``posefix refine`` end to end (JPEG decoding, cropping, the model, the JSON) on the bundled
               sample's real estimator results cycled to --refine-persons persons: torch bf16 channels-last
               and ONNX Runtime CUDA, the persons/s it prints
  training     ``posefix train`` for --train-steps steps of R-50 256×192 on the bundled training sample
               (synthesized inputs): samples/s after the first logging interval, peak memory; with several
               GPUs, the same under torchrun with DistributedDataParallel on all of them

``--dry-run`` runs every step on the CPU with a ResNet-18 at 64×64 and batches of 2–4 (the providers run as
the CPU provider), so that the script is exercised by the test suite and cannot rot; its figures mean nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine

from posefix import SAMPLE_DIR
from posefix.model import ModelConfig, PoseFixNet

RESULTS = SAMPLE_DIR / "topdown_keypoints_val4.json"
TRAIN_GT = SAMPLE_DIR / "person_keypoints_train10.json"  # the labelled persons of sample/train_images


class Plan:
    """What a run measures: the real one on a GPU, or the dry run's tiny one on the CPU."""

    def __init__(self, dry: bool, args):
        self.dry = dry
        self.device = "cpu" if dry else "cuda"
        self.cfg = (ModelConfig(backbone="resnet18", input_size=(64, 64), sigma=2.0, head_channels=16) if dry
                    else ModelConfig(backbone="resnet50", input_size=(256, 192), sigma=7.0))
        self.batches = [2, 4] if dry else [64, 128, 256, 512, 1024]
        self.ort_batch = 2 if dry else 64
        self.refine_persons = 8 if dry else args.refine_persons
        self.train_steps = 3 if dry else args.train_steps
        self.train_batch = 4 if dry else 64
        self.gpus = 0 if dry else torch.cuda.device_count()


def env() -> dict:
    """The environment for subprocesses: this checkout's posefix first on the path."""
    e = dict(os.environ)
    e["PYTHONPATH"] = str(ROOT) + (os.pathsep + e["PYTHONPATH"] if e.get("PYTHONPATH") else "")
    return e


def step_cuda_tests(plan: Plan, tmp: Path) -> dict:
    tests = (["tests/test_gpu.py"] if plan.dry
             else ["tests/test_gpu.py", "tests/test_onnx.py::test_cuda_provider_equals_torch"])
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests], cwd=ROOT,
                          env=env(), capture_output=True, text=True, timeout=240, check=False)
    tail = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr.strip()[-300:]
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|error|errors)", tail)}
    return {"returncode": proc.returncode, "summary": tail, **counts,
            "ok": proc.returncode in (0, 5) and not counts.get("failed") and not counts.get("error")}


def _model(plan: Plan) -> PoseFixNet:
    torch.manual_seed(0)
    return PoseFixNet(plan.cfg)


def _inputs(plan: Plan, n: int, device: str):
    g = torch.Generator().manual_seed(n)
    h, w = plan.cfg.input_size
    image = torch.rand(n, 3, h, w, generator=g)
    kp = torch.cat([torch.rand(n, 17, 2, generator=g) * torch.tensor([w, h]), torch.ones(n, 17, 1)], -1)
    return image.to(device), kp.to(device)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _rate(fn, n: int, device: str, calls: int) -> float:
    fn()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    _sync(device)
    return n * calls / (time.perf_counter() - t0)


def step_throughput(plan: Plan, tmp: Path) -> dict:
    from posefix.refiner import Refiner
    refiner = Refiner(_model(plan), device=plan.device, precision="bf16", channels_last=True)
    rows = []
    for b in plan.batches:
        image, kp = _inputs(plan, b, plan.device)
        if plan.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        try:
            rate = _rate(lambda image=image, kp=kp: refiner.infer(image, kp), b, plan.device, 2 if plan.dry else 10)
        except torch.OutOfMemoryError:
            rows.append({"batch": b, "error": "out of memory"})
            torch.cuda.empty_cache()
            break
        row = {"batch": b, "persons_per_s": rate}
        if plan.device == "cuda":
            row["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        rows.append(row)
        print(f"  throughput batch {b}: {rate:.1f} persons/s", flush=True)
    return {"model": f"{plan.cfg.backbone} {plan.cfg.input_size[0]}x{plan.cfg.input_size[1]}",
            "precision": "bf16", "channels_last": True, "rows": rows}


def step_onnxruntime(plan: Plan, tmp: Path) -> dict:
    import onnxruntime as ort

    from posefix.onnx_backend import PROVIDERS, OnnxModel, export_onnx, save_model

    path = tmp / "model.onnx"
    save_model(export_onnx(_model(plan)), path)
    available = ort.get_available_providers()
    rows = []
    for name, provider, fp16 in (("cuda-fp32", "cuda", False), ("tensorrt-fp16", "tensorrt", True)):
        if plan.dry:
            provider = "cpu"
        if PROVIDERS[provider][0] not in available:
            rows.append({"row": name, "skipped": f"onnxruntime {ort.__version__} has no {PROVIDERS[provider][0]} "
                                                 f"(it has {', '.join(available)})"})
            continue
        session = OnnxModel(path, plan.device, provider, fp16=fp16)
        image, kp = _inputs(plan, plan.ort_batch, plan.device)
        rate = _rate(lambda s=session, image=image, kp=kp: s(image, keypoints=kp), plan.ort_batch, plan.device,
                     2 if plan.dry else 10)
        rows.append({"row": name, "providers": session.providers, "batch": plan.ort_batch, "persons_per_s": rate})
        print(f"  onnxruntime {name}: {rate:.1f} persons/s ({session.providers[0]})", flush=True)
    return {"onnxruntime": ort.__version__, "available": available, "rows": rows}


def step_refine(plan: Plan, tmp: Path) -> dict:
    from posefix.weights import export_weights
    checkpoint = tmp / "model.safetensors"
    export_weights(_model(plan), checkpoint, {})
    results = json.loads(RESULTS.read_text())
    (tmp / "inputs.json").write_text(json.dumps([results[i % len(results)] for i in range(plan.refine_persons)]))
    torch_args = ["--device", plan.device] + ([] if plan.dry else ["--precision", "bf16", "--channels-last"])
    rows = []
    for name, extra in (("torch", torch_args),
                        ("onnxruntime", ["--backend", "onnxruntime", "--device", plan.device,
                                         "--provider", "cpu" if plan.dry else "cuda"])):
        out = tmp / f"refined_{name}.json"
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "posefix", "refine", "--checkpoint", str(checkpoint), *extra,
                               "--images", str(SAMPLE_DIR / "images"), "--input", str(tmp / "inputs.json"),
                               "--out", str(out), "--batch-size", "4" if plan.dry else "256", "--quiet"],
                              env=env(), capture_output=True, text=True, timeout=300, check=False)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            rows.append({"row": name, "error": (proc.stderr.strip().splitlines() or ["failed"])[-1][:300]})
            continue
        found = re.search(r"\(([\d.]+) persons/s\)", proc.stdout)
        rows.append({"row": name, "persons": plan.refine_persons, "persons_per_s": float(found.group(1)) if found
                     else None, "wall_s": wall, "written": len(json.loads(out.read_text()))})
        print(f"  refine {name}: {rows[-1]['persons_per_s']} persons/s", flush=True)
    return {"rows": rows}


def _train_run(plan: Plan, tmp: Path, name: str, gpus: int) -> dict:
    out = tmp / f"train_{name}"
    h, w = plan.cfg.input_size
    sets = [f"data.train_annotations={TRAIN_GT}", f"data.train_images={SAMPLE_DIR / 'train_images'}",
            f"model.backbone={plan.cfg.backbone}", f"model.input_size=[{h}, {w}]", f"model.sigma={plan.cfg.sigma}",
            f"model.head_channels={plan.cfg.head_channels}", f"train.max_steps={plan.train_steps}",
            f"train.batch_size={plan.train_batch}", "train.pretrained=none", "train.checkpoint_every=100000",
            f"train.log_every={1 if plan.dry else 50}", f"train.device={plan.device}",
            f"data.workers={1 if plan.dry else 6}"]
    command = ["-m", "posefix", "train", "--preset", "cpu-small", "--out", str(out)]
    for s in sets:
        command += ["--set", s]
    launcher = [sys.executable] if gpus <= 1 else [sys.executable, "-m", "torch.distributed.run",
                                                   f"--nproc_per_node={gpus}"]
    t0 = time.perf_counter()
    proc = subprocess.run([*launcher, *command], env=env(), capture_output=True, text=True, timeout=400, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        return {"run": name, "gpus": gpus, "error": (proc.stderr.strip().splitlines() or ["failed"])[-1][:300]}
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rates = [r["samples_per_s"] for r in records if r.get("event") == "train"]
    steady = rates[1:] or rates
    return {"run": name, "gpus": gpus, "steps": plan.train_steps, "batch_per_process": plan.train_batch,
            "samples_per_s": sum(steady) / len(steady), "wall_s": wall}


def step_training(plan: Plan, tmp: Path) -> dict:
    rows = [_train_run(plan, tmp, "one-device", 1)]
    print(f"  training: {rows[-1]}", flush=True)
    if plan.gpus > 1:
        rows.append(_train_run(plan, tmp, "ddp", plan.gpus))
        print(f"  training DDP: {rows[-1]}", flush=True)
    if plan.device == "cuda":  # peak memory of a training step in this process, one GPU
        from posefix.losses import refiner_loss

        model = _model(plan).cuda().to(memory_format=torch.channels_last).train()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
        image, kp = _inputs(plan, plan.train_batch, "cuda")
        torch.cuda.reset_peak_memory_stats()
        for _ in range(3):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = model(image.to(memory_format=torch.channels_last), keypoints=kp)
            loss, _ = refiner_loss(out, kp[..., :2] + 1.0, kp[..., 2] > 0,
                                   torch.full((len(kp),), 900.0, device="cuda"))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        torch.cuda.synchronize()
        rows.append({"run": "peak-memory", "batch": plan.train_batch,
                     "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30})
    return {"rows": rows}


STEPS = {"cuda_tests": step_cuda_tests, "throughput": step_throughput, "onnxruntime": step_onnxruntime,
         "refine": step_refine, "training": step_training}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="every step on the CPU at tiny sizes (for the tests)")
    p.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "gpu_check.json"))
    p.add_argument("--budget-s", type=float, default=450.0, help="no step starts after this many seconds")
    p.add_argument("--steps", nargs="+", default=list(STEPS), choices=list(STEPS))
    p.add_argument("--refine-persons", type=int, default=4096)
    p.add_argument("--train-steps", type=int, default=300)
    args = p.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here (torch.cuda.is_available() is False); --dry-run runs the steps on "
              "the CPU", file=sys.stderr)
        return 2
    plan = Plan(args.dry_run, args)
    report = {"dry_run": args.dry_run, "machine": machine(plan.device), "gpus": plan.gpus, "steps": {}}
    if plan.device == "cuda":
        report["machine"]["gpus"] = [torch.cuda.get_device_name(i) for i in range(plan.gpus)]
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="posefix-gpu-check-") as tmp:
        for name in args.steps:
            elapsed = time.perf_counter() - start
            if elapsed > args.budget_s:
                report["steps"][name] = {"status": "skipped", "reason": f"past the {args.budget_s:.0f} s budget"}
                continue
            print(f"{name} ...", flush=True)
            t0 = time.perf_counter()
            try:
                result = {"status": "ok", **STEPS[name](plan, Path(tmp))}
            except Exception as e:  # noqa: BLE001 — a failed step is recorded and the others still run
                result = {"status": "error", "error": f"{type(e).__name__}: {e}"[:500],
                          "traceback": traceback.format_exc()[-2000:]}
            if any("error" in row for row in result.get("rows", [])):
                result["status"] = "error"  # a row that failed (its message is in the row)
            result["seconds"] = time.perf_counter() - t0
            report["steps"][name] = result
            print(f"{name}: {result['status']} in {result['seconds']:.1f} s", flush=True)
    report["seconds"] = time.perf_counter() - start
    from posefix.fileio import write_json_atomic

    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.json, report)
    print(f"results written to {args.json} ({report['seconds']:.0f} s)")
    return 0 if all(s["status"] != "error" for s in report["steps"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
