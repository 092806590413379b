"""The refiner model, its config, weights files and loss."""
import copy

import numpy as np
import pytest
import torch
import torchvision

from posefix import codec
from posefix.errors import InputError
from posefix.losses import refiner_loss
from posefix.model import MOBILE, ModelConfig, PoseFixNet, fold_batchnorm, load_pretrained
from posefix.refiner import Refiner
from posefix.weights import export_weights, load_weights

from .conftest import SMALL_MODEL, model_inputs

SMALL = SMALL_MODEL


@pytest.mark.parametrize("backbone", ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152", *MOBILE])
def test_every_backbone_builds_and_runs(backbone):
    cfg = ModelConfig(backbone=backbone, input_size=(64, 64), sigma=2.0, head_channels=16)
    model = PoseFixNet(cfg).eval()
    assert model.backbone[0].in_channels == 3 + 17
    image, _, heat = model_inputs(2, cfg)
    with torch.no_grad():
        out = model(image, heat)
    assert out["logits"].shape == (2, 17, 16, 16) and out["coords"].shape == (2, 17, 2)
    assert out["confidence_logit"].shape == (2, 17)
    assert all(torch.isfinite(v).all() for v in out.values())


def test_untrained_refiner_returns_its_input():
    """The input-pose prior and the zero-initialised last layer make the untrained model the identity."""
    torch.manual_seed(0)
    model = PoseFixNet(SMALL).eval()
    image, kp, heat = model_inputs(8, SMALL, seed=1)
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
    image, kp, heat = model_inputs(4, SMALL)
    out = model(image, heat)
    loss, _ = refiner_loss(out, kp[..., :2] + 3.0, kp[..., 2] > 0, torch.full((4,), 900.0))
    loss.backward()
    assert model.final.weight.grad.abs().sum() > 0 and model.backbone[0].weight.grad.abs().sum() > 0
    # The coordinate term alone moves the head too (soft-argmax is not detached).
    model.zero_grad()
    out = model(image, heat)
    out["coords"].sum().backward()
    assert model.final.weight.grad.abs().sum() > 0


def test_weights_round_trip_and_refiner(tmp_path):
    torch.manual_seed(0)
    model = PoseFixNet(SMALL)
    with torch.no_grad():
        model.final.weight.normal_(std=0.1)  # not the identity any more
    path = tmp_path / "model.safetensors"
    export_weights(model, path, {"note": {"a": 1}})
    loaded = load_weights(path)
    assert loaded.cfg == SMALL
    image, _, heat = model_inputs(3, SMALL)
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


@pytest.mark.parametrize("backbone", MOBILE)
def test_mobile_backbone_pretrained_from_a_local_file(backbone, tmp_path):
    """A torchvision classifier's state dict fills the backbone (stem RGB channels and every module after it);
    another backbone's is refused naming the field."""
    g = torch.Generator().manual_seed(7)
    net = getattr(torchvision.models, backbone)(weights=None)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    path = tmp_path / f"{backbone}.pth"
    torch.save(net.state_dict(), path)
    model = PoseFixNet(ModelConfig(backbone=backbone, input_size=(64, 64), sigma=2.0, head_channels=16))
    heat_channels = model.backbone[0].weight[:, 3:].clone()
    assert load_pretrained(model, str(path)) == str(path)
    theirs = {k: v for k, v in net.state_dict().items()}
    stem = next(k for k, v in theirs.items() if v.dim() == 4 and v.shape[1] == 3)
    assert torch.equal(model.backbone[0].weight[:, :3], theirs[stem])
    assert torch.equal(model.backbone[0].weight[:, 3:], heat_channels)
    ours = [v for k, v in model.backbone.state_dict().items() if not k.startswith("0.")]
    loaded = sum(any(v.shape == w.shape and torch.equal(v, w) for w in theirs.values()) for v in ours)
    assert loaded == len(ours)  # every backbone tensor after the stem convolution is one of the file's
    other = "mobilenet_v3_small" if backbone != "mobilenet_v3_small" else "shufflenet_v2_x1_0"
    torch.save(getattr(torchvision.models, other)(weights=None).state_dict(), tmp_path / "other.pth")
    with pytest.raises(InputError, match=f"not a {backbone} state dict"):
        load_pretrained(model, str(tmp_path / "other.pth"))


@pytest.mark.parametrize("backbone", MOBILE)
def test_mobile_backbone_fused_stem_equals_the_rendered_path(backbone):
    """Each mobile backbone's stem (3×3, stride 2, padding 1) computed from the Gaussians' 1-D factors gives the
    outputs of rendering the heatmaps and convolving them, on random crops and poses (one far outside)."""
    cfg = ModelConfig(backbone=backbone, input_size=(96, 64), sigma=2.5, head_channels=16)
    model = _perturbed(cfg, seed=3, head=0.5).eval()
    image, kp, _ = model_inputs(4, cfg, seed=8)
    kp[1, 5] = torch.tensor([-40.0, 300.0, 1.0])
    heat = codec.render_heatmaps(kp, cfg.input_size, cfg.sigma)
    with torch.no_grad():
        fused = model(image, keypoints=kp)
        plain = model(image, heat)
    moved = (plain["coords"] - kp[..., :2]).abs().amax()
    assert moved > 1  # the perturbed head moves joints, so agreement means the same computation
    scale = max(1.0, plain["logits"].abs().max().item())
    assert (fused["logits"] - plain["logits"]).abs().max() < 1e-4 * scale
    assert (fused["coords"] - plain["coords"]).abs().max() < 0.01
    assert (fused["confidence_logit"] - plain["confidence_logit"]).abs().max() < 1e-4 * scale


def test_subpixel_deconv_equals_the_transposed_convolution():
    """The int8 export's form of a 4×4 stride-2 transposed convolution against torch's own, float64, random
    weights, bias or none, odd sizes; and a folded model with its head in that form gives the same outputs."""
    from posefix.model import SubpixelDeconv, subpixel_head

    g = torch.Generator().manual_seed(11)
    for cin, cout, bias, (h, w) in ((5, 7, True, (6, 5)), (8, 3, False, (1, 9)), (4, 4, True, (7, 7))):
        deconv = torch.nn.ConvTranspose2d(cin, cout, 4, stride=2, padding=1, bias=bias).double()
        with torch.no_grad():
            for p in deconv.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
        x = torch.randn(2, cin, h, w, generator=g, dtype=torch.float64)
        with torch.no_grad():
            torch.testing.assert_close(SubpixelDeconv(deconv)(x), deconv(x), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="4×4 stride-2"):
        SubpixelDeconv(torch.nn.ConvTranspose2d(3, 3, 3, stride=2, padding=1))
    model = _perturbed(SMALL, seed=5, head=0.5).double().eval()
    folded = fold_batchnorm(model)
    image, kp, _ = model_inputs(3, SMALL, seed=2)
    with torch.no_grad():
        want = folded(image.double(), keypoints=kp.double())
        got = subpixel_head(copy.deepcopy(folded))(image.double(), keypoints=kp.double())
    assert not any(isinstance(m, torch.nn.ConvTranspose2d) for m in subpixel_head(copy.deepcopy(folded)).modules())
    torch.testing.assert_close(got["logits"], want["logits"], rtol=0, atol=1e-9)
    torch.testing.assert_close(got["coords"], want["coords"], rtol=0, atol=1e-9)


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
    image, kp, heat = model_inputs(6, SMALL, seed=4)
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


@pytest.mark.parametrize("backbone", ["resnet18", "resnet50", *MOBILE])
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
    image, kp, heat = model_inputs(3, cfg, seed=6)
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


OFFSET = ModelConfig(**{**SMALL.__dict__, "head": "offset", "offset_radius": 2.0})


def test_peak_plus_offset_equals_a_plain_loop():
    from posefix.model import peak_plus_offset
    g = torch.Generator().manual_seed(3)
    logits, offsets = torch.randn(3, 5, 7, 6, generator=g), torch.randn(3, 5, 2, 7, 6, generator=g)
    got = peak_plus_offset(logits, offsets)
    for n in range(3):
        for k in range(5):
            best, at = -float("inf"), None
            for y in range(7):
                for x in range(6):
                    if logits[n, k, y, x] > best:
                        best, at = logits[n, k, y, x], (x, y)
            x, y = at
            want = torch.tensor([x + offsets[n, k, 0, y, x], y + offsets[n, k, 1, y, x]])
            torch.testing.assert_close(got[n, k], want)


def test_untrained_offset_head_returns_the_input_joints_output_pixel():
    torch.manual_seed(0)
    model = PoseFixNet(OFFSET).eval()
    image, kp, _ = model_inputs(8, OFFSET, seed=1)
    with torch.no_grad():
        out = model(image, keypoints=kp)
    assert out["offsets"].shape == (8, 17, 2, 24, 16) and not out["offsets"].any()
    valid = kp[..., 2] > 0
    centre = (kp[..., :2] - 1.5) / 4  # the input joint on the output grid
    grid = (out["coords"] - 1.5) / 4
    assert torch.equal(grid, grid.round())  # a pixel centre: the offsets are zero
    assert ((grid - centre).abs()[valid] <= 1.0).all()  # the input's pixel or a neighbour (the prior's peak)
    assert ((grid - centre).abs()[valid] <= 0.5 + 1e-4).float().mean() > 0.9


def test_head_config_is_checked_and_travels_with_the_weights(tmp_path):
    with pytest.raises(InputError, match="model.head"):
        ModelConfig(head="hough")
    with pytest.raises(InputError, match="model.offset_radius"):
        ModelConfig(head="offset", offset_radius=0)
    model = PoseFixNet(OFFSET)
    torch.nn.init.normal_(model.offset.weight, std=0.1)
    export_weights(model, tmp_path / "m.safetensors", {})
    back = load_weights(tmp_path / "m.safetensors")
    assert back.cfg == OFFSET
    torch.testing.assert_close(back.offset.weight, model.offset.weight)
