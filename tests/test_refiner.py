"""The refinement engine: batching across images, flip test, and the results-level helpers."""
import json

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from posefix import SAMPLE_DIR
from posefix.cli import main
from posefix.errors import InputError
from posefix.images import coco_image_path, decode
from posefix.keypoints import PARTNER
from posefix.model import ModelConfig, PoseFixNet
from posefix.refine import refine_images
from posefix.refiner import Refiner
from posefix.synth.cocoio import load_ground_truth, load_results

from .conftest import refine_results

CFG = ModelConfig(backbone="resnet18", input_size=(128, 96), sigma=3.5, head_channels=32, input_prior=False)
GT = SAMPLE_DIR / "person_keypoints_val_sample.json"
RESULTS = SAMPLE_DIR / "topdown_keypoints_val4.json"


@pytest.fixture(scope="module")
def refiner():
    torch.manual_seed(0)
    model = PoseFixNet(CFG)
    with torch.no_grad():  # a refiner that is not the identity, so that the checks below can fail
        model.final.weight.normal_(std=0.5)
        model.confidence.weight.normal_(std=0.05)
    return Refiner(model, device="cpu", batch_size=8, output="raw")  # the correction itself, every joint


def _sample():
    gt = load_ground_truth(GT)
    results = load_results(RESULTS, gt)
    paths = {im["id"]: coco_image_path(SAMPLE_DIR / "images", im) for im in gt.doc["images"]}
    return gt, results, paths


def test_batching_across_images_equals_one_image_at_a_time(refiner):
    _, results, paths = _sample()
    together = refine_results(refiner, results, paths)
    for image_id in {r["image_id"] for r in results}:
        rows = [n for n, r in enumerate(results) if r["image_id"] == image_id]
        poses = np.array([results[n]["keypoints"] for n in rows]).reshape(-1, 17, 3)
        xy, conf = refiner.refine([decode(paths[image_id])], np.zeros(len(rows), dtype=int), poses)
        for k, n in enumerate(rows):
            got = np.array(together[n]["keypoints"]).reshape(17, 3)
            np.testing.assert_allclose(got[:, :2], xy[k], atol=1e-3)
            np.testing.assert_allclose(got[:, 2], conf[k], atol=1e-5)
    assert [r["image_id"] for r in together] == [r["image_id"] for r in results]
    assert all(t.get("center") == r.get("center") for t, r in zip(together, results))
    for t, r in zip(together, results):  # raw: the input's instance score × the mean confidence of its present joints
        present = np.array(r["keypoints"][2::3]) > 0
        conf = np.array(t["keypoints"][2::3])
        assert t["score"] == pytest.approx(r["score"] * conf[present].sum() / max(present.sum(), 1), rel=1e-12)


def test_prepared_crops_and_poses_equal_the_plain_way(refiner):
    """prepare() scales the crops to [0, 1] after sampling; the plain way scales each image first. Its crop
    poses are the input poses through each crop's inverse affine, and back() maps them home again."""
    from posefix import codec

    rng = np.random.default_rng(5)
    images = [torch.from_numpy(rng.integers(0, 256, (3, h, w), dtype=np.uint8)) for h, w in ((90, 130), (70, 60))]
    index = np.array([0, 1, 0])
    poses = np.concatenate([rng.uniform(5, 55, (3, 17, 2)), (rng.random((3, 17, 1)) > 0.3)], axis=-1)
    given = torch.as_tensor(poses)
    crops, kp_crop, affine, ok = refiner.crop(images, index, given, given)
    h, w = CFG.input_size
    for n, b in enumerate(index):
        plain = codec.warp_crops(images[b].double()[None] / 255, torch.zeros(1, dtype=torch.long), affine[n:n + 1],
                                 (h, w))
        np.testing.assert_allclose(crops[n].numpy(), plain[0].numpy(), atol=2e-5)  # float32 sampling grid
    present = poses[..., 2] > 0
    np.testing.assert_allclose(refiner.to_image(kp_crop[..., :2].double(), affine)[present], poses[..., :2][present],
                               atol=1e-3)
    assert ok.all()


def test_refine_images_reports_progress_and_keeps_order(refiner):
    _, results, paths = _sample()
    jobs, seen = [], []
    for image_id in sorted({r["image_id"] for r in results}):
        poses = np.array([r["keypoints"] for r in results if r["image_id"] == image_id]).reshape(-1, 17, 3)
        jobs.append((image_id, paths[image_id], poses))
    out = list(refine_images(refiner, jobs, workers=2, lookahead=2, progress=seen.append))
    assert [k for k, _, _ in out] == [k for k, _, _ in jobs]
    assert sum(seen) == sum(len(p) for _, _, p in jobs) and max(seen) <= refiner.batch_size + 32


