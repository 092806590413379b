"""Synthesis of erroneous input poses from GT poses, by the PoseFix error tables.

Glossary: N persons, K = 17 joints, M overlapping persons per person (padded), A = 2 + 2M candidate
anchors per joint, R rows = labelled (person, joint) pairs, S candidate radii per row.

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
uniform-in-(radius, angle) distribution that the reference's rejection sampling produces.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .exceptions import InputError
from .keypoints import HEIGHT_PER_SQRT_AREA, NUM_KEYPOINTS, PARTNER, SIGMAS, TEMPLATE
from .profile import GOOD, INVERSION, JITTER, MISS, OUTCOMES, SWAP, Profile, published_profile

UNLABELLED = -1  # outcome code of an unlabelled GT joint that was placed plausibly
TWO_PI = 2.0 * np.pi
LN2 = np.log(2.0)
ANGLE_MARGIN = 1e-9  # radians
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
    """

    keypoints: np.ndarray
    outcome: np.ndarray
    anchor_person: np.ndarray
    anchor_joint: np.ndarray
    score: np.ndarray


def _as_array(x, shape_tail, name, dtype=np.float64):
    a = np.asarray(x, dtype=dtype)
    if a.shape[a.ndim - len(shape_tail):] != tuple(shape_tail) or not np.all(np.isfinite(a)):
        raise InputError(name, f"must be a finite array of shape (..., {', '.join(map(str, shape_tail))}), "
                               f"got shape {a.shape}")
    return a


def synthesize(gt, area, rng: np.random.Generator, others=None, others_area=None, ov=None, nv=None,
               profile: Profile | None = None, estimates=None, others_overlap=None, num_radii: int = 8,
               chunk_rows: int = 32768) -> SynthResult:
    """Draw one erroneous input pose per GT person.

    gt: (N, K, 3) GT joints (x, y, v), v > 0 labelled; every person needs a labelled joint.
    area: (N,) the persons' areas (the KS scale).
    rng: the seeded generator every random draw goes through.
    others: (N, M, K, 3) GT joints of the persons overlapping each person (box IoU >= 0.1), padded
        with v = 0; others_area: (N, M) their areas.
    others_overlap: optional (N, M) bool. By default every row of ``others`` overlaps; rows marked
        False are other persons of the image that do not: points keep clear of their joints (so that
        a classifier looking at the whole image agrees) but no swap or miss is planted around them.
    ov: (N,) number of overlapping persons (default: rows of ``others`` that overlap and have a
        labelled joint).
    nv: (N,) labelled joints in view (default: count of v > 0 in ``gt``).
    estimates: optional (N, K, 3) another estimator's joints; where present (v > 0) they place the
        unlabelled GT joints instead of the template.
    """
    profile = profile or published_profile()
    gt = _as_array(gt, (NUM_KEYPOINTS, 3), "gt")
    n = gt.shape[0]
    area = _as_array(area, (), "area").reshape(n)
    if np.any(area <= 0):
        raise InputError("area", f"must be positive; person {int(np.argmax(area <= 0))} has {area[area <= 0][0]}")
    vis = gt[..., 2] > 0
    if n and not vis.any(axis=1).all():
        raise InputError("gt", f"person {int(np.argmin(vis.any(axis=1)))} has no labelled joint")
    if others is None:
        others = np.zeros((n, 0, NUM_KEYPOINTS, 3))
        others_area = np.ones((n, 0))
    others = _as_array(others, (NUM_KEYPOINTS, 3), "others").reshape(n, -1, NUM_KEYPOINTS, 3)
    others_area = _as_array(others_area, (), "others_area").reshape(n, others.shape[1])
    others_area = np.where(others[..., 2].max(-1, initial=0) > 0, np.maximum(others_area, 1e-6), 1.0)
    overlap = (np.ones(others.shape[:2], dtype=bool) if others_overlap is None
               else np.asarray(others_overlap, dtype=bool).reshape(others.shape[:2]))
    ov = ((others[..., 2] > 0).any(-1) & overlap).sum(-1) if ov is None else np.asarray(ov).reshape(n)
    nv = vis.sum(-1) if nv is None else np.asarray(nv).reshape(n)

    # Outcome probabilities with the infeasible ones removed.  (N, K, 5)
    p = profile.probabilities(nv, ov)
    other_vis = (others[..., 2] > 0) & overlap[..., None]  # (N, M, K) joints a swap may land on
    inv_ok = vis[:, PARTNER] & (PARTNER != np.arange(NUM_KEYPOINTS))
    swap_ok = (other_vis | other_vis[:, :, PARTNER]).any(1)
    p[..., INVERSION] *= inv_ok
    p[..., SWAP] *= swap_ok

    out_xy = np.zeros((n, NUM_KEYPOINTS, 2))
    outcome = np.full((n, NUM_KEYPOINTS), UNLABELLED, dtype=np.int8)
    anchor_person = np.full((n, NUM_KEYPOINTS), -1, dtype=np.int64)
    anchor_joint = np.tile(np.arange(NUM_KEYPOINTS), (n, 1))

    rows_n, rows_j = np.nonzero(vis)
    for lo in range(0, rows_n.size, chunk_rows):
        rn, rj = rows_n[lo:lo + chunk_rows], rows_j[lo:lo + chunk_rows]
        xy, o, ap, aj = _plant(gt, area, others, others_area, overlap, p, rn, rj, profile, rng, num_radii)
        out_xy[rn, rj], outcome[rn, rj], anchor_person[rn, rj], anchor_joint[rn, rj] = xy, o, ap, aj

    placed = ~vis
    if placed.any():
        out_xy[placed] = place_unlabelled(gt, area, rng, estimates)[placed]

    conf = np.empty((n, NUM_KEYPOINTS))
    for code, name in list(enumerate(OUTCOMES)) + [(UNLABELLED, "unlabelled")]:
        m = outcome == code
        if m.any():
            a, b = profile.scores[name]
            conf[m] = rng.beta(a, b, size=int(m.sum()))
    conf = np.clip(conf, 1e-3, 1.0)
    score = (conf * vis).sum(1) / np.maximum(vis.sum(1), 1)
    keypoints = np.concatenate([out_xy, conf[..., None]], axis=-1)
    return SynthResult(keypoints, outcome, anchor_person, anchor_joint, score)


