"""Pose similarity search: the embedding and the distance against plain per-pose and per-pair loops on random
poses, exact and approximate search, the index file (versioned, atomic, never unpickled), the index and search
commands with their contact sheet, and SearchPoses over gRPC (as a pose, or refined first on an image)."""
import asyncio
import itertools
import json
import math
import sys

import grpc
import numpy as np
import pytest

from posefix._proto import pb2, pb2_grpc
from posefix.cli import main
from posefix.errors import InputError, MissingExtra
from posefix.images import decode
from posefix.keypoints import NAMES, SIGMAS
from posefix.search import MISSING_DISTANCE, VERSION, PoseIndex, distances_to, embed, mirror, pose_distance
from posefix.search_cli import CELL, LABEL
from posefix.serve import create_server

from .conftest import FIGURE, IMAGE_785, RESULTS, VAL_GT

TIMEOUT = 10
LEFT_RIGHT = [NAMES.index(n.replace("left", "right")) if "left" in n else
              NAMES.index(n.replace("right", "left")) if "right" in n else j for j, n in enumerate(NAMES)]


def random_poses(rng, n, missing=0.2, low=0.05):
    """n poses: the figure scaled, moved and bent at random, some joints absent (score 0, arbitrary x, y)."""
    h = rng.uniform(50, 400, (n, 1, 1))
    kp = np.zeros((n, 17, 3))
    kp[..., :2] = (FIGURE + rng.normal(0, 0.08, (n, 17, 2))) * h + rng.uniform(0, 800, (n, 1, 2))
    kp[..., 2] = np.where(rng.random((n, 17)) < missing, 0.0, rng.uniform(low, 1.0, (n, 17)))
    kp[kp[..., 2] == 0, :2] = rng.uniform(-1e3, 1e3, (int((kp[..., 2] == 0).sum()), 2))
    return kp


# Plain references, one pose or one pair at a time.

def embed_one(pose, rotate=False):
    pts = [(x, y) for x, y, s in pose if s > 0]
    cx = sum(p[0] for p in pts) / len(pts)
    cy = sum(p[1] for p in pts) / len(pts)
    r = math.sqrt(sum((p[0] - cx) ** 2 + (p[1] - cy) ** 2 for p in pts) / len(pts)) or 1.0
    xy = [((x - cx) / r, (y - cy) / r) if s > 0 else (0.0, 0.0) for x, y, s in pose]
    if rotate and all(pose[j][2] > 0 for j in (5, 6, 11, 12)):
        sx, sy = ((xy[5][0] + xy[6][0]) / 2 - (xy[11][0] + xy[12][0]) / 2,
                  (xy[5][1] + xy[6][1]) / 2 - (xy[11][1] + xy[12][1]) / 2)
        a = math.atan2(sx, -sy)
        xy = [(math.cos(-a) * x - math.sin(-a) * y, math.sin(-a) * x + math.cos(-a) * y) for x, y in xy]
    w = [min(max(s, 0.0), 1.0) if s > 0 else 0.0 for _, _, s in pose]
    return xy, w


def renormalised(xy, common):
    pts = [xy[k] for k in common]
    cx, cy = sum(p[0] for p in pts) / len(pts), sum(p[1] for p in pts) / len(pts)
    r = math.sqrt(sum((p[0] - cx) ** 2 + (p[1] - cy) ** 2 for p in pts) / len(pts)) or 1.0
    return {k: ((xy[k][0] - cx) / r, (xy[k][1] - cy) / r) for k in common}


def distance_one(a, b):
    (xa, wa), (xb, wb) = a, b
    common = [k for k in range(17) if wa[k] > 0 and wb[k] > 0]
    if common:
        xa, xb = renormalised(xa, common), renormalised(xb, common)
    num = den = 0.0
    for k in range(17):
        if wa[k] == 0 and wb[k] == 0:
            continue
        d = math.dist(xa[k], xb[k]) if k in common else MISSING_DISTANCE
        num += (wa[k] + wb[k]) / 2 * d
        den += (wa[k] + wb[k]) / 2
    return num / den


@pytest.mark.parametrize("rotate", [False, True])
def test_embedding_and_distance_equal_a_plain_loop(rotate):
    rng = np.random.default_rng(1)
    a, b = random_poses(rng, 12), random_poses(rng, 30)
    ea, eb = embed(a, rotate), embed(b, rotate)
    for i in range(len(a)):
        xy, w = embed_one(a[i].tolist(), rotate)
        np.testing.assert_allclose(ea.xy[i], xy, atol=1e-5)
        np.testing.assert_allclose(ea.weight[i], w, atol=1e-6)
    got = pose_distance(ea[:, None], eb[None])
    ref = [[distance_one(embed_one(p.tolist(), rotate), embed_one(q.tolist(), rotate)) for q in b] for p in a]
    np.testing.assert_allclose(got, ref, atol=1e-5)
    np.testing.assert_allclose(distances_to(ea[0], eb), ref[0], atol=1e-5)