def test_flip_test_equals_refining_the_mirrored_image(refiner):
    _, results, paths = _sample()
    image = decode(paths[785])
    poses = np.array([r["keypoints"] for r in results if r["image_id"] == 785][:3]).reshape(-1, 17, 3)
    plain_xy, plain_conf = refiner.refine([image], np.zeros(3, dtype=int), poses)
    width = image.shape[-1]
    mirrored = poses[:, PARTNER].copy()
    mirrored[..., 0] = width - 1 - mirrored[..., 0]
    m_xy, m_conf = refiner.refine([image.flip(-1)], np.zeros(3, dtype=int), mirrored)
    back = m_xy[:, PARTNER].copy()
    back[..., 0] = width - 1 - back[..., 0]
    flip = Refiner(refiner.model, device="cpu", batch_size=8, flip_test=True, output="raw")
    xy, conf = flip.refine([image], np.zeros(3, dtype=int), poses)
    np.testing.assert_allclose(xy, (plain_xy + back) / 2, atol=2e-2)
    np.testing.assert_allclose(conf, (plain_conf + m_conf[:, PARTNER]) / 2, atol=1e-3)
    assert np.abs(xy - plain_xy).max() > 0.5  # the flip test did change something


def test_missing_and_corrupt_images_are_named(refiner, tmp_path):
    _, results, paths = _sample()
    with pytest.raises(InputError, match="000000000785.jpg: image: file not found"):
        refine_results(refiner, results, {k: tmp_path / p.name for k, p in paths.items()})
    broken = tmp_path / "000000000785.jpg"
    broken.write_bytes(paths[785].read_bytes()[:2000])
    with pytest.raises(InputError, match="000000000785.jpg: image: cannot decode"):
        refine_results(refiner, [r for r in results if r["image_id"] == 785], {785: broken})


def test_eval_and_viz_commands(refiner, tmp_path, capsys):
    gt, results, paths = _sample()
    refined = tmp_path / "refined.json"
    refined.write_text(json.dumps(refine_results(refiner, results, paths)))
    table = tmp_path / "table.json"
    assert main(["eval", "--gt", str(GT), str(RESULTS), str(refined), "--json", str(table)]) == 0
    rows = json.loads(table.read_text())["rows"]
    from posefix.synth.diagnose import keypoint_ap

    assert rows[0]["AP"] == pytest.approx(keypoint_ap(gt, results))
    assert rows[1]["AP"] == pytest.approx(keypoint_ap(gt, json.loads(refined.read_text())))
    assert "refined.json" in capsys.readouterr().out
    out = tmp_path / "viz"
    assert main(["viz", "--images", str(SAMPLE_DIR / "images"), "--results", str(RESULTS), "--compare", str(refined),
                 "--out", str(out)]) == 0
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == 4
    picture = decode(pngs[0])
    original = decode(paths[785])
    assert picture.shape[2] == 2 * original.shape[2] + 8  # before | gap | after
    assert not torch.equal(picture[:, :, :original.shape[2]], original)  # something was drawn


def test_refine_images_fills_every_call_but_the_last(refiner):
    """Persons of consecutive images share calls, an image's persons split between two when needed; the
    results are those of refining each image alone, yielded in order."""
    rng = np.random.default_rng(2)
    picture = torch.from_numpy(rng.integers(0, 256, (3, 80, 100), dtype=np.uint8))
    counts = [3, 0, 11, 1, 20, 2, 0, 5]  # 42 persons; batch size 8
    jobs = [(f"im{n}", picture, np.concatenate([rng.uniform(10, 70, (c, 17, 2)), np.ones((c, 17, 1))], axis=-1))
            for n, c in enumerate(counts)]
    calls = []
    plain = refiner.refine

    def spy(images, index, poses, crop_poses=None, reductions=None):
        calls.append(len(poses))
        return plain(images, index, poses, crop_poses, reductions)

    refiner.refine = spy
    try:
        out = list(refine_images(refiner, iter(jobs), lookahead=2))
    finally:
        del refiner.refine
    assert calls == [8, 8, 8, 8, 8, 2]
    assert [key for key, _, _ in out] == [key for key, _, _ in jobs]
    for (_, xy, conf), (_, _, poses) in zip(out, jobs):
        alone_xy, alone_conf = refiner.refine([picture], np.zeros(len(poses), dtype=np.int64), poses)
        np.testing.assert_allclose(xy, alone_xy, atol=1e-3)
        np.testing.assert_allclose(conf, alone_conf, atol=1e-5)