def _candidates(gt, area, others, others_area, rn, rj):
    """The classifier's candidate anchors for each row, in its tie order.

    Order: own joint, the overlapping persons' same joint (M), own partner, their partners (M).
    Returns xy (R, A, 2), valid (R, A), scale (R, A) of KS = exp(-d² / scale).
    """
    m = others.shape[1]
    pj = PARTNER[rj]
    own = gt[rn, rj]  # (R, 3)
    own_p = gt[rn, pj]
    oth = others[rn, :, rj]  # (R, M, 3)
    oth_p = others[rn, :, pj]
    cand = np.concatenate([own[:, None], oth, own_p[:, None], oth_p], axis=1)  # (R, A, 3)
    areas = np.concatenate([area[rn, None], others_area[rn], area[rn, None], others_area[rn]], axis=1)
    valid = cand[..., 2] > 0
    nose = rj == PARTNER[rj]  # the nose is its own partner: no separate partner candidates
    valid[nose, m + 1:] = False
    scale = 2.0 * areas * (2.0 * SIGMAS[rj])[:, None] ** 2
    return cand[..., :2], valid, scale


def _choose(weights, rng):
    """Index drawn in proportion to non-negative weights along the last axis. (R, C) → (R,)."""
    cum = np.cumsum(weights, axis=-1)
    u = rng.random(weights.shape[0]) * cum[:, -1]
    return np.minimum((cum <= u[:, None]).sum(-1), weights.shape[-1] - 1)


def _plant(gt, area, others, others_area, overlap, p, rn, rj, profile, rng, num_radii):
    """Draw an outcome and place a point for each row (labelled joint). Returns xy (R, 2), outcome,
    anchor person and anchor joint (R,)."""
    r_count = rn.size
    m = others.shape[1]
    cxy, valid, scale = _candidates(gt, area, others, others_area, rn, rj)
    a_count = cxy.shape[1]
    idx = np.arange(a_count)
    # Centre weights per outcome: which candidate a point of that outcome may be planted around.
    w = np.zeros((5, r_count, a_count))
    w[[GOOD, JITTER], :, 0] = 1.0
    w[INVERSION, :, m + 1] = valid[:, m + 1]
    ovl = overlap[rn]  # (R, M)
    may_centre = np.concatenate([np.ones((r_count, 1), bool), ovl, np.ones((r_count, 1), bool), ovl], axis=1)
    w[SWAP] = valid * may_centre * ((idx != 0) & (idx != m + 1))
    w[MISS] = valid * may_centre * np.where(idx == 0, profile.miss_own_anchor_weight, 1.0)
    prob = p[rn, rj].copy()  # (R, 5)

    xy = gt[rn, rj, :2].copy()
    outcome = np.full(r_count, GOOD, dtype=np.int8)
    centre = np.zeros(r_count, dtype=np.int64)
    pending = np.arange(r_count)
    while pending.size:
        pr = prob[pending]
        dead = pr.sum(-1) <= 0
        if dead.any():  # nothing admissible (coincident anchors): the GT point itself, a good joint
            pending = pending[~dead]
            pr = pr[~dead]
            if not pending.size:
                break
        o = _choose(pr, rng)
        c = _choose(w[o, pending], rng)
        ok, pts = _place(cxy[pending], valid[pending], scale[pending], o, c, rng, num_radii)
        done = pending[ok]
        xy[done], outcome[done], centre[done] = pts[ok], o[ok], c[ok]
        bad = pending[~ok]
        # That (outcome, anchor) has no admissible point: remove it, and the outcome once no anchor is left.
        w[o[~ok], bad, c[~ok]] = 0.0
        empty = w[o[~ok], bad].sum(-1) <= 0
        prob[bad[empty], o[~ok][empty]] = 0.0
        pending = bad
    anchor_person = np.where(centre == 0, -1, np.where(centre <= m, centre - 1, centre - m - 2))
    anchor_person[centre == m + 1] = -1
    anchor_joint = np.where(centre <= m, rj, PARTNER[rj])
    return xy, outcome, anchor_person, anchor_joint


