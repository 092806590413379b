"""``posefix refine --ray``: the same refinement as ``posefix refine``, through a local Ray cluster, and its faults.

One local Ray (2 CPUs) serves the module; each refinement starts its own pool of actors on it."""
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from posefix import SAMPLE_DIR
from posefix.cli import main
from posefix.refine import refine_images
from posefix.refiner import Refiner

from .conftest import VAL_GT, VAL_RESULTS

IMAGES = SAMPLE_DIR / "images"
ACTOR = "ray::MapWorker(MapBatches(_RefineBlock))"
needs_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                               reason="Ray is not installed (pip install 'posefix[ray]')")


@pytest.fixture(scope="module")
def cluster():
    import logging

    import ray

    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=128 * 2 ** 20, logging_level=logging.WARNING)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


def _parent(pid: int) -> int:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    return int(stat.rsplit(")", 1)[1].split()[1])


def _actor_pids(working: bool = False) -> list[int]:
    """The processes of this test run's refining actors, by the title Ray gives them: only descendants of this
    process (the Ray the cluster fixture started), never another run's on a shared machine. ``working``: only
    those past their constructor (whose title no longer ends in ``__init__``)."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if not entry.name.isdigit():
                continue
            title = (entry / "cmdline").read_bytes().rstrip(b"\0 ")
            if title.startswith(ACTOR.encode()) and not (working and title.endswith(b"__init__")):
                pid = int(entry.name)
                while pid > 1 and pid != os.getpid():
                    pid = _parent(pid)
                if pid == os.getpid():
                    pids.append(int(entry.name))
        except OSError:
            pass
    return pids


def _refine(*args) -> int:
    return main(["refine", "--quiet", *map(str, args)])


def _by_person(results: list) -> list:
    """Results sorted by image, then by the input keypoints' first joint (the persons' identity here)."""
    return sorted(results, key=lambda r: (r["image_id"], r.get("center", [0])[0], r["keypoints"][0]))


def _assert_same(got: list, want: list):
    assert len(got) == len(want)
    for g, w in zip(_by_person(got), _by_person(want)):
        assert {k: v for k, v in g.items() if k not in ("keypoints", "score")} == \
               {k: v for k, v in w.items() if k not in ("keypoints", "score")}
        np.testing.assert_allclose(g["keypoints"], w["keypoints"], rtol=1e-6, atol=1e-6)  # float32 rounding
        np.testing.assert_allclose(g["score"], w["score"], rtol=1e-6, atol=1e-6)


def _many_images(tmp_path: Path, copies: int) -> tuple[Path, Path]:
    """A COCO results file of the sample's GT persons on ``copies`` copies of each photograph (links)."""
    gt = json.loads(VAL_GT.read_text())
    files = {im["id"]: IMAGES / im["file_name"] for im in gt["images"]}
    images, results = tmp_path / "many", []
    images.mkdir()
    for c in range(copies):
        for image_id, file in files.items():
            new_id = c * 10 ** 7 + image_id
            os.symlink(file, images / f"{new_id:012d}.jpg")
            for a in gt["annotations"]:
                if a["image_id"] == image_id and a["num_keypoints"] > 0:
                    kp = np.array(a["keypoints"], dtype=np.float64).reshape(17, 3)
                    kp[:, 2] = np.where(kp[:, 2] > 0, 0.9, 0.0)
                    results.append({"image_id": new_id, "category_id": 1, "keypoints": kp.reshape(-1).tolist(),
                                    "score": 0.8})
    path = tmp_path / "many.json"
    path.write_text(json.dumps(results))
    return images, path


