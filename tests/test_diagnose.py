"""Keypoint error diagnosis: every rule and tie of the taxonomy by hand, a plain reference classifier,
the diagnosis of real results against pycocotools, and result validation."""
import contextlib
import io
import json
import math

import matplotlib.image
import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from posefix.synth import InputError
from posefix.synth.coco import synthesize_coco
from posefix.synth.cocoio import load_ground_truth, load_results, validate_results
from posefix.synth.diagnose import NO_LABEL, classify, diagnose, label_names
from posefix.synth.plots import write_plots

from .conftest import TRAIN_GT, VAL_GT, VAL_RESULTS, make_crowd

K = 17
# posefix-facts.md, typed in independently of posefix.keypoints.
SIGMA = np.array([.26, .25, .25, .35, .35, .79, .79, .72, .72, .62, .62, 1.07, 1.07, .87, .87, .89, .89]) / 10
PARTNER = [0, 2, 1, 4, 3, 6, 5, 8, 7, 10, 9, 12, 11, 14, 13, 16, 15]
NAMES = ["good", "jitter", "inversion", "swap", "miss"]
WRIST, PARTNER_WRIST = 9, 10  # left wrist and its partner
AREA = 10000.0


def dist(t, j, area=AREA):
    """Pixel distance at which KS of joint j equals t: KS = exp(-d² / (2·A·(2σ)²))."""
    return 2 * SIGMA[j] * math.sqrt(-2 * area * math.log(t))


def person(x0=0.0, y0=0.0):
    """All 17 joints labelled, 1000 px apart on a row, so that no joint is near another."""
    p = np.zeros((K, 3))
    p[:, 0] = x0 + 1000.0 * np.arange(K)
    p[:, 1] = y0
    p[:, 2] = 2
    return p


def label(j, xy, own=None, others=(), others_area=(), area=AREA):
    """The label of joint j when the prediction puts it at xy and every other joint on its GT."""
    own = person() if own is None else own
    pred = own.copy()
    pred[j, :2] = xy
    others = np.array(others, dtype=float).reshape(1, -1, K, 3)
    code = classify(pred[None], own[None], np.array([area]), others, np.array(others_area, float).reshape(1, -1))
    return label_names(code)[0][j]


def below(j, t, area=AREA):
    """The point straight below the own GT joint j where KS to it is t."""
    return person()[j, :2] + [0.0, dist(t, j, area)]


def test_ks_to_the_own_joint_decides_good_jitter_and_miss():
    for t, expected in ((0.99, "good"), (0.86, "good"), (0.84, "jitter"), (0.51, "jitter"), (0.49, "miss"),
                        (0.2, "miss")):
        assert label(WRIST, below(WRIST, t)) == expected, t


def test_inversion_is_ks_at_least_half_to_the_own_partner():
    partner = person()[PARTNER_WRIST, :2]
    assert label(WRIST, partner) == "inversion"
    assert label(WRIST, partner + [0.0, dist(0.51, PARTNER_WRIST)]) == "inversion"
    assert label(WRIST, partner + [0.0, dist(0.49, PARTNER_WRIST)]) == "miss"
    assert label(PARTNER_WRIST, person()[WRIST, :2]) == "inversion"


def test_the_nose_is_never_an_inversion():
    # The nose's partner is itself: near it is good or jitter, elsewhere a miss, never an inversion.
    assert label(0, below(0, 0.7)) == "jitter"
    assert label(0, below(0, 0.3)) == "miss"
    rng = np.random.default_rng(0)
    own = person()
    pred = np.repeat(own[None], 500, axis=0)
    pred[:, 0, :2] += rng.normal(0, dist(0.3, 0), size=(500, 2))
    codes = classify(pred, np.repeat(own[None], 500, 0), np.full(500, AREA))
    assert set(codes[:, 0]) <= {0, 1, 4} and {0, 1, 4} <= set(codes[:, 0])


def test_swap_with_another_persons_same_joint_and_with_their_partner():
    other = person(y0=5000.0)
    x = other[WRIST, :2]
    assert label(WRIST, x, others=[other], others_area=[AREA]) == "swap"
    assert label(WRIST, x + [dist(0.51, WRIST), 0.0], others=[other], others_area=[AREA]) == "swap"
    assert label(WRIST, x + [dist(0.49, WRIST), 0.0], others=[other], others_area=[AREA]) == "miss"
    assert label(WRIST, other[PARTNER_WRIST, :2], others=[other], others_area=[AREA]) == "swap"


