"""The CUDA paths, where a CUDA device is present (skipped elsewhere): the same refinements as on the CPU in
every precision and layout, a batch queued without one device synchronisation, and training steps with bf16
autocast and channels_last."""
import copy
import json

import numpy as np
import pytest
import torch

from posefix import SAMPLE_DIR
from posefix.config import load_config
from posefix.images import decode
from posefix.model import ModelConfig, PoseFixNet
from posefix.refine import refine_images
from posefix.refiner import Refiner
from posefix.train import train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CFG = ModelConfig(backbone="resnet18", input_size=(128, 96), sigma=3.5, head_channels=32)
IMAGE = SAMPLE_DIR / "images" / "000000000785.jpg"


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    net = PoseFixNet(CFG)
    with torch.no_grad():  # a refiner that moves joints, so equal numbers mean equal computation
        net.backbone[0].weight[:, 3:].normal_(std=0.05)
        torch.nn.init.normal_(net.final.weight, std=3.0)
        torch.nn.init.normal_(net.confidence.weight, std=0.2)
    return net


@pytest.fixture(scope="module")
def case():
    """Two real decoded images of different sizes and persons scattered over them."""
    rng = np.random.default_rng(0)
    big = decode(IMAGE)
    small = big[:, 40:300, 100:420].contiguous()
    poses = np.concatenate([rng.uniform(60, 250, (7, 17, 2)), rng.uniform(0.3, 1, (7, 17, 1))], axis=-1)
    return [big, small], np.array([0, 1, 0, 0, 1, 1, 0]), poses


@pytest.fixture
def no_tf32():
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.parametrize("options", [{}, {"channels_last": True}, {"flip_test": True}],
                         ids=["fp32", "channels_last", "flip"])
def test_cuda_refines_as_the_cpu_does(model, case, options, no_tf32):
    images, index, poses = case
    cpu_xy, cpu_conf = Refiner(copy.deepcopy(model), device="cpu", output="raw", **options).refine(images, index, poses)
    xy, conf = Refiner(copy.deepcopy(model), device="cuda", output="raw", **options).refine(images, index, poses)
    assert np.abs(cpu_xy - poses[..., :2]).max() > 1  # the model moves joints
    np.testing.assert_allclose(xy, cpu_xy, atol=0.01)
    np.testing.assert_allclose(conf, cpu_conf, atol=1e-3)


def test_cuda_bf16_is_the_fp32_answer_within_bf16_precision(model, case):
    images, index, poses = case
    fp32, _ = Refiner(copy.deepcopy(model), device="cuda", output="raw").refine(images, index, poses)
    bf16, _ = Refiner(copy.deepcopy(model), device="cuda", output="raw", precision="bf16",
                      channels_last=True).refine(images, index, poses)
    moved = np.abs(fp32 - poses[..., :2]).max()
    assert np.abs(bf16 - fp32).max() < 0.25 * moved


def test_a_batch_is_queued_without_a_device_sync(model, case):
    """From the host's poses to the model's output nothing waits for the GPU (pinned images, as the decoding
    threads stage them): torch's sync debug mode raises on any synchronising call."""
    images, index, poses = case
    refiner = Refiner(copy.deepcopy(model), device="cuda", flip_test=True, precision="bf16")
    staged = [refiner.stage(image) for image in images]
    poses = torch.as_tensor(poses)
    with torch.no_grad():
        refiner.infer(*refiner.prepare(staged, index, poses, poses)[:2])  # warm-up: cuDNN, cached indices
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            crops, kp_crop, _affine, ok = refiner.prepare(staged, index, poses, poses)
            coords, _conf = refiner.infer(crops, kp_crop)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert coords.is_cuda and coords.shape == (7, 17, 2) and ok.all()


def test_refine_images_on_cuda_equals_one_image_at_a_time(model, case, no_tf32):
    images, index, poses = case
    refiner = Refiner(copy.deepcopy(model), device="cuda", batch_size=4)
    sources = [IMAGE, images[1]]  # a file decoded by refine_images' threads, and a decoded image
    jobs = [(n, sources[n % 2], poses[index == n % 2]) for n in range(5)]
    out = {key: xy for key, xy, _ in refine_images(refiner, jobs)}
    for key, source, p in jobs:
        image = decode(source) if not isinstance(source, torch.Tensor) else source
        np.testing.assert_allclose(out[key], refiner.refine([image], np.zeros(len(p), dtype=np.int64), p)[0],
                                   atol=0.01)


def test_training_steps_on_cuda(tmp_path):
    gt = str(SAMPLE_DIR / "person_keypoints_val_sample.json")
    cfg = load_config(preset="cpu-small", overrides=[
        f"data.train_annotations={gt}", f"data.train_images={SAMPLE_DIR / 'images'}", "data.workers=2",
        "model.input_size=[128, 96]", "train.batch_size=8", "train.max_steps=6", "train.log_every=1",
        "train.lr_milestones=[]", "train.device=cuda"])
    train(cfg, tmp_path / "run", progress=False)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["event"] == "start" and records[0]["device"] == "cuda:0"
    losses = [r["loss"] for r in records if r["event"] == "train"]
    assert len(losses) == 6 and all(loss is not None and np.isfinite(loss) for loss in losses)
    assert (tmp_path / "run" / "model.safetensors").is_file()
