"""A plain implementation of the same synthesis rules: per person, per joint, per outcome, with
rejection sampling of polar candidates, as the original PoseFix release does it.

It is the baseline that ``benchmarks/bench_synth.py`` measures :func:`synth.synthesize` against and
that the tests compare its distribution with. Use :func:`synth.synthesize` for real work.
"""
from __future__ import annotations

import numpy as np

from ..keypoints import KS_HIT, KS_SCALE, NUM_KEYPOINTS, PARTNER
from .profile import GOOD, INVERSION, JITTER, MISS, Profile, published_profile
from .synthesize import KS_RANGE, UNLABELLED

SAMPLES = 500  # polar candidates drawn per outcome and anchor


def synthesize_reference(gt, area, rng: np.random.Generator, others=None, others_area=None, ov=None,
                         profile: Profile | None = None):
    """Same inputs as :func:`synth.synthesize`; returns (xy (N, K, 2), outcome (N, K)).

    Unlabelled joints are left at their GT position with outcome ``UNLABELLED``.
    """
    profile = profile or published_profile()
    gt = np.asarray(gt, dtype=np.float64)
    n = gt.shape[0]
    area = np.asarray(area, dtype=np.float64).reshape(n)
    if others is None:
        others, others_area = np.zeros((n, 0, NUM_KEYPOINTS, 3)), np.ones((n, 0))
    others = np.asarray(others, dtype=np.float64)
    others_area = np.asarray(others_area, dtype=np.float64)
    if ov is None:
        ov = (others[..., 2] > 0).any(-1).sum(-1)
    nv = (gt[..., 2] > 0).sum(-1)
    probs = profile.probabilities(nv, np.asarray(ov))
    xy = gt[..., :2].copy()
    outcome = np.full((n, NUM_KEYPOINTS), UNLABELLED, dtype=np.int8)
    for i in range(n):
        for j in range(NUM_KEYPOINTS):
            if gt[i, j, 2] <= 0:
                continue
            pt, o = _one_joint(gt[i], area[i], others[i], others_area[i], j, probs[i, j], profile, rng)
            xy[i, j], outcome[i, j] = pt, o
    return xy, outcome


def _one_joint(gt, area, others, others_area, j, p, profile, rng):
    m = others.shape[0]
    pj = PARTNER[j]
    # Candidates in the classifier's tie order: own, others' joint, own partner, others' partner.
    cands = [(gt[j], area)] + [(others[k, j], others_area[k]) for k in range(m)]
    cands += [(gt[pj], area)] + [(others[k, pj], others_area[k]) for k in range(m)]
    valid = [c[0][2] > 0 and not (pj == j and a > m) for a, c in enumerate(cands)]
    scale = [a * KS_SCALE[j] for _, a in cands]

    def sample(outcome, centre):
        lo_ks, hi_ks = KS_RANGE[outcome]
        r_lo = np.sqrt(-scale[centre] * np.log(lo_ks))
        r_hi = np.sqrt(-scale[centre] * np.log(hi_ks))
        r = rng.uniform(r_lo, r_hi, SAMPLES)
        ang = rng.uniform(0.0, 2.0 * np.pi, SAMPLES)
        pts = cands[centre][0][:2] + np.stack([r * np.cos(ang), r * np.sin(ang)], axis=1)
        keep = np.ones(SAMPLES, dtype=bool)
        for a in range(len(cands)):
            if a == centre or not valid[a]:
                continue
            d2 = np.sum((pts - cands[a][0][:2]) ** 2, axis=1)
            if outcome == MISS:
                keep &= np.exp(-d2 / scale[a]) < KS_HIT
            elif a < centre:  # earlier candidates win ties
                keep &= d2 / scale[a] > r * r / scale[centre]
            else:
                keep &= d2 / scale[a] >= r * r / scale[centre]
        return pts[keep]

    found = {}
    for outcome in range(5):
        if p[outcome] <= 0:
            continue
        if outcome in (GOOD, JITTER):
            centres = [0]
        elif outcome == INVERSION:
            centres = [m + 1] if valid[m + 1] else []
        elif outcome == MISS:
            centres = [a for a in range(len(cands)) if valid[a]]
        else:
            centres = [a for a in range(len(cands)) if valid[a] and a not in (0, m + 1)]
        pools = [(c, sample(outcome, c)) for c in centres]
        pools = [(c, pts) for c, pts in pools if len(pts)]
        if pools:
            weights = np.array([profile.miss_own_anchor_weight if (outcome == MISS and c == 0) else 1.0
                                for c, _ in pools])
            pts = pools[rng.choice(len(pools), p=weights / weights.sum())][1]
            found[outcome] = pts[rng.integers(len(pts))]
    if not found:
        return gt[j, :2], GOOD
    keys = sorted(found)
    w = np.array([p[k] for k in keys])
    o = keys[rng.choice(len(keys), p=w / w.sum())]
    return found[o], o
