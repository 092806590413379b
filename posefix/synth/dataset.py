"""Synthetic-error datasets on disk: many inputs per person, in shards with a manifest, and their reader.

A dataset directory holds ``manifest.json``, ``README.md`` (the dataset card) and shards
``shard-BBBBB-vVVV.jsonl.gz``: gzip-compressed JSON Lines, one line per (person, variant) — or per
(person, frame, variant) for sequences — each a COCO keypoint result (``image_id``, ``category_id``,
``keypoints`` 51 numbers, ``score``) with what was planted beside it (``annotation_id``, ``variant``,
``labels``: 17 outcome names or null where the GT joint is unlabelled, ``anchors``: 17 × [annotation id,
joint] each point was planted around).

Persons are cut into blocks of whole images (whole tracks for sequences) in the GT's image order,
``block_persons`` at most unless one image has more. Each person-variant of stills is drawn by
(seed, annotation id, variant) alone (:class:`posefix.synth.draws.KeyedDraws`), whatever the blocks; a
sequences shard (block b, variant v) from its own generator, ``SeedSequence(seed, spawn_key=(v, b))``. So
any shard can be regenerated without the others and every variant is independent of how many are asked for. Each
shard is written atomically and recorded in the manifest (rewritten after the first shard, then at most every
MANIFEST_EVERY_S); a stopped run, started again with the same arguments, keeps the recorded shards (after
checking their SHA-256) and makes the others, giving the same bytes as an uninterrupted run. Memory holds the GT
and one shard, whatever the number of variants.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..fileio import orjson, read_json, write_bytes_atomic
from ..keypoints import NUM_KEYPOINTS
from .card import dataset_card
from .coco import draw_coco, plan_coco
from .cocoio import GroundTruth, load_ground_truth
from .draws import KeyedDraws, person_keys
from .profile import ERRORS, OUTCOMES, Profile, load_profile, parse_profile, published_profile
from .sequences import SequenceParams, make_sequence_shard, track_layout
from .shards import Shard, count_outcomes, encode_lines, gzip_bytes
from .synthesize import UNLABELLED

FORMAT = "posefix-synth-dataset/1"
BLOCK_PERSONS = 8192
MANIFEST_EVERY_S = 1.0


def shard_name(block: int, variant: int) -> str:
    return f"shard-{block:05d}-v{variant:03d}.jsonl.gz"


def image_blocks(gt: GroundTruth, block_persons: int = BLOCK_PERSONS, group_of=None) -> list[np.ndarray]:
    """Annotation indices of each block: whole groups (images, or tracks' clips via ``group_of`` (P,) ids) in
    order of their id, at most ``block_persons`` labelled non-crowd persons each unless one group has more."""
    if block_persons < 1:
        raise InputError("block_persons", f"must be >= 1, got {block_persons}")
    key = gt.image_ids if group_of is None else np.asarray(group_of)
    order = np.argsort(key, kind="stable")
    labelled = (~gt.crowd & (gt.keypoints[..., 2] > 0).any(-1))[order]
    starts = np.concatenate([[0], np.flatnonzero(np.diff(key[order])) + 1, [order.size]]).astype(np.int64)
    per_group = np.add.reduceat(labelled.astype(np.int64), starts[:-1]) if order.size else np.zeros(0, np.int64)
    blocks, lo, count = [], 0, 0
    for g in range(per_group.size):
        if count and count + per_group[g] > block_persons:
            blocks.append(order[starts[lo]:starts[g]])
            lo, count = g, 0
        count += int(per_group[g])
    if count:
        blocks.append(order[starts[lo]:starts[-1]])
    return blocks


def subset(gt: GroundTruth, idx: np.ndarray) -> GroundTruth:
    """The annotations ``idx`` (in file order) as a GroundTruth of their own."""
    idx = np.sort(idx)
    return GroundTruth(gt.ids[idx], gt.image_ids[idx], gt.keypoints[idx], gt.areas[idx], gt.boxes[idx],
                       gt.crowd[idx], frozenset(gt.image_ids[idx].tolist()), {})


def regenerate_shard(gt_path: str | Path, dataset: str | Path, block: int, variant: int) -> bytes:
    """The bytes of shard (block, variant) of the dataset at ``dataset``, made again from its manifest's
    parameters and the GT alone, without the other shards."""
    m = read_manifest(dataset)
    gt = load_ground_truth(gt_path)
    prof = parse_profile(m["profile"], "manifest.profile").with_severity(m["severity"])
    if m["kind"] == "sequences":
        tracks = track_layout(gt, str(gt_path))
        blocks = image_blocks(gt, m["block_persons"], group_of=tracks.clip)
        params = SequenceParams.from_dict(m["sequence_params"])
        return make_sequence_shard(gt, tracks, blocks[block], block, variant, m["seed"], prof, params).data
    blocks = image_blocks(gt, m["block_persons"])
    return draw_shard(plan_coco(subset(gt, blocks[block])), block, variant, m["seed"], prof).data


def draw_shard(plan, block: int, variant: int, seed: int, profile: Profile) -> Shard:
    """Shard (block, variant) of stills: each person's input drawn by (seed, annotation id, variant) alone."""
    sub, p = plan.gt, plan.persons
    draw = draw_coco(plan, KeyedDraws(person_keys(seed, sub.ids[p], variant)), profile)
    raw = encode_lines(sub.image_ids[p], sub.ids[p], variant, draw.keypoints, draw.score, draw.outcome,
                       draw.anchor_id, draw.anchor_joint)
    return Shard(block, variant, gzip_bytes(raw), int(p.size), count_outcomes(draw.outcome), draw.expected)


def file_sha256(path: Path) -> str | None:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    except OSError:
        return None
    return h.hexdigest()


def _identity(gt_path, gt_sha, seed, variants, severity, profile: Profile, block_persons, kind, params) -> dict:
    return {"format": FORMAT, "kind": kind, "gt": {"path": str(gt_path), "sha256": gt_sha}, "seed": seed,
            "variants": variants, "severity": severity, "block_persons": block_persons,
            "profile": profile.to_dict(), "sequence_params": params}


_SAME = ("format", "kind", "gt", "seed", "severity", "block_persons", "profile", "sequence_params")


def write_dataset(gt_path: str | Path, out_dir: str | Path, variants: int, seed: int = 0,
                  profile: Profile | None = None, severity: dict | None = None,
                  block_persons: int = BLOCK_PERSONS, sequences: bool = False, sequence_params=None,
                  stop_after: int | None = None, progress: Callable[[str], None] | None = None) -> dict:
    """Generate (or finish) a dataset directory; returns its manifest.

    ``severity`` maps error names to factors on the profile's probabilities (see
    :meth:`Profile.with_severity`). ``sequences``: per-frame GT of tracks (see
    :mod:`posefix.synth.sequences`), with ``sequence_params`` (default: the bundled ones). ``stop_after``
    stops after making that many shards in this call (the manifest then says ``complete: false``), as a
    killed run would.
    """

    if not isinstance(variants, int) or isinstance(variants, bool) or variants < 1:
        raise InputError("variants", f"must be an integer >= 1, got {variants!r}")
    for e in severity or {}:
        if e not in ERRORS:
            raise InputError("severity", f"unknown error {e!r}; one of {list(ERRORS)}")
    severity = {e: float((severity or {}).get(e, 1.0)) for e in ERRORS}
    base = profile or published_profile()
    prof = base.with_severity(severity)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError("out", f"{out} exists and is not a directory")
    gt_sha = file_sha256(Path(gt_path))
    if gt_sha is None:
        raise InputError("gt", "cannot read the file", str(gt_path))
    gt = load_ground_truth(gt_path)
    if not sequences:
        gt = GroundTruth(gt.ids, gt.image_ids, gt.keypoints, gt.areas, gt.boxes, gt.crowd, gt.image_ids_all, {})
    if sequences:
        params = SequenceParams.default() if sequence_params is None else sequence_params
        tracks = track_layout(gt, str(gt_path))
        blocks = image_blocks(gt, block_persons, group_of=tracks.clip)
        kind, params_doc = "sequences", params.to_dict()
    else:
        blocks = image_blocks(gt, block_persons)
        kind, params_doc = "stills", None
    ident = _identity(gt_path, gt_sha, seed, variants, severity, base, block_persons, kind, params_doc)
    manifest_path = out / "manifest.json"
    done: dict[str, dict] = {}
    if manifest_path.exists():
        old = read_json(manifest_path, "manifest")
        if not isinstance(old, dict) or old.get("format") != FORMAT:
            raise InputError("out", f"{out} holds a manifest.json that is not a posefix synthetic-error dataset")
        differ = [k for k in _SAME if (old.get(k) if k != "gt" else {"sha256": old.get("gt", {}).get("sha256")})
                  != (ident[k] if k != "gt" else {"sha256": gt_sha})]
        if differ:
            raise InputError("out", f"{out} holds a dataset made with other {', '.join(differ)}; give another "
                             "--out or the same arguments to finish it")
        for rec in old.get("shards", []):
            if file_sha256(out / rec["file"]) == rec["sha256"]:
                done[rec["file"]] = rec
    out.mkdir(parents=True, exist_ok=True)
    todo = [(b, v) for b in range(len(blocks)) for v in range(variants)]  # a block's plan serves its variants
    shards, made, last_write = [], 0, time.monotonic()
    plan_cache: tuple[int, object] | None = None
    for b, v in todo:
        name = shard_name(b, v)
        if name in done:
            shards.append(done[name])
            continue
        if stop_after is not None and made >= stop_after:
            break
        if sequences:
            shard = make_sequence_shard(gt, tracks, blocks[b], b, v, seed, prof, params)
        else:
            if plan_cache is None or plan_cache[0] != b:
                plan_cache = (b, plan_coco(subset(gt, blocks[b])))
            shard = draw_shard(plan_cache[1], b, v, seed, prof)
        write_bytes_atomic(out / name, shard.data)
        rec = {"file": name, "block": b, "variant": v, "records": shard.records,
               "sha256": hashlib.sha256(shard.data).hexdigest(), "bytes": len(shard.data),
               "counts": {o: shard.counts[i].tolist() for i, o in enumerate(OUTCOMES)}}
        if shard.expected is not None:
            rec["expected"] = {o: np.round(shard.expected[i], 3).tolist() for i, o in enumerate(OUTCOMES)}
        shards.append(rec)
        made += 1
        # The manifest records the shards made so far: after the first, then at most every MANIFEST_EVERY_S
        # (a stopped run makes again the few shards made since, with the same bytes).
        if made == 1 or time.monotonic() - last_write >= MANIFEST_EVERY_S:
            write_bytes_atomic(manifest_path, json.dumps(_manifest(ident, shards, len(todo))).encode())
            last_write = time.monotonic()
        if progress:
            progress(f"{len(shards)}/{len(todo)} shards")
    manifest = _manifest(ident, shards, len(todo))
    write_bytes_atomic(manifest_path, json.dumps(manifest, indent=1).encode())
    if manifest["complete"]:
        write_bytes_atomic(out / "README.md", dataset_card(manifest).encode())
    return manifest


def _manifest(ident: dict, shards: list[dict], total: int) -> dict:
    shards = sorted(shards, key=lambda r: (r["variant"], r["block"]))
    per_joint = np.zeros((len(OUTCOMES), NUM_KEYPOINTS), dtype=np.int64)
    for r in shards:
        per_joint += np.array([r["counts"][o] for o in OUTCOMES], dtype=np.int64)
    labelled = int(per_joint.sum())
    counts = {o: int(per_joint[i].sum()) for i, o in enumerate(OUTCOMES)}
    out = {**ident, "complete": len(shards) == total, "shards_total": total,
           "records": int(sum(r["records"] for r in shards)), "labelled_joints": labelled, "counts": counts,
           "counts_per_joint": {o: per_joint[i].tolist() for i, o in enumerate(OUTCOMES)},
           "planted_rates": {o: (counts[o] / labelled if labelled else 0.0) for o in OUTCOMES}}
    if shards and all("expected" in r for r in shards):
        expected = sum(np.array([r["expected"][o] for o in OUTCOMES]) for r in shards)
        out["expected_rates"] = {o: (float(expected[i].sum()) / labelled if labelled else 0.0)
                                 for i, o in enumerate(OUTCOMES)}
    return {**out, "shards": shards}


def read_manifest(path: str | Path) -> dict:
    path = Path(path)
    doc = read_json(path / "manifest.json", "manifest")
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("shards"), list):
        raise InputError("manifest", f"not a posefix synthetic-error dataset ({FORMAT})", str(path / "manifest.json"))
    return doc