def test_the_embedding_ignores_place_size_and_absent_joints_and_rotation_on_request():
    rng = np.random.default_rng(2)
    kp = random_poses(rng, 20)
    moved = kp.copy()
    moved[..., :2] = kp[..., :2] * 3.7 + (-250, 40)
    moved[kp[..., 2] == 0, :2] = 0.0  # where an absent joint is said to be does not matter
    assert np.abs(pose_distance(embed(kp), embed(moved))).max() < 1e-5
    angle = 0.6
    rot = kp.copy()
    c, s = math.cos(angle), math.sin(angle)
    rot[..., 0], rot[..., 1] = c * kp[..., 0] - s * kp[..., 1], s * kp[..., 0] + c * kp[..., 1]
    full = kp[:, [5, 6, 11, 12], 2].min(-1) > 0
    assert pose_distance(embed(kp), embed(rot))[full].min() > 0.1
    assert np.abs(pose_distance(embed(kp, True), embed(rot, True))[full]).max() < 1e-5
    # A joint one pose lacks costs MISSING_DISTANCE at its weight (here 1/2 of 16.5), and moves nothing else.
    one = kp[:1].copy()
    one[0, :, 2] = 1.0
    less = one.copy()
    less[0, 9, 2] = 0.0
    assert pose_distance(embed(one), embed(less))[0] == pytest.approx(0.5 * MISSING_DISTANCE / 16.5, abs=1e-6)


def test_mirror_is_an_involution_that_swaps_left_and_right():
    kp = random_poses(np.random.default_rng(3), 5)
    m = mirror(kp)
    np.testing.assert_array_equal(m[:, :, 0], -kp[:, LEFT_RIGHT, 0])
    np.testing.assert_array_equal(mirror(m), kp)
    assert np.array_equal(SIGMAS, SIGMAS[LEFT_RIGHT])  # partners are alike, so a mirror image is a fair match


@pytest.fixture(scope="module")
def poses():
    return random_poses(np.random.default_rng(4), 1000)


def brute_force(poses, queries, k, mirror_too=False):
    e = embed(poses)
    rows, dists = [], []
    for q in queries:
        d = distances_to(embed(q[None])[0], e)
        if mirror_too:
            d = np.minimum(d, distances_to(embed(mirror(q[None]))[0], e))
        order = np.lexsort((np.arange(len(d)), d))[:k]
        rows.append(order)
        dists.append(d[order])
    return np.array(rows), np.array(dists)


def test_exact_search_ranks_every_pose_and_finds_mirror_images(poses):
    index = PoseIndex.build(poses, method="exact")
    queries = poses[:20].copy()
    queries[..., :2] = queries[..., :2] * 0.5 + 13
    m = index.search(queries, 7)
    rows, dists = brute_force(poses, queries, 7)
    np.testing.assert_array_equal(m.rows, rows)
    np.testing.assert_allclose(m.distances, dists, atol=1e-6)
    assert (m.rows[:, 0] == np.arange(20)).all() and np.abs(m.distances[:, 0]).max() < 1e-5
    flipped = mirror(poses[:20])
    plain = index.search(flipped, 1)
    both = index.search(flipped, 1, mirror_too=True)
    assert (both.rows[:, 0] == np.arange(20)).all() and both.mirrored[:, 0].all()
    assert (plain.rows[:, 0] != np.arange(20)).mean() > 0.5 and not plain.mirrored.any()
    rows, dists = brute_force(poses, flipped, 1, mirror_too=True)
    np.testing.assert_allclose(both.distances, dists, atol=1e-6)


def test_the_approximate_index_recalls_the_exact_neighbours():
    rng = np.random.default_rng(5)
    poses = random_poses(rng, 2000, missing=0.05, low=0.5)  # as refined poses are: few joints absent, most sure
    exact = PoseIndex.build(poses, method="exact")
    approx = PoseIndex.build(poses, method="ivf")
    queries = random_poses(rng, 50, missing=0.05, low=0.5)
    a, e = approx.search(queries, 10), exact.search(queries, 10)
    recall = np.mean([len(set(x) & set(y)) / 10 for x, y in zip(a.rows, e.rows)])
    assert recall >= 0.9, recall
    assert (a.distances >= e.distances - 1e-6).all()  # never nearer than the truth: the same distance, ranked


