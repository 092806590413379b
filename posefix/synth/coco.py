"""Synthesis over a whole COCO annotation file."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..fileio import gc_paused
from ..keypoints import KS_HIT, NUM_KEYPOINTS, SIGMAS, box_iou, ks_radius
from .cocoio import GroundTruth
from .draws import KeyedDraws, as_draws
from .profile import OUTCOMES, Profile
from .synthesize import UNLABELLED, Others, prepare, synthesize

OVERLAP_IOU = 0.1
MIN_AREA = 1.0  # px²; keeps the KS scale of degenerate annotations positive
PRUNE_ABOVE = 32  # in an image of more persons, each person's candidates leave out the persons out of reach
BLOCK_PAIRS = 1 << 19  # person pairs compared at a time, so that memory grows linearly with an image's persons
# The farthest a point planted around joint j of a person of area A lands: KS 0.1, at 2σ_j·sqrt(2·A·ln 10); a
# joint of a person of area B excludes points only within KS 0.5 of it, 2σ_j·sqrt(2·B·ln 2) (see synthesize).
# Both are bounded with the widest σ.
_WIDEST = float(SIGMAS.max())


def _images(gt: GroundTruth):
    """The non-crowd persons by image, in annotation order within each: order (P,) of annotation
    indices, and each image's start in it and size."""
    keep = np.flatnonzero(~gt.crowd)
    order = keep[np.argsort(gt.image_ids[keep], kind="stable")]
    starts = np.concatenate([[0], np.flatnonzero(np.diff(gt.image_ids[order])) + 1]).astype(np.int64)
    return order, starts, np.diff(np.append(starts, order.size))


