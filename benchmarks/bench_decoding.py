"""Reduced decoding: ``posefix refine`` on large photos, each JPEG decoded at 1/2, 1/4 or 1/8 where its persons'
crops allow, against decoding every image at full size.

    python benchmarks/bench_decoding.py [--scale 4] [--copies 8] [--rounds 3] [--preset realtime-cpu-small]
                                        [--checkpoint model.safetensors] [--json PATH]

The bundled val sample's 21 photos (640 × 425-480) enlarged ``--scale`` times (bicubic, JPEG quality 90: a
phone photo's size at 4) and each written ``--copies`` times under other names, with MoveNet Thunder's real
output on them (its native file: coordinates are fractions of the image, so they hold at any size). Speed:
``posefix refine --format movenet`` end to end (its loop's persons/s as it prints them, and the subprocess's
wall time), ``--reduced-decoding`` and ``--no-reduced-decoding`` in turn, ``--rounds`` times, two decoding
threads, ONNX Runtime running the model where it is installed (else torch). Which reduction each image got
is counted by :meth:`Refiner.decode_reduction`, the rule ``refine`` applies.

Quality, with ``--checkpoint`` (a trained refiner; an untrained one returns its input): keypoint AP of the
refined joints (``--output raw``, every joint as refined, so that the decoding shows) on the GT scaled with
the photos, at the photos' own size and enlarged, both ways, beside the input's AP.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch
from common import machine, write
from PIL import Image

from posefix import SAMPLE_DIR
from posefix.config import load_config
from posefix.formats import as_coco_results, load_estimates
from posefix.model import PoseFixNet
from posefix.refine import by_image
from posefix.refiner import Refiner
from posefix.synth.cocoio import load_ground_truth, load_results
from posefix.synth.diagnose import keypoint_ap
from posefix.weights import export_weights, load_weights

GT = SAMPLE_DIR / "person_keypoints_val_sample.json"
MOVENET = SAMPLE_DIR / "real_estimators" / "movenet_thunder_native.json"


def enlarged(tmp: Path, scale: int, copies: int) -> tuple[Path, Path, Path, Path]:
    """(images dir, GT scaled with them, MoveNet's file on the first copy, on every copy)."""
    out = tmp / f"x{scale}"
    out.mkdir()
    names = sorted(p.name for p in (SAMPLE_DIR / "images").glob("*.jpg"))
    for name in names:
        with Image.open(SAMPLE_DIR / "images" / name) as im:
            big = im.convert("RGB").resize((im.width * scale, im.height * scale), Image.Resampling.BICUBIC)
        big.save(out / name, "JPEG", quality=90)
        for c in range(1, copies):
            (out / f"c{c:02d}_{name}").write_bytes((out / name).read_bytes())
    gt = json.loads(GT.read_text())
    shift = (scale - 1) / 2  # pixel centres: x of the original is scale·x + (scale - 1)/2 of the enlarged image
    for im in gt["images"]:
        im["width"], im["height"] = im["width"] * scale, im["height"] * scale
    for a in gt["annotations"]:
        kp = a.get("keypoints", [])
        for j in range(0, len(kp), 3):
            if kp[j + 2] > 0:
                kp[j], kp[j + 1] = kp[j] * scale + shift, kp[j + 1] * scale + shift
        a["bbox"] = [a["bbox"][0] * scale + shift, a["bbox"][1] * scale + shift, a["bbox"][2] * scale,
                     a["bbox"][3] * scale]
        a["area"] = a["area"] * scale * scale
    gt_path = tmp / f"gt_x{scale}.json"
    gt_path.write_text(json.dumps(gt))
    one = json.loads(MOVENET.read_text())
    every = [{**p, "image": (f"c{c:02d}_" if c else "") + p["image"]} for c in range(copies) for p in one]
    every_path = tmp / f"movenet_x{scale}_all.json"
    every_path.write_text(json.dumps(every))
    return out, gt_path, MOVENET, every_path


def refine(model: list[str], images: Path, inputs: Path, out: Path, reduced: bool, raw: bool = False):
    """(persons/s that posefix refine prints, persons/s over its whole run); ``model``: its model arguments."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "posefix", "refine", *model,
                           "--format", "movenet", "--images", str(images), "--input", str(inputs), "--out", str(out),
                           "--batch-size", "32", "--workers", "2",
                           "--reduced-decoding" if reduced else "--no-reduced-decoding",
                           *(["--output", "raw"] if raw else []), "--quiet"], capture_output=True, text=True,
                          check=False)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr.strip().splitlines()[-1])
    found = re.search(r"refined (\d+) persons .*\(([\d.]+) persons/s\)", proc.stdout)
    return float(found.group(2)), int(found.group(1)) / wall


def reductions(refiner: Refiner, images: Path, inputs: Path) -> dict:
    """How many images each reduction is chosen for, by the rule posefix refine applies."""
    est = load_estimates(inputs, "movenet", images)
    count = Counter(refiner.decode_reduction(est.keypoints[rows]) for rows in by_image(est.image_keys).values())
    return {f"1/{r}": count[r] for r in sorted(count)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scale", type=int, default=4, help="the photos enlarged this many times (4)")
    p.add_argument("--copies", type=int, default=8, help="each photo refined this many times under other names")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--preset", default="realtime-cpu-small", help="the model's preset without --checkpoint")
    p.add_argument("--checkpoint", help="a trained refiner: also the AP of its raw refinement, both ways")
    p.add_argument("--backend", choices=["onnxruntime", "torch"], default=None,
                   help="what runs the model (onnxruntime where installed)")
    p.add_argument("--json", default=str(Path(__file__).resolve().parent / "results" / "bench_decoding.json"))
    args = p.parse_args()
    if args.backend is None:
        try:
            import onnxruntime  # noqa: F401
            args.backend = "onnxruntime"
        except ImportError:
            args.backend = "torch"
    report = {"machine": machine("cpu"), "args": vars(args), "speed": [], "quality": []}
    with tempfile.TemporaryDirectory(prefix="posefix-decoding-") as tmp:
        tmp = Path(tmp)
        if args.checkpoint:
            checkpoint, model = Path(args.checkpoint), load_weights(args.checkpoint)
        else:
            torch.manual_seed(0)
            model = PoseFixNet(load_config(preset=args.preset).model)
            checkpoint = tmp / "model.safetensors"
            export_weights(model, checkpoint, {})
        refiner = Refiner(model)
        run_model = ["--checkpoint", str(checkpoint)]
        if args.backend == "onnxruntime":  # exported once, not by every run
            subprocess.run([sys.executable, "-m", "posefix", "export", "--checkpoint", str(checkpoint), "--onnx",
                            str(tmp / "model.onnx")], check=True, capture_output=True)
            run_model = ["--onnx", str(tmp / "model.onnx"), "--backend", "onnxruntime"]
        images, gt_path, one, every = enlarged(tmp, args.scale, args.copies)
        report["reductions"] = reductions(refiner, images, one)
        report["reductions_x1"] = reductions(refiner, SAMPLE_DIR / "images", one)
        print(f"{model.cfg.backbone} {model.cfg.input_size[0]}x{model.cfg.input_size[1]}, {args.backend}; images "
              f"decoded at (x{args.scale}): {report['reductions']}; at their own size: {report['reductions_x1']}")
        print(f"{'decoding':12s} {'round':>5s} {'persons/s (loop)':>17s} {'persons/s (run)':>16s}")
        for r in range(args.rounds):
            for reduced in (True, False):
                loop, run = refine(run_model, images, every, tmp / "out.json", reduced)
                name = "reduced" if reduced else "full size"
                report["speed"].append({"decoding": name, "round": r, "loop_per_s": loop, "run_per_s": run})
                print(f"{name:12s} {r + 1:5d} {loop:17.1f} {run:16.1f}", flush=True)
        for name in ("reduced", "full size"):
            rows = sorted(row["loop_per_s"] for row in report["speed"] if row["decoding"] == name)
            report[f"median_{name.replace(' ', '_')}_per_s"] = rows[len(rows) // 2]
        ratio = report["median_reduced_per_s"] / report["median_full_size_per_s"]
        report["reduced_x_full"] = ratio
        print(f"median: reduced {report['median_reduced_per_s']:.1f}, full size "
              f"{report['median_full_size_per_s']:.1f} persons/s: {ratio:.2f}x")
        if args.checkpoint:
            print(f"{'photos':10s} {'input AP':>8s} {'raw, full size':>15s} {'raw, reduced':>13s}")
            for scale, folder, gt_file in ((1, SAMPLE_DIR / "images", GT), (args.scale, images, gt_path)):
                gt = load_ground_truth(gt_file)
                row = {"scale": scale, "input": keypoint_ap(gt, as_coco_results(one, "movenet", folder, gt))}
                for reduced in (False, True):
                    out = tmp / f"raw_{scale}_{reduced}.json"
                    refine(run_model, folder, one, out, reduced, raw=True)
                    row["reduced" if reduced else "full"] = keypoint_ap(gt, load_results(out, gt))  # COCO results
                report["quality"].append(row)
                print(f"{'x' + str(scale):10s} {row['input']:8.3f} {row['full']:15.3f} {row['reduced']:13.3f}")
    write(args.json, report)


if __name__ == "__main__":
    main()
