"""``posefix index build``, ``posefix index add`` and ``posefix search``: pose similarity search from the command
line (see :mod:`posefix.search`), and the contact sheet of a search's answer.

What needs torch (the refiner, decoding, drawing) is imported inside the functions that use it, for start-up
time: ``posefix index`` and ``posefix search`` without a checkpoint or sheet run on numpy alone."""
from __future__ import annotations

import math
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from .cliargs import (
    allow_outside_images_arg,
    annotations_arg,
    check_command_outputs,
    checkpoint_arg,
    device_arg,
    format_arg,
    images_arg,
)
from .errors import InputError
from .fileio import write_json_atomic
from .formats import FORMATS, image_file, image_ids, load_estimates
from .search import PoseIndex, _keypoint_boxes, present
from .synth.cocoio import load_ground_truth


def _coco_images(annotations) -> dict | None:
    if not annotations:
        return None
    return {im["id"]: im for im in load_ground_truth(annotations).doc["images"]}


def read_poses(path, fmt: str, images_dir=None, coco_images: dict | None = None, field: str = "--results",
               allow_outside: bool = False):
    """The persons of an estimator's file (any supported format) as what an index stores: (estimates,
    keypoints (P, 17, 3), ids (P,) or None, image ids (P,), boxes (P, 4), files or None)."""
    if images_dir is not None and not Path(images_dir).is_dir():
        raise InputError("--images", f"{images_dir} is not a directory")
    try:
        est = load_estimates(path, fmt, images_dir or ".", coco_images, allow_outside)
    except InputError as e:
        if e.field in ("input", "results") and e.source == str(path):
            raise InputError(field, e.problem, e.source) from None
        raise
    kp = est.keypoints
    boxes = _keypoint_boxes(kp, present(kp))
    ids = []
    for i, rec in enumerate(est.records):
        if not FORMATS[est.format].coco_results:
            break
        box, pid = rec.get("bbox"), rec.get("id")
        if isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) and math.isfinite(v)
                                                           for v in box):
            boxes[i] = box
        if pid is not None and not (isinstance(pid, int) and not isinstance(pid, bool)
                                    and -(1 << 63) <= pid < (1 << 63)):
            raise InputError(f"{field}[{i}].id", f"must be an integer in the int64 range, got {pid!r}", str(path))
        ids.append(pid)
    ids = np.array(ids, np.int64) if ids and None not in ids else None
    files = None
    if images_dir is not None:
        files = [str(image_file(images_dir, key, coco_images, allow_outside).resolve()) for key in est.image_keys]
    return est, kp, ids, image_ids(est, coco_images), boxes, files


def cmd_index_build(args) -> int:
    check_command_outputs(args, ("results", "annotations", "images"), ("out",))
    t0 = time.perf_counter()
    _, kp, ids, image_ids, boxes, files = read_poses(args.results, args.format, args.images,
                                                     _coco_images(args.annotations),
                                                     allow_outside=args.allow_outside_images)
    if not len(kp) and args.method == "ivf":
        raise InputError("--results", "holds no person; an approximate (--method ivf) index needs at least one",
                         str(args.results))
    index = PoseIndex.build(kp, ids, image_ids, boxes, None, files, rotate=args.rotate, method=args.method)
    index.save(args.out)
    print(f"indexed {len(index)} poses of {args.results} ({index.method} search"
          f"{', rotation aligned' if index.rotate else ''}) in {time.perf_counter() - t0:.2f} s -> {args.out}")
    return 0


def cmd_index_add(args) -> int:
    out = args.out or args.index
    check_command_outputs(args, ("results", "annotations", "images") + ("index",) * bool(args.out), ("out",),
                          extra=() if args.out else [("--index", args.index)])
    index = PoseIndex.load(args.index)
    _, kp, ids, image_ids, boxes, files = read_poses(args.results, args.format, args.images,
                                                     _coco_images(args.annotations),
                                                     allow_outside=args.allow_outside_images)
    before = len(index)
    index.add(kp, ids, image_ids, boxes, None, files)
    index.save(out)
    print(f"added {len(index) - before} poses of {args.results}: {len(index)} poses -> {out}")
    return 0


def refine_queries(checkpoint, images_dir, est, kp: np.ndarray, coco_images=None, device: str = "cpu",
                   allow_outside: bool = False):
    """The queries refined first, as ``posefix refine`` refines them (:func:`posefix.refine.refine_estimates`):
    (P, 17, 3) with the refined confidences."""
    from .refine import by_image, refine_estimates
    from .refiner import Refiner

    refiner = Refiner.from_checkpoint(checkpoint, device=device)
    files = {key: image_file(images_dir, key, coco_images, allow_outside) for key in by_image(est.image_keys)}
    out = refine_estimates(refiner, replace(est, keypoints=np.asarray(kp, dtype=np.float64)), files)
    return np.concatenate([out.xy, out.conf[..., None]], -1)


