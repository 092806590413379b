"""Fitting an error profile to a diagnosis: the synthesizer's tables estimated from an estimator's errors.

Glossary: R observations = labelled GT joints of the detections a diagnosis labelled, K = 17 joints,
G groups and B bins of one error's table (the template profile's).

The synthesizer draws each labelled joint's outcome from the profile's nominal probabilities with
the impossible outcomes removed and the rest renormalised: inversion is impossible for the nose and
for a joint whose partner is unlabelled, swap for a joint that no overlapping person (box IoU >= 0.1)
labels, neither itself nor its partner. So a joint where outcomes I are impossible shows error e with
probability p_e / (1 - p_I). The fit inverts exactly that: over the joints of a cell where e was
possible, p_e = mean(1{outcome = e} · (1 - p_I)), solved by fixed-point iteration from the raw
frequencies (p_I is itself being estimated). Each cell's count ``n`` is the number of joints where
its error was possible. Swaps a diagnosis finds where the synthesizer could not plant one (against
a person whose box does not overlap) are left out of the swap estimate.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import InputError
from ..keypoints import NUM_KEYPOINTS, PARTNER
from .coco import overlaps
from .cocoio import GroundTruth
from .profile import ERRORS, OUTCOMES, Profile, crowded, published_profile

SUM_LIMIT = 1.0 - 1e-5  # most a joint's error probabilities may sum to; room for the 6-decimal rounding of to_dict
MAX_ITERATIONS = 200
TOLERANCE = 1e-12


@dataclass(frozen=True)
class Observations:
    """The labelled joints of a diagnosis' labelled detections, one row each.

    outcome (R,) codes into ``OUTCOMES``; joint (R,); nv (R,) labelled joints of the matched GT;
    ov (R,) its overlapping non-crowd persons; inversion_ok, swap_ok (R,) bool: whether the
    synthesizer could plant that error there. detections: how many detections the rows come from.
    """

    outcome: np.ndarray
    joint: np.ndarray
    nv: np.ndarray
    ov: np.ndarray
    inversion_ok: np.ndarray
    swap_ok: np.ndarray
    detections: int


def observations(report: dict, gt: GroundTruth) -> Observations:
    """Collect the labelled joints of ``report`` (from :func:`synth.diagnose.diagnose` on ``gt``)."""
    dets = report.get("detections") if isinstance(report, dict) else None
    if not isinstance(dets, list):
        raise InputError("report.detections", "missing or not a list (not a diagnosis report?)")
    index_of = {int(a): i for i, a in enumerate(gt.ids)}
    code = {name: c for c, name in enumerate(OUTCOMES)}
    ov, near = overlaps(gt)
    gt_rows, labels = [], []
    for i, d in enumerate(dets):
        f = f"report.detections[{i}]"
        lab = d.get("labels") if isinstance(d, dict) else None
        if not isinstance(lab, list) or len(lab) != NUM_KEYPOINTS or any(x is not None and x not in code for x in lab):
            raise InputError(f"{f}.labels", f"must list {NUM_KEYPOINTS} of {list(OUTCOMES)} or null")
        if all(x is None for x in lab):
            continue
        g = index_of.get(d.get("matched_gt"), -1) if isinstance(d.get("matched_gt"), int) else -1
        if g < 0:
            raise InputError(f"{f}.matched_gt", f"{d.get('matched_gt')!r} is not a GT annotation id; "
                             "was the report made with this GT?")
        if [x is not None for x in lab] != (gt.keypoints[g, :, 2] > 0).tolist():
            raise InputError(f"{f}.labels", f"do not cover the labelled joints of GT {d['matched_gt']}; "
                             "was the report made with this GT?")
        gt_rows.append(g)
        labels.append([code.get(x, -1) for x in lab])
    g = np.array(gt_rows, dtype=np.int64)  # (D,)
    lab = np.array(labels, dtype=np.int64).reshape(-1, NUM_KEYPOINTS)  # (D, K)
    vis = gt.keypoints[g, :, 2] > 0  # (D, K)
    near_vis = np.zeros_like(vis)  # an overlapping labelled person labels the joint
    for row, i in enumerate(g):
        near_vis[row] = (gt.keypoints[near[i], :, 2] > 0).any(0)
    inv_ok = vis[:, PARTNER] & (PARTNER != np.arange(NUM_KEYPOINTS))
    swap_ok = near_vis | near_vis[:, PARTNER]
    d_idx, j_idx = np.nonzero(vis)
    return Observations(lab[d_idx, j_idx], j_idx, vis.sum(-1)[d_idx], ov[g][d_idx],
                        inv_ok[d_idx, j_idx], swap_ok[d_idx, j_idx], int(g.size))


def _cells(obs: Observations, template: Profile) -> dict:
    """Each observation's (group, bin) cell in each error's table: error → (group (R,), bin (R,), G, B)."""
    is_crowded = crowded(obs.nv, obs.ov)
    out = {}
    for err in ERRORS:
        t = template.outcomes[err]
        group_of = np.empty(NUM_KEYPOINTS, dtype=np.int64)
        for gi, (_, joints) in enumerate(t.groups):
            group_of[list(joints)] = gi
        out[err] = (group_of[obs.joint], t.bin_index(obs.nv, is_crowded), len(t.groups), len(t.bins))
    return out


def _group_tables(template: Profile) -> dict:
    """The template's tables per group: error → (G, B)."""
    return {err: np.array([t.table[joints[0]] for _, joints in t.groups])
            for err, t in template.outcomes.items()}


