"""Synthetic-error dataset directories: variants, shards, resume, severity, sequences, the CLI."""
import gzip
import json
import subprocess
import sys

import numpy as np
import pytest

from posefix.cli import main
from posefix.errors import InputError
from posefix.keypoints import PARTNER, SIGMAS
from posefix.synth import read_dataset
from posefix.synth.coco import overlaps
from posefix.synth.cocoio import load_ground_truth
from posefix.synth.dataset import load_arrays, read_manifest, regenerate_shard, write_dataset
from posefix.synth.diagnose import diagnose
from posefix.synth.profile import ERRORS, OUTCOMES, published_profile
from posefix.synth.sequences import SequenceParams, fit_sequences, synthesize_track, synthesize_tracks

from .conftest import TRAIN_GT, VAL_GT


def shard_bytes(d):
    return {p.name: p.read_bytes() for p in sorted(d.glob("shard-*"))}


def test_records_and_manifest(tmp_path):
    m = write_dataset(VAL_GT, tmp_path / "d", 2, seed=4, block_persons=40)
    gt = load_ground_truth(VAL_GT)
    persons = np.flatnonzero(~gt.crowd & (gt.keypoints[..., 2] > 0).any(-1))
    recs = list(read_dataset(tmp_path / "d"))
    assert len(recs) == 2 * persons.size == m["records"] and m["complete"] and len(m["shards"]) > 2
    index = {int(a): i for i, a in enumerate(gt.ids)}
    counts = dict.fromkeys(OUTCOMES, 0)
    for r in recs:
        i = index[r["annotation_id"]]
        assert r["image_id"] == gt.image_ids[i] and r["variant"] in (0, 1) and r["keypoints"].shape == (17, 3)
        assert [x is None for x in r["labels"]] == list(gt.keypoints[i, :, 2] <= 0)
        for x in r["labels"]:
            counts[x] = counts.get(x, 0) + 1
    assert {o: counts[o] for o in OUTCOMES} == m["counts"]
    assert sum(m["counts_per_joint"]["miss"]) == m["counts"]["miss"]
    assert {(r["annotation_id"], r["variant"]) for r in recs} == {(int(gt.ids[i]), v) for i in persons for v in (0, 1)}
    assert "PoseFix" in (tmp_path / "d" / "README.md").read_text()


def test_variants_independent_and_reproducible(tmp_path):
    write_dataset(TRAIN_GT, tmp_path / "a", 2, seed=7, block_persons=50)
    write_dataset(TRAIN_GT, tmp_path / "b", 3, seed=7, block_persons=50)
    write_dataset(TRAIN_GT, tmp_path / "c", 1, seed=8, block_persons=50)
    a, b, c = shard_bytes(tmp_path / "a"), shard_bytes(tmp_path / "b"), shard_bytes(tmp_path / "c")
    assert a and all(b[k] == v for k, v in a.items())  # a variant does not depend on how many are asked for
    assert all(c[k] != a[k] for k in c)  # another seed
    arr = load_arrays(tmp_path / "b")
    v0, v1 = (arr["keypoints"][arr["variant"] == v] for v in (0, 1))
    o0, o1 = (arr["outcome"][arr["variant"] == v] for v in (0, 1))
    assert np.all(np.abs(v0[..., :2] - v1[..., :2]).max(-1) > 0)
    lab = o0 >= 0
    # Independent draws: the chance that two variants agree on a joint's outcome is sum_o p_o², not 1.
    agree = (o0 == o1)[lab].mean()
    p = np.bincount(np.concatenate([o0[lab], o1[lab]]), minlength=5) / (2 * lab.sum())
    assert abs(agree - (p ** 2).sum()) < 0.05


def test_shard_regenerated_alone_equals_the_original(tmp_path):
    write_dataset(TRAIN_GT, tmp_path / "d", 2, seed=3, block_persons=30)
    m = read_manifest(tmp_path / "d")
    assert len(m["shards"]) >= 6
    for rec in m["shards"]:
        assert regenerate_shard(TRAIN_GT, tmp_path / "d", rec["block"], rec["variant"]) == \
            (tmp_path / "d" / rec["file"]).read_bytes()


