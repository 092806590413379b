"""The pose search under attack: bounded k and replies built off the serving loop, k beyond what an approximate
index probes, absurd but finite queries, hostile index files (sizes, compression, values, ids, damaged faiss
blobs) and the image paths an index stores (docs/reliability.md)."""
import asyncio
import io
import json
import threading
import zipfile

import grpc
import numpy as np
import pytest

from posefix._proto import pb2, pb2_grpc
from posefix.cli import main
from posefix.errors import InputError
from posefix.search import PoseIndex
from posefix.serve import create_server

from .conftest import IMAGE_785, RESULTS
from .test_search import random_poses

TIMEOUT = 20


def _one_error_line(capsys, argv) -> str:
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and err.startswith("posefix: error: "), (argv, rc, err)
    return err


@pytest.fixture(scope="module")
def ivf():
    """An approximate index of 3,000 random poses (54 inverted lists)."""
    return PoseIndex.build(random_poses(np.random.default_rng(5), 3000), method="ivf")


def _brute(index, query, k):
    d = np.array([index.search(query, len(index), exact=True).distances[0]])[0]
    return d[:k]


# 4. k beyond what the approximate index probes.

def test_k_beyond_the_approximate_candidates_ranks_every_pose(ivf):
    rng = np.random.default_rng(6)
    queries = random_poses(rng, 3)
    for k, nprobe, candidates in ((2000, 32, 30), (100, 1, 1), (1, 1, 30)):
        ivf.nprobe, ivf.candidates = nprobe, candidates  # 1 list probed: about 55 poses, fewer than 100
        got = ivf.search(queries, k)
        exact = ivf.search(queries, k, exact=True)
        assert got.rows.shape == (3, k) and np.isfinite(got.distances).all()
        assert (np.diff(got.distances, axis=1) >= 0).all()
        if k > 1:  # too few candidates: every pose is ranked, so the answer is the exact one
            np.testing.assert_array_equal(got.rows, exact.rows)
    ivf.nprobe, ivf.candidates = 32, 30


# 5. Finite but absurd queries give finite distances, the same as the query scaled down.

def test_a_finite_query_at_float64s_edge_gives_finite_distances(ivf):
    rng = np.random.default_rng(7)
    query = random_poses(rng, 1)
    huge = query.copy()
    huge[0, :, :2] *= 1e305 / np.abs(query[0, :, :2]).max()
    huge[0, 3:5, 0] = 1.7e308
    exact = PoseIndex.build(ivf.keypoints, method="exact")
    for index in (exact, ivf):
        for k in (1, 52):
            got = index.search(huge, k)
            assert np.isfinite(got.distances).all()
            small = huge.copy()
            small[..., :2] /= 1e300  # the same pose, smaller: the distance ignores size
            np.testing.assert_allclose(got.distances, index.search(small, k).distances, rtol=1e-4, atol=1e-5)


# 3 and 5 over gRPC: k bounded, the work off the loop, every reply finite.

@pytest.fixture(scope="module")
def loop():
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def _call(loop, port, method, request):
    async def go():
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            return await getattr(pb2_grpc.PoseRefinerStub(channel), method)(request, timeout=TIMEOUT)
    return loop.run_until_complete(go())


def _query(pose, **fields):
    return pb2.SearchPosesRequest(format=pb2.KEYPOINT_FORMAT_COCO_17, query=pb2.Person(
        keypoints=[pb2.Keypoint(x=x, y=y, score=s) for x, y, s in pose.tolist()]), **fields)


