"""The synthesizer's fast paths against plain ones: the line encoder, skipping isolated joints and fixed
anchors, shared per-plan work, and counter-based draws keyed per (seed, person, variant)."""
import gzip
import json
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from posefix.synth import read_dataset
from posefix.synth.cocoio import load_ground_truth
from posefix.synth.dataset import load_arrays, write_dataset
from posefix.synth.draws import KeyedDraws, person_keys
from posefix.synth.profile import GOOD, INVERSION, JITTER, MISS, OUTCOMES, SWAP, published_profile
from posefix.synth.shards import encode_lines, encode_lines_reference, gzip_bytes
from posefix.synth.synthesize import (
    Others,
    Prepared,
    _candidates,
    _chosen,
    _weights,
    fit_unlabelled,
    isolated_joints,
    prepare,
    synthesize,
)

from .conftest import TRAIN_GT, make_crowd


def _lines_args(rng, n):
    kp = rng.normal(400, 300, (n, 17, 3))
    kp[..., 2] = rng.random((n, 17))
    kp[:1, 0, :2] = [-0.0001, 1e-7]  # rounds to -0.0 and 0.0
    return (rng.integers(0, 10 ** 12, n), rng.integers(0, 10 ** 15, n), int(rng.integers(0, 1000)), kp,
            rng.random(n), rng.integers(-1, 5, (n, 17)).astype(np.int8), rng.integers(0, 10 ** 9, (n, 17)),
            rng.integers(0, 17, (n, 17)))


@pytest.mark.parametrize("n", [0, 1, 2, 37, 3000])
def test_line_encoder_matches_one_dict_per_record(n):
    args = _lines_args(np.random.default_rng(n), n)
    fast = encode_lines(*args)
    assert fast == encode_lines_reference(*args)
    assert len(fast.splitlines()) == n and all(json.loads(line)["variant"] == args[2] for line in fast.splitlines())


def test_gzip_is_deterministic_and_standard():
    data = encode_lines(*_lines_args(np.random.default_rng(1), 500))
    z = gzip_bytes(data)
    assert z == gzip_bytes(data) and gzip.decompress(z) == data and z[4:8] == b"\0\0\0\0"  # no time in the header


def _crowd_others(rng, n, m):
    gt, area, others, others_area = make_crowd(rng, n, m, labelled=0.75, spread=0.2)
    return gt, area, Others.dense(others, others_area)


def _same(a, b):
    for f in ("keypoints", "outcome", "anchor_person", "anchor_joint", "score", "probabilities"):
        assert np.array_equal(getattr(a, f), getattr(b, f)), f


@pytest.mark.parametrize("m", [0, 1, 5])
def test_isolated_joints_skip_changes_no_number(m):
    """Skipping the candidates of isolated good/jittered joints gives the same numbers as placing every joint
    the general way (isolated all False), for the same draws, on crowds where many joints are not isolated."""
    gt, area, oth = _crowd_others(np.random.default_rng(20 + m), 1500, m)
    prep = prepare(gt, area, oth)
    assert prep.isolated.any() and (m == 0 or not prep.isolated[gt[..., 2] > 0].all())
    plain = Prepared(prep.others, np.zeros_like(prep.isolated), fit_unlabelled(gt, area))
    fast = synthesize(gt, area, np.random.default_rng(5), prepared=prep)
    _same(fast, synthesize(gt, area, np.random.default_rng(5), prepared=plain))
    _same(fast, synthesize(gt, area, np.random.default_rng(5), others=oth))  # computed in the call


def test_isolated_joints_are_really_isolated():
    """A joint marked isolated has no other candidate within the reach of its outcome's largest circle."""
    gt, area, oth = _crowd_others(np.random.default_rng(3), 800, 3)
    oth = oth.checked(gt.shape[0])
    iso = isolated_joints(gt, area, oth)
    rn, rj = np.nonzero(gt[..., 2] > 0)
    _, valid, _, cxy, scale = _candidates(gt, area, oth, rn, rj)
    dist = np.hypot(*np.moveaxis(cxy - cxy[:, :1], -1, 0))
    for k, ks in enumerate((0.85, 0.5)):
        r_max = np.sqrt(-scale[:, :1] * np.log(ks))
        near = valid[:, 1:] & (dist[:, 1:] < r_max * (1 + np.sqrt(scale[:, 1:] / scale[:, :1])))
        assert not near[iso[rn, rj, k]].any()
        assert iso[rn, rj, k].any() and (~iso[rn, rj, k]).any()


@pytest.mark.parametrize("m", [1, 4])
def test_good_jitter_and_inversion_anchors_need_no_draw(m):
    """The fast path takes a good/jittered joint's own joint and an inversion's partner without building the
    candidates: the weights give those indices for any uniform draw."""
    gt, area, oth = _crowd_others(np.random.default_rng(m), 300, m)
    oth = oth.checked(gt.shape[0])
    rn, rj = np.nonzero(gt[..., 2] > 0)
    mm, valid, may_centre = _candidates(gt, area, oth, rn, rj, geometry=False)
    u = np.random.default_rng(0).random(rn.size)
    for o, want in ((GOOD, 0), (JITTER, 0), (INVERSION, mm + 1)):
        w = _weights(mm, valid, may_centre, np.full(rn.size, o), published_profile())
        ok = w.sum(-1) > 0  # an inversion needs a labelled partner (else its probability is 0)
        assert ok.any() and np.all(_chosen(w[ok], u[ok]) == want)
        assert np.all(_chosen(w[ok], np.nextafter(1.0, 0.0) + 0 * u[ok]) == want)