def test_stopped_run_resumes_to_the_same_bytes(tmp_path):
    full = write_dataset(TRAIN_GT, tmp_path / "full", 2, seed=5, block_persons=30)
    part = write_dataset(TRAIN_GT, tmp_path / "part", 2, seed=5, block_persons=30, stop_after=3)
    assert not part["complete"] and len(part["shards"]) == 3 and not (tmp_path / "part" / "README.md").exists()
    # A shard written but not yet recorded, and one damaged: both are made again.
    names = sorted(r["file"] for r in full["shards"])
    (tmp_path / "part" / names[-1]).write_bytes(b"partial")
    first = part["shards"][0]["file"]
    (tmp_path / "part" / first).write_bytes(b"damaged")
    done = write_dataset(TRAIN_GT, tmp_path / "part", 2, seed=5, block_persons=30)
    assert done == full | {"gt": done["gt"]} and done["complete"]
    assert shard_bytes(tmp_path / "part") == shard_bytes(tmp_path / "full")
    assert (tmp_path / "part" / "manifest.json").read_bytes().replace(b"part", b"full") == \
        (tmp_path / "full" / "manifest.json").read_bytes()


def test_killed_cli_run_resumes(tmp_path):
    """The CLI killed mid-way (SIGKILL after its first shards), then run again."""
    args = [sys.executable, "-m", "posefix", "synth", "--gt", str(TRAIN_GT), "--variants", "20", "--seed", "2",
            "--block-persons", "20"]
    ref = subprocess.run(args + ["--out", str(tmp_path / "ref")], capture_output=True, text=True, timeout=300,
                         check=False)
    assert ref.returncode == 0, ref.stderr
    proc = subprocess.Popen(args + ["--out", str(tmp_path / "run")], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    manifest = tmp_path / "run" / "manifest.json"
    import time
    t0 = time.monotonic()
    while not manifest.exists() and proc.poll() is None and time.monotonic() - t0 < 120:
        time.sleep(0.01)
    proc.kill()
    proc.wait()
    stopped = read_manifest(tmp_path / "run")
    assert not stopped["complete"] and 0 < len(stopped["shards"]) < stopped["shards_total"]
    again = subprocess.run(args + ["--out", str(tmp_path / "run")], capture_output=True, text=True, timeout=300,
                           check=False)
    assert again.returncode == 0, again.stderr
    assert shard_bytes(tmp_path / "run") == shard_bytes(tmp_path / "ref")


def _expected_rates(gt, profile, factors, sel_joint_groups):
    """Expected count and binomial variance of each error per joint group: the profile's probabilities
    scaled by ``factors`` (divided by their sum where it passes 1), the impossible outcomes removed and
    the rest renormalised, as synthesis draws them."""
    ov, near = overlaps(gt)
    persons = np.flatnonzero(~gt.crowd & (gt.keypoints[..., 2] > 0).any(-1))
    vis = gt.keypoints[persons, :, 2] > 0
    p = profile.probabilities(vis.sum(-1), ov[persons])
    p[..., 1:] *= np.array([factors[e] for e in ERRORS])
    total = p[..., 1:].sum(-1)
    p[..., 1:] /= np.maximum(total, 1.0)[..., None]
    p[..., 0] = np.maximum(1.0 - np.minimum(total, 1.0), 0.0)
    inv_ok = vis[:, PARTNER] & (PARTNER != np.arange(17))
    swap_ok = np.zeros_like(vis)
    for r, i in enumerate(persons):
        if near[i].size:
            ov_vis = (gt.keypoints[near[i], :, 2] > 0).any(0)
            swap_ok[r] = ov_vis | ov_vis[PARTNER]
    p[..., 2] *= inv_ok
    p[..., 3] *= swap_ok
    p /= p.sum(-1, keepdims=True)
    out = {}
    for e in ERRORS:
        code = OUTCOMES.index(e)
        for name, joints in sel_joint_groups[e]:
            q = p[:, list(joints), code][vis[:, list(joints)]]
            out[e, name] = (q.sum(), (q * (1 - q)).sum())
    return out


@pytest.mark.parametrize("severity", [{"jitter": 1.0, "inversion": 1.0, "swap": 1.0, "miss": 1.0},
                                      {"jitter": 2.0, "inversion": 2.0, "swap": 2.0, "miss": 2.0},
                                      {"jitter": 0.5, "inversion": 3.0, "swap": 1.0, "miss": 0.0},
                                      {"jitter": 4.0, "inversion": 4.0, "swap": 4.0, "miss": 4.0}])
def test_severity_scales_planted_rates(tmp_path, severity):
    variants = 30
    m = write_dataset(TRAIN_GT, tmp_path / "d", variants, seed=11, severity=severity)
    gt = load_ground_truth(TRAIN_GT)
    prof = published_profile()
    groups = {e: prof.outcomes[e].groups for e in ERRORS}
    expected = _expected_rates(gt, prof, severity, groups)
    per_joint = {o: np.array(m["counts_per_joint"][o]) for o in OUTCOMES}
    for (e, name), (mean, var) in expected.items():
        joints = dict(groups[e])[name]
        got = per_joint[e][list(joints)].sum()
        tol = 4.5 * np.sqrt(variants * var) + 3
        assert abs(got - variants * mean) <= tol, (e, name, got, variants * mean, tol)
    # The manifest's expected rates are those computed here, independently.
    for e in ERRORS:
        want = variants * sum(mean for (err, _), (mean, _) in expected.items() if err == e)
        assert m["expected_rates"][e] * m["labelled_joints"] == pytest.approx(want, rel=1e-3, abs=0.1)
    if severity["miss"] == 0:
        assert m["counts"]["miss"] == 0
    assert m["severity"] == severity


def test_diagnose_agrees_with_planted_labels(tmp_path):
    write_dataset(VAL_GT, tmp_path / "d", 3, seed=1, severity={"inversion": 2.0, "swap": 2.0, "miss": 2.0})
    gt = load_ground_truth(VAL_GT)
    agree = total = 0
    for v in range(3):
        recs = [r for r in read_dataset(tmp_path / "d") if r["variant"] == v]
        results = [{"image_id": r["image_id"], "category_id": 1, "keypoints": r["keypoints"].reshape(-1).tolist(),
                    "score": r["score"]} for r in recs]
        report = diagnose(gt, results, with_ap=False)
        for r, d in zip(recs, report["detections"]):
            for planted, found in zip(r["labels"], d["labels"] if d["matched_gt"] == r["annotation_id"]
                                      else [None] * 17):
                if planted is not None:
                    total += 1
                    agree += planted == found
    assert total > 1000 and agree / total >= 0.99


def _walking_track(t_len, n=1, seed=0):
    """N tracks of a bundled GT person moving across T frames."""
    gt = load_ground_truth(TRAIN_GT)
    i = int(np.argmax((gt.keypoints[..., 2] > 0).sum(-1)))
    base = gt.keypoints[i]
    rng = np.random.default_rng(seed)
    steps = np.cumsum(rng.normal(0, 2.0, (n, t_len, 1, 2)), axis=1)
    g = np.broadcast_to(base, (n, t_len, 17, 3)).copy()
    g[..., :2] += steps
    return g, np.full((n, t_len), max(gt.areas[i], 1.0))


def test_sequences_keep_rates_durations_and_jitter_correlation():
    params = SequenceParams({"inversion": 3.0, "swap": 4.0, "miss": 6.0}, 0.7)
    g, area = _walking_track(200, n=150)
    res = synthesize_tracks(g, area, params, np.random.default_rng(0))
    vis = g[..., 2] > 0
    prof = published_profile()
    p = prof.probabilities(vis.sum(-1).reshape(-1), np.zeros(vis[..., 0].size)).reshape(vis.shape + (5,))
    # Per-frame marginal rates of the planted states follow the profile (first frame and all frames).
    for e in ("inversion", "miss"):
        c = OUTCOMES.index(e)
        want = p[..., c][vis].mean()
        got = (res.state == c)[vis].mean()
        assert abs(got - want) < 0.15 * want + 0.002, (e, got, want)
        got0 = (res.state[:, 0] == c)[vis[:, 0]].mean()
        assert abs(got0 - want) < 0.5 * want + 0.01, (e, got0, want)
    # Durations: the mean length of runs that start and end inside the track.
    for e in ("inversion", "miss"):
        c = OUTCOMES.index(e)
        inside = (res.state == c).transpose(0, 2, 1).reshape(-1, 200).astype(np.int8)
        d = np.diff(inside, axis=1)
        lengths = []
        for row in d:
            s, t = np.flatnonzero(row == 1), np.flatnonzero(row == -1)
            t = t[t > (s[0] if s.size else 10 ** 9)]
            lengths += (t[:s.size] - s[:t.size]).tolist()
        assert len(lengths) > 300
        assert abs(np.mean(lengths) - params.durations[e]) < 0.1 * params.durations[e], (e, np.mean(lengths))
    # Jitter: lag-1 correlation of the KS-unit offset over base frames.
    u = (res.keypoints[..., :2] - g[..., :2]) / (2 * SIGMAS[:, None] * np.sqrt(area)[..., None, None])
    in_base = (res.state == 0) | (res.state == 1)  # good or jitter
    both = in_base[:, 1:] & in_base[:, :-1] & vis[:, 1:]
    a0, a1 = u[:, :-1][both], u[:, 1:][both]
    rho = (a0 * a1).sum() / np.sqrt((a0 ** 2).sum() * (a1 ** 2).sum())
    assert abs(rho - 0.7) < 0.03
    # The labels are the classification; jitter's share of good/jitter frames follows the profile.
    base = in_base & vis
    share = (res.outcome == OUTCOMES.index("jitter"))[base].mean()
    want = (p[..., 1] / (1 - p[..., 2:].sum(-1)))[base].mean()
    assert abs(share - want) < 0.1 * want


def test_synthesize_track_on_arrays():
    g, area = _walking_track(30)
    a = synthesize_track(g[0], area[0], rng=np.random.default_rng(3))
    b = synthesize_track(g[0], area[0], rng=np.random.default_rng(3))
    assert a.keypoints.shape == (30, 17, 3) and a.outcome.shape == (30, 17)
    assert np.array_equal(a.keypoints, b.keypoints)
    with pytest.raises(InputError, match="rng"):
        synthesize_track(g[0], area[0])
    with pytest.raises(InputError, match="gt"):
        synthesize_track(g[0, :, :5], area[0], rng=np.random.default_rng(0))


def _video_gt(path, layout="posetrack"):
    """A per-frame GT: each image of the bundled sample as a 24-frame clip of its persons moving."""
    src = json.loads(VAL_GT.read_text())
    doc = {"images": [], "annotations": [], "categories": src["categories"]}
    rng = np.random.default_rng(0)
    persons = {}
    for a in src["annotations"]:
        if not a.get("iscrowd") and any(a["keypoints"][2::3]):
            persons[a["image_id"]] = persons.get(a["image_id"], 0) + 1
    for im in [im for im in src["images"] if persons.get(im["id"], 0) >= 2][:5]:
        anns = [a for a in src["annotations"] if a["image_id"] == im["id"] and not a.get("iscrowd")]
        for f in range(24):
            iid = im["id"] * 100 + f
            meta = {"vid_id": f"{im['id']:06d}", "frame_id": im["id"] * 10000 + f} if layout == "posetrack" \
                else {"clip_id": im["id"], "frame": f}
            doc["images"].append({**im, "id": iid, **meta})
            shift = rng.normal(0, 2, 2)
            for a in anns:
                kp = np.array(a["keypoints"], float).reshape(17, 3)
                kp[:, :2] += np.where(kp[:, 2:] > 0, shift, 0)
                doc["annotations"].append({**a, "id": a["id"] * 100 + f, "image_id": iid, "track_id": a["id"],
                                           "keypoints": kp.reshape(-1).tolist(),
                                           "bbox": [a["bbox"][0] + shift[0], a["bbox"][1] + shift[1], *a["bbox"][2:]]})
    path.write_text(json.dumps(doc))
    return path


@pytest.mark.parametrize("layout", ["posetrack", "clips"])
def test_sequences_through_the_cli(tmp_path, capsys, layout):
    gt_path = _video_gt(tmp_path / "gt.json", layout)
    out = tmp_path / "d"
    assert main(["synth", "--gt", str(gt_path), "--out", str(out), "--sequences", "--variants", "2"]) == 0
    recs = list(read_dataset(out))
    gt = load_ground_truth(gt_path)
    assert len(recs) == 2 * int((~gt.crowd & (gt.keypoints[..., 2] > 0).any(-1)).sum())
    assert {"track_id", "video_id", "frame", "planted", "labels"} <= set(recs[0])
    images = {im["id"]: im for im in json.loads(gt_path.read_text())["images"]}
    key = ("vid_id", "frame_id") if layout == "posetrack" else ("clip_id", "frame")
    assert all((r["video_id"], r["frame"]) == tuple(images[r["image_id"]][k] for k in key) for r in recs)
    # A swap's anchor is another person of the same frame, and the point is within KS 0.5 of that joint.
    by_id = {int(a): i for i, a in enumerate(gt.ids)}
    swaps = 0
    for r in recs:
        for j, (p, (aid, aj)) in enumerate(zip(r["planted"], r["anchors"])):
            if p == "swap":
                swaps += 1
                o = by_id[aid]
                assert aid != r["annotation_id"] and gt.image_ids[o] == r["image_id"]
                d2 = ((r["keypoints"][j, :2] - gt.keypoints[o, aj, :2]) ** 2).sum()
                assert np.exp(-d2 / (2 * gt.areas[o] * (2 * SIGMAS[aj]) ** 2)) >= 0.5
            elif p is not None:
                assert aid == r["annotation_id"]
    assert swaps > 5
    assert "person-frame" in capsys.readouterr().out
    # What was planted is what the classifier (diagnose's rule, against every person of the frame) finds.
    pairs = [(p, lab) for r in recs for p, lab in zip(r["planted"], r["labels"]) if p is not None]
    assert len(pairs) > 800 and np.mean([p == lab for p, lab in pairs]) >= 0.99
    m = read_manifest(out)
    assert regenerate_shard(gt_path, out, 0, 1) == (out / m["shards"][1]["file"]).read_bytes()
    # fit-sequences measures the generated inputs as it would an estimator's.
    res = tmp_path / "res.json"
    res.write_text(json.dumps([{"image_id": r["image_id"], "track_id": r["track_id"], "category_id": 1,
                                "keypoints": r["keypoints"].reshape(-1).tolist(), "score": r["score"]}
                               for r in recs if r["variant"] == 0]))
    assert main(["synth", "fit-sequences", "--gt", str(gt_path), "--results", str(res),
                 "--out", str(tmp_path / "p.json")]) == 0
    params = SequenceParams.from_dict(json.loads((tmp_path / "p.json").read_text()))
    assert 0.5 < params.jitter_rho < 1


def test_fit_sequences_recovers_parameters():
    """Generated tracks fitted back: durations and jitter correlation near the parameters given."""
    params = SequenceParams({"inversion": 2.0, "swap": 3.0, "miss": 5.0}, 0.6)
    g, area = _walking_track(60, n=40, seed=1)
    res = synthesize_tracks(g, area, params, np.random.default_rng(5))
    images, anns, results = [], [], []
    for n in range(g.shape[0]):
        for t in range(g.shape[1]):
            iid = n * 1000 + t
            images.append({"id": iid, "vid_id": n, "frame_id": t, "width": 1000, "height": 1000})
            anns.append({"id": iid, "image_id": iid, "track_id": n, "category_id": 1, "iscrowd": 0,
                         "keypoints": g[n, t].reshape(-1).tolist(), "bbox": [0, 0, 10, 10], "area": float(area[n, t])})
            results.append({"image_id": iid, "track_id": n, "category_id": 1, "score": 1.0,
                            "keypoints": res.keypoints[n, t].reshape(-1).tolist()})
    from posefix.synth.cocoio import _ground_truth
    fitted, measured = fit_sequences(_ground_truth({"images": images, "annotations": anns}, "gt"), results)
    assert abs(fitted.jitter_rho - 0.6) < 0.06
    # Runs cut by the track's ends are shorter: the fitted mean is within a frame of the parameter.
    assert abs(fitted.durations["miss"] - 5.0) < 1.5 and measured["runs"]["miss"] > 50


def run(*args):
    return subprocess.run([sys.executable, "-m", "posefix", *args], capture_output=True, text=True, timeout=120,
                          check=False)


@pytest.mark.parametrize("extra,field", [
    (["--variants", "0"], "--variants"),
    (["--severity", "-1"], "--severity"),
    (["--severity-miss", "nan"], "--severity-miss"),
    (["--variants", "2", "--labels", "x.json"], "--labels"),
    (["--sequences"], "images[0]"),
    (["--variants", "2", "--sequence-params", "p.json"], "--sequence-params"),
    (["--block-persons", "0"], "--block-persons"),
])
def test_bad_arguments_are_one_line_errors(tmp_path, extra, field):
    r = run("synth", "--gt", str(VAL_GT), "--out", str(tmp_path / "d"), *extra)
    assert r.returncode != 0 and field in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "d" / "manifest.json").exists()


