"""Fitting an error profile to a diagnosis: the estimator on model draws, the full round trip
synthesize → diagnose → fit on the bundled GT, empty cells, and sums above 1."""
import json

import numpy as np
import pytest

from posefix.synth import InputError, parse_profile, published_profile
from posefix.synth.coco import synthesize_coco
from posefix.synth.cocoio import load_ground_truth
from posefix.synth.diagnose import diagnose
from posefix.synth.fit import Observations, estimate, fit_profile
from posefix.synth.profile import ERRORS, OUTCOMES

from .conftest import TRAIN_GT, VAL_GT, VAL_RESULTS

K = 17
COPIES = 25  # copies of the bundled GT (train + val: 191 labelled persons) synthesized in one go
MIN_N = 400  # a cell is checked when at least this many keypoints are behind it
Z = 4.0  # tolerance in binomial standard errors


def known_profile():
    """The published profile with its errors raised as far as every joint's errors still sum to at most 1:
    inversion and swap doubled, jitter × 1.5, miss as published."""
    doc = published_profile().to_dict()
    for err, factor in (("jitter", 1.5), ("inversion", 2.0), ("swap", 2.0)):
        for g in doc["outcomes"][err]["groups"]:
            g["p"] = [x * factor for x in g["p"]]
    doc["name"] = "published, raised"
    return parse_profile(doc)


def replicated_gt(tmp_path, copies):
    """The train and val samples merged and repeated ``copies`` times under new image and annotation ids,
    so that one synthesis draws ``copies`` independent inputs per person and COCO matching keeps them apart."""
    images, anns = [], []
    for path in (TRAIN_GT, VAL_GT):
        doc = json.loads(path.read_text())
        images += doc["images"]
        anns += doc["annotations"]
        categories = doc["categories"]
    img_step = max(im["id"] for im in images) + 1
    ann_step = max(a["id"] for a in anns) + 1
    out = {"images": [], "annotations": [], "categories": categories}
    for c in range(copies):
        out["images"] += [dict(im, id=im["id"] + c * img_step) for im in images]
        out["annotations"] += [dict(a, id=a["id"] + c * ann_step, image_id=a["image_id"] + c * img_step)
                               for a in anns]
    path = tmp_path / "replicated.json"
    path.write_text(json.dumps(out))
    return load_ground_truth(path)


def cells(profile):
    """(error, group name, bin name, probability, count) of every cell."""
    for err in ERRORS:
        t = profile.outcomes[err]
        for name, joints in t.groups:
            for b, bin_name in enumerate(t.bins):
                n = None if t.counts is None else int(t.counts[joints[0], b])
                yield err, name, bin_name, float(t.table[joints[0], b]), n


@pytest.fixture(scope="module")
def round_trip(tmp_path_factory):
    gt = replicated_gt(tmp_path_factory.mktemp("fit"), COPIES)
    known = known_profile()
    results, _ = synthesize_coco(gt, np.random.default_rng(2024), known)
    report = diagnose(gt, results, "synthesized", with_ap=False)
    return known, fit_profile(report, gt), report


def test_round_trip_recovers_the_known_profile(round_trip):
    known, fitted, _ = round_trip
    published = published_profile()
    checked = moved = 0
    for (err, group, b, p, _), (_, _, _, q, n), (_, _, _, p0, _) in zip(cells(known), cells(fitted), cells(published)):
        if n < MIN_N:
            continue
        se = np.sqrt(p * (1 - p) / n)
        assert abs(q - p) <= Z * se, f"{err} {group} {b}: fitted {q:.4f}, known {p:.4f}, n {n}, se {se:.4f}"
        checked += 1
        if abs(p - p0) > 2 * Z * se:  # the fit follows the data, not the template
            assert abs(q - p) < abs(q - p0)
            moved += 1
    assert checked == 24 and moved >= 8


def test_fitted_profile_is_a_valid_profile_with_counts(round_trip):
    _, fitted, report = round_trip
    doc = fitted.to_dict()
    again = parse_profile(json.loads(json.dumps(doc)))
    for err in ERRORS:
        assert np.array_equal(again.outcomes[err].counts, fitted.outcomes[err].counts)
        assert np.allclose(again.outcomes[err].table, fitted.outcomes[err].table, atol=1e-6)
        assert all("n" in g for g in doc["outcomes"][err]["groups"])
    # Jitter and miss were possible at every labelled keypoint: their cells count each once.
    labelled = report["summary"]["keypoints"]["labelled"]
    for err in ("jitter", "miss"):
        t = fitted.outcomes[err]
        assert sum(int(t.counts[joints[0]].sum()) for _, joints in t.groups) == labelled
    assert "scaled" not in fitted.description