def matches_json(index: PoseIndex, matches, queries: np.ndarray, keys) -> list[dict]:
    """The JSON answer: per query, its keypoints and its matches, nearest first."""
    out = []
    for q in range(len(queries)):
        found = []
        for rank, (row, d, m) in enumerate(zip(matches.rows[q].tolist(), matches.distances[q].tolist(),
                                               matches.mirrored[q].tolist()), start=1):
            found.append({"rank": rank, "id": int(index.ids[row]), "image_id": int(index.image_ids[row]),
                          "distance": round(float(d), 6), "mirrored": bool(m), "box": index.boxes[row].tolist(),
                          "score": float(index.scores[row]), "keypoints": index.keypoints[row].reshape(-1).tolist(),
                          "file": index.file_of(row)})
        key = keys[q]
        out.append({"query": q, "image": key if isinstance(key, (int, str)) else None,
                    "keypoints": queries[q].reshape(-1).tolist(), "matches": found})
    return out


def cmd_search(args) -> int:
    check_command_outputs(args, ("index", "query", "checkpoint", "images", "annotations"), ("out", "sheet"))
    if args.k < 1:
        raise InputError("-k", f"must be at least 1, got {args.k}")
    if args.checkpoint and not args.images:
        raise InputError("--images", "is required with --checkpoint: the queries are refined on their images")
    index = PoseIndex.load(args.index)
    if args.k > len(index):
        raise InputError("-k", f"{args.k} is more than the {len(index)} poses in the index")
    coco_images = _coco_images(args.annotations)
    est, kp, _, _, _, files = read_poses(args.query, args.format, args.images, coco_images, field="--query",
                                         allow_outside=args.allow_outside_images)
    if not len(kp):
        raise InputError("--query", "holds no person", str(args.query))
    if args.checkpoint:
        kp = refine_queries(args.checkpoint, args.images, est, kp, coco_images, args.device, args.allow_outside_images)
    t0 = time.perf_counter()
    try:
        matches = index.search(kp, args.k, mirror_too=args.mirror, exact=True if args.exact else None)
    except InputError as e:
        raise InputError(e.field.replace("query", "--query", 1) if e.field.startswith("query") else e.field,
                         e.problem) from None
    elapsed = time.perf_counter() - t0
    answer = {"index": str(args.index), "poses": len(index), "k": args.k, "mirror": args.mirror,
              "refined": bool(args.checkpoint), "queries": matches_json(index, matches, kp, est.image_keys)}
    if args.sheet:
        outside = write_sheet(args.sheet, index, matches, kp, files, args.images, args.allow_outside_images)
        if outside:
            print(f"note: {outside} indexed image{'s' * (outside > 1)} outside --images "
                  f"{'(none given) ' if not args.images else ''}drawn without the image (--allow-outside-images "
                  "reads them)", file=sys.stderr)
    if args.out:
        write_json_atomic(args.out, answer)
    else:
        import json

        json.dump(answer, sys.stdout)
        sys.stdout.write("\n")
    print(f"searched {len(kp)} queries among {len(index)} poses in {elapsed * 1000:.1f} ms"
          + (f" -> {args.out}" if args.out else "") + (f"; contact sheet -> {args.sheet}" if args.sheet else ""),
          file=sys.stderr)
    return 0


# The contact sheet.

CELL = (200, 160)  # height, width of one picture
LABEL = 16  # pixels above each picture for its caption


def _cell(file: str | None, pose: np.ndarray, box, colour, decoded: dict):
    """One picture (3, H, W) uint8: the person cropped from its image around ``box`` with its skeleton drawn, or,
    without an image, the skeleton alone on white."""
    import torch
    from PIL import Image

    from .images import decode
    from .viz import draw_poses

    h, w = CELL
    x, y, bw, bh = (float(v) for v in box)
    side = max(bw * w / h, bh, 1.0) * 1.2  # the crop's height, the box with a margin, at the cell's aspect
    cx, cy = x + bw / 2, y + bh / 2
    left, top = cx - side * w / h / 2, cy - side / 2
    scale = h / side
    if file is not None and file not in decoded:
        try:
            decoded[file] = decode(file)
        except InputError:
            decoded[file] = None
    image = decoded.get(file) if file is not None else None
    if image is None:
        picture = Image.new("RGB", (w, h), (255, 255, 255))
    else:
        full = Image.fromarray(image.permute(1, 2, 0).contiguous().numpy())
        region = (round(left), round(top), round(left + side * w / h), round(top + side))
        picture = full.crop(region).resize((w, h), Image.BILINEAR)
    drawn = pose.astype(np.float64).copy()
    drawn[:, 0] = (drawn[:, 0] - left) * scale
    drawn[:, 1] = (drawn[:, 1] - top) * scale
    tensor = torch.from_numpy(np.asarray(picture).copy()).permute(2, 0, 1)
    return draw_poses(tensor, drawn, colour)


