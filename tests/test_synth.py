"""Error synthesis: frequencies against the published tables, KS ranges, classification, determinism."""
import subprocess
import sys

import numpy as np
import pytest

from posefix.keypoints import NUM_KEYPOINTS, PARTNER, SIGMAS
from posefix.synth import InputError, parse_profile, published_profile, synthesize
from posefix.synth.diagnose import classify
from posefix.synth.profile import GOOD, INVERSION, JITTER, MISS, SWAP
from posefix.synth.reference import synthesize_reference
from posefix.synth.synthesize import UNLABELLED, place_unlabelled

from .conftest import FIGURE, make_crowd

# The published tables (posefix-facts.md), typed in independently of synth/profiles/published.json.
FACE, NOSE_KNEE_ANKLE, HIPS = range(5), (0, 13, 14, 15, 16), (11, 12)
SHOULDER_ANKLE = (5, 6, 15, 16)


def published(j, nv, ov):
    """Nominal (jitter, inversion, swap, miss) of joint j for a person with nv labelled joints and ov overlaps."""
    if j in NOSE_KNEE_ANKLE:
        jit = 0.15 if nv <= 10 else 0.10
    elif j in HIPS:
        jit = 0.25 if nv <= 10 else 0.20
    else:
        jit = 0.20 if nv <= 10 else 0.15
    col = 0 if nv <= 5 else (1 if nv <= 10 else 2)
    if j in FACE:
        miss = (0.15, 0.10, 0.02)[col]
    elif j in SHOULDER_ANKLE:
        miss = (0.20, 0.13, 0.05)[col]
    else:
        miss = (0.25, 0.15, 0.10)[col]
    inv = 0.01 if j <= 4 else (0.03 if j <= 10 else 0.06)
    crowded = (nv <= 10 and ov > 0) or (nv <= 15 and ov >= 3)
    if j <= 4:
        swap = 0.02 if crowded else 0.01
    elif j <= 10:
        swap = 0.15 if crowded else 0.06
    else:
        swap = 0.10 if crowded else 0.03
    return jit, inv, swap, miss


def expected_probabilities(gt, others):
    """(N, K, 5) outcome probabilities after removing infeasible outcomes, by plain loops."""
    n = gt.shape[0]
    out = np.zeros((n, NUM_KEYPOINTS, 5))
    for i in range(n):
        vis = gt[i, :, 2] > 0
        nv = int(vis.sum())
        ov = int((others[i, :, :, 2] > 0).any(-1).sum())
        for j in range(NUM_KEYPOINTS):
            jit, inv, swap, miss = published(j, nv, ov)
            good = 1 - jit - inv - swap - miss
            partner = PARTNER[j]
            if j == 0 or not vis[partner]:
                inv = 0.0
            if not ((others[i, :, j, 2] > 0).any() or (others[i, :, partner, 2] > 0).any()):
                swap = 0.0
            p = np.array([good, jit, inv, swap, miss])
            out[i, j] = p / p.sum()
    return out


def test_published_profile_matches_the_paper():
    prof = published_profile()
    rng = np.random.default_rng(1)
    nv = rng.integers(1, 18, size=300)
    ov = rng.integers(0, 5, size=300)
    p = prof.probabilities(nv, ov)
    for i in range(nv.size):
        for j in range(NUM_KEYPOINTS):
            np.testing.assert_allclose(p[i, j, 1:], published(j, nv[i], ov[i]), atol=1e-12)


@pytest.mark.parametrize("m,labelled", [(0, 1.0), (0, 0.5), (1, 0.55), (3, 0.8), (2, 1.0)])
def test_frequencies_match_the_table(m, labelled):
    """Planted outcome frequencies per joint group and bin match the renormalised table (4.5 SE)."""
    rng = np.random.default_rng(100 + m)
    gt, area, others, others_area = make_crowd(rng, 6000, m, labelled=labelled)
    res = synthesize(gt, area, np.random.default_rng(7), others, others_area)
    expect = expected_probabilities(gt, others)
    vis = gt[..., 2] > 0
    nv = vis.sum(1)
    groups = [FACE, (5, 6), (7, 8, 9, 10), HIPS, (13, 14), (15, 16)]
    checked = 0
    for bins in ((nv <= 5), (nv > 5) & (nv <= 10), (nv > 10)):
        for g in groups:
            sel = vis & bins[:, None] & np.isin(np.arange(NUM_KEYPOINTS), g)[None]
            count = sel.sum()
            if count < 400:
                continue
            for o in range(5):
                p = expect[..., o][sel].mean()
                f = (res.outcome[sel] == o).mean()
                se = np.sqrt(max(p * (1 - p), 1e-4) / count)
                assert abs(f - p) < 4.5 * se + 2e-3, (g, o, f, p, count)
                checked += 1
    assert checked >= 20