def test_bad_queries_and_k_name_their_field(poses):
    index = PoseIndex.build(poses[:50])
    for k in (0, -1, 51):
        with pytest.raises(InputError, match="^k: "):
            index.search(poses[:1], k)
    with pytest.raises(InputError, match=r"^query: must be poses of shape \(N, 17, 3\)"):
        index.search(np.zeros((1, 18, 3)), 5)
    with pytest.raises(InputError, match=r"^query\[0\].keypoints: has no present joint"):
        index.search(np.zeros((1, 17, 3)), 5)
    lone = np.zeros((2, 17, 3))
    lone[0, 3] = (10, 10, 0.9)  # one joint: indexed, unscaled; no joint: at MISSING_DISTANCE from everything
    index.add(lone)
    assert index.search(lone[:1], 1).rows[0, 0] == 50
    np.testing.assert_allclose(distances_to(embed(poses[:3])[0], index.embedding)[51], MISSING_DISTANCE)
    with pytest.raises(InputError, match=r"^poses\[0\].id: pose id 3 is already"):
        index.add(poses[:1], ids=[3])
    assert len(index) == 52 and len(index.embedding) == 52


def test_the_index_file_round_trips_and_refuses_other_versions_and_corrupt_files(tmp_path, poses):
    for method in ("exact", "ivf"):
        index = PoseIndex.build(poses, image_ids=np.arange(len(poses)) // 3, method=method, rotate=True,
                                files=[f"/images/{i // 3}.jpg" for i in range(len(poses))])
        path = tmp_path / f"{method}.index"
        index.save(path)
        back = PoseIndex.load(path)
        assert (back.method, back.rotate, back.files) == (method, True, index.files)
        for name in ("keypoints", "ids", "image_ids", "boxes", "scores", "file_index"):
            np.testing.assert_array_equal(getattr(back, name), getattr(index, name))
        np.testing.assert_array_equal(back.search(poses[:5], 5).rows, index.search(poses[:5], 5).rows)
    good = (tmp_path / "exact.index").read_bytes()
    with np.load(tmp_path / "exact.index") as z:
        arrays = {n: z[n] for n in z.files}
    cases = {"truncated": good[: len(good) // 2], "noise": bytes(range(256)) * 8, "empty": b""}
    for name, changes in {"other_version": {"version": np.array(VERSION + 1)}, "foreign": {"format": np.array("x")},
                          "bad_shape": {"ids": np.zeros(3, np.int64)},
                          "pickled": {"keypoints": np.array([{"a": 1}], dtype=object)}}.items():
        path = tmp_path / f"{name}.npz"
        with open(path, "wb") as f:
            np.savez(f, **{**arrays, **changes})
        cases[name] = path.read_bytes()
    for name, data in cases.items():
        path = tmp_path / f"{name}.index"
        path.write_bytes(data)
        with pytest.raises(InputError, match=r"^.*--index: ") as err:
            PoseIndex.load(path)
        if name == "other_version":
            assert f"version {VERSION + 1}; this posefix reads version {VERSION}" in str(err.value)
        assert path.read_bytes() == data


def test_the_approximate_index_without_faiss_names_the_extra(monkeypatch, poses):
    monkeypatch.setitem(sys.modules, "faiss", None)
    with pytest.raises(MissingExtra,
                       match=r"^the approximate pose index needs the search extra: pip install 'posefix\[search\]'$"):
        PoseIndex.build(poses, method="ivf")
    assert PoseIndex.build(poses[:100], method="auto").search(poses[:1], 1).rows[0, 0] == 0


# The commands.

def _results(n=None):
    results = json.loads(RESULTS.read_text())
    return results[:n] if n else results


def test_index_build_add_and_search_with_a_contact_sheet(tmp_path, capsys):
    images = IMAGE_785.parent
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    results = _results()
    first.write_text(json.dumps(results[:40]))
    second.write_text(json.dumps(results[40:]))
    index = tmp_path / "poses.index"
    assert main(["index", "build", "--results", str(first), "--images", str(images), "--out", str(index)]) == 0
    assert main(["index", "add", "--index", str(index), "--results", str(second)]) == 0
    loaded = PoseIndex.load(index)
    assert len(loaded) == len(results) and list(loaded.ids) == list(range(len(results)))
    assert loaded.file_of(0).endswith(f"{results[0]['image_id']:012d}.jpg") and loaded.file_of(45) is None
    query = tmp_path / "query.json"
    q = [dict(results[3])]
    kp = np.array(q[0]["keypoints"]).reshape(17, 3)
    kp[:, :2] = kp[:, :2] * 1.5 + 20  # the same pose, larger, elsewhere
    q[0]["keypoints"] = kp.reshape(-1).tolist()
    query.write_text(json.dumps(q))
    capsys.readouterr()
    sheet = tmp_path / "sheet.png"
    assert main(["search", "--index", str(index), "--query", str(query), "-k", "5", "--sheet", str(sheet),
                 "--images", str(images)]) == 0
    answer = json.loads(capsys.readouterr().out)
    matches = answer["queries"][0]["matches"]
    assert matches[0]["id"] == 3 and matches[0]["distance"] < 1e-5 and matches[0]["image_id"] == results[3]["image_id"]
    assert [m["rank"] for m in matches] == [1, 2, 3, 4, 5]
    assert all(a["distance"] <= b["distance"] for a, b in itertools.pairwise(matches))
    picture = decode(sheet)
    (h, w), label, gap = CELL, LABEL, 6
    assert picture.shape[1:] == (h + label + 2 * gap, 6 * (w + gap) + gap)  # one row: the query and 5 matches
    assert picture.float().std() > 20  # photographs, not a blank page


def _cli_error(capsys, argv):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("posefix: error: ")
    return err


def test_bad_input_to_the_commands_is_one_line_and_changes_nothing(tmp_path, capsys):
    index = tmp_path / "poses.index"
    assert main(["index", "build", "--results", str(RESULTS), "--out", str(index)]) == 0
    before = index.read_bytes()
    bad = _results(3)
    bad[1]["keypoints"] = bad[1]["keypoints"][:48]
    bad_path = tmp_path / "bad.json"
    bad_path.write_text(json.dumps(bad))
    assert "results[1].keypoints" in _cli_error(capsys, ["index", "add", "--index", str(index), "--results",
                                                         str(bad_path)])
    assert "results[1].keypoints" in _cli_error(capsys, ["search", "--index", str(index), "--query", str(bad_path)])
    good = tmp_path / "q.json"
    good.write_text(json.dumps(_results(1)))
    for k in ("0", "-3", "1000"):
        assert "-k: " in _cli_error(capsys, ["search", "--index", str(index), "--query", str(good), "-k", k])
    other = tmp_path / "other.index"
    other.write_bytes(before[:100])
    assert "--index: " in _cli_error(capsys, ["search", "--index", str(other), "--query", str(good)])
    assert "--index: " in _cli_error(capsys, ["index", "add", "--index", str(other), "--results", str(good)])
    assert other.read_bytes() == before[:100] and index.read_bytes() == before
    assert list(tmp_path.glob(".*tmp")) == []


# The service.

@pytest.fixture(scope="module")
def loop():
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def _server(loop, refiner, index):
    async def start():
        handle = create_server(refiner, "127.0.0.1", 0, index=index)
        await handle.start()
        return handle
    return loop.run_until_complete(start())


def _call(loop, handle, method, request):
    async def go():
        async with grpc.aio.insecure_channel(f"127.0.0.1:{handle.port}") as channel:
            return await getattr(pb2_grpc.PoseRefinerStub(channel), method)(request, timeout=TIMEOUT)
    return loop.run_until_complete(go())


def _query(pose, **fields):
    return pb2.SearchPosesRequest(format=pb2.KEYPOINT_FORMAT_COCO_17, query=pb2.Person(
        keypoints=[pb2.Keypoint(x=x, y=y, score=s) for x, y, s in pose.tolist()]), **fields)


def test_search_poses_over_grpc(loop, refiner, poses_785):
    from posefix.search_cli import read_poses

    _, kp, ids, image_ids, boxes, _ = read_poses(RESULTS, "coco")
    index = PoseIndex.build(kp, ids, image_ids, boxes)
    handle = _server(loop, refiner, index)
    bare = _server(loop, refiner, None)
    try:
        info = _call(loop, handle, "GetModelInfo", pb2.GetModelInfoRequest())
        assert info.index_loaded and info.index_size == len(kp)
        assert not _call(loop, bare, "GetModelInfo", pb2.GetModelInfoRequest()).index_loaded
        answer = _call(loop, handle, "SearchPoses", _query(poses_785[2], k=4))
        expected = index.search(poses_785[2:3], 4)
        assert [m.pose_id for m in answer.matches] == index.ids[expected.rows[0]].tolist()
        np.testing.assert_allclose([m.distance for m in answer.matches], expected.distances[0], atol=1e-6)
        assert answer.matches[0].distance < 1e-6 and answer.matches[0].image_id == 785
        # With the image, the query is refined first, as RefinePose refines it.
        image = pb2.Image(encoded=IMAGE_785.read_bytes())
        answer = _call(loop, handle, "SearchPoses", _query(poses_785[2], k=3, image=image, mirror=True))
        xy, conf = refiner.refine([decode(IMAGE_785)], np.zeros(1, np.int64), poses_785[2:3])
        np.testing.assert_allclose([(k.x, k.y) for k in answer.query], xy[0], atol=1e-4)
        refined = np.concatenate([xy, conf[..., None]], -1)
        assert ([m.pose_id for m in answer.matches]
                == index.ids[index.search(refined, 3, mirror_too=True).rows[0]].tolist())
        for request, code, field in [
            (_query(poses_785[2][:16], k=3), grpc.StatusCode.INVALID_ARGUMENT, "query.keypoints"),
            (_query(poses_785[2], k=0), grpc.StatusCode.INVALID_ARGUMENT, "k"),
            (_query(poses_785[2], k=len(kp) + 1), grpc.StatusCode.INVALID_ARGUMENT, "k"),
            (_query(np.zeros((17, 3)), k=3), grpc.StatusCode.INVALID_ARGUMENT, "query.keypoints"),
            (pb2.SearchPosesRequest(format=pb2.KEYPOINT_FORMAT_COCO_17, k=3), grpc.StatusCode.INVALID_ARGUMENT,
             "query"),
            (_query(poses_785[2] + (1e5, 0, 0), k=3, image=image), grpc.StatusCode.INVALID_ARGUMENT,
             "query.keypoints[0]"),
        ]:
            with pytest.raises(grpc.RpcError) as err:
                _call(loop, handle, "SearchPoses", request)
            assert err.value.code() == code and err.value.details().startswith(f"{field}: "), err.value.details()
        with pytest.raises(grpc.RpcError) as err:
            _call(loop, bare, "SearchPoses", _query(poses_785[2], k=3))
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "--index" in err.value.details()
    finally:
        for h in (handle, bare):
            loop.run_until_complete(h.stop(grace_s=1.0))


def test_serve_refuses_a_bad_index_before_listening(tmp_path, checkpoint, capsys):
    bad = tmp_path / "bad.index"
    bad.write_bytes(b"PK\x03\x04 not really")
    err = _cli_error(capsys, ["serve", "--checkpoint", str(checkpoint), "--port", "0", "--index", str(bad)])
    assert "bad.index: index: " in err and "listening" not in capsys.readouterr().out


def test_the_sample_gt_persons_find_themselves():
    gt = json.loads(VAL_GT.read_text())
    kp = np.array([a["keypoints"] for a in gt["annotations"] if a.get("num_keypoints", 0) > 0],
                  float).reshape(-1, 17, 3)
    kp[..., 2] = (kp[..., 2] > 0).astype(float)
    index = PoseIndex.build(kp)
    assert (index.search(kp, 1).rows[:, 0] == np.arange(len(kp))).all()


# The benchmarks, on tiny settings; the retrieval-quality figures on the samples' real persons.

def test_bench_search_runs_and_reports_what_it_prints(tmp_path, capsys):
    from benchmarks import bench_search

    out = tmp_path / "bench.json"
    assert bench_search.main(["--sizes", "400", "--queries", "3", "--nprobe", "2", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["poses"], r["method"]) for r in rows] == [(400, "exact"), (400, "ivf nprobe 2")]
    assert rows[0]["recall_at_10"] == 1.0 and 0 <= rows[1]["recall_at_10"] <= 1
    assert all(0 < r["p50_ms"] <= r["p99_ms"] and r["build_s"] > 0 and r["file_bytes"] > 0 for r in rows)
    assert "ivf nprobe 2" in capsys.readouterr().out


def test_jittered_copies_of_the_samples_persons_find_the_original(tmp_path):
    from benchmarks import search_quality

    out = tmp_path / "quality.json"
    assert search_quality.main(["--json", str(out)]) == 0
    report = json.loads(out.read_text())
    rows = report["rows"]
    assert report["index_poses"] == 191
    for name in ("jitter, every joint", "jitter, published rates", "mirrored, --mirror"):
        assert rows[name]["all"]["rank1"] >= 0.95, (name, rows[name])
    assert rows["mirrored, without --mirror"]["all"]["rank1"] < 0.5
