"""The refiner model, its config, weights files and loss."""
import copy
import json

import numpy as np
import pytest
import torch
import torchvision

from posefix import codec
from posefix.config import PRESETS, dump_toml, from_dict, load_config, to_dict
from posefix.engine import Refiner, export_weights, load_weights
from posefix.losses import refiner_loss
from posefix.model import ModelConfig, PoseFixNet, fold_batchnorm, load_pretrained
from posefix.errors import InputError

SMALL = ModelConfig(backbone="resnet18", input_size=(96, 64), sigma=2.5, head_channels=32)


def _inputs(n, cfg, seed=0):
    g = torch.Generator().manual_seed(seed)
    h, w = cfg.input_size
    image = torch.rand(n, 3, h, w, generator=g)
    kp = torch.cat([torch.rand(n, 17, 1, generator=g) * (w - 16) + 8, torch.rand(n, 17, 1, generator=g) * (h - 16) + 8,
                    (torch.rand(n, 17, 1, generator=g) > 0.2).float()], dim=-1)
    return image, kp, codec.render_heatmaps(kp, cfg.input_size, cfg.sigma)


@pytest.mark.parametrize("backbone", ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"])
def test_every_backbone_builds_and_runs(backbone):
    cfg = ModelConfig(backbone=backbone, input_size=(64, 64), sigma=2.0, head_channels=16)
    model = PoseFixNet(cfg).eval()
    assert model.backbone[0].in_channels == 3 + 17
    image, _, heat = _inputs(2, cfg)
    with torch.no_grad():
        out = model(image, heat)
    assert out["logits"].shape == (2, 17, 16, 16) and out["coords"].shape == (2, 17, 2)
    assert out["confidence_logit"].shape == (2, 17)
    assert all(torch.isfinite(v).all() for v in out.values())


def test_untrained_refiner_returns_its_input():
    """The input-pose prior and the zero-initialised last layer make the untrained model the identity."""
    torch.manual_seed(0)
    model = PoseFixNet(SMALL).eval()
    image, kp, heat = _inputs(8, SMALL, seed=1)
    with torch.no_grad():
        coords = model(image, heat)["coords"]
    valid = kp[..., 2] > 0
    assert (coords - kp[..., :2]).norm(dim=-1)[valid].max() < 0.05
    without = PoseFixNet(ModelConfig(**{**SMALL.__dict__, "input_prior": False})).eval()
    with torch.no_grad():
        plain = without(image, heat)["coords"]
    assert (plain - kp[..., :2]).norm(dim=-1)[valid].median() > 3  # without the prior, no such start


def test_coordinates_carry_gradients_to_the_head():
    torch.manual_seed(0)
    model = PoseFixNet(SMALL)
    image, kp, heat = _inputs(4, SMALL)
    out = model(image, heat)
    loss, _ = refiner_loss(out, kp[..., :2] + 3.0, kp[..., 2] > 0, torch.full((4,), 900.0))
    loss.backward()
    assert model.final.weight.grad.abs().sum() > 0 and model.backbone[0].weight.grad.abs().sum() > 0
    # The coordinate term alone moves the head too (soft-argmax is not detached).
    model.zero_grad()
    out = model(image, heat)
    out["coords"].sum().backward()
    assert model.final.weight.grad.abs().sum() > 0


def test_loss_parts_respect_the_mask():
    torch.manual_seed(0)
    model = PoseFixNet(SMALL)
    image, kp, heat = _inputs(2, SMALL)
    out = model(image, heat)
    none = torch.zeros(2, 17, dtype=torch.bool)
    loss, parts = refiner_loss(out, kp[..., :2], none, torch.full((2,), 900.0))
    assert all(not v.requires_grad and v.ndim == 0 for v in parts.values())  # read only when logged
    assert loss.item() == 0 and {k: v.item() for k, v in parts.items()} == {"heatmap": 0.0, "coord": 0.0,
                                                                            "confidence": 0.0}
    _, near = refiner_loss(out, kp[..., :2], kp[..., 2] > 0, torch.full((2,), 900.0))
    _, far = refiner_loss(out, kp[..., :2] + 6.0, kp[..., 2] > 0, torch.full((2,), 900.0))
    assert far["coord"] > near["coord"] + 1 and far["heatmap"] > near["heatmap"]


def test_weights_round_trip_and_refiner(tmp_path):
    torch.manual_seed(0)
    model = PoseFixNet(SMALL)
    with torch.no_grad():
        model.final.weight.normal_(std=0.1)  # not the identity any more
    path = tmp_path / "model.safetensors"
    export_weights(model, path, {"note": {"a": 1}})
    loaded = load_weights(path)
    assert loaded.cfg == SMALL
    image, _, heat = _inputs(3, SMALL)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(image, heat)["coords"], loaded.eval()(image, heat)["coords"])
    refiner = Refiner.from_checkpoint(path)
    picture = (torch.rand(3, 120, 160) * 255).to(torch.uint8)
    poses = np.zeros((2, 17, 3))
    poses[0, :, :2] = np.random.default_rng(0).uniform(40, 100, (17, 2))
    poses[0, :, 2] = 0.9
    xy, conf = refiner.refine([picture], [0, 0], poses)
    assert xy.shape == (2, 17, 2) and np.all((conf[0] > 0) & (conf[0] < 1))
    assert np.array_equal(xy[1], poses[1, :, :2]) and np.all(conf[1] == 0)  # no joint: unchanged