def test_tie_between_own_and_another_persons_joint_goes_to_own():
    twin = person()  # same joints, same area: every KS ties
    assert label(WRIST, below(WRIST, 0.7), others=[twin], others_area=[AREA]) == "jitter"
    assert label(WRIST, below(WRIST, 0.9), others=[twin], others_area=[AREA]) == "good"


def test_tie_between_another_persons_joint_and_own_partner_goes_to_the_other_person():
    other = person(y0=5000.0)
    other[WRIST, :2] = person()[PARTNER_WRIST, :2]  # their wrist where our partner is, same area
    at = person()[PARTNER_WRIST, :2] + [0.0, dist(0.7, WRIST)]
    assert label(WRIST, at, others=[other], others_area=[AREA]) == "swap"


def test_tie_between_own_partner_and_another_persons_partner_goes_to_own_partner():
    other = person(y0=5000.0)
    other[PARTNER_WRIST, :2] = person()[PARTNER_WRIST, :2]
    at = person()[PARTNER_WRIST, :2] + [0.0, dist(0.7, WRIST)]
    assert label(WRIST, at, others=[other], others_area=[AREA]) == "inversion"


def test_unlabelled_gt_joint_gets_no_label():
    own = person()
    own[WRIST, 2] = 0
    assert label(WRIST, below(WRIST, 0.99), own=own) is None
    assert label(WRIST, [1e6, 1e6], own=own) is None


def test_unlabelled_candidates_are_ignored():
    other = person(y0=5000.0)
    other[WRIST, 2] = 0
    assert label(WRIST, other[WRIST, :2], others=[other], others_area=[AREA]) == "miss"
    own = person()
    own[PARTNER_WRIST, 2] = 0
    assert label(WRIST, own[PARTNER_WRIST, :2], own=own) == "miss"


def test_ks_to_another_person_uses_that_persons_area():
    # Prediction at KS 0.6 from the own wrist (area A); the other person's wrist twice as far again.
    d = dist(0.6, WRIST)
    at = person()[WRIST, :2] + [0.0, d]
    other = person(y0=5000.0)
    other[WRIST, :2] = at + [0.0, 2 * d]
    # With area 9A: KS = exp(-(2d)² / (2·9A·(2σ)²)) = 0.6^(4/9) ≈ 0.797 > 0.6, a swap.
    assert label(WRIST, at, others=[other], others_area=[9 * AREA]) == "swap"
    # With area A it would be 0.6^4 ≈ 0.13 < 0.6: the own joint wins, a jitter.
    assert label(WRIST, at, others=[other], others_area=[AREA]) == "jitter"


def reference_classify(pred, gt, area, others, others_area):
    """posefix-facts.md's taxonomy, one joint and one candidate at a time."""
    n, m = gt.shape[0], others.shape[1]
    out = np.full((n, K), NO_LABEL)
    for i in range(n):
        for j in range(K):
            if gt[i, j, 2] <= 0:
                continue
            # (kind, person row, joint) in the tie order: own joint, others' joints, own partner, others' partners.
            cands = [("own", None, j)] + [("other", o, j) for o in range(m)]
            if j != 0:
                cands += [("partner", None, PARTNER[j])] + [("other", o, PARTNER[j]) for o in range(m)]
            best, best_kind = -1.0, None
            for kind, o, jj in cands:
                xyv, a = (gt[i, jj], area[i]) if o is None else (others[i, o, jj], others_area[i, o])
                if xyv[2] <= 0:
                    continue
                d2 = (pred[i, j, 0] - xyv[0]) ** 2 + (pred[i, j, 1] - xyv[1]) ** 2
                s = math.exp(-d2 / (2 * a * (2 * SIGMA[j]) ** 2 + np.spacing(1)))
                if s > best:
                    best, best_kind = s, kind
            if best < 0.5:
                out[i, j] = 4
            elif best_kind == "own":
                out[i, j] = 0 if best >= 0.85 else 1
            elif best_kind == "partner":
                out[i, j] = 2
            else:
                out[i, j] = 3
    return out