def write_sheet(path, index: PoseIndex, matches, queries: np.ndarray, query_files, images_dir=None,
                allow_outside: bool = False) -> int:
    """A PNG with a row per query: the query (orange skeleton) and its matches (cyan), nearest first, each
    captioned with its rank, distance and pose id; written atomically. The image files an index names are read
    only inside ``images_dir`` (their real paths), or anywhere with ``allow_outside``; the others' poses are
    drawn on white. Returns how many indexed files were not read for that reason."""
    import os

    root = os.path.realpath(images_dir) if images_dir else None
    refused: set = set()

    def confined(file):
        if file is None or allow_outside:
            return file
        real = os.path.realpath(file)
        if root is not None and os.path.commonpath([real, root]) == root:
            return file
        refused.add(file)
        return None

    import torch
    from PIL import Image, ImageDraw

    from .viz import INPUT_COLOUR, REFINED_COLOUR, write_png

    h, w = CELL
    gap = 6
    q_count, k = matches.rows.shape
    sheet = Image.new("RGB", ((k + 1) * (w + gap) + gap, q_count * (h + LABEL + gap) + gap), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    decoded: dict = {}
    q_boxes = _keypoint_boxes(queries, present(queries))
    for q in range(q_count):
        top = gap + q * (h + LABEL + gap)
        file = query_files[q] if query_files is not None else None
        cells = [(_cell(file, queries[q], q_boxes[q], INPUT_COLOUR, decoded), "query")]
        for r in range(k):
            row = int(matches.rows[q, r])
            pose = index.keypoints[row]
            caption = f"{r + 1}: d {matches.distances[q, r]:.3f} id {index.ids[row]}"
            if matches.mirrored[q, r]:
                caption += " (mirror)"
            cells.append((_cell(confined(index.file_of(row)), pose, index.boxes[row], REFINED_COLOUR, decoded),
                          caption))
        for c, (picture, caption) in enumerate(cells):
            left = gap + c * (w + gap)
            sheet.paste(Image.fromarray(picture.permute(1, 2, 0).numpy()), (left, top + LABEL))
            draw.text((left + 2, top + 2), caption, fill=(0, 0, 0))
    write_png(torch.from_numpy(np.asarray(sheet).copy()).permute(2, 0, 1), path)
    return len(refused)


def add_parsers(sub, formats) -> None:
    """The ``index`` and ``search`` subcommands on ``sub`` (the parser's subparsers)."""

    ix = sub.add_parser("index", help="build or extend a pose similarity index over refined poses",
                        description="An index of poses for posefix search: translation- and scale-free, "
                                    "confidence-weighted, exact or approximate (faiss).")
    ix_sub = ix.add_subparsers(dest="index_command", metavar="{build,add}", required=True)
    b = ix_sub.add_parser("build", help="index the persons of a results file")
    b.add_argument("--results", required=True, metavar="REFINED.json", help="poses to index (e.g. posefix refine's)")
    b.add_argument("--out", required=True, metavar="POSES.index")
    images_arg(b, help="the images, so that posefix search --sheet can show them")
    allow_outside_images_arg(b)
    annotations_arg(b)
    format_arg(b, choices=formats)
    b.add_argument("--rotate", action="store_true", help="also ignore the person's rotation (torso upright)")
    b.add_argument("--method", default="auto", choices=("auto", "exact", "ivf"),
                   help="exact (numpy) or ivf (approximate, faiss: pip install 'posefix[search]'); auto: "
                        "exact below 50,000 poses")
    b.set_defaults(func=cmd_index_build)
    a = ix_sub.add_parser("add", help="append the persons of a results file to an index")
    a.add_argument("--index", required=True, metavar="POSES.index")
    a.add_argument("--results", required=True, metavar="REFINED.json")
    a.add_argument("--out", metavar="NEW.index", help="write the extended index here (default: over --index)")
    images_arg(a)
    allow_outside_images_arg(a)
    annotations_arg(a)
    format_arg(a, choices=formats)
    a.set_defaults(func=cmd_index_add)

    s = sub.add_parser("search", help="find the indexed poses nearest to query poses",
                       description="The k nearest indexed poses of each person of the query file, as JSON "
                                   "(stdout or --out), and with --sheet a contact sheet PNG.")
    s.add_argument("--index", required=True, metavar="POSES.index")
    s.add_argument("--query", required=True, metavar="QUERY.json", help="the query persons (any --format)")
    s.add_argument("-k", type=int, default=10, help="matches per query (10)")
    s.add_argument("--mirror", action="store_true", help="a left-right mirrored pose counts as the same")
    s.add_argument("--exact", action="store_true", help="rank every pose even with an approximate index")
    s.add_argument("--out", metavar="MATCHES.json", help="write the JSON here (default: stdout)")
    s.add_argument("--sheet", metavar="SHEET.png", help="a contact sheet: each query and its matches, cropped")
    images_arg(s, help="the query images (for --sheet and --checkpoint)")
    allow_outside_images_arg(s)
    annotations_arg(s)
    format_arg(s, choices=formats)
    checkpoint_arg(s, help="refine the queries on their images first")
    device_arg(s)
    s.set_defaults(func=cmd_search)
