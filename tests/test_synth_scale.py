"""Synthesis at scale: the free-arc kernel against the previous one and against brute force, persons out of
reach leaving the result unchanged, the pruned COCO path against the plain dense one, crowd memory, and the
fast JSON and annotation checks against the plain ones."""
import json
import sys
import time
import tracemalloc

import numpy as np
import pytest

from posefix.errors import InputError
from posefix.fileio import read_json
from posefix.keypoints import NUM_KEYPOINTS, box_iou
from posefix.synth import synthesize
from posefix.synth.coco import MIN_AREA, OVERLAP_IOU, image_persons, synthesize_coco
from posefix.synth.cocoio import GroundTruth, _ground_truth
from posefix.synth.diagnose import classify
from posefix.synth.profile import parse_profile
from posefix.synth.synthesize import ANGLE_MARGIN, TWO_PI, Others, _free_arcs

# the module (posefix.synth.synthesize is also the function)
synthesize_module = sys.modules["posefix.synth.synthesize"]

from .conftest import FIGURE, VAL_GT, make_crowd, profile_doc_with_misses


def previous_free_arcs(dx, dy, r, t, active, wins):
    """The previous implementation, kept as it was: 2A arcs (each one's wrapped part apart), sorted."""
    dist, phi = np.hypot(dx, dy), np.arctan2(dy, dx)
    num = r ** 2 + dist ** 2 - t
    den = 2.0 * r * dist
    outside = np.where((num > 0) | ((num == 0) & wins), np.inf, -np.inf)  # a point at the centre
    kappa = np.divide(num, den, out=outside.astype(np.float64), where=den > 0)
    half = np.arccos(np.clip(kappa, -1.0, 1.0)) * active
    half = np.broadcast_to(half, np.broadcast_shapes(half.shape, phi.shape))
    s = np.mod(phi - half, TWO_PI)
    e = s + 2.0 * half
    starts = np.concatenate([s, np.zeros_like(s)], axis=-1)
    ends = np.concatenate([np.minimum(e, TWO_PI), np.maximum(e - TWO_PI, 0.0)], axis=-1)
    order = np.argsort(starts, axis=-1)
    starts = np.take_along_axis(starts, order, -1)
    ends = np.maximum.accumulate(np.take_along_axis(ends, order, -1), axis=-1)
    prev = np.concatenate([np.zeros_like(ends[..., :1]), ends[..., :-1]], axis=-1)
    gap_start = np.concatenate([prev, ends[..., -1:]], axis=-1)
    gap_len = np.concatenate([starts, np.full_like(ends[..., :1], TWO_PI)], axis=-1) - gap_start
    return gap_start + ANGLE_MARGIN, np.maximum(gap_len - 2.0 * ANGLE_MARGIN, 0.0)


def random_arcs(rng, rows=300, radii=4, anchors=7):
    """Anchors around circles of radius ~1: overlapping, wrapping past 2π, some inactive, some out of reach,
    some on the centre itself (den = 0), with ties won or lost."""
    shape = (rows, radii, anchors)
    dist = (rng.choice([0.0, 0.5, 1.0, 1.5, 3.0], size=shape, p=[0.05, 0.3, 0.3, 0.2, 0.15])
            * rng.uniform(0.8, 1.2, shape))
    phi = rng.uniform(-np.pi, np.pi, shape)
    phi[:, :, 0] = np.pi - rng.uniform(0, 0.05, (rows, radii))  # straddles the cut at ±π
    dx, dy = dist * np.cos(phi), dist * np.sin(phi)
    r = rng.uniform(0.5, 1.5, (rows, radii, 1))
    t = rng.uniform(0.01, 1.0, shape) * r ** 2
    active = rng.random(shape) < 0.8
    wins = rng.random(shape) < 0.5
    return dx, dy, r, t, active, wins


def positive_gaps(start, length):
    """Per row of (..., G) gaps: the sorted (start, length) pairs of the gaps that are not empty."""
    flat_s, flat_l = start.reshape(-1, start.shape[-1]), length.reshape(-1, length.shape[-1])
    return [sorted(zip(s[l > 0].tolist(), l[l > 0].tolist())) for s, l in zip(flat_s, flat_l)]