def test_search_poses_bounds_k_answers_finitely_and_works_off_the_loop(loop, refiner, monkeypatch):
    import posefix.serve.search as served

    rng = np.random.default_rng(8)
    index = PoseIndex.build(random_poses(rng, 1500), method="exact")
    threads = []
    answer = served._answer

    def recording(*args):
        threads.append(threading.current_thread())
        return answer(*args)

    monkeypatch.setattr(served, "_answer", recording)

    async def start():
        handle = create_server(refiner, "127.0.0.1", 0, index=index)
        await handle.start()
        return handle
    handle = loop.run_until_complete(start())
    try:
        query = random_poses(rng, 1)[0]
        with pytest.raises(grpc.RpcError) as err:
            _call(loop, handle.port, "SearchPoses", _query(query, k=1001))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.details().startswith("k: 1001 exceeds the limit of 1000"), err.value.details()
        huge = query.copy()
        huge[3:5, 0] = 1.7e308
        huge[3:5, 2] = 0.9
        for k in (1, 52, 1000):
            reply = _call(loop, handle.port, "SearchPoses", _query(huge, k=k))
            assert len(reply.matches) == k
            numbers = [m.distance for m in reply.matches] + [v for m in reply.matches for p in m.keypoints
                                                            for v in (p.x, p.y, p.score)]
            assert np.isfinite(numbers).all()
        assert threads and all(t is not threading.main_thread() for t in threads)
    finally:
        loop.run_until_complete(handle.stop(grace_s=1.0))


# 6. Hostile index files: one line naming the file and the field; loadable values never break a search.

def _arrays(path) -> dict:
    with np.load(path, allow_pickle=False) as z:
        return {name: z[name] for name in z.files}