@pytest.mark.parametrize("m", [0, 1, 3])
def test_classify_matches_a_plain_reference_on_random_inputs(m):
    rng = np.random.default_rng(10 + m)
    n = 300
    gt, area, others, others_area = make_crowd(rng, n, m, spread=0.15)
    # Each predicted joint near a random candidate (own, partner, another person's joint or partner).
    persons = np.concatenate([gt[:, None], others], axis=1)  # (n, 1+m, K, 3)
    areas = np.concatenate([area[:, None], others_area], axis=1)
    who = rng.integers(0, m + 1, size=(n, K))
    joint = np.where(rng.random((n, K)) < 0.3, np.array(PARTNER)[None], np.arange(K)[None])
    rows = np.arange(n)[:, None]
    anchor = persons[rows, who, joint, :2]
    t = rng.uniform(0.05, 1.0, size=(n, K))
    r = 2 * SIGMA * np.sqrt(-2 * areas[rows, who] * np.log(t))
    ang = rng.uniform(0, 2 * np.pi, size=(n, K))
    pred = np.concatenate([anchor + r[..., None] * np.stack([np.cos(ang), np.sin(ang)], -1),
                           np.ones((n, K, 1))], axis=-1)
    got = classify(pred, gt, area, others, others_area)
    want = reference_classify(pred, gt, area, others, others_area)
    assert np.array_equal(got, want)
    assert set(np.unique(want)) == ({-1, 0, 1, 2, 4} if m == 0 else {-1, 0, 1, 2, 3, 4})


# ---- diagnosis of real results ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def val_gt():
    return load_ground_truth(VAL_GT)


@pytest.fixture(scope="module")
def val_results():
    return json.loads(VAL_RESULTS.read_text())


@pytest.fixture(scope="module")
def report(val_gt, val_results):
    return diagnose(val_gt, val_results, str(VAL_RESULTS))


def test_report_has_one_entry_per_result_in_order(report, val_results):
    assert report["format"] == "posefix-diagnosis/1" and report["source"] == str(VAL_RESULTS)
    dets = report["detections"]
    assert len(dets) == len(val_results)
    for i, (d, r) in enumerate(zip(dets, val_results)):
        assert set(d) == {"index", "image_id", "matched_gt", "oks", "labels"}
        assert d["index"] == i and d["image_id"] == r["image_id"] and len(d["labels"]) == K
        assert set(d["labels"]) <= {None, *NAMES}
        if d["matched_gt"] is None:
            assert d["oks"] is None and d["labels"] == [None] * K
    json.dumps(report, allow_nan=False)  # plain JSON, no NaN


def test_matches_and_labels_agree_with_an_independent_computation(report, val_gt, val_results):
    by_id = {int(a): i for i, a in enumerate(val_gt.ids)}
    matched = [d for d in report["detections"] if d["matched_gt"] is not None]
    assert len(matched) > 10
    assert len({d["matched_gt"] for d in matched}) == len(matched)  # one-to-one (no crowd here)
    checked = 0
    for d in matched:
        g = by_id[d["matched_gt"]]
        assert val_gt.image_ids[g] == d["image_id"] and 0.1 <= d["oks"] <= 1.0
        vis = val_gt.keypoints[g, :, 2] > 0
        if not vis.any():
            assert d["labels"] == [None] * K
            continue
        pred = np.array(val_results[d["index"]]["keypoints"], float).reshape(K, 3)
        d2 = ((pred[:, :2] - val_gt.keypoints[g, :, :2]) ** 2).sum(1)
        ks = np.exp(-d2 / (2 * (val_gt.areas[g] + np.spacing(1)) * (2 * SIGMA) ** 2))
        assert d["oks"] == pytest.approx(ks[vis].mean(), abs=1e-9)
        # Labels: the reference classifier against every other non-crowd person of the image.
        others = np.flatnonzero((val_gt.image_ids == d["image_id"]) & (np.arange(val_gt.ids.size) != g)
                                & ~val_gt.crowd)
        want = reference_classify(pred[None], val_gt.keypoints[g][None], val_gt.areas[g:g + 1],
                                  val_gt.keypoints[others][None], val_gt.areas[others][None])[0]
        assert [None if c < 0 else NAMES[c] for c in want] == d["labels"]
        assert [x is not None for x in d["labels"]] == vis.tolist()
        checked += 1
    assert checked >= 10