def test_free_arcs_match_the_previous_implementation():
    """The same gaps as before wherever an arc excludes something. The previous implementation also split a
    gap at every arc that excludes nothing (an inactive anchor, or one out of reach: a zero-length arc),
    taking the margin there; given those anchors at the centre (where their empty arc lies at angle 0 and
    splits nothing), it finds exactly the gaps the new one finds with them anywhere."""
    rng = np.random.default_rng(0)
    dx, dy, r, t, active, wins = random_arcs(rng)
    start, length = _free_arcs(dx, dy, r, t, active, wins)
    dist = np.hypot(dx, dy)
    with np.errstate(divide="ignore", invalid="ignore"):
        kappa = (r * r + dist * dist - t) / (2.0 * r * dist)
    live = active & ((kappa < 1) | ((dist == 0) & ((r * r - t < 0) | ((r * r == t) & ~wins))))
    ref_start, ref_length = previous_free_arcs(np.where(live, dx, 0.0), np.where(live, dy, 0.0), r, t,
                                               active & live, wins)
    assert positive_gaps(start, length) == positive_gaps(ref_start, ref_length)
    np.testing.assert_allclose(length.sum(-1), ref_length.sum(-1), rtol=0, atol=1e-12)
    # With the empty arcs where they are, the previous one loses 2 margins per gap such an arc splits.
    _, old_length = previous_free_arcs(dx, dy, r, t, active, wins)
    lost = ref_length.sum(-1) - old_length.sum(-1)
    assert np.all(lost > -1e-12) and lost.max() < 2 * dx.shape[-1] * 2 * ANGLE_MARGIN + 1e-12
    assert lost.max() > 0  # the inputs do have such splits


def test_free_arcs_are_the_admissible_angles():
    """Brute force: angles inside a gap satisfy every constraint; angles clear of every arc end that satisfy
    them all lie in a gap."""
    rng = np.random.default_rng(1)
    dx, dy, r, t, active, wins = random_arcs(rng, rows=200)
    start, length = _free_arcs(dx, dy, r, t, active, wins)
    theta = rng.uniform(0, TWO_PI, (*r.shape[:2], 200))  # (R, S, 200)
    px, py = r * np.cos(theta), r * np.sin(theta)
    d2 = (px[..., None] - dx[:, :, None]) ** 2 + (py[..., None] - dy[:, :, None]) ** 2  # (R, S, 200, A)
    slack = (d2 - t[:, :, None]) / np.maximum(t[:, :, None], 1e-12)
    admissible = np.all(~active[:, :, None] | (slack > 0), axis=-1)
    clear = np.all(~active[:, :, None] | (np.abs(slack) > 1e-6), axis=-1)
    rel = np.mod(theta[..., None] - start[:, :, None], TWO_PI)
    in_gap = np.any((rel < length[:, :, None]) & (length[:, :, None] > 0), axis=-1)
    assert np.all(admissible[in_gap])
    assert np.all(in_gap[admissible & clear])
    assert in_gap.mean() > 0.1 and (~admissible).mean() > 0.1  # both cases occur


def test_persons_out_of_reach_change_nothing():
    """Non-overlapping persons far away exclude no point: the same draws and points with or without them,
    dense or as ragged lists."""
    gt, area, others, others_area = make_crowd(np.random.default_rng(5), 400, 2, labelled=0.8, spread=0.25)
    far = others.copy()
    far[..., :2] += 5000.0
    more = np.concatenate([others, far, np.zeros_like(others[:, :1])], axis=1)  # and a padding row
    more_area = np.concatenate([others_area, others_area, np.ones_like(others_area[:, :1])], axis=1)
    overlap = np.zeros(more.shape[:2], dtype=bool)
    overlap[:, :2] = True
    a = synthesize(gt, area, np.random.default_rng(9), others, others_area)
    b = synthesize(gt, area, np.random.default_rng(9), more, more_area, others_overlap=overlap)
    ragged = Others(others.reshape(-1, NUM_KEYPOINTS, 3), others_area.reshape(-1), np.arange(401) * 2,
                    np.arange(800), np.ones(800, dtype=bool))
    c = synthesize(gt, area, np.random.default_rng(9), ragged)
    for field in ("keypoints", "outcome", "anchor_person", "anchor_joint", "score"):
        assert np.array_equal(getattr(a, field), getattr(b, field)), field
        assert np.array_equal(getattr(a, field), getattr(c, field)), field


def test_only_anchors_in_reach_take_part(monkeypatch):
    """Leaving out, row by row, the anchors that cannot reach the row's circles gives exactly the result
    of the plain computation over every candidate."""
    gt, area, others, others_area = make_crowd(np.random.default_rng(6), 1500, 4, labelled=0.8, spread=0.2)
    fast = synthesize(gt, area, np.random.default_rng(3), others, others_area, block_elems=5000)
    monkeypatch.setattr(synthesize_module, "_in_reach", lambda *args: args[-1])  # every active anchor
    plain = synthesize(gt, area, np.random.default_rng(3), others, others_area)
    for field in ("keypoints", "outcome", "anchor_person", "anchor_joint", "score"):
        assert np.array_equal(getattr(fast, field), getattr(plain, field)), field