def test_bad_weights_files(tmp_path):
    with pytest.raises(InputError, match="file not found"):
        load_weights(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(InputError, match="not a safetensors file"):
        load_weights(junk)


def test_pretrained_from_a_local_file_and_never_downloaded(tmp_path, monkeypatch):
    resnet = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save(resnet.state_dict(), path)
    model = PoseFixNet(SMALL)
    assert load_pretrained(model, str(path)) == str(path)
    assert torch.equal(model.backbone[0].weight[:, :3], resnet.conv1.weight)
    assert torch.equal(model.backbone[4][0].conv1.weight, resnet.layer1[0].conv1.weight)
    assert load_pretrained(model, "none") == "none"
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_cache"))
    with pytest.raises(InputError, match="not in"):
        load_pretrained(model, "imagenet")
    torch.save({"fc.weight": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(InputError, match="not a resnet18 state dict"):
        load_pretrained(model, str(tmp_path / "other.pth"))


def test_config_presets_overrides_and_rejections(tmp_path):
    assert "cpu-small" in PRESETS
    for name in PRESETS:
        load_config(preset=name)
    cfg = load_config(preset="cpu-small", overrides=["train.max_steps=7", "model.input_size=[64, 64]",
                                                     "data.train_images=/data/coco/train2017", "train.seed=3",
                                                     "model.backbone=resnet34"])
    assert cfg.train.max_steps == 7 and cfg.model.input_size == (64, 64) and cfg.train.seed == 3
    assert cfg.data.train_images == "/data/coco/train2017" and cfg.model.backbone == "resnet34"
    toml = tmp_path / "c.toml"
    toml.write_text(dump_toml(cfg))
    assert load_config(config=str(toml)) == cfg
    assert from_dict(json.loads(json.dumps(to_dict(cfg)))) == cfg
    with pytest.raises(InputError, match=r"train\.max_stepz: unknown key"):
        load_config(preset="cpu-small", overrides=["train.max_stepz=3"])
    with pytest.raises(InputError, match="train.max_steps: must be an integer"):
        load_config(overrides=["train.max_steps=many"])
    with pytest.raises(InputError, match="model.backbone"):
        load_config(overrides=["model.backbone=vgg16"])
    with pytest.raises(InputError, match="model.input_size"):
        load_config(overrides=["model.input_size=[100, 64]"])
    with pytest.raises(InputError, match="unknown section"):
        load_config(overrides=["optimizer.lr=1"])
    with pytest.raises(InputError, match="unknown preset"):
        load_config(preset="r9000")


def _random_keypoints(g, n, k, size, margin=20.0):
    """Joints in and around an (H, W) map, about a fifth invalid, a few NaN."""
    h, w = size
    kp = torch.cat([torch.rand(n, k, 1, generator=g, dtype=torch.float64) * (w + 2 * margin) - margin,
                    torch.rand(n, k, 1, generator=g, dtype=torch.float64) * (h + 2 * margin) - margin,
                    (torch.rand(n, k, 1, generator=g, dtype=torch.float64) > 0.2).double()], dim=-1)
    kp[0, 0, 0] = float("nan")
    return kp


@pytest.mark.parametrize(("size", "sigma", "kernel", "stride", "padding"), [
    ((384, 288), 9.0, 7, 2, 3), ((256, 192), 7.0, 7, 2, 3), ((64, 96), 2.0, 3, 1, 1), ((33, 31), 1.5, 5, 3, 0),
])
def test_heatmap_conv_equals_convolving_the_rendered_maps(size, sigma, kernel, stride, padding):
    """The fused stem's arithmetic against the plain path (render, then F.conv2d), in float64 and float32."""
    g = torch.Generator().manual_seed(sum(size))
    kp = _random_keypoints(g, 3, 17, size)
    weight = torch.randn(8, 17, kernel, kernel, generator=g, dtype=torch.float64)
    plain = torch.nn.functional.conv2d(codec.render_heatmaps(kp, size, sigma), weight, stride=stride, padding=padding)
    fused = codec.heatmap_conv2d(kp, size, sigma, weight, stride=stride, padding=padding)
    assert fused.shape == plain.shape
    torch.testing.assert_close(fused, plain, rtol=0, atol=1e-10)
    fused32 = codec.heatmap_conv2d(kp.float(), size, sigma, weight.float(), stride=stride, padding=padding)
    assert fused32.dtype == torch.float32
    assert (fused32.double() - plain).abs().max() <= 1e-5 * plain.abs().max()


def test_pooled_heatmaps_equal_pooling_the_rendered_maps():
    g = torch.Generator().manual_seed(3)
    for size, sigma, stride in (((256, 192), 7.0, 4), ((96, 64), 2.5, 4), ((30, 20), 1.0, 2)):
        kp = _random_keypoints(g, 4, 17, size)
        plain = torch.nn.functional.avg_pool2d(codec.render_heatmaps(kp, size, sigma), stride)
        torch.testing.assert_close(codec.pooled_heatmaps(kp, size, sigma, stride), plain, rtol=0, atol=1e-12)


def _perturbed(cfg, seed=0, head=0.1):
    """A model whose heatmap channels and head matter (not the identity it starts as)."""
    torch.manual_seed(seed)
    model = PoseFixNet(cfg)
    with torch.no_grad():
        model.backbone[0].weight[:, 3:].normal_(std=0.05)
        model.final.weight.normal_(std=head)
    return model


def test_fused_stem_equals_the_rendered_path():
    """Tolerance of the fused stem in float32: logits within 1e-3, coordinates within 0.01 input pixels,
    and the stem's gradients for training within 1e-4 (relative to their largest) of the plain path's in float64."""
    model = _perturbed(SMALL)
    image, kp, heat = _inputs(6, SMALL, seed=4)
    kp[0, 3] = torch.tensor([-30.0, 500.0, 1.0])  # a joint far outside the crop
    heat = codec.render_heatmaps(kp, SMALL.input_size, SMALL.sigma)
    model.eval()
    with torch.no_grad():
        fused = model(image, keypoints=kp)
        plain = model(image, heat)
        model.fused_stem = False
        rendered = model(image, keypoints=kp)
    model.fused_stem = True
    torch.testing.assert_close(rendered["logits"], plain["logits"], rtol=0, atol=0)
    assert (fused["logits"] - plain["logits"]).abs().max() < 1e-3
    assert (fused["coords"] - plain["coords"]).abs().max() < 0.01
    assert (fused["confidence_logit"] - plain["confidence_logit"]).abs().max() < 1e-4
    # Gradients for training: the fused stem's in float32 against the plain path's in float64. (The plain
    # path's own float32 stem gradient can be further off than this: its convolution backward over 3 + 17
    # channels is torch's, with its own accumulation order.)
    def stem_grad(dtype, pose):
        net = _perturbed(SMALL).to(dtype).train()
        points = kp.to(dtype)
        given = {"keypoints": points} if pose == "keypoints" else {
            "heatmaps": codec.render_heatmaps(points, SMALL.input_size, SMALL.sigma)}
        out = net(image.to(dtype), **given)
        loss, _ = refiner_loss(out, points[..., :2] + 2.0, points[..., 2] > 0, torch.full((6,), 900.0, dtype=dtype))
        loss.backward()
        return net.backbone[0].weight.grad.double()

    reference = stem_grad(torch.float64, "heatmaps")
    scale = reference.abs().max().item()
    assert (stem_grad(torch.float64, "keypoints") - reference).abs().max() < 1e-5 * scale
    assert (stem_grad(torch.float32, "keypoints") - reference).abs().max() < 1e-4 * scale
    with pytest.raises(ValueError, match="exactly one"):
        model(image, heat, keypoints=kp)
    with pytest.raises(ValueError, match="exactly one"):
        model(image)


def test_refiner_precisions_and_layouts_agree():
    """bf16 autocast and channels_last give the fp32 answer within bf16's precision; fused or rendered alike."""
    model = _perturbed(SMALL, seed=1, head=3.0)
    rng = np.random.default_rng(0)
    picture = torch.from_numpy(rng.integers(0, 256, (3, 120, 160), dtype=np.uint8))
    poses = np.concatenate([rng.uniform(30, 110, (3, 17, 2)), np.ones((3, 17, 1))], axis=-1)
    results = {}
    for name, options in {"fp32": {}, "bf16": {"precision": "bf16"}, "channels_last": {"channels_last": True},
                          "flip": {"flip_test": True}}.items():
        results[name] = Refiner(model, output="raw", **options).refine([picture], np.zeros(3, dtype=np.int64),
                                                                       poses)[0]
    model.fused_stem = False
    rendered = Refiner(model, output="raw").refine([picture], np.zeros(3, dtype=np.int64), poses)[0]
    model.fused_stem = True
    assert np.abs(results["fp32"] - rendered).max() < 0.01
    assert np.abs(results["channels_last"] - results["fp32"]).max() < 0.01
    moved = np.abs(results["fp32"] - poses[..., :2]).max()
    assert moved > 1  # the perturbed model does move joints, so agreement below means something
    assert np.abs(results["bf16"] - results["fp32"]).max() < 0.25 * moved  # bf16: 8 bits of mantissa in the logits
    assert np.abs(results["flip"] - results["fp32"]).max() > 1e-3  # flip test is its own answer
    with pytest.raises(InputError, match="precision"):
        Refiner(model, precision="fp8")


@pytest.mark.parametrize("backbone", ["resnet18", "resnet50"])
def test_folded_batchnorm_is_the_same_function(backbone):
    """Every BatchNorm folded into its convolution: the same outputs (float64 within 1e-9, float32 within
    float rounding), no BatchNorm left, and the model given left untouched."""
    cfg = ModelConfig(backbone=backbone, input_size=(64, 64), sigma=2.5, head_channels=16)
    model = _perturbed(cfg, seed=2, head=1.0)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # running statistics and affine parameters of their own, as after training
        for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
            bn.running_mean.copy_(torch.randn(bn.num_features, generator=g) * 0.2)
            bn.running_var.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
            bn.weight.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
            bn.bias.copy_(torch.randn(bn.num_features, generator=g) * 0.1)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    folded = fold_batchnorm(model)
    assert model.training and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) > 0
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules()) and not folded.training
    image, kp, heat = _inputs(3, cfg, seed=6)
    model.eval()
    for dtype, tol in ((torch.float64, 1e-9), (torch.float32, 1e-3)):
        plain = copy.deepcopy(model).to(dtype)
        fast = fold_batchnorm(plain)  # folded in the dtype it runs in
        with torch.no_grad():
            for pose in ({"keypoints": kp.to(dtype)}, {"heatmaps": heat.to(dtype)}):
                want, got = plain(image.to(dtype), **pose), fast(image.to(dtype), **pose)
                for key in ("logits", "coords", "confidence_logit"):
                    scale = want[key].abs().max().item()
                    assert (got[key] - want[key]).abs().max().item() <= tol * max(scale, 1.0), (dtype, key)
    again = fold_batchnorm(folded)  # folding a folded model changes nothing
    assert all(torch.equal(v, folded.state_dict()[k]) for k, v in again.state_dict().items())