def test_estimator_undoes_the_renormalisation_of_impossible_outcomes():
    # Outcomes drawn straight from the synthesizer's model: nominal p, impossible outcomes removed, renormalised.
    rng = np.random.default_rng(7)
    prof = known_profile()
    r = 200_000
    joint = rng.integers(0, K, r)
    nv = rng.integers(1, K + 1, r)
    ov = rng.integers(0, 5, r)
    inv_ok = (joint != 0) & (rng.random(r) < 0.7)
    swap_ok = rng.random(r) < 0.3
    p = prof.probabilities(nv, ov)[np.arange(r), joint]  # (R, 5)
    p[:, 2] *= inv_ok
    p[:, 3] *= swap_ok
    p /= p.sum(1, keepdims=True)
    outcome = (rng.random(r)[:, None] > np.cumsum(p, 1)).sum(1)
    obs = Observations(outcome, joint, nv, ov, inv_ok, swap_ok, r)
    tables, counts = estimate(obs, published_profile())
    naive_off = 0
    for err in ERRORS:
        t = prof.outcomes[err]
        for gi, (_, joints) in enumerate(t.groups):
            for b in range(len(t.bins)):
                want, n = t.table[joints[0], b], counts[err][gi, b]
                se = np.sqrt(want * (1 - want) / n)
                assert abs(tables[err][gi, b] - want) <= Z * se, (err, gi, b)
    # The plain frequency of jitter among all joints is too high where swap or inversion was impossible.
    for gi, (_, joints) in enumerate(prof.outcomes["jitter"].groups):
        for b in range(2):
            sel = np.isin(joint, joints) & (prof.outcomes["jitter"].bin_index(nv, None) == b)
            freq, want = (outcome[sel] == 1).mean(), prof.outcomes["jitter"].table[joints[0], b]
            naive_off += abs(freq - want) > Z * np.sqrt(want * (1 - want) / sel.sum())
    assert naive_off >= 4


def test_cells_without_data_keep_the_template_value():
    gt = load_ground_truth(VAL_GT)
    report = diagnose(gt, json.loads(VAL_RESULTS.read_text()), with_ap=False)
    template = known_profile()
    fitted = fit_profile(report, gt, template)
    empty = 0
    for (err, group, b, p, n), (_, _, _, p0, _) in zip(cells(fitted), cells(template)):
        if n == 0:
            assert p == p0
            empty += 1
    assert empty > 0
    assert fitted.outcomes["miss"].counts[:, 2].sum() > 0  # the nv > 10 persons of the real results
    assert fitted.scores == template.scores and fitted.miss_own_anchor_weight == template.miss_own_anchor_weight


def test_errors_summing_above_one_are_scaled_down_and_said_so():
    gt = load_ground_truth(VAL_GT)
    report = diagnose(gt, json.loads(VAL_RESULTS.read_text()), with_ap=False)
    for d in report["detections"]:
        d["labels"] = ["miss" if x is not None else None for x in d["labels"]]
    fitted = fit_profile(report, gt)  # miss 1 where seen, plus the template's swaps where not seen
    assert "scaled down" in fitted.description
    p = fitted.probabilities(np.repeat(np.arange(1, K + 1), 4), np.tile(np.arange(4), K))
    assert p[..., OUTCOMES.index("good")].min() >= 0
    assert p[..., OUTCOMES.index("miss")].max() < 1.0
    parse_profile(json.loads(json.dumps(fitted.to_dict())))


@pytest.mark.parametrize("change, field", [
    (lambda rep, d: {"detections": 3}, "report.detections"),
    (lambda rep, d: d.update(labels=["good"] * 16), "report.detections[{i}].labels"),
    (lambda rep, d: d.update(labels=["fine"] * 17), "report.detections[{i}].labels"),
    (lambda rep, d: d.update(matched_gt=123), "report.detections[{i}].matched_gt"),
    (lambda rep, d: d.update(labels=["good"] * 17), "report.detections[{i}].labels"),  # GT leaves some unlabelled
])
def test_malformed_reports_name_the_field(change, field):
    gt = load_ground_truth(VAL_GT)
    report = diagnose(gt, json.loads(VAL_RESULTS.read_text()), with_ap=False)
    i = next(i for i, d in enumerate(report["detections"]) if d["matched_gt"] and None in d["labels"]
             and set(d["labels"]) != {None})
    report = change(report, report["detections"][i]) or report
    with pytest.raises(InputError) as e:
        fit_profile(report, gt)
    assert e.value.field == field.format(i=i)
