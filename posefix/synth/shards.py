"""A synthetic-error dataset's shards in memory: the records encoded as JSON Lines, gzip-compressed, with their
outcome counts (:class:`Shard`), and the generator of a sequences shard. What a record holds, and how shards
are laid out on disk: :mod:`posefix.synth.dataset`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
from isal import igzip

from ..fileio import gc_paused, orjson
from ..keypoints import NUM_KEYPOINTS
from .profile import OUTCOMES

GZIP_LEVEL = 1  # ISA-L levels 0-3; 1 compresses as well as zlib's 1 at about 3x its speed
XY_DECIMALS, SCORE_DECIMALS = 3, 4  # 0.001 px and 1e-4 of confidence, far below any KS boundary's width
LABEL_NAMES = np.array(list(OUTCOMES) + [None], dtype=object)  # index UNLABELLED (-1) → None


def shard_rng(seed: int, block: int, variant: int) -> np.random.Generator:
    """The generator of sequences shard (block, variant): keyed on (seed, variant, block) alone."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(variant, block)))


def encode_lines(image_id, annotation_id, variant, keypoints, score, outcome, anchor_id, anchor_joint,
                 extra: dict | None = None) -> bytes:
    """JSON Lines of N records: arrays (N,), (N, K, 3), (N, K) as in :class:`posefix.synth.coco.CocoDraw`;
    ``extra`` maps field names to (N,) arrays or lists written after ``variant`` (frame, track_id...).

    Without ``extra`` (and with orjson) each field is encoded for all records at once and the lines are
    spliced from the pieces in one join; :func:`encode_lines_reference` (one dict per record) gives the same
    bytes."""
    if extra or orjson is None or not keypoints.shape[0]:
        return encode_lines_reference(image_id, annotation_id, variant, keypoints, score, outcome, anchor_id,
                                      anchor_joint, extra)
    n = keypoints.shape[0]
    flat, score, anchors = _rounded(keypoints, score, anchor_id, anchor_joint)
    opt = orjson.OPT_SERIALIZE_NUMPY
    # Each field of all records as one JSON array, cut into the records' pieces: numbers and outcome names
    # hold no bracket or comma, so the separators below occur only between records.
    kp = orjson.dumps(flat, option=opt)[2:-2].split(b"],[")
    lab = orjson.dumps(LABEL_NAMES[outcome].tolist())[2:-2].split(b"],[")
    anc = orjson.dumps(anchors, option=opt)[3:-3].split(b"]],[[")
    img = orjson.dumps(np.asarray(image_id).tolist())[1:-1].split(b",")
    ann = orjson.dumps(np.asarray(annotation_id).tolist())[1:-1].split(b",")
    sc = orjson.dumps(score.tolist())[1:-1].split(b",")
    fields = (img, ann, kp, sc, lab, anc)
    glue = (b'{"image_id":', b',"annotation_id":',
            b',"variant":' + orjson.dumps(variant, option=opt) + b',"category_id":1,'
            b'"keypoints":[', b'],"score":', b',"labels":[', b'],"anchors":[[', b"]]}\n")
    parts = [b""] * (len(glue) + len(fields)) * n
    step = len(glue) + len(fields)
    for i, g in enumerate(glue):
        parts[2 * i::step] = [g] * n
    for i, f in enumerate(fields):
        if len(f) != n:  # an empty row (no joints) would not split apart: the plain encoder handles it
            return encode_lines_reference(image_id, annotation_id, variant, keypoints, score, outcome, anchor_id,
                                          anchor_joint)
        parts[2 * i + 1::step] = f
    return b"".join(parts)


def _rounded(keypoints, score, anchor_id, anchor_joint):
    n = keypoints.shape[0]
    kp = keypoints.copy()
    kp[..., :2] = np.round(kp[..., :2], XY_DECIMALS)
    kp[..., 2] = np.round(kp[..., 2], SCORE_DECIMALS)
    anchors = np.ascontiguousarray(np.stack([anchor_id, anchor_joint], axis=-1).astype(np.int64))
    return np.ascontiguousarray(kp.reshape(n, kp[0].size if n else 0)), np.round(score, SCORE_DECIMALS), anchors


def encode_lines_reference(image_id, annotation_id, variant, keypoints, score, outcome, anchor_id, anchor_joint,
                           extra: dict | None = None) -> bytes:
    """:func:`encode_lines` one dict per record (the plain implementation, and the one for ``extra``)."""
    n = keypoints.shape[0]
    flat, score, anchors = _rounded(keypoints, score, anchor_id, anchor_joint)
    names = list(extra or {})
    with gc_paused():
        labels = LABEL_NAMES[outcome].tolist()
        score = score.tolist()
        image_id, annotation_id = np.asarray(image_id).tolist(), np.asarray(annotation_id).tolist()
        cols = [np.asarray(extra[k]).tolist() if not isinstance(extra[k], list) else extra[k] for k in names]
        records = []
        for i in range(n):
            rec = {"image_id": image_id[i], "annotation_id": annotation_id[i], "variant": variant}
            for k, c in zip(names, cols):
                rec[k] = c[i]
            rec.update(category_id=1, keypoints=flat[i], score=score[i], labels=labels[i], anchors=anchors[i])
            records.append(rec)
        data = _dumps_numpy(records)
    # The records hold no nested object, so "},{" occurs only between records.
    return data[1:-1].replace(b"},{", b"}\n{") + b"\n" if n else b""


def _dumps_numpy(obj) -> bytes:
    if orjson is not None:
        return orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY)
    return json.dumps(obj, separators=(",", ":"), allow_nan=False,
                      default=lambda a: a.tolist()).encode()


def gzip_bytes(data: bytes) -> bytes:
    """gzip (ISA-L's deflate, level ``GZIP_LEVEL``) with no name and a zero time in its header, so that the
    same data gives the same bytes; any gzip reader reads it."""
    return igzip.compress(data, GZIP_LEVEL, mtime=0)


def count_outcomes(outcome: np.ndarray) -> np.ndarray:
    """(N, K) outcome codes → (len(OUTCOMES), K) counts of each outcome per joint (unlabelled not counted)."""
    o = outcome.reshape(-1, NUM_KEYPOINTS).astype(np.int64)
    cell = (o * NUM_KEYPOINTS + np.arange(NUM_KEYPOINTS))[o >= 0]
    return np.bincount(cell, minlength=len(OUTCOMES) * NUM_KEYPOINTS).reshape(len(OUTCOMES), NUM_KEYPOINTS)


@dataclass(frozen=True)
class Shard:
    block: int
    variant: int
    data: bytes  # the gzip file's bytes
    records: int
    counts: np.ndarray  # (len(OUTCOMES), K)
    expected: np.ndarray | None = None  # (len(OUTCOMES), K) expected counts, where known
