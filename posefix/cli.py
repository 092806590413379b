"""The ``posefix`` command line: a thin layer over the library.

Every command reports bad input as one line ``posefix: error: ...`` and exits with status 2 (an error of the
library names its own field; where that field is one of the command's options, the message names the flag);
outputs are written atomically, and never over one of the command's own inputs.

Each command imports the library modules it runs inside its function, for start-up time: ``posefix --help``
and the commands that need numpy alone (synth, diagnose, eval) do not load torch.
"""
from __future__ import annotations

import argparse
import collections
import itertools
import sys
import time
from dataclasses import fields
from pathlib import Path

import numpy as np

from . import SAMPLE_DIR, __version__
from .choice import KEEPS_INPUT_NOTICE
from .cliargs import (
    allow_outside_images_arg,
    annotations_arg,
    batch_size_arg,
    check_command_outputs,
    checkpoint_arg,
    device_arg,
    flip_test_arg,
    format_arg,
    gt_arg,
    images_arg,
    precision_args,
    quiet_arg,
    reduced_decoding_arg,
    seed_type,
    skip_invalid_arg,
    workers_arg,
)
from .errors import InputError, PosefixError, require
from .formats import FORMATS, as_coco_results
from .options import RefineOptions
from .search_cli import add_parsers as add_search_parsers


def cmd_synth(args) -> int:
    for name in ("gt", "out"):
        if getattr(args, name) is None:
            raise InputError(f"--{name}", "is required")
    per_error = {e: getattr(args, f"severity_{e}", None) for e in ("jitter", "inversion", "swap", "miss")}
    if any(getattr(args, k, None) is not None for k in ("variants", "severity", "sequence_params", "block_persons")) \
            or getattr(args, "sequences", False) or any(v is not None for v in per_error.values()):
        from .synth.dataset import BLOCK_PERSONS, run_synth_dataset
        if args.labels is not None:
            raise InputError("--labels", "a dataset directory carries its labels in its shards; leave --labels out")
        if args.variants is not None and args.variants < 1:
            raise InputError("--variants", f"must be >= 1, got {args.variants}")
        if args.block_persons is not None and args.block_persons < 1:
            raise InputError("--block-persons", f"must be >= 1, got {args.block_persons}")
        check_command_outputs(args, ("gt", "profile"), ())
        for line in run_synth_dataset(args.gt, args.out, args.variants, args.seed, args.profile, args.severity,
                                      per_error, args.sequences, args.sequence_params,
                                      args.block_persons or BLOCK_PERSONS):
            print(line)
        return 0
    check_command_outputs(args, ("gt", "profile"), ("out", "labels"))
    _synthesize(args.gt, args.out, args.labels, args.seed, args.profile)
    return 0


def _synthesize(gt_path, out, labels_path, seed: int, profile_path) -> None:
    """``posefix synth`` without a dataset directory: one input per labelled person, written, and said."""
    from .synth.coco import synthesize_coco
    from .synth.cocoio import load_ground_truth, write_synth_outputs
    from .synth.profile import load_profile

    profile = load_profile(profile_path)
    gt = load_ground_truth(gt_path)
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    results, labels = synthesize_coco(gt, rng, profile)
    elapsed = time.perf_counter() - t0
    write_synth_outputs(out, results, labels_path, labels)  # labels after results, naming them by hash
    counts = collections.Counter(itertools.chain.from_iterable(entry["labels"] for entry in labels))
    planted = ", ".join(f"{k} {counts[k]}" for k in ("good", "jitter", "inversion", "swap", "miss", "unlabelled")
                        if k in counts)
    print(f"synthesized {len(results)} input poses from {gt_path} in {elapsed:.2f} s "
          f"(profile {profile.name}, seed {seed}) -> {out}")
    print(f"keypoints: {planted}")


def cmd_synth_fit(args) -> int:
    from .fileio import write_json_atomic
    from .synth.cocoio import load_ground_truth, load_results
    from .synth.diagnose import diagnose
    from .synth.fit import fit_profile
    from .synth.profile import load_profile

    check_command_outputs(args, ("gt", "results", "profile", "images"), ("out",))
    gt = load_ground_truth(args.gt)
    if FORMATS[args.format].coco_results:
        results = load_results(args.results, gt)
    else:
        if args.images is None or not Path(args.images).is_dir():
            raise InputError("--images", f"--format {args.format} needs the images' directory, got {args.images}")
        results = as_coco_results(args.results, args.format, args.images, gt, args.allow_outside_images)
    report = diagnose(gt, results, source=str(args.results), with_ap=False)
    profile = fit_profile(report, gt, load_profile(args.profile))
    write_json_atomic(args.out, profile.to_dict())
    print(f"fitted an error profile to {args.results}: {report['summary']['detections']['labelled']} matched "
          f"detections, {report['summary']['keypoints']['labelled']} labelled keypoints -> {args.out}")
    for err in ("jitter", "inversion", "swap", "miss"):
        t = profile.outcomes[err]
        cells = "; ".join(f"{name} " + " ".join(f"{b}={t.table[joints[0], i]:.3f} (n={t.counts[joints[0], i]})"
                                                 for i, b in enumerate(t.bins))
                          for name, joints in t.groups)
        print(f"  {err}: {cells}")
    return 0


def cmd_synth_fit_sequences(args) -> int:
    from .fileio import read_json, write_json_atomic
    from .synth.cocoio import load_ground_truth, validate_results
    from .synth.sequences import fit_sequences

    check_command_outputs(args, ("gt", "results"), ("out",))
    gt = load_ground_truth(args.gt)
    results = validate_results(read_json(args.results, "results"), str(args.results), gt)
    params, measured = fit_sequences(gt, results, str(args.results))
    write_json_atomic(args.out, {**params.to_dict(), "measured": measured})
    d = params.durations
    print(f"fitted sequence parameters to {args.results}: mean durations (frames) inversion {d['inversion']:.2f}, "
          f"swap {d['swap']:.2f}, miss {d['miss']:.2f}; jitter lag-1 correlation {params.jitter_rho:.3f} -> {args.out}")
    return 0