def read_dataset(path: str | Path, variants=None, check: bool = False) -> Iterator[dict]:
    """Every record of a dataset directory, shard by shard (variant, then block), as dicts: the file's
    fields, with ``keypoints`` a (17, 3) float64 array; ``labels`` 17 outcome names, None where the GT
    joint is unlabelled. ``variants``: only these. ``check``: verify each shard's SHA-256 first."""
    path = Path(path)
    manifest = read_manifest(path)
    for rec in manifest["shards"]:
        if variants is not None and rec["variant"] not in variants:
            continue
        file = path / rec["file"]
        try:
            data = file.read_bytes()
        except OSError as e:
            raise InputError("shards", f"cannot read {rec['file']}: {e.strerror or e}", str(path)) from None
        if check and hashlib.sha256(data).hexdigest() != rec["sha256"]:
            raise InputError("shards", f"{rec['file']} does not match its SHA-256 in the manifest", str(path))
        loads = orjson.loads if orjson is not None else json.loads
        try:
            lines = gzip.decompress(data).splitlines()
            records = [loads(line) for line in lines]
        except (OSError, EOFError, zlib.error, ValueError) as e:
            raise InputError("shards", f"{rec['file']} is damaged ({e}); make it again with the same "
                             "posefix synth command", str(path)) from None
        for r in records:
            r["keypoints"] = np.asarray(r["keypoints"], dtype=np.float64).reshape(NUM_KEYPOINTS, 3)
            yield r