def test_other_parameters_on_an_existing_dataset_are_refused(tmp_path):
    assert main(["synth", "--gt", str(VAL_GT), "--out", str(tmp_path / "d"), "--variants", "1"]) == 0
    r = run("synth", "--gt", str(VAL_GT), "--out", str(tmp_path / "d"), "--variants", "1", "--seed", "9")
    assert r.returncode != 0 and "seed" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    (tmp_path / "f.json").write_text("{}")
    r = run("synth", "--gt", str(VAL_GT), "--out", str(tmp_path / "f.json"), "--variants", "1")
    assert r.returncode != 0 and "not a directory" in r.stderr


def test_shards_are_gzip_json_lines_of_coco_results(tmp_path):
    write_dataset(VAL_GT, tmp_path / "d", 1, seed=0)
    lines = gzip.decompress((tmp_path / "d" / "shard-00000-v000.jsonl.gz").read_bytes()).splitlines()
    rec = json.loads(lines[0])
    assert rec["category_id"] == 1 and len(rec["keypoints"]) == 51 and 0 < rec["score"] <= 1


def test_more_variants_extend_a_dataset(tmp_path):
    write_dataset(TRAIN_GT, tmp_path / "d", 2, seed=1, block_persons=60)
    first = shard_bytes(tmp_path / "d")
    m = write_dataset(TRAIN_GT, tmp_path / "d", 3, seed=1, block_persons=60)
    write_dataset(TRAIN_GT, tmp_path / "ref", 3, seed=1, block_persons=60)
    assert shard_bytes(tmp_path / "d") == shard_bytes(tmp_path / "ref") and m["complete"] and m["variants"] == 3
    assert all(shard_bytes(tmp_path / "d")[k] == v for k, v in first.items())


def test_reader_selects_variants_and_checks_shards(tmp_path):
    write_dataset(VAL_GT, tmp_path / "d", 3, seed=0)
    assert {r["variant"] for r in read_dataset(tmp_path / "d", variants={1})} == {1}
    m = read_manifest(tmp_path / "d")
    shard = tmp_path / "d" / m["shards"][0]["file"]
    data = bytearray(shard.read_bytes())
    data[-12] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(InputError, match="SHA-256"):
        list(read_dataset(tmp_path / "d", check=True))
    with pytest.raises(InputError, match="damaged"):
        list(read_dataset(tmp_path / "d"))
    with pytest.raises(InputError, match="manifest"):
        list(read_dataset(tmp_path))