def _anchor_ks(res, gt, area, others, others_area):
    """KS of each planted point to the anchor it was planted around, using the anchor's area."""
    n = gt.shape[0]
    persons = np.concatenate([gt[:, None], others], axis=1)
    areas = np.concatenate([area[:, None], others_area], axis=1)
    who = res.anchor_person + 1
    rows = np.arange(n)[:, None]
    anchor = persons[rows, who, res.anchor_joint]
    d2 = ((res.keypoints[..., :2] - anchor[..., :2]) ** 2).sum(-1)
    return np.exp(-d2 / (2 * areas[rows, who] * (2 * SIGMAS) ** 2))


@pytest.mark.parametrize("m", [0, 1, 4])
def test_planted_points_lie_in_their_ks_range_and_classify_as_planted(m):
    rng = np.random.default_rng(m)
    gt, area, others, others_area = make_crowd(rng, 3000, m, labelled=0.7, spread=0.25)
    res = synthesize(gt, area, np.random.default_rng(11), others, others_area)
    k = _anchor_ks(res, gt, area, others, others_area)
    o = res.outcome
    assert np.all(k[o == GOOD] >= 0.85)
    assert np.all((k[o == JITTER] >= 0.5) & (k[o == JITTER] < 0.85))
    assert np.all(k[(o == INVERSION) | (o == SWAP)] >= 0.5)
    assert np.all((k[o == MISS] > 0.1) & (k[o == MISS] < 0.5))
    # The anchor person/joint matches the outcome.
    assert np.all(res.anchor_person[(o == GOOD) | (o == JITTER) | (o == INVERSION)] == -1)
    assert np.all(res.anchor_person[o == SWAP] >= 0)
    inv = np.argwhere(o == INVERSION)
    assert np.all(res.anchor_joint[inv[:, 0], inv[:, 1]] == PARTNER[inv[:, 1]])
    # A Ronchi & Perona classifier labels every labelled joint as planted.
    labels = classify(res.keypoints, gt, area, others, others_area)
    vis = gt[..., 2] > 0
    assert np.array_equal(labels[vis], o[vis])
    assert np.all(o[~vis] == UNLABELLED)
    assert np.isin(np.unique(o[vis]), [GOOD, JITTER, INVERSION, SWAP, MISS]).all()
    if m:
        assert (o == SWAP).any()


def test_same_seed_same_output_and_other_seed_differs():
    gt, area, others, others_area = make_crowd(np.random.default_rng(3), 200, 2)
    a = synthesize(gt, area, np.random.default_rng(5), others, others_area)
    b = synthesize(gt, area, np.random.default_rng(5), others, others_area)
    c = synthesize(gt, area, np.random.default_rng(6), others, others_area)
    for field in ("keypoints", "outcome", "anchor_person", "anchor_joint", "score"):
        assert np.array_equal(getattr(a, field), getattr(b, field))
    assert not np.array_equal(a.keypoints, c.keypoints)


def test_scores_are_confidences():
    gt, area, others, others_area = make_crowd(np.random.default_rng(4), 500, 1)
    res = synthesize(gt, area, np.random.default_rng(0), others, others_area)
    conf = res.keypoints[..., 2]
    assert np.all((conf > 0) & (conf <= 1)) and np.all((res.score > 0) & (res.score <= 1))
    # Good joints are, on average, more confident than misses (the profile's Beta parameters say so).
    assert conf[res.outcome == GOOD].mean() > conf[res.outcome == MISS].mean() + 0.2


def test_matches_the_plain_rejection_sampler_in_distribution():
    """Outcome frequencies and the KS distribution of jitters agree with the plain per-joint sampler."""
    gt, area, others, others_area = make_crowd(np.random.default_rng(8), 400, 1, labelled=0.8)
    fast = synthesize(gt, area, np.random.default_rng(1), others, others_area)
    xy, slow = synthesize_reference(gt, area, np.random.default_rng(2), others, others_area)
    vis = gt[..., 2] > 0
    n = vis.sum()
    for o in range(5):
        pf, ps = (fast.outcome[vis] == o).mean(), (slow[vis] == o).mean()
        assert abs(pf - ps) < 4.5 * np.sqrt(2 * max(ps * (1 - ps), 1e-3) / n), (o, pf, ps)
    assert np.array_equal(classify(np.concatenate([xy, np.ones_like(xy[..., :1])], -1), gt, area, others,
                                   others_area)[vis], slow[vis])
    kf = _anchor_ks(fast, gt, area, others, others_area)[fast.outcome == JITTER]
    d2 = ((xy - gt[..., :2]) ** 2).sum(-1)
    ks_slow = np.exp(-d2 / (2 * area[:, None] * (2 * SIGMAS) ** 2))[slow == JITTER]
    assert abs(np.median(kf) - np.median(ks_slow)) < 0.03


def test_unlabelled_joints_are_placed_plausibly():
    rng = np.random.default_rng(9)
    gt, area, _, _ = make_crowd(rng, 400, 0, labelled=1.0)
    hidden = rng.random(gt.shape[:2]) < 0.4
    hidden[:, 5] = False  # keep at least one labelled joint
    partial = gt.copy()
    partial[hidden, 2] = 0
    placed = place_unlabelled(partial, area, np.random.default_rng(0))
    height = np.sqrt(area) * 1.8
    err = np.hypot(*(placed - gt[..., :2]).transpose(2, 0, 1)) / height[:, None]
    assert np.median(err[hidden]) < 0.08 and np.quantile(err[hidden], 0.95) < 0.25
    res = synthesize(partial, area, np.random.default_rng(1))
    assert np.all(res.outcome[hidden] == UNLABELLED) and np.all(res.outcome[~hidden] >= 0)