def test_keyed_draws_are_uniform_and_keyed_per_person():
    d = KeyedDraws(person_keys(0, np.arange(2000), 3))
    rows = np.arange(2000 * 17)
    u = d.random(rows, 1, 8)
    assert u.shape == (rows.size, 8) and u.min() >= 0 and u.max() < 1
    assert stats.kstest(u.ravel(), "uniform").pvalue > 1e-3
    assert abs(np.corrcoef(u[:, 0], u[:, 1])[0, 1]) < 0.01 and abs(np.corrcoef(u[:-1, 0], u[1:, 0])[0, 1]) < 0.01
    # A person's numbers depend on its key alone: the same taken alone, in another order.
    perm = np.random.default_rng(0).permutation(2000)
    sub = d.take(perm)
    rows_p = (np.arange(2000) * 17 + 5)
    assert np.array_equal(sub.random(rows_p, 2), d.random(perm * 17 + 5, 2))
    assert not np.array_equal(d.random(rows, 1), d.random(rows, 2))  # sites differ
    other = KeyedDraws(person_keys(1, np.arange(2000), 3)).random(rows, 1)
    assert np.mean(other == d.random(rows, 1)) < 1e-3  # seeds differ


@pytest.mark.parametrize("a,b", [(8.0, 1.5), (2.0, 3.0), (1.5, 5.0)])
def test_keyed_beta_follows_the_beta_distribution(a, b):
    x = KeyedDraws(person_keys(2, np.arange(6000), 0)).beta(a, b, np.arange(6000 * 17), 8)
    assert x.min() >= 0 and x.max() <= 1
    assert stats.kstest(x, stats.beta(a, b).cdf).pvalue > 1e-3


@pytest.mark.parametrize("m", [0, 3])
def test_keyed_draws_plant_the_same_distribution_as_a_generator(m):
    """Statistically equal (the numbers necessarily differ): outcome frequencies per outcome within binomial
    tolerance, and the confidences' and offsets' distributions by two-sample KS tests."""
    gt, area, oth = _crowd_others(np.random.default_rng(40 + m), 4000, m)
    prep = prepare(gt, area, oth)
    a = synthesize(gt, area, np.random.default_rng(1), prepared=prep)
    b = synthesize(gt, area, KeyedDraws(person_keys(1, np.arange(gt.shape[0]), 0)), prepared=prep)
    lab = gt[..., 2] > 0
    for o in range(len(OUTCOMES)):
        p = a.probabilities[..., o][lab].mean()
        se = np.sqrt(2 * p * (1 - p) / lab.sum())
        assert abs((a.outcome[lab] == o).mean() - (b.outcome[lab] == o).mean()) < 4.5 * se + 1e-3, OUTCOMES[o]
    for o in (GOOD, JITTER, MISS) + ((SWAP,) if m else ()):
        sa, sb = a.outcome == o, b.outcome == o
        assert stats.ks_2samp(a.keypoints[..., 2][sa], b.keypoints[..., 2][sb]).pvalue > 1e-3
        da = np.hypot(*(a.keypoints[..., :2] - gt[..., :2])[sa].T) / np.sqrt(area[np.nonzero(sa)[0]])
        db = np.hypot(*(b.keypoints[..., :2] - gt[..., :2])[sb].T) / np.sqrt(area[np.nonzero(sb)[0]])
        assert stats.ks_2samp(da, db).pvalue > 1e-3


def _records(d):
    return {(r["annotation_id"], r["variant"]): r for r in read_dataset(d)}


def test_each_person_variant_is_reproducible_from_seed_person_and_variant_alone(tmp_path):
    """The same record whatever the block layout, and for an image generated alone."""
    full = _records(write_dataset(TRAIN_GT, tmp_path / "a", 2, seed=3) and tmp_path / "a")
    small = _records(write_dataset(TRAIN_GT, tmp_path / "b", 2, seed=3, block_persons=7) and tmp_path / "b")
    assert full.keys() == small.keys() and len(full) > 100
    for k, r in full.items():
        assert r == {**small[k], "keypoints": r["keypoints"]} and np.array_equal(r["keypoints"], small[k]["keypoints"])
    # One crowded image alone (its other persons matter for swaps), in a file of its own.
    doc = json.loads(Path(TRAIN_GT).read_text())
    gt = load_ground_truth(TRAIN_GT)
    labelled = ~gt.crowd & (gt.keypoints[..., 2] > 0).any(-1)
    ids, inverse = np.unique(gt.image_ids, return_inverse=True)
    image_id = int(ids[np.bincount(inverse, weights=labelled).argmax()])
    doc["annotations"] = [a for a in doc["annotations"] if a["image_id"] == image_id]
    doc["images"] = [i for i in doc["images"] if i["id"] == image_id]
    (tmp_path / "one.json").write_text(json.dumps(doc))
    write_dataset(tmp_path / "one.json", tmp_path / "c", 2, seed=3)
    alone = _records(tmp_path / "c")
    assert len(alone) >= 6
    for k, r in alone.items():
        assert r["labels"] == full[k]["labels"] and r["anchors"] == full[k]["anchors"]
        assert np.array_equal(r["keypoints"], full[k]["keypoints"])
    arr = load_arrays(tmp_path / "a")
    assert np.any(arr["outcome"] == SWAP) or np.any(arr["outcome"] == INVERSION)

