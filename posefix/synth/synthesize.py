"""Synthesis of erroneous input poses from GT poses, by the PoseFix error tables.

Glossary: N persons, K = 17 joints, M other persons per person (the most in a block of rows, padded),
A = 2 + 2M candidate anchors per joint, R rows = labelled (person, joint) pairs, S candidate radii per row.

Every labelled joint gets one outcome — good, jitter, inversion, swap or miss — drawn from the
profile's probabilities, and a point placed where a Ronchi & Perona classifier labels it so:

- good: KS > 0.85 to its own GT joint; jitter: 0.5 <= KS < 0.85 to it; in both cases the own joint
  has the highest KS of all candidates;
- inversion: KS >= 0.5 to the same person's left/right partner, which beats every other candidate;
- swap: KS >= 0.5 to the same joint or its partner of an overlapping person, which beats every other
  candidate;
- miss: 0.1 < KS < 0.5 to the own joint or a wrong anchor and KS < 0.5 to every candidate.

KS to a candidate uses that candidate person's own area, as COCO-style analysis does. An outcome
with no valid point (inversion of the nose or of a joint whose partner is unlabelled, swap with no
overlapping joint) has probability 0 and the others are renormalised.

Placement is exact and vectorised, with no rejection sampling: for a radius r around the chosen
anchor, every constraint "KS to anchor a below some bound" excludes one arc of the circle of radius
r, so the admissible angles are the circle minus a union of arcs, computed in closed form. S radii
are drawn uniformly in the outcome's range and one is taken with probability proportional to its
admissible arc length, then an angle uniformly in the admissible arcs: in the limit this is the
uniform-in-(radius, angle) distribution that the reference's rejection sampling produces. An arc that
excludes nothing takes no part, and only the anchors within reach of a row's circles are computed, so
persons out of reach leave the result unchanged and the work follows the persons near each joint. Most
labelled joints have no other anchor in reach of any good or jittered circle (:func:`isolated_joints`,
computed from the GT once for any number of draws, :func:`prepare`): those take the whole circle without
their candidates being built, with the same numbers.

Random numbers come from a numpy Generator's stream, or per (person, joint) from counter-based
:class:`posefix.synth.draws.KeyedDraws`, so that a person's draw does not depend on who else is drawn.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import InputError
from ..keypoints import HEIGHT_PER_SQRT_AREA, KS_HIT, KS_SCALE, NUM_KEYPOINTS, PARTNER, TEMPLATE, ks_radius
from .draws import ANCHOR, ANGLE, ATTEMPT, CONFIDENCE, OUTCOME, PICK, RADII, RHO, THETA, KeyedDraws, as_draws
from .profile import GOOD, INVERSION, JITTER, MISS, OUTCOMES, SWAP, Profile, published_profile

UNLABELLED = -1  # outcome code of an unlabelled GT joint that was placed plausibly
TWO_PI = 2.0 * np.pi
LN2 = -np.log(KS_HIT)  # ln 2: a miss keeps d² >= s · LN2 from every other candidate (KS below KS_HIT)
ANGLE_MARGIN = 1e-9  # radians
BLOCK_ELEMS = 1 << 18  # (row, radius, anchor) entries of the arc computation at a time
# (low, high) KS bounds of the planted point's KS to its anchor; radii follow as sqrt(-s ln KS).
KS_RANGE = {GOOD: (1.0, 0.85), JITTER: (0.85, 0.5), INVERSION: (1.0, 0.5), SWAP: (1.0, 0.5), MISS: (0.5, 0.1)}


@dataclass(frozen=True)
class SynthResult:
    """Synthesized input poses.

    keypoints: (N, K, 3) x, y in pixels and a confidence in (0, 1).
    outcome: (N, K) int8, an index into ``OUTCOMES`` or ``UNLABELLED`` (-1) for a joint the GT does
        not label, placed plausibly rather than planted.
    anchor_person: (N, K) int, -1 when the anchor is the person itself, else the index along the
        ``others`` axis of the person whose joint it was planted around (swaps, some misses).
    anchor_joint: (N, K) int, the joint index of the anchor (the partner for an inversion).
    score: (N,) instance score, the mean confidence of the labelled joints.
    probabilities: (N, K, 5) each joint's outcome probabilities as drawn (the profile's, the impossible
        outcomes removed and the rest renormalised; zero for an unlabelled joint).
    """

    keypoints: np.ndarray
    outcome: np.ndarray
    anchor_person: np.ndarray
    anchor_joint: np.ndarray
    score: np.ndarray
    probabilities: np.ndarray | None = None


@dataclass(frozen=True)
class Others:
    """The other persons of each of N persons, as ragged lists over one pool of persons.

    Person i's others are the pool rows ``members[ptr[i]:ptr[i + 1]]``, in the classifier's tie order;
    ``keypoints`` (Q, K, 3) and ``area`` (Q,) are the pool's joints and areas; ``overlap`` (nnz,) marks,
    for each entry of ``members``, whether that person overlaps person i (box IoU >= 0.1): swaps and misses
    are planted around those only, while every point keeps clear of all. ``SynthResult.anchor_person``
    indexes person i's list. Memory grows with the entries, not with N × the longest list.
    """

    keypoints: np.ndarray
    area: np.ndarray
    ptr: np.ndarray
    members: np.ndarray
    overlap: np.ndarray

    @classmethod
    def dense(cls, others, others_area, overlap=None) -> Others:
        """From (N, M, K, 3) joints, (N, M) areas and optional (N, M) overlap flags (default all True)."""
        n, m = others.shape[:2]
        overlap = np.ones((n, m), dtype=bool) if overlap is None else np.asarray(overlap, dtype=bool).reshape(n, m)
        return cls(others.reshape(n * m, NUM_KEYPOINTS, 3), others_area.reshape(n * m),
                   np.arange(n + 1, dtype=np.int64) * m, np.arange(n * m, dtype=np.int64), overlap.reshape(-1))

    def checked(self, n: int) -> Others:
        """A copy with validated arrays for N persons, and the KS areas of the pool's persons that label
        no joint set to 1 (they are never a candidate)."""
        kp = _as_array(self.keypoints, (NUM_KEYPOINTS, 3), "others.keypoints").reshape(-1, NUM_KEYPOINTS, 3)
        q = kp.shape[0]
        area = _as_array(self.area, (), "others.area").reshape(-1)
        ptr = np.asarray(self.ptr, dtype=np.int64).reshape(-1)
        members = np.asarray(self.members, dtype=np.int64).reshape(-1)
        overlap = np.asarray(self.overlap, dtype=bool).reshape(-1)
        if area.size != q:
            raise InputError("others.area", f"must have one area per pool person ({q}), got {area.size}")
        if ptr.size != n + 1 or ptr[0] != 0 or ptr[-1] != members.size or np.any(np.diff(ptr) < 0):
            raise InputError("others.ptr", f"must be {n + 1} non-decreasing offsets from 0 to len(members)")
        if members.size and (members.min() < 0 or members.max() >= q):
            raise InputError("others.members", f"must be rows of the pool (0..{q - 1})")
        if overlap.size != members.size:
            raise InputError("others.overlap", f"must have one flag per member ({members.size}), got {overlap.size}")
        area = np.where(kp[..., 2].max(-1, initial=0) > 0, np.maximum(area, 1e-6), 1.0)
        if not q:  # one pool row that no list names, so that gathers never index an empty pool
            kp, area = np.zeros((1, NUM_KEYPOINTS, 3)), np.ones(1)
        return Others(kp, area, ptr, members, overlap)


def _as_array(x, shape_tail, name, dtype=np.float64):
    a = np.asarray(x, dtype=dtype)
    if a.shape[a.ndim - len(shape_tail):] != tuple(shape_tail) or not np.all(np.isfinite(a)):
        raise InputError(name, f"must be a finite array of shape (..., {', '.join(map(str, shape_tail))}), "
                               f"got shape {a.shape}")
    return a


def synthesize(gt, area, rng: np.random.Generator | KeyedDraws, others=None, others_area=None, ov=None, nv=None,
               profile: Profile | None = None, estimates=None, others_overlap=None, num_radii: int = 8,
               chunk_rows: int = 32768, block_elems: int = BLOCK_ELEMS,
               prepared: Prepared | None = None) -> SynthResult:
    """Draw one erroneous input pose per GT person.

    gt: (N, K, 3) GT joints (x, y, v), v > 0 labelled; every person needs a labelled joint.
    area: (N,) the persons' areas (the KS scale).
    rng: the seeded generator every random draw goes through, or a :class:`posefix.synth.draws.KeyedDraws`
        of these N persons (then each person's draws depend on its key alone).
    others: (N, M, K, 3) GT joints of the persons overlapping each person (box IoU >= 0.1), padded
        with v = 0; others_area: (N, M) their areas. Or an :class:`Others`, the same as ragged lists
        (then others_area and others_overlap are not given).
    others_overlap: optional (N, M) bool. By default every row of ``others`` overlaps; rows marked
        False are other persons of the image that do not: points keep clear of their joints (so that
        a classifier looking at the whole image agrees) but no swap or miss is planted around them.
    ov: (N,) number of overlapping persons (default: rows of ``others`` that overlap and have a
        labelled joint).
    nv: (N,) labelled joints in view (default: count of v > 0 in ``gt``).
    estimates: optional (N, K, 3) another estimator's joints; where present (v > 0) they place the
        unlabelled GT joints instead of the template.
    chunk_rows: labelled joints drawn for at a time (the random stream depends on it); block_elems: the
        size of the blocks the work of a chunk is done in, so that memory stays bounded (the result does
        not depend on it).
    prepared: optional :func:`prepare` of these persons and others, the work that depends on the GT alone,
        which several draws over the same persons share (``others`` is then not given). The result does not
        depend on it.
    """
    profile = profile or published_profile()
    draws = as_draws(rng)
    gt = _as_array(gt, (NUM_KEYPOINTS, 3), "gt")
    n = gt.shape[0]
    area = _as_array(area, (), "area").reshape(n)
    if np.any(area <= 0):
        raise InputError("area", f"must be positive; person {int(np.argmax(area <= 0))} has {area[area <= 0][0]}")
    vis = gt[..., 2] > 0
    if n and not vis.any(axis=1).all():
        raise InputError("gt", f"person {int(np.argmin(vis.any(axis=1)))} has no labelled joint")
    if prepared is not None:
        if others is not None or others_area is not None or others_overlap is not None:
            raise InputError("others", "prepared carries the others: give neither")
        if prepared.isolated.shape[0] != n:
            raise InputError("prepared", f"was made for {prepared.isolated.shape[0]} persons, not {n}")
        oth = prepared.others
    elif isinstance(others, Others):
        if others_area is not None or others_overlap is not None:
            raise InputError("others", "an Others carries its areas and overlap flags: give neither separately")
        oth = others.checked(n)
    else:
        if others is None:
            others = np.zeros((n, 0, NUM_KEYPOINTS, 3))
            others_area = np.ones((n, 0))
        others = _as_array(others, (NUM_KEYPOINTS, 3), "others").reshape(n, -1, NUM_KEYPOINTS, 3)
        others_area = _as_array(others_area, (), "others_area").reshape(n, others.shape[1])
        oth = Others.dense(others, others_area, others_overlap).checked(n)
    owner = np.repeat(np.arange(n), np.diff(oth.ptr))  # (nnz,) whose list each entry is in
    member_vis = oth.keypoints[oth.members, :, 2] > 0  # (nnz, K)
    counted = member_vis.any(-1) & oth.overlap
    ov = np.bincount(owner[counted], minlength=n) if ov is None else np.asarray(ov).reshape(n)
    nv = vis.sum(-1) if nv is None else np.asarray(nv).reshape(n)

    # Outcome probabilities with the infeasible ones removed.  (N, K, 5)
    p = profile.probabilities(nv, ov)
    other_vis = member_vis & oth.overlap[:, None]  # (nnz, K) joints a swap may land on
    inv_ok = vis[:, PARTNER] & (PARTNER != np.arange(NUM_KEYPOINTS))
    swap_ok = np.zeros((n, NUM_KEYPOINTS), dtype=bool)
    entry, joint = np.nonzero(other_vis | other_vis[:, PARTNER])
    swap_ok[owner[entry], joint] = True
    p[..., INVERSION] *= inv_ok
    p[..., SWAP] *= swap_ok

    out_xy = np.zeros((n, NUM_KEYPOINTS, 2))
    outcome = np.full((n, NUM_KEYPOINTS), UNLABELLED, dtype=np.int8)
    anchor_person = np.full((n, NUM_KEYPOINTS), -1, dtype=np.int64)
    anchor_joint = np.tile(np.arange(NUM_KEYPOINTS), (n, 1))

    isolated = prepared.isolated if prepared is not None else isolated_joints(gt, area, oth, block_elems)
    rows_n, rows_j = np.nonzero(vis)
    for lo in range(0, rows_n.size, chunk_rows):
        rn, rj = rows_n[lo:lo + chunk_rows], rows_j[lo:lo + chunk_rows]
        xy, o, ap, aj = _plant(gt, area, oth, p, rn, rj, profile, draws, num_radii, block_elems, isolated)
        out_xy[rn, rj], outcome[rn, rj], anchor_person[rn, rj], anchor_joint[rn, rj] = xy, o, ap, aj

    placed = ~vis
    if placed.any():
        fit = prepared.fit if prepared is not None and estimates is None else None
        out_xy[placed] = place_unlabelled(gt, area, draws, estimates, fit, placed)

    conf = np.empty((n, NUM_KEYPOINTS))
    row_id = np.arange(n * NUM_KEYPOINTS).reshape(n, NUM_KEYPOINTS)
    for code, name in list(enumerate(OUTCOMES)) + [(UNLABELLED, "unlabelled")]:
        m = outcome == code
        if m.any():
            a, b = profile.scores[name]
            conf[m] = draws.beta(a, b, row_id[m], CONFIDENCE)
    conf = np.clip(conf, 1e-3, 1.0)
    score = (conf * vis).sum(1) / np.maximum(vis.sum(1), 1)
    keypoints = np.concatenate([out_xy, conf[..., None]], axis=-1)
    total = p.sum(-1, keepdims=True)
    expected = np.where(vis[..., None], p / np.where(total > 0, total, 1.0), 0.0)
    return SynthResult(keypoints, outcome, anchor_person, anchor_joint, score, expected)


def _row_blocks(width, budget):
    """Consecutive row slices whose rows × widest row stays within ``budget`` (at least one row each)."""
    lo, n = 0, width.size
    while lo < n:
        widest = np.maximum.accumulate(width[lo:lo + budget])
        hi = lo + max(1, int(np.searchsorted(widest * np.arange(1, widest.size + 1), budget, side="right")))
        yield lo, hi
        lo = hi


def _candidates(gt, area, oth, rn, rj, geometry=True):
    """The classifier's candidate anchors for each row, in its tie order.

    Order: own joint, the M others' same joint, own partner, their partners, where M is the most others
    of these rows (padded with invalid ones). Returns M, valid (R, A), may_centre (R, A) (own joints and
    overlapping persons), and with ``geometry`` xy (R, A, 2) and scale (R, A) of KS = exp(-d² / scale).
    """
    start = oth.ptr[rn]
    count = oth.ptr[rn + 1] - start
    m = int(count.max(initial=0))
    has = np.arange(m) < count[:, None]  # (R, M)
    entry = np.where(has, start[:, None] + np.arange(m), 0)
    who = oth.members[entry] if oth.members.size else np.zeros((rn.size, m), dtype=np.int64)
    pj = PARTNER[rj]
    vis_j = has & (oth.keypoints[who, rj[:, None], 2] > 0)
    vis_p = has & (oth.keypoints[who, pj[:, None], 2] > 0)
    nose = (rj == pj)[:, None]  # the nose is its own partner: no separate partner candidates
    valid = np.concatenate([gt[rn, rj, 2:] > 0, vis_j, (gt[rn, pj, 2:] > 0) & ~nose, vis_p & ~nose], axis=1)
    ovl = has & (oth.overlap[entry] if oth.overlap.size else has)
    own = np.ones((rn.size, 1), dtype=bool)
    may_centre = np.concatenate([own, ovl, own, ovl], axis=1)
    if not geometry:
        return m, valid, may_centre
    oth_area = np.where(has, oth.area[who], 1.0)
    cxy = np.concatenate([gt[rn, rj, None, :2], oth.keypoints[who, rj[:, None], :2],
                          gt[rn, pj, None, :2], oth.keypoints[who, pj[:, None], :2]], axis=1)  # (R, A, 2)
    areas = np.concatenate([area[rn, None], oth_area, area[rn, None], oth_area], axis=1)
    scale = areas * KS_SCALE[rj][:, None]
    return m, valid, may_centre, cxy, scale


def _index(part, slot, m):
    """Candidate index, in the layout of :func:`_candidates` for M others, of (part, slot): part 0 the
    row's joint, 1 its partner; slot -1 the person itself, else the index in its list of others."""
    return part * (m + 1) + slot + 1


def _weights(m, valid, may_centre, o, profile):
    """Centre weights (R, A) for outcome o (R,): which candidate a point of that outcome may be planted
    around, and in proportion to what."""
    a_count = valid.shape[1]
    idx = np.arange(a_count)
    w = np.zeros(valid.shape)
    w[:, 0] = (o == GOOD) | (o == JITTER)
    inv = o == INVERSION
    w[inv, m + 1] = valid[inv, m + 1]
    swap = o == SWAP
    w[swap] = valid[swap] * may_centre[swap] * ((idx != 0) & (idx != m + 1))
    miss = o == MISS
    w[miss] = valid[miss] * may_centre[miss] * np.where(idx == 0, profile.miss_own_anchor_weight, 1.0)
    return w


def _chosen(weights, u):
    """The index that uniform draw u (R,) selects in proportion to weights (R, C)."""
    cum = np.cumsum(weights, axis=-1)
    u = u * cum[:, -1]
    return np.minimum((cum <= u[:, None]).sum(-1), weights.shape[-1] - 1)


def _plant(gt, area, oth, p, rn, rj, profile, draws, num_radii, block_elems=BLOCK_ELEMS, isolated=None):
    """Draw an outcome and place a point for each row (labelled joint). Returns xy (R, 2), outcome,
    anchor person and anchor joint (R,). Candidates are built for blocks of rows at a time, for the rows
    whose anchor is a choice (swaps and misses): a good or jittered point is planted around its own joint,
    an inversion around its partner (the only anchor of nonzero weight, so the draw picks it whatever u)."""
    r_count = rn.size
    width = 2 + 2 * (oth.ptr[rn + 1] - oth.ptr[rn])  # candidates per row
    prob = p[rn, rj].copy()  # (R, 5)
    xy = gt[rn, rj, :2].copy()
    outcome = np.full(r_count, GOOD, dtype=np.int8)
    part = np.zeros(r_count, dtype=np.int64)
    slot = np.full(r_count, -1, dtype=np.int64)
    removed = np.zeros((3, 0), dtype=np.int64)  # (row, outcome, part·(M+1) + slot + 1) with no admissible point
    key_base = int(width.max(initial=2)) // 2  # above any slot + 1
    pending = np.arange(r_count)
    rid = rn * NUM_KEYPOINTS + rj  # the draws' row ids
    attempt = 0
    while pending.size:
        pr = prob[pending]
        dead = pr.sum(-1) <= 0
        if dead.any():  # nothing admissible (coincident anchors): the GT point itself, a good joint
            pending = pending[~dead]
            pr = pr[~dead]
            if not pending.size:
                break
        o = _chosen(pr, draws.random(rid[pending], OUTCOME + ATTEMPT * attempt))
        u = draws.random(rid[pending], ANCHOR + ATTEMPT * attempt)
        c_part = (o == INVERSION).astype(np.int64)
        c_slot = np.full(pending.size, -1, dtype=np.int64)
        choice = np.flatnonzero((o == SWAP) | (o == MISS))
        for lo, hi in _row_blocks(width[pending[choice]], block_elems):
            at = choice[lo:hi]
            rows = pending[at]
            m, valid, may_centre = _candidates(gt, area, oth, rn[rows], rj[rows], geometry=False)
            w = _weights(m, valid, may_centre, o[at], profile)
            _drop_removed(w, removed, rows, o[at], m, key_base)
            c = _chosen(w, u[at])
            c_part[at], c_slot[at] = c // (m + 1), c % (m + 1) - 1
        easy = None
        if isolated is not None:  # good or jittered around its own joint with no other candidate in reach
            own = (o == GOOD) | (o == JITTER)
            easy = own & isolated[rn[pending], rj[pending], np.where(o == JITTER, 1, 0)]
        ok, pts = _place(gt, area, oth, rn[pending], rj[pending], width[pending], o, c_part, c_slot, draws,
                         rid[pending], attempt, num_radii, block_elems, easy)
        done = pending[ok]
        xy[done], outcome[done], part[done], slot[done] = pts[ok], o[ok], c_part[ok], c_slot[ok]
        bad = pending[~ok]
        if not bad.size:
            break
        # That (outcome, anchor) has no admissible point: remove it, and the outcome once no anchor is left.
        o_bad = o[~ok]
        removed = np.concatenate([removed, [bad, o_bad, c_part[~ok] * key_base + c_slot[~ok] + 1]], axis=1)
        left = np.zeros(bad.size, dtype=bool)
        for lo, hi in _row_blocks(width[bad], block_elems):
            m, valid, may_centre = _candidates(gt, area, oth, rn[bad[lo:hi]], rj[bad[lo:hi]], geometry=False)
            w = _weights(m, valid, may_centre, o_bad[lo:hi], profile)
            _drop_removed(w, removed, bad[lo:hi], o_bad[lo:hi], m, key_base)
            left[lo:hi] = w.sum(-1) > 0
        prob[bad[~left], o_bad[~left]] = 0.0
        pending = bad
    anchor_joint = np.where(part == 0, rj, PARTNER[rj])
    return xy, outcome, slot, anchor_joint


def _drop_removed(w, removed, rows, o, m, key_base):
    """Zero, in weights w (B, A) of ``rows`` (ascending) for outcomes o, the (outcome, anchor) pairs removed."""
    if not removed.shape[1]:
        return
    at = np.minimum(np.searchsorted(rows, removed[0]), rows.size - 1)
    hit = (rows[at] == removed[0]) & (o[at] == removed[1])
    key = removed[2, hit]
    w[at[hit], _index(key // key_base, key % key_base - 1, m)] = 0.0


def _place(gt, area, oth, rn, rj, width, o, part, slot, draws, rid, attempt, num_radii, block_elems=BLOCK_ELEMS,
           easy=None):
    """Place one point per row around its centre, candidate (part, slot), for outcome ``o``, drawing from
    ``draws`` for row ids ``rid`` (R,) in retry round ``attempt``.

    Returns ok (R,) and points (R, 2). Only the anchors whose excluded arc can be non-empty at one of
    the row's radii take part (the others exclude nothing), so the work per row follows the anchors near
    it; candidates and arcs are computed in blocks of about ``block_elems`` entries. ``easy`` (R,) marks
    rows known to have no such anchor at any radius of their outcome (see :func:`isolated_joints`): they
    take the whole circle without their candidates being built.
    """
    r_count = rn.size
    # The centre: the person's own joint or partner, or an other's.
    entry = np.where(slot >= 0, oth.ptr[rn] + slot, 0)
    who = oth.members[entry] if oth.members.size else np.zeros(r_count, dtype=np.int64)
    joint = np.where(part == 0, rj, PARTNER[rj])
    own = slot < 0
    centre = np.where(own[:, None], gt[rn, joint, :2], oth.keypoints[who, joint, :2])  # (R, 2)
    s_c = np.where(own, area[rn], oth.area[who]) * KS_SCALE[rj]  # (R,)
    ks_hi = np.array([KS_RANGE[k][0] for k in range(5)])[o]
    ks_lo = np.array([KS_RANGE[k][1] for k in range(5)])[o]
    r_min = np.sqrt(-s_c * np.log(ks_hi))
    r_max = np.sqrt(-s_c * np.log(ks_lo))
    # S radii per row; an easy row's circles are all whole, so only the radius it picks is computed (and, with
    # keyed draws, drawn).
    hard = np.arange(r_count) if easy is None else np.flatnonzero(~easy)
    site = RADII + ATTEMPT * attempt
    u_radii = None if isinstance(draws, KeyedDraws) else draws.random(rid, site, num_radii)  # a stream: all (R, S)
    radii = np.empty((r_count, num_radii))
    radii[hard] = r_min[hard, None] + (r_max - r_min)[hard, None] * (
        draws.random(rid[hard], site, num_radii) if u_radii is None else u_radii[hard])  # (H, S)
    r_lo, r_hi = radii[hard].min(-1)[:, None], radii[hard].max(-1)[:, None]
    whole = TWO_PI - 2.0 * ANGLE_MARGIN  # the one gap of a circle with no arc, as _free_arcs gives it
    free = np.full((hard.size, num_radii), whole)
    at = np.full(r_count, -1)
    at[hard] = np.arange(hard.size)  # row → its index among the hard rows
    live_blocks = []
    for lo, hi in _row_blocks(width[hard], max(1, block_elems // num_radii)):
        b = hard[lo:hi]
        m, valid, _, cxy, scale = _candidates(gt, area, oth, rn[b], rj[b])
        c = _index(part[b], slot[b], m)
        d = cxy - centre[b, None]  # (B, A, 2)
        dx, dy = d[..., 0], d[..., 1]
        active = valid.copy()
        active[np.arange(hi - lo), c] = False
        miss = (o[b] == MISS)[:, None]
        ratio = scale / s_c[b, None]  # (B, A)
        miss_t = scale * LN2
        near = _in_reach(np.hypot(dx, dy), miss, ratio, miss_t, r_lo[lo:hi], r_hi[lo:hi], active)
        # Rows with such anchors (the others have the whole circle: one gap, [0, 2π] less the margins),
        # each with those anchors first, in candidate order (ties go by it), the rest dropped.
        live = np.flatnonzero(near.any(-1))
        if not live.size:
            continue
        w_live = int(near[live].sum(-1).max())
        keep = np.argsort(~near[live], axis=-1, kind="stable")[:, :w_live]  # (L, W) candidate indices
        arcs = _Arcs(b[live], np.take_along_axis(dx[live], keep, -1), np.take_along_axis(dy[live], keep, -1),
                     np.where(miss[live], np.take_along_axis(miss_t[live], keep, -1),
                              np.take_along_axis(ratio[live], keep, -1)),
                     miss[live, :, None], np.take_along_axis(near[live], keep, -1), keep > c[live, None])
        live_blocks.append(arcs)
        step = max(1, block_elems // (num_radii * (w_live + 1)))
        for a in range(0, live.size, step):
            sel = arcs.rows[a:a + step]
            free[at[sel]] = np.cumsum(arcs.gaps(a, a + step, radii[sel])[1], axis=-1)[..., -1]
    ok = np.ones(r_count, dtype=bool)
    ok[hard] = free.max(-1) > 0
    u_pick = draws.random(rid, PICK + ATTEMPT * attempt)
    pick = np.empty(r_count, dtype=np.int64)
    pick[hard] = _chosen(np.where(ok[hard, None], free, 1.0), u_pick[hard])
    r = np.empty(r_count)
    r[hard] = radii[hard, pick[hard]]
    if easy is not None and easy.any():  # _chosen over S whole circles, by one row of them
        e = np.flatnonzero(easy)
        cum = np.cumsum(np.full(num_radii, whole))
        pick[e] = np.minimum(np.searchsorted(cum, u_pick[e] * cum[-1], side="right"), num_radii - 1)
        u_e = draws.random_at(rid[e], site, num_radii, pick[e]) if u_radii is None else u_radii[e, pick[e]]
        r[e] = r_min[e] + (r_max - r_min)[e] * u_e
    u = draws.random(rid, THETA + ATTEMPT * attempt)
    theta = ANGLE_MARGIN + u * whole
    for arcs in live_blocks:
        step = max(1, block_elems // (arcs.dx.shape[1] + 1))
        for a in range(0, arcs.rows.size, step):
            sel = arcs.rows[a:a + step]
            start, length = arcs.gaps(a, a + step, r[sel, None])
            start, length = start[:, 0], length[:, 0]  # (B, W + 1)
            cum = np.cumsum(length, axis=-1)
            ub = u[sel] * cum[:, -1]
            g = np.minimum((cum <= ub[:, None]).sum(-1), length.shape[-1] - 1)
            i = np.arange(g.size)
            theta[sel] = start[i, g] + (ub - (cum[i, g] - length[i, g]))
    pts = centre + r[:, None] * np.stack([np.cos(theta), np.sin(theta)], axis=-1)
    return ok, pts


@dataclass(frozen=True)
class Prepared:
    """What :func:`synthesize` computes from the GT alone, for any number of draws over the same persons:
    the checked others, :func:`isolated_joints` and :func:`fit_unlabelled`."""

    others: Others
    isolated: np.ndarray
    fit: np.ndarray


def prepare(gt, area, others: Others) -> Prepared:
    """:class:`Prepared` for N persons (gt (N, K, 3), area (N,)) and their :class:`Others`."""
    gt = _as_array(gt, (NUM_KEYPOINTS, 3), "gt")
    area = _as_array(area, (), "area").reshape(gt.shape[0])
    oth = others.checked(gt.shape[0])
    return Prepared(oth, isolated_joints(gt, area, oth), fit_unlabelled(gt, area))


def isolated_joints(gt, area, others: Others, block_elems: int = BLOCK_ELEMS) -> np.ndarray:
    """(N, K, 2) bool: whether a good (…, 0) or jittered (…, 1) point around each labelled GT joint has no
    other candidate anchor in reach at any radius of its outcome's range, so that its whole circle is
    admissible. It depends on the GT alone, so several draws over the same persons share it. Conservative:
    a joint marked False may still be isolated (it is then placed the general way, with the same result).
    ``others`` is :meth:`Others.checked` for these N persons."""
    n = gt.shape[0]
    out = np.zeros((n, NUM_KEYPOINTS, 2), dtype=bool)
    rn, rj = np.nonzero(gt[..., 2] > 0)
    width = 2 + 2 * (others.ptr[rn + 1] - others.ptr[rn])
    r_unit = np.sqrt(-np.log([KS_RANGE[GOOD][1], KS_RANGE[JITTER][1]]))  # outermost radius / sqrt(s)
    for lo, hi in _row_blocks(width, block_elems):
        _, valid, _, cxy, scale = _candidates(gt, area, others, rn[lo:hi], rj[lo:hi])
        dist = np.hypot(*np.moveaxis(cxy - cxy[:, :1], -1, 0))  # (B, A) from the own joint
        reach = 1.0 + np.sqrt(scale / scale[:, :1])  # a candidate at D is in reach at radius r iff D < r · reach
        valid[:, 0] = False
        for k in range(2):  # past the slack _in_reach allows at any radius of the range
            r_max = r_unit[k] * np.sqrt(scale[:, :1])
            near = valid & (dist < r_max * reach * (1.0 + 1e-5) + 1e-8)
            out[rn[lo:hi], rj[lo:hi], k] = ~near.any(-1)
    return out


def _in_reach(dist, miss, ratio, miss_t, r_lo, r_hi, active):
    """(B, A) which active anchors can exclude a non-empty arc of a row's circle at some radius in
    [r_lo, r_hi] (B, 1). An anchor at distance D does at radius r iff |D - r| < sqrt(t): t = r² · ratio
    (KS to it below the centre's), or s · ln 2 for a miss (KS to it below 0.5). The bounds carry a slack
    far above rounding error, so that no live arc is ever dropped."""
    reach_hi = np.where(miss, r_hi + np.sqrt(miss_t), r_hi * (1.0 + np.sqrt(ratio)))
    reach_lo = np.where(miss, r_lo - np.sqrt(miss_t), r_lo * (1.0 - np.sqrt(ratio)))
    slack = 1e-6 * (np.abs(reach_hi) + np.abs(reach_lo)) + 1e-9
    return active & (dist < reach_hi + slack) & (dist > reach_lo - slack)


@dataclass(frozen=True)
class _Arcs:
    """The anchors near the circles of some rows, compacted: rows (L,), and per row dx, dy (L, W) from the
    centre, t (L, W) (the squared-distance bound, or its ratio to r² when not a miss), miss (L, 1, 1),
    active (L, W) and wins (L, W) (the centre wins a tie against that anchor)."""

    rows: np.ndarray
    dx: np.ndarray
    dy: np.ndarray
    t: np.ndarray
    miss: np.ndarray
    active: np.ndarray
    wins: np.ndarray

    def gaps(self, lo, hi, r):
        """Gap starts and lengths (B, S, W + 1) of rows lo:hi at radii r (B, S)."""
        t = np.where(self.miss[lo:hi], self.t[lo:hi, None], r[..., None] ** 2 * self.t[lo:hi, None])
        return _free_arcs(self.dx[lo:hi, None], self.dy[lo:hi, None], r[..., None], t, self.active[lo:hi, None],
                          self.wins[lo:hi, None])


def _free_arcs(dx, dy, r, t, active, wins):
    """Admissible angles on circles around the origin, as gaps between excluded arcs.

    For each anchor at (dx, dy) the point at radius r and angle θ must satisfy |p - a|² > t, which
    fails on one arc centred on the anchor's direction (an empty one for an inactive anchor or one out
    of reach: such arcs take no part). All inputs broadcast to (R, S, A). Returns gap starts and lengths
    (R, S, A + 1) in radians, each gap kept clear of the arcs' ends by ``ANGLE_MARGIN``; their lengths
    sum to the free angle.
    """
    dist = np.hypot(dx, dy)
    phi = np.arctan2(dy, dx)
    num = r * r + dist * dist - t
    den = 2.0 * r * dist
    with np.errstate(divide="ignore", invalid="ignore"):
        kappa = num / den
    kappa = np.where(den > 0, kappa, np.where((num > 0) | ((num == 0) & wins), np.inf, -np.inf))
    half = np.where(active, np.arccos(np.clip(kappa, -1.0, 1.0)), 0.0)  # half-width of the excluded arc
    half = np.broadcast_to(half, np.broadcast_shapes(half.shape, phi.shape))
    live = half > 0
    s = np.where(live, np.mod(phi - half, TWO_PI), 0.0)  # an empty arc becomes [0, 0], which splits no gap
    e = s + 2.0 * half
    wrap = np.maximum(e - TWO_PI, 0.0).max(-1, keepdims=True)  # arcs past 2π cover [0, wrap]
    order = np.argsort(s, axis=-1)
    s = np.take_along_axis(s, order, -1)
    ends = np.maximum(np.maximum.accumulate(np.take_along_axis(np.minimum(e, TWO_PI), order, -1), axis=-1), wrap)
    gap_start = np.concatenate([wrap, ends], axis=-1)
    gap_len = np.concatenate([s, np.full_like(wrap, TWO_PI)], axis=-1) - gap_start
    # Keep clear of the arcs' ends by a margin far above rounding error, so that no point lands on
    # a boundary and slivers left by rounding count as no gap.
    return gap_start + ANGLE_MARGIN, np.maximum(gap_len - 2.0 * ANGLE_MARGIN, 0.0)


def place_unlabelled(gt, area, rng, estimates=None, fit=None, only=None):
    """Plausible positions for every joint from the labelled ones: (N, K, 2).

    The template pose (facing the camera, or facing away, whichever fits better) is fitted to each
    person's labelled joints by a least-squares similarity transform (scale from the area when only
    one joint is labelled), then each position is perturbed uniformly within the KS = 0.5 radius.
    Where ``estimates`` has a joint (v > 0) it is used instead of the template. ``fit``: the positions before
    the perturbation (:func:`fit_unlabelled`), where already known. ``only``: an (N, K) mask; then the
    positions of those joints alone, (count, 2), with the same random draws.
    """
    xy = fit_unlabelled(gt, area, estimates) if fit is None else fit
    radius = ks_radius(KS_HIT, area)  # (N, K)
    draws = as_draws(rng)
    rows = np.arange(radius.size).reshape(radius.shape)
    u_rho, u_ang = draws.random(rows, RHO), draws.random(rows, ANGLE)
    if only is not None:
        xy, radius, u_rho, u_ang = xy[only], radius[only], u_rho[only], u_ang[only]
    rho = radius * np.sqrt(u_rho)
    ang = u_ang * TWO_PI
    return xy + np.stack([rho * np.cos(ang), rho * np.sin(ang)], axis=-1)


def fit_unlabelled(gt, area, estimates=None):
    """The positions of :func:`place_unlabelled` before its random perturbation: (N, K, 2)."""
    gt = np.asarray(gt, dtype=np.float64)
    vis = (gt[..., 2] > 0).astype(np.float64)
    z = gt[..., 0] + 1j * gt[..., 1]  # (N, K)
    tmpl = TEMPLATE[:, 0] + 1j * TEMPLATE[:, 1]
    best_fit, best_res = None, None
    for t in (tmpl, -np.conj(tmpl)):  # facing the camera; facing away (mirrored)
        cnt = vis.sum(-1, keepdims=True)
        mt = (vis * t).sum(-1, keepdims=True) / cnt
        mz = (vis * z).sum(-1, keepdims=True) / cnt
        tc, zc = t - mt, z - mz
        denom = (vis * np.abs(tc) ** 2).sum(-1, keepdims=True)
        a = (vis * np.conj(tc) * zc).sum(-1, keepdims=True) / np.where(denom > 0, denom, 1.0)
        one = cnt[:, 0] < 2
        a[one] = HEIGHT_PER_SQRT_AREA * np.sqrt(np.asarray(area, dtype=np.float64)[one, None])
        fit = mz + a * (t - mt)
        res = (vis * np.abs(fit - z) ** 2).sum(-1)
        if best_fit is None:
            best_fit, best_res = fit, res
        else:
            better = (res < best_res - 1e-9)[:, None]
            best_fit = np.where(better, fit, best_fit)
    xy = np.stack([best_fit.real, best_fit.imag], axis=-1)
    if estimates is not None:
        est = np.asarray(estimates, dtype=np.float64)
        xy = np.where((est[..., 2] > 0)[..., None], est[..., :2], xy)
    return xy