def test_mirrored_person_is_fitted_as_facing_away():
    rng = np.random.default_rng(12)
    gt, area, _, _ = make_crowd(rng, 50, 0, labelled=1.0)
    mirrored = gt.copy()
    mirrored[..., 0] = 2 * gt[:, :1, 0] - gt[..., 0]  # the subject's left now appears at image left
    partial = mirrored.copy()
    partial[:, 9:11, 2] = 0  # wrists unknown
    placed = place_unlabelled(partial, area, np.random.default_rng(0))
    left_wrist_x, right_wrist_x = placed[:, 9, 0], placed[:, 10, 0]
    assert np.mean(left_wrist_x < right_wrist_x) > 0.9


def test_bad_inputs_are_named():
    gt, area, _, _ = make_crowd(np.random.default_rng(0), 3, 0)
    with pytest.raises(InputError, match="area"):
        synthesize(gt, -area, np.random.default_rng(0))
    nan = gt.copy()
    nan[0, 0, 0] = np.nan
    with pytest.raises(InputError, match="gt"):
        synthesize(nan, area, np.random.default_rng(0))
    empty = gt.copy()
    empty[1, :, 2] = 0
    with pytest.raises(InputError, match="person 1 has no labelled joint"):
        synthesize(empty, area, np.random.default_rng(0))
    with pytest.raises(InputError, match="gt"):
        synthesize(gt[:, :16], area, np.random.default_rng(0))


def test_profile_is_data_and_user_profiles_are_validated():
    doc = published_profile().to_dict()
    for group in doc["outcomes"]["miss"]["groups"]:
        group["p"] = [0.0] * len(group["p"])
    no_miss = parse_profile(doc)
    gt, area, _, _ = make_crowd(np.random.default_rng(0), 300, 0)
    assert not np.any(synthesize(gt, area, np.random.default_rng(0), profile=no_miss).outcome == MISS)

    bad = published_profile().to_dict()
    bad["outcomes"]["jitter"]["groups"][0]["p"] = [0.9, 0.9]
    with pytest.raises(InputError, match="sum to"):
        parse_profile(bad)
    bad = published_profile().to_dict()
    bad["outcomes"]["swap"]["colour"] = 1
    with pytest.raises(InputError, match=r"outcomes\.swap: unknown key"):
        parse_profile(bad)
    bad = published_profile().to_dict()
    bad["outcomes"]["inversion"]["groups"][0]["joints"].append(5)
    with pytest.raises(InputError, match="more than one group"):
        parse_profile(bad)
    bad = published_profile().to_dict()
    bad["outcomes"]["miss"]["groups"][1]["p"][0] = "high"
    with pytest.raises(InputError, match=r"outcomes\.miss\.groups\[1\]\.p\[0\]"):
        parse_profile(bad)


def test_synth_imports_no_torch():
    code = ("import sys, posefix.synth, posefix.synth.diagnose, posefix.synth.occlusion, posefix.synth.coco, "
            "posefix.synth.reference, posefix.synth.cocoio, posefix.synth.fit, posefix.synth.dataset, "
            "posefix.synth.sequences, posefix.synth.shards, posefix.synth.card; "
            "sys.exit(1 if 'torch' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_figure_helper_is_a_person():
    # Guards the test data: left joints at +x, head above feet.
    assert FIGURE[5, 0] > FIGURE[6, 0] and FIGURE[0, 1] < FIGURE[15, 1]


def test_non_overlapping_persons_are_avoided_but_never_swap_targets():
    gt, area, others, others_area = make_crowd(np.random.default_rng(21), 3000, 3, labelled=0.8, spread=0.25)
    overlap = np.zeros((3000, 3), dtype=bool)
    overlap[:, 0] = True  # only the first of the three overlaps
    res = synthesize(gt, area, np.random.default_rng(2), others, others_area, others_overlap=overlap)
    assert (res.outcome == SWAP).any()
    assert np.all(res.anchor_person[res.outcome == SWAP] == 0)
    assert np.all(res.anchor_person[res.outcome == MISS] <= 0)
    vis = gt[..., 2] > 0
    assert np.array_equal(classify(res.keypoints, gt, area, others, others_area)[vis], res.outcome[vis])
    # The crowding bin counts overlapping persons only: with one overlap and nv > 10, not crowded.
    expect = expected_probabilities(gt, others[:, :1])
    many = vis.sum(1) > 10
    sel = vis & many[:, None] & np.isin(np.arange(NUM_KEYPOINTS), (5, 6, 7, 8, 9, 10))[None]
    p, f = expect[..., SWAP][sel].mean(), (res.outcome[sel] == SWAP).mean()
    assert abs(f - p) < 4.5 * np.sqrt(p * (1 - p) / sel.sum()) + 2e-3