def coco_ap(gt_path, results, image_ids):
    """pycocotools' own keypoint AP (stats[0]) on the given images."""
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(gt_path))
        ev = COCOeval(coco, coco.loadRes(results), "keypoints")
        ev.params.imgIds = sorted(image_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats[0]


def test_ap_of_the_original_results_is_pycocotools_own(report, val_results):
    ap = report["summary"]["ap"]
    images = {r["image_id"] for r in val_results}
    assert report["summary"]["images"] == len(images) == 4
    assert ap["original"] == pytest.approx(coco_ap(VAL_GT, str(VAL_RESULTS), images), abs=1e-12)
    assert 0.5 < ap["original"] < 1.0


def test_correcting_errors_does_not_lower_ap(report):
    ap = report["summary"]["ap"]
    assert list(ap["cumulative"]) == ["miss", "swap", "inversion", "jitter"]
    final = ap["cumulative"]["jitter"]["ap"]
    assert final >= ap["original"]
    assert sum(c["gain"] for c in ap["cumulative"].values()) == pytest.approx(final - ap["original"])
    for c in ap["alone"].values():
        assert c["gain"] == pytest.approx(c["ap"] - ap["original"])
    assert ap["cumulative"]["miss"] == ap["alone"]["miss"]
    # Correcting everything puts every matched labelled keypoint on its GT joint: AP can only rise here.
    assert ap["alone"]["miss"]["gain"] > 0 and ap["alone"]["jitter"]["gain"] > 0


def test_summary_counts_add_up(report):
    s = report["summary"]
    dets = report["detections"]
    labels = [x for d in dets for x in d["labels"] if x is not None]
    assert s["detections"]["total"] == len(dets)
    assert s["detections"]["unmatched"] == sum(d["matched_gt"] is None for d in dets)
    assert s["detections"]["labelled"] == sum(any(x is not None for x in d["labels"]) for d in dets)
    assert s["keypoints"]["labelled"] == len(labels)
    assert s["keypoints"]["counts"] == {n: labels.count(n) for n in NAMES}
    assert sum(s["keypoints"]["shares"].values()) == pytest.approx(1.0)
    for n in NAMES:
        assert sum(p["counts"][n] for p in s["per_keypoint"].values()) == s["keypoints"]["counts"][n]
        cells = [c for row in s["crowding"]["cells"].values() for c in row.values()]
        assert sum(c[n] for c in cells) == s["keypoints"]["counts"][n]
    assert list(s["per_keypoint"])[:2] == ["nose", "left_eye"]
    assert s["crowding"]["overlap_bins"] == ["0", "1-2", "3-8"]
    assert s["crowding"]["visible_bins"] == ["1-5", "6-10", "11-15", "16-17"]


def test_results_without_category_and_with_extra_fields_diagnose_the_same(report, val_gt, val_results):
    plain = []
    for r in val_results:
        r = {k: v for k, v in r.items() if k != "category_id"}
        r["bbox"] = [0, 0, 1, 1]
        plain.append(r)
    before = json.dumps(plain)
    again = diagnose(val_gt, plain, str(VAL_RESULTS), with_ap=False)
    assert json.dumps(plain) == before  # the caller's results are left alone
    assert again["detections"] == report["detections"] and again["summary"]["ap"] is None


def test_crowd_regions_and_unlabelled_persons_give_no_labels():
    gt = load_ground_truth(TRAIN_GT)
    results, _ = synthesize_coco(gt, np.random.default_rng(0))
    crowd = int(np.flatnonzero(gt.crowd)[0])
    x, y, w, h = gt.boxes[crowd]
    kp = np.zeros((K, 3))
    kp[:, 0], kp[:, 1], kp[:, 2] = x + w / 2, y + h / 2, 1.0
    results.append({"image_id": int(gt.image_ids[crowd]), "keypoints": kp.ravel().tolist(), "score": 0.01})
    rep = diagnose(gt, results, with_ap=False)
    by_id = {int(a): i for i, a in enumerate(gt.ids)}
    last = rep["detections"][-1]
    assert last["matched_gt"] is not None and last["labels"] == [None] * K
    g = by_id[last["matched_gt"]]
    assert gt.crowd[g] or not (gt.keypoints[g, :, 2] > 0).any()
    for d in rep["detections"]:
        if d["matched_gt"] is not None:
            vis = gt.keypoints[by_id[d["matched_gt"]], :, 2] > 0
            if gt.crowd[by_id[d["matched_gt"]]] or not vis.any():
                assert d["labels"] == [None] * K
            else:
                assert [x is not None for x in d["labels"]] == vis.tolist()


def test_synthesized_results_diagnose_as_planted(val_gt):
    results, planted = synthesize_coco(val_gt, np.random.default_rng(5))
    rep = diagnose(val_gt, results, with_ap=False)
    own = [(d, p) for d, p in zip(rep["detections"], planted) if d["matched_gt"] == p["gt_id"]]
    assert len(own) >= 0.9 * len(results)
    for d, p in own:
        assert d["labels"] == [None if x == "unlabelled" else x for x in p["labels"]]


def test_detections_beyond_twenty_per_image_stay_unmatched(val_gt, val_results):
    image = val_results[0]["image_id"]
    many = [dict(val_results[0], score=1.0 - 0.01 * i) for i in range(25)]
    rep = diagnose(val_gt, many, with_ap=False)
    assert rep["detections"][0]["matched_gt"] is not None
    assert all(d["matched_gt"] is None for d in rep["detections"][20:])
    assert rep["summary"]["detections"]["unmatched"] == 24 and rep["summary"]["images"] == 1
    assert all(d["image_id"] == image for d in rep["detections"])


def test_write_plots_makes_valid_pngs(report, tmp_path, val_gt, val_results):
    paths = write_plots(report, tmp_path / "plots")
    assert [p.name for p in paths] == ["keypoint_errors.png", "ap_gains.png", "crowding.png"]
    for p in paths:
        data = p.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
        image = matplotlib.image.imread(p)
        assert image.ndim == 3 and image.shape[0] > 300 and image.shape[1] > 600
        assert image[..., :3].std() > 0.05  # something is drawn
    without_ap = diagnose(val_gt, val_results, with_ap=False)
    assert [p.name for p in write_plots(without_ap, tmp_path / "b")] == ["keypoint_errors.png", "crowding.png"]
    assert sorted(q.name for q in (tmp_path / "plots").iterdir()) == sorted(p.name for p in paths)  # no temp files


# ---- validation --------------------------------------------------------------------------------------


def good_result():
    return {"image_id": 785, "category_id": 1, "keypoints": [1.0] * 51, "score": 0.5}


@pytest.mark.parametrize("mutate, field", [
    (lambda rs: {"results": rs}, "results"),
    (lambda rs: rs[:1] + ["x"], "results[1]"),
    (lambda rs: rs[:1] + [{k: v for k, v in good_result().items() if k != "image_id"}], "results[1].image_id"),
    (lambda rs: rs[:1] + [dict(good_result(), image_id="785")], "results[1].image_id"),
    (lambda rs: rs[:2] + [dict(good_result(), image_id=12345)], "results[2].image_id"),
    (lambda rs: rs[:2] + [dict(good_result(), keypoints=[1.0] * 50)], "results[2].keypoints"),
    (lambda rs: rs[:1] + [dict(good_result(), keypoints=[1.0] * 50 + [float("nan")])], "results[1].keypoints"),
    (lambda rs: rs[:1] + [dict(good_result(), score=float("nan"))], "results[1].score"),
    (lambda rs: rs[:1] + [dict(good_result(), score=None)], "results[1].score"),
    (lambda rs: rs[:1] + [dict(good_result(), category_id="person")], "results[1].category_id"),
])
def test_malformed_results_name_the_index_and_field(val_gt, mutate, field):
    results = mutate([good_result(), good_result()])
    with pytest.raises(InputError) as e:
        validate_results(results, "res.json", val_gt)
    assert e.value.field == field and e.value.source == "res.json"
    with pytest.raises(InputError) as e:
        diagnose(val_gt, results, "res.json")
    assert e.value.field == field


def test_diagnose_rejects_empty_results_and_unknown_categories(val_gt):
    with pytest.raises(InputError, match="empty"):
        diagnose(val_gt, [])
    with pytest.raises(InputError) as e:
        diagnose(val_gt, [good_result(), dict(good_result(), category_id=3)])
    assert e.value.field == "results[1].category_id"


def test_load_results_reads_and_validates_files(tmp_path, val_gt):
    loaded = load_results(VAL_RESULTS, val_gt)
    assert len(loaded) == 73 and all(r["category_id"] == 1 for r in loaded)
    bad = tmp_path / "bad.json"
    bad.write_text('[{"image_id": 785, "keypoints": [NaN' + ", 1" * 50 + '], "score": 1}]')
    with pytest.raises(InputError) as e:
        load_results(bad, val_gt)
    assert e.value.field == "results[0].keypoints" and str(bad) in str(e.value)
    (tmp_path / "broken.json").write_text("[{")
    with pytest.raises(InputError, match="not valid JSON"):
        load_results(tmp_path / "broken.json")
    with pytest.raises(InputError, match="file not found"):
        load_results(tmp_path / "missing.json")