def random_ground_truth(rng, sizes, spread=300.0, big=True):
    """Images of the given person counts: figures of random heights at random places (so that some overlap),
    a few persons labelling no joint, a crowd annotation, and in each image a large person in front."""
    ids, image_ids, kps, areas, boxes, crowd = [], [], [], [], [], []
    for image, n in enumerate(sizes):
        h = rng.uniform(40, 160, n)
        if big:
            h[0] = 900.0
        centre = rng.uniform(0, spread * np.sqrt(n / 10), (n, 1, 2))
        kp = np.zeros((n, NUM_KEYPOINTS, 3))
        kp[..., :2] = FIGURE * h[:, None, None] + centre + rng.normal(0, 0.02, (n, NUM_KEYPOINTS, 2)) * h[:, None, None]
        kp[..., 2] = np.where(rng.random((n, NUM_KEYPOINTS)) < 0.75, 2, 0)
        kp[rng.random(n) < 0.05, :, 2] = 0  # persons with no labelled joint
        lo, hi = kp[..., :2].min(1), kp[..., :2].max(1)
        ids += list(range(len(ids) + 1, len(ids) + n + 1))
        image_ids += [image + 1] * n
        kps.append(kp)
        areas.append(0.45 * np.prod(hi - lo, axis=1))
        boxes.append(np.concatenate([lo, hi - lo], axis=1))
        crowd.append(np.arange(n) == n - 1)
    arrays = [np.array(ids), np.array(image_ids), np.concatenate(kps), np.concatenate(areas), np.concatenate(boxes),
              np.concatenate(crowd)]
    return GroundTruth(*arrays, image_ids_all=frozenset(image_ids), doc={})


def plain_synthesize_coco(gt, rng, profile=None):
    """synthesize_coco the plain way: for each person every other labelled non-crowd person of its image, all
    of them, as dense candidates; persons grouped by that count."""
    labelled = ~gt.crowd & (gt.keypoints[..., 2] > 0).any(-1)
    persons = np.flatnonzero(labelled)
    ov, members, overlap = {}, {}, {}
    for i in persons:
        mates = np.flatnonzero((gt.image_ids == gt.image_ids[i]) & ~gt.crowd & (np.arange(gt.ids.size) != i))
        iou = box_iou(gt.boxes[i:i + 1], gt.boxes[mates])[0]
        ov[i] = int((iou >= OVERLAP_IOU).sum())
        members[i], overlap[i] = mates[labelled[mates]], iou[labelled[mates]] >= OVERLAP_IOU
    count = np.array([members[i].size for i in persons])
    out = {}
    for m in np.unique(count):
        who = persons[count == m]
        idx = np.array([members[i] for i in who]).reshape(who.size, m)
        res = synthesize(gt.keypoints[who], np.maximum(gt.areas[who], MIN_AREA), rng, gt.keypoints[idx],
                         np.maximum(gt.areas[idx], MIN_AREA),
                         others_overlap=np.array([overlap[i] for i in who]).reshape(who.size, m),
                         ov=np.array([ov[i] for i in who]), profile=profile)
        for row, i in enumerate(who):
            anchor = [int(gt.ids[i]) if a < 0 else int(gt.ids[idx[row, a]]) for a in res.anchor_person[row]]
            out[i] = (res.keypoints[row].ravel().tolist(), res.outcome[row].tolist(), anchor,
                      res.anchor_joint[row].tolist())
    return [out[i] for i in persons]


def mostly_misses():
    """A profile planting misses at 60 %: points far from their joints, near other persons'."""
    return parse_profile(profile_doc_with_misses(0.6))


@pytest.mark.parametrize("prune_above,spread,misses", [(4, 300.0, False), (4, 80.0, True), (32, 80.0, False)])
def test_pruned_coco_synthesis_matches_the_plain_dense_one(prune_above, spread, misses):
    """Listing only the persons in reach (images above ``prune_above`` persons) gives exactly the plain
    result, every person of the image a candidate, for the same seed. (With the reach bound halved, the
    crowded case with misses differs.)"""
    gt = random_ground_truth(np.random.default_rng(3), [1, 2, 3, 7, 12, 45, 60], spread=spread)
    profile = mostly_misses() if misses else None
    results, labels = synthesize_coco(gt, np.random.default_rng(11), profile, prune_above=prune_above)
    plain = plain_synthesize_coco(gt, np.random.default_rng(11), profile)
    codes = {"good": 0, "jitter": 1, "inversion": 2, "swap": 3, "miss": 4, "unlabelled": -1}
    got = [(r["keypoints"], [codes[n] for n in lab["labels"]], [a for a, _ in lab["anchors"]],
            [j for _, j in lab["anchors"]]) for r, lab in zip(results, labels)]
    assert got == plain
    assert sum(n in ("swap", "miss") for lab in labels for n in lab["labels"]) > 10
    listed = sum(m.size for m in image_persons(gt, prune_above)[0])
    assert listed < sum(m.size for m in image_persons(gt, 10 ** 9)[0])  # some were left out