class _Transfers(TorchDispatchMode):
    """Every operation that moves data between devices, or reads a value out of a tensor."""

    def __init__(self):
        super().__init__()
        self.log = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = {t.device.type for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        out = func(*args, **kwargs)
        outputs = {t.device.type for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)}
        if len(inputs) > 1 or (inputs and outputs and inputs != outputs):
            self.log.append((func.__name__, sorted(inputs), sorted(outputs), kwargs.get("non_blocking", False)))
        elif func.__name__.startswith("_local_scalar_dense") and inputs != {"cpu"}:
            self.log.append((func.__name__, sorted(inputs), [], False))
        return out


@pytest.mark.parametrize("flip_test", [False, True])
@pytest.mark.parametrize("index", [[0, 0, 1, 1, 1], [0, 1, 0, 1, 1]])
def test_the_device_is_only_given_work_until_the_results_come_back(flip_test, index):
    """Cropping, rendering and the model read nothing back from the device and copy to it only the used
    images, the affines and the poses, each asynchronously: on a GPU the host queues a whole batch without
    waiting. Checked on PyTorch's meta device (shapes without data), where any read of a value would raise
    and every copy to it is seen; the shapes, affines and refinable persons equal the CPU's."""
    model = PoseFixNet(CFG)
    rng = np.random.default_rng(0)
    images = [torch.from_numpy(rng.integers(0, 256, (3, h, w), dtype=np.uint8)) for h, w in ((120, 160), (90, 70))]
    images.append(torch.zeros(3, 10, 10, dtype=torch.uint8))  # an image without persons is not copied
    poses = torch.as_tensor(np.concatenate([rng.uniform(10, 60, (5, 17, 2)), np.ones((5, 17, 1))], -1))
    index = np.array(index)
    cpu = Refiner(model, device="cpu", flip_test=flip_test).crop(images, index, poses, poses)
    meta = Refiner(PoseFixNet(CFG), device="meta", flip_test=flip_test)
    with torch.no_grad(), _Transfers() as seen:
        crops, kp_crop, affine, ok = meta.crop(images, index, poses, poses)
        coords, conf = meta.infer(crops, kp_crop)
    assert crops.device.type == kp_crop.device.type == coords.device.type == conf.device.type == "meta"
    assert coords.shape == (5, 17, 2) and conf.shape == (5, 17)
    copies = [entry for entry in seen.log if entry[:3] == ("_to_copy.default", ["cpu"], ["meta"])]
    assert copies == seen.log  # no implicit transfer, no value read back
    assert all(non_blocking for *_, non_blocking in copies)
    consecutive = index.tolist() == sorted(index.tolist())
    assert len(copies) == 2 + 2 + (0 if consecutive else 2)  # images, affines + poses, indices of scattered persons
    assert crops.shape == cpu[0].shape and kp_crop.shape == cpu[1].shape
    torch.testing.assert_close(affine, cpu[2], rtol=0, atol=0)
    np.testing.assert_array_equal(ok, cpu[3])


def test_devices_that_cannot_be_used_are_named(tmp_path, capsys):
    from posefix.weights import export_weights
    missing = "cuda" if not torch.cuda.is_available() else f"cuda:{torch.cuda.device_count()}"
    weights = tmp_path / "model.safetensors"
    export_weights(PoseFixNet(CFG), weights, {})
    with pytest.raises(InputError, match="device"):
        Refiner.from_checkpoint(weights, device=missing)
    if not torch.cuda.is_available():  # the command line names the device in one line and writes nothing
        out = tmp_path / "out.json"
        code = main(["refine", "--checkpoint", str(weights), "--images", str(SAMPLE_DIR / "images"), "--input",
                     str(RESULTS), "--out", str(out), "--device", "cuda"])
        err = capsys.readouterr().err.strip()
        assert code != 0 and "--device" in err and len(err.splitlines()) == 1 and not out.exists()


def test_a_batch_without_persons_prepares_nothing(refiner):
    image = torch.zeros(3, 20, 30, dtype=torch.uint8)
    crops, kp_crop, affine, ok = refiner.crop([image], np.zeros(0, dtype=np.int64),
                                                 torch.zeros(0, 17, 3, dtype=torch.float64),
                                                 torch.zeros(0, 17, 3, dtype=torch.float64))
    assert crops.shape == (0, 3, *CFG.input_size) and kp_crop.shape == (0, 17, 3) and affine.shape == (0, 2, 3)
    assert ok.shape == (0,)
    xy, conf = refiner.refine([image], np.zeros(0, dtype=np.int64), np.zeros((0, 17, 3)))
    assert xy.shape == (0, 17, 2) and conf.shape == (0, 17)