def _write(path, arrays, compress=False, raw=None):
    """An .npz of ``arrays`` (members named NAME.npy); ``raw``: {name: bytes} members written as given."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED) as z:
        for name, value in arrays.items():
            member = io.BytesIO()
            np.lib.format.write_array(member, np.asarray(value), allow_pickle=False)
            z.writestr(name + ".npy", member.getvalue())
        for name, data in (raw or {}).items():
            z.writestr(name + ".npy", data)
    path.write_bytes(buffer.getvalue())


def test_hostile_index_files_are_one_line_naming_the_file_and_field(tmp_path, ivf, capsys):
    good = tmp_path / "good.index"
    ivf.save(good)
    a = _arrays(good)
    query = tmp_path / "query.json"
    query.write_text(json.dumps(json.loads(RESULTS.read_text())[:1]))
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f8", "fortran_order": False,
                                                  "shape": (10 ** 12, 17, 3)})
    ids = a["ann"].copy()
    cases = {
        "a declared shape of 10^12 x 17 x 3": ({k: v for k, v in a.items() if k != "keypoints"},
                                               {"keypoints": header.getvalue() + b"\0" * 64}, "keypoints"),
        "a NaN template": ({**a, "template": np.full((17, 2), np.nan, np.float32)}, None, "template"),
        "nprobe -1": ({**a, "nprobe": np.array(-1)}, None, "nprobe"),
        "NaN boxes": ({**a, "boxes": np.where(np.arange(len(a["boxes"]))[:, None] == 5, np.nan, a["boxes"])},
                      None, "boxes[5, 0]"),
        "repeated ids": ({**a, "ids": np.zeros_like(a["ids"])}, None, "ids[1]"),
        "an object array": ({**a, "files": np.array([None], dtype=object)}, None, "--index"),
    }
    for name, (arrays, raw, field) in cases.items():
        bad = tmp_path / "bad.index"
        if "object" in name:
            member = io.BytesIO()
            np.lib.format.write_array(member, np.array([1, 2]), allow_pickle=False)
            data = member.getvalue().replace(b"'<i8'", b"'|O' ")
            arrays = {k: v for k, v in arrays.items() if k != "files"}
            raw = {"files": data}
        _write(bad, arrays, raw=raw)
        err = _one_error_line(capsys, ["search", "--index", bad, "--query", query])
        assert str(bad) in err and f"--index: {field}" in err or (field == "--index" and "--index: " in err), \
            (name, err)
    # Members compressed (a few MB that could inflate to GB) are refused before inflating.
    big = tmp_path / "bomb.index"
    _write(big, {**a, "keypoints": np.zeros((200_000, 17, 3))}, compress=True)
    assert big.stat().st_size < 2_000_000
    assert "compressed" in _one_error_line(capsys, ["search", "--index", big, "--query", query])
    # Corrupted ids inside the faiss blob: found by checking every inverted list.
    blob = bytearray(ids.tobytes())
    import faiss

    ann = PoseIndex.load(good)._ann  # kept alive while its lists are read
    sizes = [ann.invlists.list_size(i) for i in range(ann.nlist)]
    i = int(np.argmax(sizes))
    list_ids = faiss.rev_swig_ptr(ann.invlists.get_ids(i), sizes[i]).copy()
    where = bytes(blob).find(list_ids[:4].astype(np.int64).tobytes())
    assert where > 0
    blob[where:where + 8] = np.int64(10 ** 9).tobytes()
    bad = tmp_path / "ids.index"
    _write(bad, {**a, "ann": np.frombuffer(bytes(blob), np.uint8)})
    assert "--index: ann: " in _one_error_line(capsys, ["search", "--index", bad, "--query", query])


def test_damaged_faiss_blobs_load_whole_or_are_refused(tmp_path, ivf):
    good = tmp_path / "good.index"
    ivf.save(good)
    a = _arrays(good)
    rng = np.random.default_rng(9)
    query = random_poses(rng, 1)
    refused = 0
    for trial in range(60):
        blob = a["ann"].copy()
        at = rng.integers(0, len(blob), size=rng.integers(1, 8))
        blob[at] = rng.integers(0, 256, size=len(at), dtype=np.uint8)
        if trial % 4 == 0:
            blob = blob[: rng.integers(1, len(blob))]
        bad = tmp_path / f"bad{trial}.index"
        _write(bad, {**a, "ann": blob})
        try:
            index = PoseIndex.load(bad)
        except InputError as e:
            assert e.field.startswith("--index") and e.source == str(bad)
            refused += 1
            continue
        got = index.search(query, 5)  # loaded: it searches, finitely
        assert got.rows.shape == (1, 5) and np.isfinite(got.distances).all()
        assert ((got.rows >= 0) & (got.rows < len(index))).all()
    assert refused > 0


def test_an_index_with_huge_finite_keypoints_searches_finitely(tmp_path, ivf):
    a = _arrays(_saved(tmp_path, ivf))
    kp = a["keypoints"].copy()
    kp[:10, :, :2] = 1e308
    bad = tmp_path / "huge.index"
    _write(bad, {**a, "keypoints": kp})
    index = PoseIndex.load(bad)
    got = index.search(random_poses(np.random.default_rng(1), 2), 20, exact=True)
    assert np.isfinite(got.distances).all()


def _saved(tmp_path, index):
    path = tmp_path / "index.index"
    index.save(path)
    return path


# 7. The image paths an index stores are confined like every other image name.

def test_the_sheet_reads_indexed_images_only_inside_images(tmp_path, capsys, monkeypatch):
    import posefix.images

    index = tmp_path / "poses.index"
    results = json.loads(RESULTS.read_text())
    (tmp_path / "r.json").write_text(json.dumps(results))
    assert main(["index", "build", "--results", str(tmp_path / "r.json"), "--images", str(IMAGE_785.parent),
                 "--out", str(index)]) == 0
    query = tmp_path / "q.json"
    query.write_text(json.dumps(results[:1]))
    read = []
    decode = posefix.images.decode
    monkeypatch.setattr(posefix.images, "decode", lambda path, *a, **k: read.append(str(path)) or decode(path, *a, **k))
    other = tmp_path / "elsewhere"
    other.mkdir()
    for extra, reads in (([], False), (["--images", str(other)], False),
                         (["--images", str(IMAGE_785.parent)], True), (["--allow-outside-images"], True)):
        read.clear()
        capsys.readouterr()
        assert main(["search", "--index", str(index), "--query", str(query), "-k", "3",
                     "--sheet", str(tmp_path / "sheet.png"), *extra]) == 0
        err = capsys.readouterr().err
        assert any(r.startswith(str(IMAGE_785.parent.resolve())) for r in read) == reads, (extra, read)
        assert ("outside --images" in err) != reads, err
