"""Refinement quality on real estimators: input AP → refined AP (raw, the heads' choice, posefix refine's default).

    python benchmarks/bench_choice.py --train-annotations TRAIN.json --train-images TRAIN_DIR \\
        --val-annotations VAL.json --val-images VAL_DIR --estimators EST_DIR [--seeds 0 1 2] [--steps 600] \\
        [--train-estimators TRAIN_EST_DIR] [--profile PROFILE.json] [--runs runs/choice] [--set KEY=VALUE ...] \\
        [--json PATH]

For each seed, the ``cpu-small`` preset is trained as ``posefix train --preset cpu-small --set
data.train_annotations=TRAIN.json --set data.train_images=TRAIN_DIR --set train.seed=SEED`` does (a run
already in ``--runs`` is reused). Each checkpoint then refines, with ``posefix refine`` in ``--output raw``
(every joint as refined), with ``--choice-margin 0`` (the heads' own choice, column "heads") and as it is
by default (column "default": without a fitted choice every input joint is kept), held-out inputs on the
validation images: inputs synthesized by the published error tables from VAL.json (``posefix synth --seed 1``),
and every real estimator's native output found in
EST_DIR (``movenet_*_native.json`` through ``--format movenet``, ``blazepose_*_native.json`` through
``--format blazepose``). Every file is scored by pycocotools keypoint AP on the images it covers, with the
error breakdown of ``posefix diagnose`` (the shares of good and jitter keypoints). A row "untrained" refines
the same inputs with a randomly initialised model once: the cost of the decoding alone (raw) and the
choice's starting point (the heads' choice must give the input exactly). With ``--train-estimators`` (the same
estimators' native files on the train images), each checkpoint's choice is also fitted to each input
(``posefix fit-choice`` on its train-image counterpart: the train images' synthesized inputs, the estimator's
own output there) and that fitted checkpoint refines the held-out input: column "fitted choice". Prints a
table (mean and range over the seeds) and writes every number as JSON.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from common import machine, write

ESTIMATORS = (("MoveNet Thunder", "movenet_thunder_native.json", "movenet"),
              ("MoveNet Lightning", "movenet_lightning_native.json", "movenet"),
              ("MoveNet MultiPose", "movenet_multipose_native.json", "movenet"),
              ("BlazePose full", "blazepose_full_native.json", "blazepose"))


def score(gt, path) -> dict:
    from posefix.synth.cocoio import load_results
    from posefix.synth.diagnose import diagnose, keypoint_ap

    res = load_results(path, gt)
    shares = diagnose(gt, res, source=str(path), with_ap=False)["summary"]["keypoints"]["shares"]
    kept = [s == "input" for r in res for s in r.get("keypoint_source", [])]
    return {"ap": keypoint_ap(gt, res), "good": shares["good"], "jitter": shares["jitter"],
            "kept_input": sum(kept) / len(kept) if kept else None}


# What each column refines with: every joint as refined, the heads' own choice, posefix refine's default.
OUTPUTS = {"raw": ["--output", "raw"], "heads": ["--choice-margin", "0"], "default": []}


def refine(checkpoint, images, src, fmt, out, flags, annotations) -> None:
    from posefix.cli import main

    rc = main(["refine", "--checkpoint", str(checkpoint), "--images", str(images), "--input", str(src),
               "--out", str(out), "--format", fmt, "--annotations", str(annotations), "--quiet", *flags])
    if rc:
        raise SystemExit(f"posefix refine failed on {src}")


def evaluate(checkpoint, inputs, args, work: Path, fit_inputs=None) -> dict:
    from posefix.cli import main as posefix
    from posefix.synth.cocoio import load_ground_truth

    gt = load_ground_truth(args.val_annotations)
    rows = {}
    for name, src, fmt in inputs:
        row = {"input": score(gt, src) if fmt == "coco" else None}
        for output, flags in OUTPUTS.items():
            out = work / f"{Path(src).stem}_{output}.json"
            refine(checkpoint, args.val_images, src, fmt, out, flags, args.val_annotations)
            row[output] = score(gt, out)
        if fit_inputs and name in fit_inputs:
            fitted = work / f"{Path(src).stem}_fitted.safetensors"
            if posefix(["fit-choice", "--checkpoint", str(checkpoint), "--images", args.train_images, "--input",
                        str(fit_inputs[name]), "--format", fmt, "--annotations", args.train_annotations,
                        "--out", str(fitted)]):
                raise SystemExit(f"posefix fit-choice failed on {fit_inputs[name]}")
            out = work / f"{Path(src).stem}_fitted.json"
            refine(fitted, args.val_images, src, fmt, out, [], args.val_annotations)
            row["fitted"] = score(gt, out)
        rows[name] = row
    return rows


def train_run(args, seed: int) -> Path:
    from posefix.config import load_config
    from posefix.train import train

    run = Path(args.runs) / f"seed-{seed}"
    if (run / "model.safetensors").exists():
        return run / "model.safetensors"
    overrides = [f"data.train_annotations={args.train_annotations}", f"data.train_images={args.train_images}",
                 f"train.seed={seed}", f"train.max_steps={args.steps}"] + list(args.set or [])
    if args.profile:
        overrides.append(f"data.profile={args.profile}")
    train(load_config(preset="cpu-small", overrides=overrides), run, resume=(run / "last.pt").exists())
    return run / "model.safetensors"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train-annotations", required=True)
    p.add_argument("--train-images", required=True)
    p.add_argument("--val-annotations", required=True)
    p.add_argument("--val-images", required=True)
    p.add_argument("--estimators", required=True, help="directory of the estimators' native files on the val images")
    p.add_argument("--train-estimators", help="directory of the same estimators' native files on the train images: "
                   "fit the choice to each (posefix fit-choice) and score the fitted checkpoint too")
    p.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--profile", help="train on this error profile (posefix synth fit) instead of the published one")
    p.add_argument("--runs", default="runs/choice", help="where the runs are trained (reused when there)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="another training override")
    p.add_argument("--json", default="benchmarks/results/choice.json")
    args = p.parse_args(argv)

    import torch

    from posefix.cli import main as posefix
    from posefix.config import load_config
    from posefix.model import PoseFixNet
    from posefix.weights import export_weights

    work = Path(tempfile.mkdtemp(prefix="posefix-choice-"))
    synth = work / "synthesized.json"
    if posefix(["synth", "--gt", args.val_annotations, "--out", str(synth), "--seed", "1"]):
        return 2
    inputs = [("synthesized (published rates)", synth, "coco")]
    for name, file, fmt in ESTIMATORS:
        if (Path(args.estimators) / file).is_file():
            inputs.append((name, Path(args.estimators) / file, fmt))
    fit_inputs = None
    if args.train_estimators:
        fit_inputs = {"synthesized (published rates)": work / "synthesized_train.json"}
        if posefix(["synth", "--gt", args.train_annotations, "--out", str(fit_inputs["synthesized (published rates)"]),
                    "--seed", "1"]):
            return 2
        for name, file, _ in ESTIMATORS:
            if (Path(args.train_estimators) / file).is_file():
                fit_inputs[name] = Path(args.train_estimators) / file
    # The estimators' own COCO results beside the native files give their input AP.
    coco_inputs = {name: Path(args.estimators) / file.replace("_native", "_coco") for name, file, _ in ESTIMATORS}

    from posefix.synth.cocoio import load_ground_truth

    gt = load_ground_truth(args.val_annotations)
    base = {name: score(gt, coco_inputs[name]) if fmt != "coco" else score(gt, src) for name, src, fmt in inputs}

    torch.manual_seed(0)
    untrained = work / "untrained.safetensors"
    cfg = load_config(preset="cpu-small", overrides=list(args.set or []))
    export_weights(PoseFixNet(cfg.model), untrained, {"note": "random initialisation"})
    (work / "untrained").mkdir()
    report = {"machine": machine(), "steps": args.steps, "profile": args.profile, "input": base,
              "untrained": evaluate(untrained, inputs, args, work / "untrained"), "seeds": {}}
    if not args.seeds:
        write(args.json, report)
    for seed in args.seeds:
        checkpoint = train_run(args, seed)
        (work / f"seed-{seed}").mkdir(exist_ok=True)
        report["seeds"][seed] = evaluate(checkpoint, inputs, args, work / f"seed-{seed}", fit_inputs)
        write(args.json, report)
        print_table(report)
    return 0


def print_table(report) -> None:
    def cell(values) -> str:
        values = [v for v in values if v is not None]
        if not values:
            return "-"
        mean = sum(values) / len(values)
        return f"{mean:.3f}" if len(values) == 1 else f"{mean:.3f} ({min(values):.3f}–{max(values):.3f})"

    seeds = list(report["seeds"].values()) or [report["untrained"]]
    print(f"\n{len(seeds)} seed(s), {report['steps']} steps, profile {report['profile'] or 'published'}")
    print(f"{'input':32s} {'input AP':>9s} {'untrained raw':>14s} {'refined raw':>22s} {'heads':>22s} "
          f"{'default':>22s} {'fitted choice':>22s} {'kept: heads':>11s} {'good (in → raw → heads)':>26s}")
    for name, base in report["input"].items():
        raw, heads, default = (cell([s[name][k]["ap"] for s in seeds]) for k in ("raw", "heads", "default"))
        fitted = cell([s[name]["fitted"]["ap"] for s in seeds if "fitted" in s[name]])
        kept = cell([s[name]["heads"]["kept_input"] for s in seeds])
        good = f"{100 * base['good']:.1f} → {100 * sum(s[name]['raw']['good'] for s in seeds) / len(seeds):.1f} → " \
               f"{100 * sum(s[name]['heads']['good'] for s in seeds) / len(seeds):.1f} %"
        print(f"{name:32s} {base['ap']:9.3f} {report['untrained'][name]['raw']['ap']:14.3f} {raw:>22s} "
              f"{heads:>22s} {default:>22s} {fitted:>22s} {kept:>11s} {good:>26s}")
    sys.stdout.flush()


if __name__ == "__main__":
    raise SystemExit(main())
