"""The ``posefix`` command line: a thin layer over the library.

Every command reports bad input as one line ``posefix: error: ...`` and exits with status 2;
outputs are written atomically, and never over one of the command's own inputs.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from synth.exceptions import InputError, PosefixError

from . import SAMPLE_DIR, __version__


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text!r}")
    return value


def _check_outputs(args, inputs: tuple[str, ...], outputs: tuple[str, ...]):
    """Refuse to write an output over an input or over another output."""
    given = {}
    for name in inputs + outputs:
        path = getattr(args, name, None)
        if path is None:
            continue
        resolved = Path(path).resolve()
        if resolved in given and name in outputs:
            raise InputError(f"--{name.replace('_', '-')}", f"{path} is also given as --{given[resolved]}; "
                             "refusing to overwrite it")
        given.setdefault(resolved, name.replace("_", "-"))
    for name in outputs:
        path = getattr(args, name, None)
        if path is not None and Path(path).is_dir():
            raise InputError(f"--{name.replace('_', '-')}", f"{path} is a directory; give a file path")


def cmd_synth(args) -> int:
    from synth.coco import synthesize_coco
    from synth.cocoio import load_ground_truth, write_json_atomic
    from synth.profile import load_profile

    _check_outputs(args, ("gt", "profile"), ("out", "labels"))
    profile = load_profile(args.profile)
    gt = load_ground_truth(args.gt)
    rng = np.random.default_rng(args.seed)
    t0 = time.perf_counter()
    results, labels = synthesize_coco(gt, rng, profile)
    elapsed = time.perf_counter() - t0
    write_json_atomic(args.out, results)
    if args.labels:
        write_json_atomic(args.labels, labels)
    counts = {}
    for entry in labels:
        for name in entry["labels"]:
            counts[name] = counts.get(name, 0) + 1
    planted = ", ".join(f"{k} {counts[k]}" for k in ("good", "jitter", "inversion", "swap", "miss", "unlabelled")
                        if k in counts)
    print(f"synthesized {len(results)} input poses from {args.gt} in {elapsed:.2f} s "
          f"(profile {profile.name}, seed {args.seed}) -> {args.out}")
    print(f"keypoints: {planted}")
    return 0


def cmd_demo(args) -> int:
    out = Path(args.out)
    gt = SAMPLE_DIR / "person_keypoints_val_sample.json"
    ns = argparse.Namespace(gt=str(gt), out=str(out / "synth_results.json"), labels=str(out / "synth_labels.json"),
                            seed=args.seed, profile=None)
    print(f"posefix {__version__} demo on the bundled COCO sample ({SAMPLE_DIR})")
    return cmd_synth(ns)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="posefix", description=__doc__.splitlines()[0].rstrip(".") + ".")
    p.add_argument("--version", action="version", version=f"posefix {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    s = sub.add_parser("synth", help="synthesize erroneous input poses from COCO GT (PoseFix's error tables)",
                       description="Synthesize one erroneous input pose per labelled GT person, as COCO results.")
    s.add_argument("--gt", required=True, metavar="ANNOTATIONS.json", help="COCO person-keypoints annotations")
    s.add_argument("--out", required=True, metavar="RESULTS.json", help="where to write the COCO results")
    s.add_argument("--seed", type=_seed, default=0, help="random seed; the same seed gives the same output (0)")
    s.add_argument("--profile", metavar="PROFILE.json", help="error profile (default: the published PoseFix one)")
    s.add_argument("--labels", metavar="LABELS.json", help="also write what was planted at each keypoint")
    s.set_defaults(func=cmd_synth)

    d = sub.add_parser("demo", help="run the demo on the bundled sample")
    d.add_argument("--out", default="posefix-demo", metavar="DIR", help="output directory (posefix-demo)")
    d.add_argument("--seed", type=_seed, default=0)
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except PosefixError as e:
        print(f"posefix: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("posefix: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