def cmd_diagnose(args) -> int:
    from .fileio import write_json_atomic
    from .synth.cocoio import load_ground_truth, load_results
    from .synth.diagnose import diagnose

    plots = [("--plots", Path(args.plots) / n) for n in ("keypoint_errors.png", "ap_gains.png", "crowding.png")
             ] if args.plots else ()
    check_command_outputs(args, ("gt", "results"), ("out",), extra=plots)
    gt = load_ground_truth(args.gt)
    results = load_results(args.results, gt)
    report = diagnose(gt, results, source=str(args.results))
    write_json_atomic(args.out, report)
    print(format_report(report))
    if args.plots:
        from .synth.plots import write_plots

        for path in write_plots(report, args.plots):
            print(f"chart: {path}")
    print(f"report: {args.out}")
    return 0


def format_report(report: dict) -> str:
    """A diagnosis summary as a few plain-text tables."""
    s = report["summary"]
    d = s["detections"]
    lines = [(f"{report['source']}: {d['total']} detections on {s['images']} images, {d['matched']} matched "
              f"to GT at OKS >= 0.1 ({d['unmatched']} unmatched)")]
    k = s["keypoints"]
    lines.append(f"keypoints of matched detections: {k['labelled']} labelled")
    lines.append("  " + "  ".join(f"{name} {k['counts'][name]} ({100 * (k['shares'][name] or 0):.1f} %)"
                                  for name in ("good", "jitter", "inversion", "swap", "miss")))
    ap = s.get("ap")
    if ap and ap.get("original") is not None:
        lines.append(f"AP {ap['original']:.3f}; corrected ({ap['correction']}):")
        lines.append(f"  {'error':10s} {'alone':>8s} {'gain':>8s} {'cumulative':>11s} {'gain':>8s}")
        for err, alone in ap["alone"].items():
            cum = ap["cumulative"][err]
            lines.append(f"  {err:10s} {_f(alone['ap']):>8s} {_f(alone['gain'], True):>8s} "
                         f"{_f(cum['ap']):>11s} {_f(cum['gain'], True):>8s}")
    return "\n".join(lines)


def _f(x, signed=False) -> str:
    if x is None:
        return "-"
    return f"{x:+.3f}" if signed else f"{x:.3f}"


# (name, the val images' input, its format, the same kind of input on the train images for fit-choice)
DEMO_INPUTS = (("synthesized inputs (published error rates)", None, "coco", None),
               ("real top-down estimator", "topdown_keypoints_val4.json", "coco", ""),
               ("MoveNet Thunder (--format movenet)", "real_estimators/movenet_thunder_native.json", "movenet",
                "real_estimators/movenet_thunder_train10_native.json"),
               ("BlazePose full (--format blazepose)", "real_estimators/blazepose_full_native.json", "blazepose",
                "real_estimators/blazepose_full_train10_native.json"))


def cmd_demo(args) -> int:
    """Train the CPU preset briefly on the bundled train images (or take a checkpoint), then refine held-out
    inputs on the bundled val images — synthesized ones and real estimators' outputs, each through its own
    --format — raw and with the per-joint choice, and print AP and the error breakdown of each."""
    from .config import load_config
    from .fileio import read_json, write_json_atomic
    from .offline import fit_choice_file, refine_file
    from .synth.cocoio import load_ground_truth, load_results, validate_results
    from .synth.diagnose import diagnose, keypoint_ap
    from .viz import write_overlays

    out = Path(args.out)
    gt_path = SAMPLE_DIR / "person_keypoints_val_sample.json"
    images_dir = SAMPLE_DIR / "images"
    train_gt = SAMPLE_DIR / "person_keypoints_train10.json"
    print(f"posefix {__version__} demo on the bundled COCO sample ({SAMPLE_DIR})\n")
    synth_path = out / "synth_results.json"
    _synthesize(str(gt_path), str(synth_path), str(out / "synth_labels.json"), args.seed + 1, None)
    checkpoint = args.checkpoint
    if checkpoint is None:
        run = out / f"run-{args.steps}-steps-seed-{args.seed}"
        checkpoint = run / "model.safetensors"
        if checkpoint.exists():
            print(f"\nreusing the refiner an earlier demo trained in {run} (delete it to train again)")
        else:
            resume = (run / "last.pt").exists()
            print(f"\n{'resuming' if resume else 'training'} the cpu-small preset for {args.steps} steps on the "
                  f"train images' persons ({train_gt.name}) -> {run}")
            cfg = load_config(preset="cpu-small", overrides=[
                f"data.train_annotations={train_gt}", f"data.train_images={SAMPLE_DIR / 'train_images'}",
                f"train.max_steps={args.steps}", f"train.seed={args.seed}", "train.lr_milestones=[0.9]"])
            from .train import train

            train(cfg, run, resume=resume)
    gt = load_ground_truth(gt_path)
    rows = []
    print()
    train_synth = out / "synth_train_results.json"
    _synthesize(str(train_gt), str(train_synth), None, args.seed + 2, None)
    for name, file, fmt, fit_file in DEMO_INPUTS:
        path = synth_path if file is None else SAMPLE_DIR / file
        stem = Path(path).stem
        if FORMATS[fmt].coco_results:
            given = load_results(path, gt)
        else:  # the estimator's poses as read, as COCO results: the input the refiner gets
            given = as_coco_results(path, fmt, images_dir, gt)
            write_json_atomic(out / f"input_{stem}.json", given)
        files = [("input", given)]
        runs = [("raw", checkpoint, RefineOptions(output="raw")),
                ("heads", checkpoint, RefineOptions(choice_margin=0.0))]
        if fit_file != "":  # the choice fitted on the train images' counterpart of this input, then refined
            fitted = out / f"fitted_{stem}.safetensors"
            runs.append(("fitted", fitted, RefineOptions()))
        for label, weights, options in runs:
            if label == "fitted":
                fit_input = train_synth if fit_file is None else SAMPLE_DIR / fit_file
                print_fitted(fit_choice_file(checkpoint, fit_input, SAMPLE_DIR / "train_images", train_gt, weights,
                                             fmt=fmt), weights)
            refined = out / f"refined_{stem}_{label}.json"
            print_refined(refine_file(weights, path, images_dir, refined, options, fmt=fmt, annotations=gt_path))
            files.append((label, load_results(refined, gt)))
        for label, res in files:
            shares = diagnose(gt, res, source=str(path), with_ap=False)["summary"]["keypoints"]["shares"]
            rows.append((name, label, keypoint_ap(gt, res), shares))
    print(f"\n{'results':45s} {'':8s} {'AP':>6s} {'good':>6s} {'jitter':>7s} {'inv.':>6s} {'swap':>6s} {'miss':>6s}")
    for name, label, ap, sh in rows:
        cells = " ".join(f"{100 * (sh[k] or 0):5.1f}%" for k in ("good", "jitter", "inversion", "swap", "miss"))
        print(f"{name:45s} {label:8s} {ap:6.3f} {cells}")
    overlays = out / "overlays"
    results = validate_results(read_json(SAMPLE_DIR / "topdown_keypoints_val4.json", "results"))
    compare = validate_results(read_json(out / "refined_topdown_keypoints_val4_heads.json", "compare"))
    shown = write_overlays(images_dir, results, compare, {im["id"]: im for im in gt.doc["images"]}, overlays)
    print(f"wrote {len(shown)} images to {overlays} (input orange, left; refined cyan, right)")
    print(f"\nrefined results, overlays and the run are in {out}/ (checkpoint {checkpoint})")
    print("AP by pycocotools on the val images each input covers; raw: every joint as refined; heads: per joint "
          "the input or the refined joint, whichever the refiner's heads find more likely right (--choice-margin 0); "
          "fitted: the choice fitted (posefix fit-choice) to the same kind of input on the train images. Without a "
          "fitted choice, posefix refine keeps every input joint (the input rows).")
    if args.checkpoint is None:
        print(f"the refiner was trained for {args.steps} CPU steps on {train_gt.name}'s persons only; every "
              "score above is on the held-out val images.")
    return 0