def _place(cxy, valid, scale, o, c, rng, num_radii):
    """Place one point per row around candidate ``c`` for outcome ``o``.

    cxy (R, A, 2), valid (R, A), scale (R, A), o (R,), c (R,). Returns ok (R,) and points (R, 2).
    """
    r_count, a_count = valid.shape
    rows = np.arange(r_count)
    s_c = scale[rows, c]  # (R,)
    ks_hi = np.array([KS_RANGE[k][0] for k in range(5)])[o]
    ks_lo = np.array([KS_RANGE[k][1] for k in range(5)])[o]
    r_min = np.sqrt(-s_c * np.log(ks_hi))
    r_max = np.sqrt(-s_c * np.log(ks_lo))
    radii = r_min[:, None] + (r_max - r_min)[:, None] * rng.random((r_count, num_radii))  # (R, S)

    centre = cxy[rows, c]  # (R, 2)
    d = cxy - centre[:, None]  # (R, A, 2)
    active = valid.copy()
    active[rows, c] = False
    miss = (o == MISS)[:, None, None]
    # Constraint per anchor a: |p - a|² > T.  Miss: KS_a < 0.5; otherwise KS_a < KS_centre.
    t = np.where(miss, (scale * LN2)[:, None, :],
                 radii[..., None] ** 2 * (scale / s_c[:, None])[:, None, :])  # (R, S, A)
    wins = (np.arange(a_count)[None] > c[:, None])  # the centre wins ties against later candidates
    start, length = _free_arcs(d[..., 0][:, None], d[..., 1][:, None], radii[..., None], t,
                               active[:, None], wins[:, None])
    free = length.sum(-1)  # (R, S)
    ok = free.max(-1) > 0
    pick = _choose(np.where(ok[:, None], free, 1.0), rng)
    start, length = start[rows, pick], length[rows, pick]  # (R, G)
    cum = np.cumsum(length, axis=-1)
    u = rng.random(r_count) * cum[:, -1]
    g = np.minimum((cum <= u[:, None]).sum(-1), length.shape[-1] - 1)
    theta = start[rows, g] + (u - (cum[rows, g] - length[rows, g]))
    r = radii[rows, pick]
    pts = centre + r[:, None] * np.stack([np.cos(theta), np.sin(theta)], axis=-1)
    return ok, pts


def _free_arcs(dx, dy, r, t, active, wins):
    """Admissible angles on circles around the origin, as gaps between excluded arcs.

    For each anchor at (dx, dy) the point at radius r and angle θ must satisfy |p - a|² > t, which
    fails on one arc centred on the anchor's direction. All inputs broadcast to (R, S, A).
    Returns gap starts and lengths (R, S, 2A + 1) in radians; their lengths sum to the free angle.
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
    s = np.mod(phi - half, TWO_PI)
    e = s + 2.0 * half
    starts = np.concatenate([s, np.zeros_like(s)], axis=-1)  # an arc past 2π wraps to [0, e - 2π]
    ends = np.concatenate([np.minimum(e, TWO_PI), np.maximum(e - TWO_PI, 0.0)], axis=-1)
    order = np.argsort(starts, axis=-1)
    starts = np.take_along_axis(starts, order, -1)
    ends = np.maximum.accumulate(np.take_along_axis(ends, order, -1), axis=-1)
    prev = np.concatenate([np.zeros_like(ends[..., :1]), ends[..., :-1]], axis=-1)
    gap_start = np.concatenate([prev, ends[..., -1:]], axis=-1)
    gap_len = np.concatenate([starts, np.full_like(ends[..., :1], TWO_PI)], axis=-1) - gap_start
    # Keep clear of the arcs' ends by a margin far above rounding error, so that no point lands on
    # a boundary and slivers left by rounding count as no gap.
    return gap_start + ANGLE_MARGIN, np.maximum(gap_len - 2.0 * ANGLE_MARGIN, 0.0)


def place_unlabelled(gt, area, rng, estimates=None):
    """Plausible positions for every joint from the labelled ones: (N, K, 2).

    The template pose (facing the camera, or facing away, whichever fits better) is fitted to each
    person's labelled joints by a least-squares similarity transform (scale from the area when only
    one joint is labelled), then each position is perturbed uniformly within the KS = 0.5 radius.
    Where ``estimates`` has a joint (v > 0) it is used instead of the template.
    """
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
    radius = np.sqrt(np.asarray(area, dtype=np.float64)[:, None] * 2.0 * (2.0 * SIGMAS) ** 2 * LN2)  # d(0.5)
    rho = radius * np.sqrt(rng.random(radius.shape))
    ang = rng.random(radius.shape) * TWO_PI
    return xy + np.stack([rho * np.cos(ang), rho * np.sin(ang)], axis=-1)