def test_a_crowd_image_synthesizes_in_bounded_memory():
    """2,000 persons in one image (and a large one in front): memory follows the persons in reach, not
    persons²: the plain dense candidates alone (2000 × 1999 × 17 × 3 float64) would be 1.6 GB."""
    rng = np.random.default_rng(7)
    n = 2000
    cols = 50
    h = rng.uniform(100, 140, n)
    h[0] = 1200.0
    centre = np.stack([60.0 * (np.arange(n) % cols), 110.0 * (np.arange(n) // cols)], axis=1)[:, None]
    centre = centre + rng.uniform(-15, 15, (n, 1, 2))
    kp = np.zeros((n, NUM_KEYPOINTS, 3))
    kp[..., :2] = FIGURE * h[:, None, None] + centre
    kp[..., 2] = np.where(rng.random((n, NUM_KEYPOINTS)) < 0.8, 2, 0)
    kp[kp[..., 2].sum(1) == 0, 0, 2] = 2
    lo, hi = kp[..., :2].min(1), kp[..., :2].max(1)
    gt = GroundTruth(np.arange(1, n + 1), np.ones(n, dtype=np.int64), kp, 0.45 * np.prod(hi - lo, axis=1),
                     np.concatenate([lo, hi - lo], axis=1), np.zeros(n, dtype=bool), frozenset([1]), {})
    t0 = time.perf_counter()
    tracemalloc.start()
    try:
        results, labels = synthesize_coco(gt, np.random.default_rng(0))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 150e6, f"peak {peak / 1e6:.0f} MB"
    assert time.perf_counter() - t0 < 10
    # Every labelled joint of a sample of persons classifies as planted against all 1,999 others.
    codes = {"good": 0, "jitter": 1, "inversion": 2, "swap": 3, "miss": 4}
    for i in rng.choice(n, 40, replace=False).tolist() + [0]:
        others = np.delete(np.arange(n), i)
        pred = np.array(results[i]["keypoints"]).reshape(1, NUM_KEYPOINTS, 3)
        got = classify(pred, gt.keypoints[i:i + 1], gt.areas[i:i + 1], gt.keypoints[others][None],
                       gt.areas[others][None])[0]
        vis = gt.keypoints[i, :, 2] > 0
        assert got[vis].tolist() == [codes[x] for x, v in zip(labels[i]["labels"], vis) if v]


def test_json_reader_gives_the_standard_librarys_values(tmp_path):
    """The fast reader parses as json does, and what it refuses (NaN, a BOM) still parses the same way."""
    assert read_json(VAL_GT, "annotations") == json.loads(VAL_GT.read_bytes())
    odd = tmp_path / "odd.json"
    odd.write_bytes(b'\xef\xbb\xbf{"a": [NaN, 1e400, 18446744073709551615, -0.0, 0.1]}')
    got = read_json(odd, "x")["a"]
    assert np.isnan(got[0]) and got[1:] == [float("inf"), 18446744073709551615, -0.0, 0.1]


def test_annotations_checked_in_bulk_as_entry_by_entry():
    """Well-formed annotations give the entry-by-entry arrays; a malformed one falls back to those checks,
    which name it."""
    doc = json.loads(VAL_GT.read_bytes())
    fast, plain = _ground_truth(doc, "gt"), _ground_truth(doc, "gt", bulk=False)
    for field in ("ids", "image_ids", "keypoints", "areas", "boxes", "crowd"):
        assert np.array_equal(getattr(fast, field), getattr(plain, field)) and getattr(fast, field).dtype == \
            getattr(plain, field).dtype, field
    rng = np.random.default_rng(0)
    errors = 0
    breaks = [("keypoints", 5, float("nan")), ("keypoints", 2, -1), ("keypoints", 0, True), ("keypoints", 7, "3"),
              ("bbox", 2, -1.0), ("bbox", 0, None), ("area", None, -2.0), ("area", None, True), ("id", None, 1.5),
              ("image_id", None, 999999999), ("iscrowd", None, 0)]
    for key, at, value in breaks:
        bad = json.loads(VAL_GT.read_bytes())
        i = int(rng.integers(len(bad["annotations"])))
        a = bad["annotations"][i]
        if at is None:
            a[key] = value
        else:
            a[key][at] = value
        outcomes = []
        for use_bulk in (True, False):
            try:
                outcomes.append(_ground_truth(bad, "gt", bulk=use_bulk).keypoints.tolist())
            except InputError as e:
                outcomes.append(str(e))
        assert outcomes[0] == outcomes[1], (key, at, value)
        errors += isinstance(outcomes[0], str)
    assert errors == len(breaks) - 1  # all but the harmless iscrowd 0
    del bad["annotations"][3]["area"]  # the box's area stands in
    assert np.array_equal(_ground_truth(bad, "gt").areas, _ground_truth(bad, "gt", bulk=False).areas)