def cmd_train(args) -> int:
    from .config import PRESETS, load_config

    if args.list_presets:
        for name, preset in PRESETS.items():
            print(f"{name:14s} {preset['_about']}")
        return 0
    if args.out is None:
        raise InputError("--out", "is required: the run directory")
    if (args.config is None) == (args.preset is None):
        raise InputError("--config/--preset", "give exactly one of them")
    cfg = load_config(args.config, args.preset, args.set or [])
    out = Path(args.out)
    from .fileio import check_outputs

    data = [(f"data.{k}", getattr(cfg.data, k) or None) for k in ("train_annotations", "train_images",
                                                                  "val_annotations", "val_images", "profile",
                                                                  "train_results")]
    check_outputs([("--config", args.config), *data], [("--out", out / name) for name in (
        "model.safetensors", "last.pt", "metrics.jsonl", "calibration.json", "config.toml")])
    if not args.resume and (out / "last.pt").exists():
        raise InputError("--out", f"{out} already holds a run; use --resume to continue it or another directory")
    from .train import train

    summary = train(cfg, out, resume=args.resume)
    if summary:
        print(f"validation: input AP {summary['input_ap']:.3f} -> refined AP {summary['refined_ap']:.3f} "
              f"on {summary['persons']} persons; confidence ECE {summary['confidence_ece']:.3f}")
    print(f"weights: {out / 'model.safetensors'}")
    return 0


def cmd_train_temporal(args) -> int:
    from .fileio import check_outputs
    from .temporal.learned import NetConfig
    from .temporal.training import train_temporal, training_sequences

    check_command_outputs(args, ("gt",), ("out",))
    check_outputs([("--results", p) for p in args.results or []] + [("--mocap", p) for p in args.mocap or []],
                  [("--out", args.out)])
    if args.steps < 1:
        raise InputError("--steps", f"must be at least 1, got {args.steps}")
    config = NetConfig(window=args.window)
    seqs = training_sequences(args.gt, args.results or [], args.mocap or [], args.mocap_sequences, args.seed)
    if not seqs:
        raise InputError("--results/--mocap", "give at least one results file or motion-capture clip")
    log = None if args.quiet else (lambda line: print(line, file=sys.stderr))
    train_temporal(args.out, seqs, config, args.steps, args.seed, log=log)
    print(f"weights: {args.out} ({len(seqs)} sequences, {args.steps} steps per network)")
    return 0


def refine_options(args, **changes) -> RefineOptions:
    """The refiner's options from a command's flags (those it has; the rest at their defaults)."""
    given = {f.name: getattr(args, f.name) for f in fields(RefineOptions) if getattr(args, f.name, None) is not None}
    return RefineOptions(**{**given, **changes})


def _ray_args(args) -> dict | None:
    """The Ray options of ``posefix refine``: only with ``--ray``, and in range (None without ``--ray``)."""
    if args.ray is None:
        for name in ("actors", "num_gpus"):
            if getattr(args, name) is not None:
                raise InputError(f"--{name.replace('_', '-')}", "only goes with --ray")
        return None
    return {"actors": args.actors, "num_gpus": args.num_gpus, "address": args.ray or None,
            "show_progress": not args.quiet}


def print_refined(r, quiet_notice: bool = False) -> None:
    """What ``posefix refine`` says of a :class:`~posefix.refine.FileRefinement`."""
    kept = f", {r.kept} of {r.present} present keypoints kept from the input"
    print(f"refined {r.persons} persons on {r.images} images in {r.seconds:.1f} s "
          f"({r.persons / max(r.seconds, 1e-9):.1f} persons/s){kept} -> {r.where}")
    if r.skipped_entries:
        print(f"skipped {len(r.skipped_entries)} invalid entries (--skip-invalid); the first: {r.skipped_entries[0]}")
    if r.skipped_images:
        n = len(r.skipped_images)
        print(f"skipped {n} image{'s' * (n > 1)} that cannot be read (--skip-invalid), their persons left out: "
              + "; ".join(message for _, message in r.skipped_images[:5]) + ("; ..." if n > 5 else ""))
    if r.keeps_every_input and not quiet_notice:
        print(f"note: {KEEPS_INPUT_NOTICE}")


def cmd_refine(args) -> int:
    from tqdm import tqdm

    from .offline import check_run, refine_file, shard_paths

    ray = _ray_args(args)
    options = refine_options(args)
    check_run(args.shards, ray, options)
    if args.ray is not None:
        require("ray.data", "ray", "refining on Ray")
    check_command_outputs(args, ("checkpoint", "onnx", "input", "annotations", "images"), ("out",),
                          extra=[("--shards", p) for p in shard_paths(args.out, args.shards)] if args.shards else ())
    with tqdm(unit="person", file=sys.stderr, disable=args.quiet or args.ray is not None or None,
              mininterval=0.5) as bar:
        def start(total):
            bar.total = total
            bar.refresh()

        r = refine_file(args.checkpoint, args.input, args.images, args.out, options, fmt=args.format,
                        annotations=args.annotations, keep_input_below=args.keep_input_below, workers=args.workers,
                        skip_invalid=args.skip_invalid, allow_outside_images=args.allow_outside_images,
                        shards=args.shards, ray=ray, start=start, progress=bar.update)
    print_refined(r)
    return 0