def load_arrays(path: str | Path, variants=None) -> dict:
    """A whole dataset (or some variants) as arrays: image_id, annotation_id, variant (N,), keypoints
    (N, K, 3), outcome (N, K) int8 (UNLABELLED where None), and frame / track_id where present."""
    cols: dict[str, list] = {}
    code = {o: i for i, o in enumerate(OUTCOMES)} | {None: UNLABELLED}
    for r in read_dataset(path, variants):
        for k in ("image_id", "annotation_id", "variant", "frame", "track_id", "keypoints"):
            if k in r:
                cols.setdefault(k, []).append(r[k])
        cols.setdefault("outcome", []).append([code[x] for x in r["labels"]])
    out = {k: np.asarray(v) for k, v in cols.items()}
    if "outcome" in out:
        out["outcome"] = out["outcome"].astype(np.int8)
    return out


def run_synth_dataset(gt: str, out: str, variants: int | None, seed: int, profile_path: str | None,
                      severity: float | None, per_error: dict, sequences: bool, sequence_params: str | None,
                      block_persons: int, stop_after: int | None = None) -> list[str]:
    """``posefix synth`` writing a dataset directory: the arguments as the command line gives them (None where
    not given; ``per_error``: {error: its severity factor}); returns the lines to print."""
    for name, f in [("severity", severity)] + [(f"severity_{e}", per_error.get(e)) for e in ERRORS]:
        if f is not None and not (np.isfinite(f) and f >= 0):
            raise InputError(name, f"must be a finite number >= 0, got {f}")
    factors = {e: (1.0 if severity is None else severity) * (1.0 if per_error.get(e) is None else per_error[e])
               for e in ERRORS}
    params = None
    if sequence_params is not None:
        if not sequences:
            raise InputError("sequence_params", "needs sequences (per-frame ground truth of tracks)")
        params = SequenceParams.from_dict(read_json(sequence_params, "sequence parameters"), sequence_params)
    t0 = time.perf_counter()
    m = write_dataset(gt, out, variants or 1, seed, load_profile(profile_path), factors, block_persons, sequences,
                      params, stop_after)
    dt = time.perf_counter() - t0
    exp = m.get("expected_rates")
    rates = ", ".join(f"{o} {m['planted_rates'][o]:.4f}" + (f" ({exp[o]:.4f})" if exp else "") for o in OUTCOMES)
    state = "complete" if m["complete"] else f"stopped after {len(m['shards'])} of {m['shards_total']} shards"
    return [(f"synthesized {m['records']} {'person-frame' if sequences else 'person'} inputs "
             f"({m['variants']} variant(s), {len(m['shards'])} shards) from {gt} in {dt:.2f} s "
             f"(profile {m['profile']['name']}, seed {seed}, {state}) -> {out}"),
            f"planted rates of labelled joints{' (expected by the profile at this severity)' if exp else ''}: {rates}"]