def _blocks(n: int):
    """Row slices of an (n, n) comparison, about BLOCK_PAIRS entries each."""
    step = max(1, BLOCK_PAIRS // n)
    for lo in range(0, n, step):
        yield lo, min(n, lo + step)


def _pair_iou(a, b):
    """IoU of box a[i] with box b[i], (P, 4) xywh each → (P,): box_iou's arithmetic, pair by pair."""
    ax1, ay1 = a[:, 0] + a[:, 2], a[:, 1] + a[:, 3]
    bx1, by1 = b[:, 0] + b[:, 2], b[:, 1] + b[:, 3]
    iw = np.clip(np.minimum(ax1, bx1) - np.maximum(a[:, 0], b[:, 0]), 0, None)
    ih = np.clip(np.minimum(ay1, by1) - np.maximum(a[:, 1], b[:, 1]), 0, None)
    inter = iw * ih
    union = (a[:, 2] * a[:, 3]) + (b[:, 2] * b[:, 3]) - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def _overlapping(boxes, lo, hi):
    """(hi - lo, M) whether boxes lo:hi overlap each of ``boxes`` (IoU >= 0.1), never themselves."""
    hit = box_iou(boxes[lo:hi], boxes) >= OVERLAP_IOU
    rows = np.arange(hi - lo)
    hit[rows, lo + rows] = False
    return hit


def _in_reach(gt: GroundTruth, idx, lab):
    """For each person of one image (indices ``idx``), the local positions of the labelled persons whose
    joints can constrain a point planted around one of its joints (a superset: labelled-joint boxes)."""
    kp = gt.keypoints[idx]
    v = (kp[..., 2] > 0)[..., None]
    lo_xy = np.where(v, kp[..., :2], np.inf).min(1)  # (M, 2); ±inf for a person with no labelled joint
    hi_xy = np.where(v, kp[..., :2], -np.inf).max(1)
    area = np.maximum(gt.areas[idx], MIN_AREA)
    reach_from, reach_to = (ks_radius(t, area, _WIDEST)[:, 0] for t in (0.1, KS_HIT))
    out = []
    for lo, hi in _blocks(idx.size):
        gap = np.maximum(np.maximum(lo_xy[None] - hi_xy[lo:hi, None], lo_xy[lo:hi, None] - hi_xy[None]), 0.0)
        reach = reach_from[lo:hi, None] + reach_to[None]
        near = (np.hypot(gap[..., 0], gap[..., 1]) < reach * (1.0 + 1e-6) + 1e-6) & lab[None]
        out += [np.flatnonzero(row) for row in near]
    return out


def _neighbours(gt: GroundTruth, prune_above: int = PRUNE_ABOVE, with_members: bool = True):
    """ov (N,): overlapping non-crowd persons; near: the overlapping labelled ones; and, with
    ``with_members``, members and overlap: see :func:`image_persons`."""
    n = gt.ids.size
    ov = np.zeros(n, dtype=np.int64)
    empty, none = np.zeros(0, dtype=np.int64), np.zeros(0, dtype=bool)
    near, members, overlap = [empty] * n, [empty] * n, [none] * n
    labelled = (gt.keypoints[..., 2] > 0).any(-1)
    order, starts, sizes = _images(gt)
    limit = max(prune_above, 1)
    # Images of 2..limit persons: every ordered pair of persons of an image at once.
    small = np.flatnonzero((sizes >= 2) & (sizes <= limit))
    size = np.repeat(sizes[small], sizes[small])  # per person of those images, its image's size
    first = np.repeat(starts[small], sizes[small])
    pos = first + np.arange(size.size) - np.repeat(np.cumsum(sizes[small]) - sizes[small], sizes[small])
    rows = np.repeat(pos, size)  # positions in ``order``: person, other person
    cols = np.repeat(first, size) + np.arange(rows.size) - np.repeat(np.cumsum(size) - size, size)
    other = rows != cols
    rows, cols = order[rows[other]], order[cols[other]]
    hit = _pair_iou(gt.boxes[rows], gt.boxes[cols]) >= OVERLAP_IOU
    ov += np.bincount(rows, weights=hit, minlength=n).astype(np.int64)
    persons = order[pos].tolist()
    lab = labelled[cols]

    def bounds(keep):  # each person's slice of the pairs kept
        ends = np.cumsum(np.bincount(rows, weights=keep, minlength=n)[persons]).astype(np.int64).tolist()
        return zip(persons, [0] + ends[:-1], ends)

    kept = cols[hit & lab]
    for i, a, b in bounds(hit & lab):
        near[i] = kept[a:b]
    if with_members:
        kept, flags = cols[lab], hit[lab]
        for i, a, b in bounds(lab):
            members[i], overlap[i] = kept[a:b], flags[a:b]
    # Larger images: in blocks of rows, with only the persons in reach as members.
    for k in np.flatnonzero(sizes > limit):
        idx = order[starts[k]:starts[k] + sizes[k]]
        lab = labelled[idx]
        hits = []
        for lo, hi in _blocks(idx.size):
            hit = _overlapping(gt.boxes[idx], lo, hi)
            ov[idx[lo:hi]] = hit.sum(1)
            hits += [np.flatnonzero(row) for row in hit & lab[None]]
        for i, h in zip(idx, hits):
            near[i] = idx[h]
        reach = _in_reach(gt, idx, lab) if with_members else []
        for i in np.flatnonzero(lab) if with_members else ():
            close = np.unique(np.concatenate([hits[i], reach[i]] + [reach[p] for p in hits[i]]))
            close = close[close != i]
            members[idx[i]], overlap[idx[i]] = idx[close], np.isin(close, hits[i])
    return ov, near, members, overlap


def overlaps(gt: GroundTruth) -> tuple[np.ndarray, list[np.ndarray]]:
    """For every annotation, the count of non-crowd persons of its image whose box has IoU >= 0.1
    with its box, and the indices of those among them that have labelled keypoints."""
    ov, near, _, _ = _neighbours(gt, with_members=False)
    return ov, near


def image_persons(gt: GroundTruth, prune_above: int = PRUNE_ABOVE) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """For every annotation, the other non-crowd persons of its image that label a joint (indices, in
    annotation order), and whether each overlaps it (box IoU >= 0.1).

    In an image of more than ``prune_above`` persons, only those that can matter are listed: every person
    that overlaps it, and every person with a joint within reach of a point planted around its own joints
    or those of a person overlapping it. The others exclude no point, so synthesis gives the same result
    without them, with memory and time linear in the persons per image.
    """
    _, _, members, overlap = _neighbours(gt, prune_above)
    return members, overlap


def synthesize_coco(gt: GroundTruth, rng: np.random.Generator, profile: Profile | None = None,
                    prune_above: int = PRUNE_ABOVE):
    """One synthesized input pose per labelled, non-crowd GT person, in annotation order.

    Swaps and misses are planted around the persons that overlap (box IoU >= 0.1), as PoseFix does;
    every point also keeps clear of the other persons of the image, so that a classifier that looks at
    the whole image (as COCO-style analysis does) labels it as planted (``prune_above``: see
    :func:`image_persons`; the result does not depend on it).

    Returns (results, labels): COCO results dicts, and per result what was planted:
    ``{"gt_id", "image_id", "labels": [K names, "unlabelled" for joints the GT does not label],
    "anchors": [K × [GT annotation id, joint]]}`` (the anchor a joint was planted around).
    """
    plan = plan_coco(gt, prune_above)
    draw = draw_coco(plan, rng, profile)
    persons = plan.persons
    names = np.array(list(OUTCOMES) + ["unlabelled"], dtype=object)
    outcome = draw.outcome.astype(np.int64)
    outcome[outcome == UNLABELLED] = len(OUTCOMES)
    with gc_paused():  # millions of small lists, no cycles
        image_ids, gt_ids = gt.image_ids[persons].tolist(), gt.ids[persons].tolist()
        results = [{"image_id": i, "category_id": 1, "keypoints": k, "score": s}
                   for i, k, s in zip(image_ids, draw.keypoints.reshape(persons.size, -1).tolist(),
                                      draw.score.tolist())]
        labels = [{"gt_id": g, "image_id": i, "labels": lab, "anchors": a}
                  for g, i, lab, a in zip(gt_ids, image_ids, names[outcome].tolist(),
                                          np.stack([draw.anchor_id, draw.anchor_joint], axis=-1).tolist())]
    return results, labels


@dataclass(frozen=True)
class CocoPlan:
    """What synthesis over a COCO file needs besides the random draws, computed once for any number of draws:
    ``persons`` (P,) the labelled non-crowd annotations in annotation order, and per group of persons with the
    same number of other labelled persons in their image, its rows of ``persons`` and its :class:`Others`."""

    gt: GroundTruth
    persons: np.ndarray
    ov: np.ndarray
    areas: np.ndarray
    groups: tuple  # of (sel (G,), members (nnz,), ptr (G + 1,), flags (nnz,))
    prepared: dict = field(default_factory=dict, compare=False, repr=False)  # group → synthesize.prepare, once made


@dataclass(frozen=True)
class CocoDraw:
    """One draw over a :class:`CocoPlan`'s persons: keypoints (P, K, 3), outcome (P, K) int8 (an index into
    OUTCOMES, UNLABELLED for unlabelled GT joints), anchor_id / anchor_joint (P, K) the GT annotation id
    and joint each point was planted around, score (P,)."""

    keypoints: np.ndarray
    outcome: np.ndarray
    anchor_id: np.ndarray
    anchor_joint: np.ndarray
    score: np.ndarray
    expected: np.ndarray  # (len(OUTCOMES), K) the sum over persons of each outcome's probability per joint


def plan_coco(gt: GroundTruth, prune_above: int = PRUNE_ABOVE) -> CocoPlan:
    """The overlaps and candidate persons of every labelled non-crowd person (see :func:`synthesize_coco`)."""
    labelled = ~gt.crowd & (gt.keypoints[..., 2] > 0).any(-1)
    persons = np.flatnonzero(labelled)
    ov, _, near, near_overlap = _neighbours(gt, prune_above)
    # Persons go in groups of the same number of other labelled persons in their image (so that the
    # random stream does not depend on which of them are in reach), each with those in reach.
    _, image_of = np.unique(gt.image_ids, return_inverse=True)
    counts = np.bincount(image_of, weights=labelled, minlength=image_of.max(initial=-1) + 1).astype(np.int64)
    group = counts[image_of[persons]] - 1
    lengths = np.array([near[i].size for i in persons], dtype=np.int64)
    groups = []
    for m in np.unique(group):
        sel = np.flatnonzero(group == m)
        who = persons[sel]
        ptr = np.concatenate([[0], np.cumsum(lengths[sel])]).astype(np.int64)
        members = np.concatenate([near[i] for i in who] + [np.zeros(0, dtype=np.int64)])
        flags = np.concatenate([near_overlap[i] for i in who] + [np.zeros(0, dtype=bool)])
        groups.append((sel, members, ptr, flags))
    return CocoPlan(gt, persons, ov, np.maximum(gt.areas, MIN_AREA), tuple(groups))


def draw_coco(plan: CocoPlan, rng: np.random.Generator | KeyedDraws, profile: Profile | None = None) -> CocoDraw:
    """One synthesized input pose per person of ``plan``, every random draw from ``rng``: a Generator, or
    :class:`KeyedDraws` of ``plan.persons`` (each person's draws then depend on its key alone)."""
    draws = as_draws(rng)
    gt, persons, areas = plan.gt, plan.persons, plan.areas
    kp = np.zeros((persons.size, NUM_KEYPOINTS, 3))
    outcome = np.zeros((persons.size, NUM_KEYPOINTS), dtype=np.int8)
    anchor_id = np.zeros((persons.size, NUM_KEYPOINTS), dtype=np.int64)
    anchor_joint = np.zeros((persons.size, NUM_KEYPOINTS), dtype=np.int64)
    score = np.zeros(persons.size)
    expected = np.zeros((len(OUTCOMES), NUM_KEYPOINTS))
    for g, (sel, members, ptr, flags) in enumerate(plan.groups):
        who = persons[sel]
        if g not in plan.prepared:  # the same for every draw over the plan
            plan.prepared[g] = prepare(gt.keypoints[who], areas[who], Others(gt.keypoints, areas, ptr, members, flags))
        res = synthesize(gt.keypoints[who], areas[who], draws.take(sel), ov=plan.ov[who], profile=profile,
                         prepared=plan.prepared[g])
        kp[sel], outcome[sel], score[sel] = res.keypoints, res.outcome, res.score
        entry = np.where(res.anchor_person >= 0, ptr[:-1, None] + res.anchor_person, 0)
        other_ids = gt.ids[members[entry]] if members.size else 0
        anchor_id[sel] = np.where(res.anchor_person < 0, gt.ids[who][:, None], other_ids)
        anchor_joint[sel] = res.anchor_joint
        expected += res.probabilities.sum(0).T
    return CocoDraw(kp, outcome, anchor_id, anchor_joint, score, expected)