def cmd_eval(args) -> int:
    from .fileio import write_json_atomic
    from .synth.cocoio import load_ground_truth, load_results
    from .synth.diagnose import diagnose, keypoint_stats

    if args.json:
        check_command_outputs(args, ("gt",), ("json",))
    gt = load_ground_truth(args.gt)
    loaded = [(path, load_results(path, gt)) for path in args.results]
    if args.all_images:
        images = sorted(gt.image_ids_all)
    else:
        images = sorted({r["image_id"] for _, res in loaded for r in res})
    rows = []
    for path, res in loaded:
        stats = keypoint_stats(gt, res, images)
        shares = diagnose(gt, res, source=str(path), with_ap=False)["summary"]["keypoints"]["shares"] if res else {}
        rows.append({"results": str(path), "detections": len(res), **stats, "error_shares": shares})
    width = max(12, *(len(Path(r["results"]).name) for r in rows))
    print(f"keypoint AP/AR by pycocotools on {len(images)} images"
          f"{' (all GT images)' if args.all_images else ' (those the results cover)'}; "
          "error shares among labelled keypoints of matched detections")
    head = " ".join(f"{k:>6s}" for k in ("AP", "AP50", "AP75", "APm", "APl", "AR"))
    print(f"{'results':{width}s} {head} | {'good':>6s} {'jitter':>6s} {'inv.':>6s} {'swap':>6s} {'miss':>6s}")
    for r in rows:
        nums = " ".join(f"{r[k]:6.3f}" if r[k] is not None else f"{'-':>6s}"
                        for k in ("AP", "AP50", "AP75", "APm", "APl", "AR"))
        sh = r["error_shares"]
        errs = " ".join(f"{100 * sh[k]:5.1f}%" if sh.get(k) is not None else f"{'-':>6s}"
                        for k in ("good", "jitter", "inversion", "swap", "miss"))
        print(f"{Path(r['results']).name:{width}s} {nums} | {errs}")
    if args.json:
        write_json_atomic(args.json, {"images": images, "rows": rows})
    return 0


def cmd_viz(args) -> int:
    from .fileio import read_json
    from .synth.cocoio import load_ground_truth, validate_results
    from .viz import selected_images, write_overlays

    results = validate_results(read_json(args.results, "results"), str(args.results))
    compare = validate_results(read_json(args.compare, "compare"), str(args.compare)) if args.compare else None
    if compare is not None and len(compare) != len(results):
        raise InputError("--compare", f"has {len(compare)} results, --results has {len(results)}; "
                         "give the refined file of the same input")
    entries = {}
    if args.annotations:
        entries = {im["id"]: im for im in load_ground_truth(args.annotations).doc["images"]}
    out = Path(args.out)
    shown = selected_images(results, args.min_score, args.max_images)
    check_command_outputs(args, ("images", "results", "compare", "annotations"), (),
                          extra=[("--out", out / f"{image_id:012d}.png") for image_id in shown])
    written = write_overlays(args.images, results, compare, entries, out, args.min_score, args.min_keypoint_score,
                             args.max_images, args.allow_outside_images)
    print(f"wrote {len(written)} images to {out}" + (" (input orange, left; refined cyan, right)" if compare else ""))
    return 0


def cmd_refine_video(args) -> int:
    from tqdm import tqdm

    from .tracking import OneEuroParams
    from .video import refine_video_frames

    check_command_outputs(args, ("checkpoint", "onnx", "video", "input", "annotations", "temporal_weights"),
                          ("out", "render"))
    if args.video is None:
        for name in ("checkpoint", "onnx", "render"):
            if getattr(args, name):
                raise InputError(f"--{name}", "needs --video (the image refiner sees the frames)")
        from .temporal.files import refine_video_file

        t0 = time.perf_counter()
        c = refine_video_file(args.input, args.out, args.format, args.annotations, args.causal, args.smoother,
                              args.temporal_weights, args.max_gap, args.max_person_gap, args.frame_size,
                              args.person_gate, args.lost_score)
        print(f"refined {c['persons']} persons in {c['tracks']} tracks over time "
              f"({'causal' if args.causal else 'offline'}, {args.smoother}; {c['filled']} joints filled, "
              f"{c['corrected']} corrected, {c['filled_persons']} persons filled in) in "
              f"{time.perf_counter() - t0:.1f} s -> {args.out}")
        return 0
    if args.annotations:
        raise InputError("--annotations", "with --video the poses are one video's frames; leave it out")
    temporal = None
    if args.temporal:  # the temporal refinement of the image refiner's output
        temporal = {"smoother": args.smoother, "weights": args.temporal_weights, "max_gap": args.max_gap,
                    "max_person_gap": args.max_person_gap, "causal": args.causal, "person_gate": args.person_gate,
                    "lost_score": args.lost_score}
    with tqdm(unit="frame", file=sys.stderr, disable=args.quiet or None) as bar:
        def start(total):
            bar.total = total
            bar.refresh()

        r = refine_video_frames(args.checkpoint, args.video, args.input, args.out, refine_options(args),
                                fmt=args.format, follow=args.follow,
                                smoothing=OneEuroParams(args.min_cutoff, args.beta, args.d_cutoff) if args.smooth
                                else None, render=args.render, temporal=temporal, start=start, progress=bar.update)
    print(f"refined {r['persons']} persons on {r['frames']} frames in {r['seconds']:.1f} s "
          f"({r['frames'] / max(r['seconds'], 1e-9):.1f} frames/s) -> {args.out}"
          + (f"; video with input (orange) and refined (cyan) poses -> {args.render}" if args.render else ""))
    if r["keeps_every_input"]:
        print(f"note: {KEEPS_INPUT_NOTICE}")
    return 0