def test_without_ray_it_names_the_extra(tmp_path, checkpoint, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray fails as where it is not installed
    out = tmp_path / "out.json"
    assert _refine("--checkpoint", checkpoint, "--images", IMAGES, "--input", VAL_RESULTS, "--out", out, "--ray") == 2
    err = capsys.readouterr().err.strip()
    assert err == "posefix: error: refining on Ray needs the ray extra: pip install 'posefix[ray]'"
    assert not out.exists()
    assert _refine("--checkpoint", checkpoint, "--images", IMAGES, "--input", VAL_RESULTS, "--out", out,
                   "--actors", "2") == 2
    assert "--actors: only goes with --ray" in capsys.readouterr().err



def test_image_names_out_of_images_are_refused_for_a_uri_or_a_directory(tmp_path):
    """The images of ``posefix refine`` (with or without --ray): a name leading out of --images is refused by name,
    or with --skip-invalid left out and listed, unless --allow-outside-images."""

    from posefix.errors import InputError
    from posefix.offline import image_sources

    names = {1: "../x.jpg", 2: "/etc/y.jpg", 3: "a/../b.jpg", 4: "a/../../z.jpg", 5: "c/d.jpg"}
    coco = {k: {"id": k, "file_name": v} for k, v in names.items()}
    groups = {k: [k - 1] for k in [*names, 6]}
    for images in ("s3://bucket/val2017/", str(tmp_path)):
        with pytest.raises(InputError, match="^'../x.jpg': image: leads outside"):
            image_sources(images, groups, coco)
        skipped: list = []
        sources = image_sources(images, groups, coco, skipped=skipped)
        assert [k for k, _ in skipped] == [1, 2, 4] and all("leads outside" in m for _, m in skipped)
        assert sorted(sources) == [3, 5, 6]
        everything = image_sources(images, groups, coco, allow_outside=True)
        assert sorted(everything) == [1, 2, 3, 4, 5, 6]
        if images.startswith("s3://"):
            assert everything[5] == "s3://bucket/val2017/c/d.jpg"
            assert everything[6] == "s3://bucket/val2017/000000000006.jpg"
        else:
            assert everything[5] == tmp_path / "c/d.jpg" and everything[2] == Path("/etc/y.jpg")

@needs_ray
def test_same_output_as_refine_through_two_actors(tmp_path, checkpoint, cluster, capsys):
    want = tmp_path / "in_process.json"
    assert _refine("--checkpoint", checkpoint, "--images", IMAGES, "--input", VAL_RESULTS, "--out", want,
                   "--batch-size", "16", "--flip-test", "--choice-margin", "0") == 0
    out = tmp_path / "ray.json"
    assert _refine("--checkpoint", checkpoint, "--images", IMAGES, "--input", VAL_RESULTS, "--out", out,
                   "--batch-size", "16", "--flip-test", "--choice-margin", "0", "--ray", "--actors", "2",
                   "--shards", "3") == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert "persons/s" in line and "ray-00000-of-00003.json" in line
    assert not out.exists()
    shards = [json.loads(out.with_name(f"ray-{i:05d}-of-00003.json").read_text()) for i in range(3)]
    images = [{r["image_id"] for r in s} for s in shards]
    assert sum(map(len, images)) == len(set().union(*images)) == 4  # each image in one shard
    _assert_same([r for s in shards for r in s], json.loads(want.read_text()))


@needs_ray
def test_a_corrupt_image_is_named_and_the_rest_refined(tmp_path, checkpoint, cluster, capsys):
    images = tmp_path / "images"
    images.mkdir()
    results = json.loads(VAL_RESULTS.read_text())
    for image_id in {r["image_id"] for r in results}:
        (images / f"{image_id:012d}.jpg").write_bytes((IMAGES / f"{image_id:012d}.jpg").read_bytes())
    bad = images / "000000040083.jpg"
    bad.write_bytes(bad.read_bytes()[:400])  # cut short in its header
    want = tmp_path / "want.json"
    good = tmp_path / "good.json"
    good.write_text(json.dumps([r for r in results if r["image_id"] != 40083]))
    assert _refine("--checkpoint", checkpoint, "--images", IMAGES, "--input", good, "--out", want) == 0
    capsys.readouterr()
    out = tmp_path / "out.json"
    # Read by the workers through a URI, as from an object store.
    assert _refine("--checkpoint", checkpoint, "--images", bad.parent.as_uri(), "--input", VAL_RESULTS,
                   "--out", out, "--ray", "--actors", "1", "--skip-invalid") == 0
    printed = capsys.readouterr().out
    assert f"skipped 1 image that cannot be read (--skip-invalid), their persons left out: {bad.as_uri()}: image: " \
           in printed
    _assert_same(json.loads(out.read_text()), json.loads(want.read_text()))


@needs_ray
def test_a_killed_worker_its_blocks_run_again_every_person_once(tmp_path, checkpoint, cluster):
    from posefix.distributed import refine_images_ray
    from posefix.options import RefineOptions

    images, path = _many_images(tmp_path, copies=1)
    results = json.loads(path.read_text())
    groups: dict = {}
    for i, r in enumerate(results):
        groups.setdefault(r["image_id"], []).append(i)
    poses = np.array([r["keypoints"] for r in results]).reshape(-1, 17, 3)
    jobs = [(key, images / f"{key:012d}.jpg", poses[rows]) for key, rows in groups.items()]
    killed = []

    def kill_one(_):
        if not killed:
            pids = _actor_pids()
            assert pids
            os.kill(pids[0], signal.SIGKILL)
            killed.append(pids[0])

    got = list(refine_images_ray(checkpoint, jobs, RefineOptions(batch_size=8), actors=2, images_per_block=1,
                                 progress=kill_one, show_progress=False))
    assert killed
    assert sorted(key for key, _, _ in got) == sorted(groups)  # every image once
    want = {key: (xy, conf) for key, xy, conf in refine_images(Refiner.from_checkpoint(checkpoint, batch_size=8),
                                                               jobs)}
    for key, xy, conf in got:
        assert xy.shape == (len(groups[key]), 17, 2)
        np.testing.assert_allclose(xy, want[key][0], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(conf, want[key][1], rtol=0, atol=1e-6)


@needs_ray
def test_stopping_the_driver_leaves_no_output(tmp_path, checkpoint, cluster):
    images, path = _many_images(tmp_path, copies=20)
    out = tmp_path / "out.json"
    out.write_text("[]")  # an earlier output, which must stay as it was
    earlier = set(_actor_pids())
    # The driver takes SIGINT as a terminal's Ctrl-C gives it, even where this test runs in a background job
    # (which starts its children with SIGINT ignored, and Python then installs no KeyboardInterrupt handler).
    as_in_a_terminal = ("import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
                        "sys.argv[0] = 'posefix'; runpy.run_module('posefix', run_name='__main__')")
    proc = subprocess.Popen([sys.executable, "-c", as_in_a_terminal, "refine", "--checkpoint", str(checkpoint),
                             "--images", str(images), "--input", str(path), "--out", str(out), "--ray", cluster,
                             "--actors", "1", "--quiet",
                             "--allow-outside-images"],  # its images are links to the sample's
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stopped = []
    try:
        # A state, not a time: the driver is waiting for the results of an actor that cannot give them (stopped),
        # so it can be neither starting nor finishing when the signal comes, however loaded the machine is. Only
        # this driver's actors are stopped (the cluster may still hold earlier tests' actor processes), and only
        # once past their constructor: a driver waiting on an actor's construction does not see the signal.
        deadline = time.monotonic() + 300
        while not stopped and proc.poll() is None and time.monotonic() < deadline:
            for pid in set(_actor_pids(working=True)) - earlier:
                os.kill(pid, signal.SIGSTOP)
                stopped.append(pid)
            time.sleep(0.05)
        assert stopped and proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in stopped:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
    # Exit 130 with "posefix: interrupted"; where Ray's core worker has put SIGINT back to its default first,
    # the signal ends the process (-SIGINT). Either way nothing is written.
    assert proc.returncode in (130, -signal.SIGINT), err
    if proc.returncode == 130:
        assert err.strip().splitlines()[-1] == "posefix: interrupted"
    assert out.read_text() == "[]"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["many", "many.json", "out.json"]


def test_ray_options_give_actors_a_device_they_can_see():
    """An actor sees only the GPUs Ray gives it: --device cuda:N is "cuda" there with one GPU each; auto is
    decided on the driver (here without a GPU: the CPU, no GPUs asked for)."""
    import torch

    from posefix.distributed import actor_options
    from posefix.options import RefineOptions

    def got(device, num_gpus=None):
        options, gpus = actor_options(RefineOptions(device=device, batch_size=8), num_gpus)
        assert options.batch_size == 8  # the rest as given
        return options.device, gpus

    for device in ("cuda", "cuda:1"):
        assert got(device) == ("cuda", 1.0)
    assert got("cuda:1", 0.5)[1] == 0.5
    assert got("cpu") == ("cpu", 0.0)
    want = "cuda" if torch.cuda.is_available() else "cpu"
    assert got("auto") == (want, float(want == "cuda"))