def estimate(obs: Observations, template: Profile) -> tuple[dict, dict]:
    """Per-group probabilities and counts: error → (G, B) each, cells without data at the template's value."""
    cells = _cells(obs, template)
    possible = {"jitter": np.ones(obs.joint.size, dtype=bool), "inversion": obs.inversion_ok,
                "swap": obs.swap_ok, "miss": np.ones(obs.joint.size, dtype=bool)}
    counts = {}
    for err, (g, b, n_groups, n_bins) in cells.items():
        flat = g * n_bins + b
        counts[err] = np.bincount(flat[possible[err]], minlength=n_groups * n_bins).reshape(n_groups, n_bins)
    tables = _group_tables(template)
    weight = np.ones(obs.joint.size)  # (R,) 1 - p(impossible outcomes) of each observation
    for _ in range(MAX_ITERATIONS):
        new = {}
        for err, (g, b, n_groups, n_bins) in cells.items():
            hit = possible[err] & (obs.outcome == OUTCOMES.index(err))
            num = np.bincount((g * n_bins + b)[hit], weights=weight[hit], minlength=n_groups * n_bins)
            num = num.reshape(n_groups, n_bins)
            new[err] = np.where(counts[err] > 0, num / np.maximum(counts[err], 1), tables[err])
        change = max(np.abs(new[e] - tables[e]).max() for e in ERRORS)
        tables = new
        impossible = sum(tables[e][cells[e][0], cells[e][1]] * ~possible[e] for e in ("inversion", "swap"))
        weight = 1.0 - impossible
        if change < TOLERANCE:
            break
    return tables, counts


def _joint_tables(group_tables: dict, template: Profile) -> dict:
    """Per-group (G, B) tables → per-joint (K, B) tables."""
    out = {}
    for err, t in template.outcomes.items():
        table = np.empty((NUM_KEYPOINTS, len(t.bins)))
        for gi, (_, joints) in enumerate(t.groups):
            table[list(joints)] = group_tables[err][gi]
        out[err] = table
    return out


def limit_sums(tables: dict, template: Profile) -> tuple[dict, float]:
    """Scale down error probabilities so that no joint's errors sum above ``SUM_LIMIT`` for any nv, ov.

    tables: error → (K, B). A joint whose errors can sum to s > SUM_LIMIT has every group it is in
    scaled by SUM_LIMIT / s (a group takes its joints' smallest factor). Returns the tables and the
    smallest factor applied (1.0 when none was needed).
    """
    nv = np.repeat(np.arange(1, NUM_KEYPOINTS + 1), 4)
    ov = np.tile(np.arange(4), NUM_KEYPOINTS)  # 0, 1-2 and >= 3 cover every crowding case
    is_crowded = crowded(nv, ov)
    total = sum(tables[e][:, template.outcomes[e].bin_index(nv, is_crowded)] for e in ERRORS)  # (K, C)
    factor = np.minimum(1.0, SUM_LIMIT / np.maximum(total.max(1), 1e-300))  # (K,)
    if np.all(factor >= 1.0):
        return tables, 1.0
    out = {}
    for err, t in template.outcomes.items():
        out[err] = tables[err].copy()
        for _, joints in t.groups:
            out[err][list(joints)] *= factor[list(joints)].min()
    return out, float(factor.min())


def fit_profile(report: dict, gt: GroundTruth, template: Profile | None = None) -> Profile:
    """Estimate an error profile from a diagnosis ``report`` of results on ``gt``.

    Every error gets the ``template``'s groups and bins (default: the published profile); each cell's
    probability is estimated as the module docstring describes, with its count ``n``. Cells with no
    data keep the template's value (n = 0); scores and the miss anchor weight are the template's.
    """
    template = template or published_profile()
    obs = observations(report, gt)
    group_tables, group_counts = estimate(obs, template)
    tables, factor = limit_sums(_joint_tables(group_tables, template), template)
    counts = _joint_tables(group_counts, template)
    counts = {e: c.astype(np.int64) for e, c in counts.items()}
    source = report.get("source", "results")
    description = (f"Fitted from the diagnosis of {source} ({obs.detections} labelled detections, "
                   f"{obs.joint.size} labelled keypoints): per cell, the probability of the error where the "
                   "synthesizer could plant it, corrected for its renormalisation where inversion or swap "
                   f"was impossible; n = the keypoints behind each cell. Cells without data (n = 0), the "
                   f"scores and the miss anchor weight are {template.name}'s.")
    if factor < 1.0:
        description += (f" The fitted errors of some joints summed above 1 and were scaled down "
                        f"(by a factor down to {factor:.4f}) so that 'good' stays non-negative.")
    return template.with_tables(tables, counts, name="fitted", description=description)