def cmd_export(args) -> int:
    from .onnx_backend import export_onnx, save_model, triton_model_dir
    from .refiner import Refiner
    from .weights import load_weights

    if args.onnx is None and args.triton is None:
        raise InputError("--onnx/--triton", "give at least one: the ONNX file or the Triton repository to write")
    check_command_outputs(args, ("checkpoint", "calibration_poses", "calibration_images"), ("onnx",),
                          trees=[("--triton", triton_model_dir(args.triton, args.triton_name))] if args.triton else ())
    if args.int8 and (args.calibration_images is None or args.calibration_poses is None):
        raise InputError("--calibration-images/--calibration-poses", "--int8 needs both: images and the "
                         "estimator's poses on them, for the crops the quantiser calibrates on")
    if args.batch != "dynamic" and not (args.batch.isdigit() and int(args.batch) > 0):
        raise InputError("--batch", f"must be dynamic or a positive integer, got {args.batch!r}")
    batch = None if args.batch == "dynamic" else int(args.batch)
    if args.triton and batch is not None:
        raise InputError("--batch", "a Triton repository needs --batch dynamic (Triton batches the calls)")
    for name in ("max_batch_size", "instances", "calibration_persons"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name.replace('_', '-')}", f"must be at least 1, got {getattr(args, name)}")
    model = load_weights(args.checkpoint)
    t0 = time.perf_counter()
    if args.int8:  # the crops first: bad calibration input is reported before the export's work
        from .onnx_backend import calibration_crops, quantize_int8

        image, keypoints = calibration_crops(Refiner(model), args.calibration_images, args.calibration_poses,
                                             args.calibration_persons, allow_outside=args.allow_outside_images)
    proto = export_onnx(model, args.opset, batch, for_int8=args.int8)
    what = "fp32"
    if args.int8:
        proto = quantize_int8(proto, image, keypoints)
        what = f"int8 (calibrated on {len(image)} crops)"
    written = []
    if args.onnx:
        save_model(proto, args.onnx)
        written.append(args.onnx)
    if args.triton:
        from .onnx_backend import triton_config, write_triton_repository

        config = triton_config(proto, args.triton_name, args.max_batch_size, args.max_queue_delay_ms,
                               args.instances, args.instance_kind)
        written.append(str(write_triton_repository(proto, args.triton, config, args.triton_name)))
    print(f"exported {args.checkpoint} ({model.cfg.backbone}, {model.cfg.input_size[0]}x{model.cfg.input_size[1]}) "
          f"as ONNX opset {args.opset}, {what}, batch {args.batch}, in {time.perf_counter() - t0:.1f} s -> "
          + ", ".join(written))
    return 0


def _temporal_args(parser) -> None:
    from .temporal import DEFAULT_SMOOTHER, SMOOTHERS

    parser.add_argument("--annotations", metavar="FRAMES.json", help="images with id, vid_id and frame_id "
                        "(PoseTrack): the results' image_ids are its frames, of many videos")
    parser.add_argument("--causal", action="store_true", help="use only past frames, as the stream does "
                        "(default: offline, every frame)")
    parser.add_argument("--smoother", default=DEFAULT_SMOOTHER, choices=sorted(SMOOTHERS),
                        help=f"the trajectory smoother ({DEFAULT_SMOOTHER})")
    parser.add_argument("--temporal-weights", metavar="FILE", help="weights for a learned smoother")
    parser.add_argument("--max-gap", type=int, default=5, help="fill a joint missing for at most this many frames (5)")
    parser.add_argument("--max-person-gap", type=int, default=0,
                        help="offline, fill a person its track missed for at most this many frames (0)")
    parser.add_argument("--person-gate", type=float, default=0.0, metavar="S",
                        help="offline, take out a frame where most of a person's joints are more than S person "
                             "sizes from their course and their mean score is below --lost-score (the estimator "
                             "lost the person), and fill it in from the frames around it (0: off)")
    parser.add_argument("--lost-score", type=float, default=0.3, metavar="P",
                        help="the mean score below which --person-gate takes a frame out (0.3; 1: any score)")
    parser.add_argument("--frame-size", metavar="WxH", help="without --video or --annotations: the frames' size "
                        "in pixels, for formats with normalised coordinates (MoveNet, BlazePose)")
    parser.add_argument("--temporal", action="store_true",
                        help="with --video: refine the image refiner's output over time as well (without --video "
                             "the temporal refinement is all there is)")


def _backend_args(parser) -> None:
    parser.add_argument("--backend", choices=("torch", "onnxruntime"),
                        help="what runs the model (torch; onnxruntime where --onnx is given)")
    parser.add_argument("--onnx", metavar="MODEL.onnx", help="a model from posefix export (fp32 or int8), run by "
                        "ONNX Runtime; without it --backend onnxruntime exports --checkpoint in memory")
    parser.add_argument("--provider", choices=("cpu", "cuda", "tensorrt"),
                        help="ONNX Runtime's execution provider (default: cuda on --device cuda, else cpu)")


def cmd_serve(args) -> int:
    from .serve import ServeOptions, serve_main

    names = {f.name for f in fields(ServeOptions)} - {"refine"}
    return serve_main(ServeOptions(refine=refine_options(args), **{name: getattr(args, name) for name in names}))


def _output_options(parser) -> None:
    parser.add_argument("--output", default="choice", choices=("choice", "raw"),
                        help="choice (default): per joint, the input or the refined joint, whichever the model "
                             "finds more likely right; raw: every joint as refined")
    parser.add_argument("--choice-margin", type=float, default=None, metavar="P",
                        help="with --output choice, take the refined joint only where its confidence exceeds the "
                             "input joint's by more than P (0; with a checkpoint from fit-choice: where 2p - 1 > P "
                             "for its probability p that the correction is closer, P its own fitted margin)")


def cmd_fit_choice(args) -> int:
    from .offline import fit_choice_file

    check_command_outputs(args, ("checkpoint", "input", "annotations", "images"), ("out",))
    rule = fit_choice_file(args.checkpoint, args.input, args.images, args.annotations, args.out,
                           refine_options(args), fmt=args.format, workers=args.workers,
                           skip_invalid=args.skip_invalid, allow_outside_images=args.allow_outside_images)
    print_fitted(rule, args.out)
    return 0


def print_fitted(rule, out) -> None:
    """What ``posefix fit-choice`` says of the rule it fitted and wrote to ``out``."""
    i = rule.info
    print(f"fitted the choice on {i['joints']} labelled joints of {i['persons']} persons: the correction is closer "
          f"to the truth on {100 * i['refined_closer']:.0f} % of them and taken on {100 * i['taken']:.0f} %; on "
          f"these persons (not held out) AP {i['ap_input']:.3f} input, {i['ap_raw']:.3f} raw, {i['ap_fitted']:.3f} "
          f"with the fitted choice at its margin {rule.margin:g} "
          f"(the best of {', '.join(map(str, i['ap_by_margin']))}) "
          f"-> {out}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="posefix", description=__doc__.splitlines()[0].rstrip(".") + ".")
    p.add_argument("--version", action="version", version=f"posefix {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    s = sub.add_parser("synth", help="synthesize erroneous input poses from COCO GT (PoseFix's error tables)",
                       description="Synthesize one erroneous input pose per labelled GT person, as COCO results.")
    s.add_argument("--gt", metavar="ANNOTATIONS.json", help="COCO person-keypoints annotations (required)")
    s.add_argument("--out", metavar="RESULTS.json", help="where to write the COCO results (required)")
    s.add_argument("--seed", type=seed_type, default=0, help="random seed; the same seed gives the same output (0)")
    s.add_argument("--profile", metavar="PROFILE.json", help="error profile (default: the published PoseFix one)")
    s.add_argument("--labels", metavar="LABELS.json", help="also write what was planted at each keypoint "
                   "(with the SHA-256 of the results they belong to)")
    d = s.add_argument_group("dataset directory (any of these makes --out a directory; see docs/synthesis.md)")
    d.add_argument("--variants", type=int, metavar="N", help="N independent inputs per person (1)")
    d.add_argument("--severity", type=float, metavar="S", help="scale every error's probability by S (1)")
    for e in ("jitter", "inversion", "swap", "miss"):
        d.add_argument(f"--severity-{e}", type=float, metavar="S", help=f"scale the {e} probability by S (1)")
    d.add_argument("--sequences", action="store_true", help="per-frame GT of tracks (vid_id/frame_id or "
                   "clip_id/frame on images, track_id on annotations): errors that persist over frames")
    d.add_argument("--sequence-params", metavar="PARAMS.json", help="durations and jitter correlation (default: "
                   "the bundled ones; see synth fit-sequences)")
    d.add_argument("--block-persons", type=int, metavar="N", help="persons per shard (8192)")
    s.set_defaults(func=cmd_synth)
    fit_sub = s.add_subparsers(dest="synth_command", metavar="{fit,fit-sequences}")
    f = fit_sub.add_parser("fit", help="fit an error profile to an estimator's results",
                           description="Estimate, from the diagnosis of an estimator's results, the probability "
                                       "of each error by joint group and bin, as a profile for --profile.")
    gt_arg(f)
    f.add_argument("--results", required=True, metavar="RESULTS.json", help="the estimator's COCO results")
    f.add_argument("--out", required=True, metavar="PROFILE.json")
    f.add_argument("--profile", metavar="TEMPLATE.json", help="groups and bins to fit (default: the published)")
    format_arg(f, help="the results' format, as for refine (coco)")
    images_arg(f, help="the images (for a format other than coco: file names, sizes)")
    allow_outside_images_arg(f)
    f.set_defaults(func=cmd_synth_fit)
    fs = fit_sub.add_parser("fit-sequences", help="measure error durations and jitter correlation from an "
                            "estimator's per-frame results", description="Measure, from an estimator's per-frame "
                            "COCO results with track_id, the mean duration of its inversions, swaps and misses and "
                            "its jitter's frame-to-frame correlation, as --sequence-params for synth --sequences.")
    gt_arg(fs)
    fs.add_argument("--results", required=True, metavar="RESULTS.json", help="COCO results with track_id")
    fs.add_argument("--out", required=True, metavar="PARAMS.json")
    fs.set_defaults(func=cmd_synth_fit_sequences)

    g = sub.add_parser("diagnose", help="diagnose an estimator's keypoint errors (Ronchi & Perona)",
                       description="Label every keypoint of every matched detection good / jitter / inversion / "
                                   "swap / miss, and measure the AP each error type costs.")
    gt_arg(g)
    g.add_argument("--results", required=True, metavar="RESULTS.json")
    g.add_argument("--out", required=True, metavar="REPORT.json")
    g.add_argument("--plots", metavar="DIR", help="also write PNG charts there")
    g.set_defaults(func=cmd_diagnose)

    t = sub.add_parser("train", help="train a refiner (torchrun for several GPUs or nodes)",
                       description="Train a refiner on COCO with inputs synthesized on the fly.")
    t.add_argument("--config", metavar="CONFIG.toml", help="a config file ([model], [data], [train] tables)")
    t.add_argument("--preset", metavar="NAME", help="a preset (see --list-presets)")
    t.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a key, e.g. --set train.max_steps=100 (repeatable)")
    t.add_argument("--out", metavar="RUN_DIR", help="the run directory")
    t.add_argument("--resume", action="store_true", help="continue the run in RUN_DIR from its last.pt")
    t.add_argument("--list-presets", action="store_true", help="name the presets and exit")
    t.set_defaults(func=cmd_train)

    tt = sub.add_parser("train-temporal", help="train the learned temporal refiner (--smoother learned)",
                        description="Train the learned temporal refiner on an estimator's per-frame results against "
                        "per-frame ground truth (matched by track_id) and on motion capture with planted errors.")
    tt.add_argument("--gt", required=True, metavar="GT.json",
                    help="per-frame COCO GT; images carry vid_id and frame_id (or clip_id and frame)")
    tt.add_argument("--results", action="append", metavar="RESULTS.json",
                    help="an estimator's COCO results on those frames, with the GT's track_id (repeatable)")
    tt.add_argument("--mocap", action="append", metavar="CLIP.bvh", help="a motion-capture clip (repeatable)")
    tt.add_argument("--mocap-sequences", type=int, default=300, metavar="N",
                    help="sequences cut from the clips, each with its own camera and planted errors (300)")
    tt.add_argument("--out", required=True, metavar="WEIGHTS.safetensors", help="the weights file to write")
    tt.add_argument("--steps", type=int, default=800, help="training steps of each network (800)")
    tt.add_argument("--window", type=int, default=15, help="frames the network sees (odd; 15)")
    tt.add_argument("--seed", type=seed_type, default=0, help="the seed (0)")
    tt.add_argument("--quiet", action="store_true", help="no progress lines")
    tt.set_defaults(func=cmd_train_temporal)

    r = sub.add_parser("refine", help="refine an estimator's results on a set of images",
                       description="Refine an estimator's poses (COCO results or another estimator's format) and "
                                   "write COCO results with each keypoint's refined confidence.")
    checkpoint_arg(r)
    images_arg(r, required=True)
    r.add_argument("--input", required=True, metavar="RESULTS.json", help="the estimator's output (a directory "
                   "of *_keypoints.json for openpose)")
    r.add_argument("--out", required=True, metavar="REFINED.json")
    annotations_arg(r)
    format_arg(r)
    flip_test_arg(r)
    batch_size_arg(r)
    device_arg(r)
    precision_args(r)
    workers_arg(r)
    reduced_decoding_arg(r)
    r.add_argument("--keep-input-below", type=float, metavar="CONF",
                   help="keep the input keypoint where the refined confidence is below CONF and below the "
                        "input keypoint's score")
    _output_options(r)
    skip_invalid_arg(r)
    allow_outside_images_arg(r)
    quiet_arg(r)
    ray = r.add_argument_group("on a Ray cluster (pip install 'posefix[ray]')")
    ray.add_argument("--ray", nargs="?", const="", metavar="ADDRESS",
                     help="refine as a Ray Data pipeline: on a new local Ray, or on the cluster at ADDRESS")
    ray.add_argument("--actors", type=int,
                     help="refiners, one per actor (the cluster's GPUs / --num-gpus, or its CPUs)")
    ray.add_argument("--num-gpus", type=float, help="GPUs per actor, a fraction shares one (1 with --device cuda)")
    ray.add_argument("--shards", type=int, help="write the output as N files REFINED-00000-of-0000N.json, "
                     "the images split between them in input order")
    _backend_args(r)
    r.set_defaults(func=cmd_refine)

    fc = sub.add_parser("fit-choice", help="fit the per-joint choice to one estimator's results on labelled images",
                        description="Learn, from an estimator's results on labelled images, when the refiner's "
                                    "correction of a joint is closer to the truth than the estimator's joint, and "
                                    "write a copy of the checkpoint whose per-joint choice follows that rule.")
    checkpoint_arg(fc, required=True, help="model.safetensors from posefix train")
    images_arg(fc, required=True)
    fc.add_argument("--input", required=True, metavar="RESULTS.json", help="the estimator's output on these images")
    annotations_arg(fc, required=True, help="their COCO ground truth")
    fc.add_argument("--out", required=True, metavar="FITTED.safetensors", help="the checkpoint with the fitted choice")
    format_arg(fc)
    batch_size_arg(fc)
    device_arg(fc)
    workers_arg(fc)
    reduced_decoding_arg(fc)
    skip_invalid_arg(fc, help="fit on the valid entries and skip the rest")
    allow_outside_images_arg(fc)
    fc.set_defaults(func=cmd_fit_choice)

    e = sub.add_parser("eval", help="keypoint AP/AR and error breakdown of results files, side by side",
                       description="Evaluate COCO keypoint results with pycocotools, side by side, with the "
                                   "error breakdown of posefix diagnose for each.")
    gt_arg(e)
    e.add_argument("results", nargs="+", metavar="RESULTS.json")
    e.add_argument("--json", metavar="OUT.json", help="also write the table as JSON")
    e.add_argument("--all-images", action="store_true",
                   help="evaluate on every GT image, not only those the results cover")
    e.set_defaults(func=cmd_eval)

    v = sub.add_parser("viz", help="draw skeletons, before and after side by side, as PNGs")
    images_arg(v, required=True)
    v.add_argument("--results", required=True, metavar="RESULTS.json")
    v.add_argument("--compare", metavar="REFINED.json", help="refined results of the same input, drawn on the right")
    annotations_arg(v, help="to find image files by their file_name")
    v.add_argument("--out", required=True, metavar="DIR")
    v.add_argument("--min-score", type=float, default=0.2, help="skip persons scored below this (0.2)")
    v.add_argument("--min-keypoint-score", type=float, default=0.0, help="skip keypoints scored at or below (0)")
    v.add_argument("--max-images", type=int, default=0, help="at most this many images (0 = all)")
    allow_outside_images_arg(v)
    v.set_defaults(func=cmd_viz)

    rv = sub.add_parser("refine-video", help="refine an estimator's poses over time (and on the video's frames)",
                        description="Refine per-frame poses of videos over time: tracking, left/right flips and "
                                    "spikes corrected, short gaps filled, smoothing in units of the person's size "
                                    "(docs/video.md). Input: COCO results with image_id = frame index (or frames "
                                    "of --annotations), or any supported format keyed by frame. With --video and "
                                    "--checkpoint the image refiner runs first; --render draws the result.")
    checkpoint_arg(rv)
    rv.add_argument("--video", metavar="IN.mp4", help="the video, for the image refiner and --render")
    rv.add_argument("--input", required=True, metavar="POSES.json")
    rv.add_argument("--out", required=True, metavar="REFINED.json")
    rv.add_argument("--render", metavar="OUT.mp4", help="also write the video with input and refined skeletons")
    format_arg(rv)
    rv.add_argument("--follow", action="store_true",
                    help="a tracked person's crop follows its previous refined pose (needs track_id)")
    rv.add_argument("--smooth", action="store_true", help="One-Euro filter over each track's refined keypoints")
    rv.add_argument("--min-cutoff", type=float, default=1.0,
                    help="One-Euro minimum cutoff in Hz (1.0; lower: smoother)")
    rv.add_argument("--beta", type=float, default=0.007,
                    help="One-Euro speed coefficient in 1/px (0.007; higher: less lag)")
    rv.add_argument("--d-cutoff", type=float, default=1.0, help="One-Euro cutoff of the speed estimate in Hz (1.0)")
    _temporal_args(rv)
    flip_test_arg(rv)
    batch_size_arg(rv)
    device_arg(rv)
    precision_args(rv)
    _output_options(rv)
    quiet_arg(rv)
    _backend_args(rv)
    rv.set_defaults(func=cmd_refine_video)

    sv = sub.add_parser("serve", help="serve refinements over gRPC (posefix.v1.PoseRefiner)",
                        description="Serve the refiner over gRPC until SIGTERM/SIGINT; concurrent calls are batched "
                                    "together on the device. Health, reflection and Prometheus metrics included.")
    checkpoint_arg(sv, metavar="MODEL.safetensors", help="the refiner's weights (posefix train; or --onnx); "
                   "without either, no refiner: streams are refined over time alone (docs/video.md)")
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1; 0.0.0.0 for other machines)")
    sv.add_argument("--port", type=int, default=50051, help="gRPC port (50051; 0: any free port)")
    device_arg(sv, "auto")
    sv.add_argument("--max-batch-size", dest="batch_size", type=int, default=64, metavar="PERSONS",
                    help="persons per model call (64)")
    sv.add_argument("--max-queue-delay-ms", type=float, default=5.0, metavar="MS",
                    help="how long the oldest waiting call waits for others to batch with (5)")
    sv.add_argument("--max-queue-size", type=int, default=1024, metavar="PERSONS",
                    help="persons that may wait, at least 256; beyond: RESOURCE_EXHAUSTED (1024)")
    sv.add_argument("--max-queue-wait-s", type=float, default=None, metavar="S",
                    help="longest a call may wait for its batch; estimated longer: RESOURCE_EXHAUSTED (no bound)")
    sv.add_argument("--metrics-port", type=int, default=None, metavar="PORT", help="Prometheus /metrics port (off)")
    flip_test_arg(sv, help="also refine each crop's mirror and average")
    precision_args(sv)
    _output_options(sv)
    sv.add_argument("--grace-s", type=float, default=10.0, metavar="S",
                    help="on SIGTERM, time for calls in flight (10)")
    sv.add_argument("--drain-s", type=float, default=0.0, metavar="S",
                    help="on SIGTERM, keep taking calls with health NOT_SERVING this long first (0)")
    sv.add_argument("--index", metavar="POSES.index", help="a pose index (posefix index build) for SearchPoses")
    sv.add_argument("--temporal-weights", metavar="FILE", help="weights of posefix train-temporal: streams may ask "
                    "for the learned smoother (temporal.smoother \"learned\")")
    _backend_args(sv)
    sv.set_defaults(func=cmd_serve)

    add_search_parsers(sub, tuple(FORMATS))

    x = sub.add_parser("export", help="export a refiner to ONNX (fp32 or int8) or a Triton model repository",
                       description="Export the whole refiner as one ONNX graph (crops and input keypoints in; "
                                   "coordinates, confidences and the model's other outputs out), optionally "
                                   "quantised to int8, and/or as a Triton Inference Server model repository.")
    checkpoint_arg(x, required=True, help="model.safetensors from posefix train")
    x.add_argument("--onnx", metavar="OUT.onnx", help="where to write the ONNX model")
    x.add_argument("--opset", type=int, default=18, help="ONNX opset (18)")
    x.add_argument("--batch", default="dynamic", metavar="dynamic|N", help="batch axis: dynamic (default) or fixed N")
    x.add_argument("--int8", action="store_true", help="static int8 quantisation of the convolutions (ONNX Runtime)")
    x.add_argument("--calibration-images", metavar="DIR", help="images for --int8's calibration crops")
    x.add_argument("--calibration-poses", metavar="RESULTS.json",
                   help="an estimator's COCO results on those images: the persons to crop")
    x.add_argument("--calibration-persons", type=int, default=128, help="at most this many crops (128)")
    allow_outside_images_arg(x)
    x.add_argument("--triton", metavar="REPO_DIR", help="also write a Triton model repository (REPO_DIR/NAME/...)")
    x.add_argument("--triton-name", default="posefix", help="the model's name in the repository (posefix)")
    x.add_argument("--max-batch-size", type=int, default=64, help="Triton's max_batch_size (64)")
    x.add_argument("--max-queue-delay-ms", type=float, default=5.0, help="Triton's dynamic batching delay (5)")
    x.add_argument("--instances", type=int, default=1, help="Triton model instances (1)")
    x.add_argument("--instance-kind", default="gpu", choices=("gpu", "cpu"), help="Triton instance kind (gpu)")
    x.set_defaults(func=cmd_export)

    d = sub.add_parser("demo", help="run the demo on the bundled sample",
                       description="Train the CPU preset briefly on the bundled train images (or use --checkpoint), "
                                   "refine held-out synthesized and real estimators' inputs on the val images, raw "
                                   "and with the per-joint choice, and print the table.")
    d.add_argument("--out", default="posefix-demo", metavar="DIR", help="output directory (posefix-demo)")
    d.add_argument("--seed", type=seed_type, default=0)
    d.add_argument("--steps", type=seed_type, default=150, help="training steps of the CPU preset (150)")
    checkpoint_arg(d, help="refine with these weights instead of training")
    d.set_defaults(func=cmd_demo)
    return p


def _flags(parser: argparse.ArgumentParser, argv_command: list[str]) -> dict[str, str]:
    """{dest: its first option string} of the (sub)command's parser that ``argv_command`` names."""
    flags = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name in argv_command[:1]:
                if name in action.choices:
                    flags.update(_flags(action.choices[name], argv_command[1:]))
        elif action.option_strings and action.dest not in flags:
            flags[action.dest] = action.option_strings[-1] if action.option_strings[-1].startswith("--") \
                else action.option_strings[0]
    return flags


def as_flag(error: InputError, parser: argparse.ArgumentParser, args) -> InputError:
    """The library's error with its field named as the command's flag, where the field is one of the
    command's options and the error names no file (``batch_size`` → ``--max-batch-size`` in ``serve``)."""
    head = error.field.split(".", 1)[0].split("[", 1)[0]
    if error.source is not None or not head.isidentifier():
        return error  # a field of a file, named with the file
    command = [args.command] + [v for k, v in vars(args).items() if k.endswith("_command") and v]
    flag = _flags(parser, command).get(head)
    return error if flag is None else InputError(flag + error.field[len(head):], error.problem, error.source)


# Commands whose model calls have one shape (full batches): freed memory is reused instead of faulted in
# afresh. Not serve (its batches take every size, and a heap that is never trimmed fragments).
MODEL_COMMANDS = {"train", "refine", "demo"}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if args.command in MODEL_COMMANDS:
        from .runtime import keep_freed_memory
        keep_freed_memory()
    try:
        if hasattr(args, "max_image_pixels"):
            from . import images

            if args.max_image_pixels is not None and args.max_image_pixels < 1:
                raise InputError("--max-image-pixels", f"must be at least 1, got {args.max_image_pixels}")
            images.max_image_pixels = args.max_image_pixels or images.DEFAULT_MAX_IMAGE_PIXELS
        return args.func(args)
    except InputError as e:
        print(f"posefix: error: {as_flag(e, parser, args)}", file=sys.stderr)
        return 2
    except PosefixError as e:
        print(f"posefix: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("posefix: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
