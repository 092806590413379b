"""The refiner's training loss (posefix.losses): its parts, their masks, the offset head's losses."""
import pytest
import torch

from posefix.losses import refiner_loss
from posefix.model import ModelConfig, PoseFixNet

from .conftest import SMALL_MODEL, model_inputs

SMALL = SMALL_MODEL
OFFSET = ModelConfig(**{**SMALL.__dict__, "head": "offset", "offset_radius": 2.0})


def test_loss_parts_respect_the_mask():
    torch.manual_seed(0)
    model = PoseFixNet(SMALL)
    image, kp, heat = model_inputs(2, SMALL)
    out = model(image, heat)
    none = torch.zeros(2, 17, dtype=torch.bool)
    loss, parts = refiner_loss(out, kp[..., :2], none, torch.full((2,), 900.0))
    assert all(not v.requires_grad and v.ndim == 0 for v in parts.values())  # read only when logged
    assert loss.item() == 0 and {k: v.item() for k, v in parts.items()} == {"heatmap": 0.0, "coord": 0.0,
                                                                            "confidence": 0.0}
    _, near = refiner_loss(out, kp[..., :2], kp[..., 2] > 0, torch.full((2,), 900.0))
    _, far = refiner_loss(out, kp[..., :2] + 6.0, kp[..., 2] > 0, torch.full((2,), 900.0))
    assert far["coord"] > near["coord"] + 1 and far["heatmap"] > near["heatmap"]


def test_offset_head_loss_is_zero_only_for_the_exact_offsets_and_trains():
    from posefix.losses import offset_head_loss
    g = torch.Generator().manual_seed(4)
    target = torch.rand(2, 17, 2, generator=g) * torch.tensor([15.0, 23.0])
    valid = torch.rand(2, 17, generator=g) > 0.3
    ys, xs = torch.meshgrid(torch.arange(24.0), torch.arange(16.0), indexing="ij")
    exact = torch.stack([target[..., 0, None, None] - xs, target[..., 1, None, None] - ys], 2)  # (2, 17, 2, 24, 16)
    logits = torch.randn(2, 17, 24, 16, generator=g)
    heat, off = offset_head_loss(logits, exact, target, valid, 2.0)
    assert float(off) < 1e-6 and float(heat) > 0
    _, off_moved = offset_head_loss(logits, exact + 0.5, target, valid, 2.0)
    assert float(off_moved) == pytest.approx(2 * 0.5 / 2.0, rel=1e-5)  # |dx| + |dy| in radii
    inside = (((xs - target[..., 0, None, None]) ** 2 + (ys - target[..., 1, None, None]) ** 2 <= 4)
              & valid[..., None, None])
    disk_logits = torch.where(inside, 20.0, -20.0)  # the disk exactly: the BCE all but vanishes
    assert float(offset_head_loss(disk_logits, exact, target, valid, 2.0)[0]) < 1e-6
    torch.manual_seed(0)
    model = PoseFixNet(OFFSET)
    image, kp, _ = model_inputs(4, OFFSET, seed=2)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    losses = []
    for _ in range(15):
        out = model(image, keypoints=kp)
        loss, parts = refiner_loss(out, kp[..., :2] + 3.0, kp[..., 2] > 0, torch.full((4,), 900.0), inputs=kp,
                                   radius=OFFSET.offset_radius)
        assert "offset" in parts
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.85 * losses[0]


@pytest.mark.parametrize("target_kind", ["hit", "ks"])
def test_confidence_parts_against_a_plain_reference(target_kind):
    """Both confidence BCEs, each joint computed alone with math: the target is KS >= 0.5 ("hit") or the KS itself
    ("ks"); an absent input joint's target is 0; invalid joints are left out."""
    import math

    from posefix.keypoints import SIGMAS
    g = torch.Generator().manual_seed(11)
    n, k = 3, 17
    target = torch.rand(n, k, 2, generator=g) * 90
    valid = torch.rand(n, k, generator=g) > 0.2
    area = torch.full((n,), 900.0)
    coords = target + torch.randn(n, k, 2, generator=g) * 6
    inputs = torch.cat([target + torch.randn(n, k, 2, generator=g) * 6,
                        (torch.rand(n, k, 1, generator=g) > 0.2).float()], -1)
    out = {"logits": torch.zeros(n, k, 24, 16), "coords": coords, "confidence_logit": torch.randn(n, k, generator=g),
           "input_confidence_logit": torch.randn(n, k, generator=g)}
    _, parts = refiner_loss(out, target, valid, area, inputs=inputs, confidence_target=target_kind)

    def reference(logits, points, present):
        total, count = 0.0, 0
        for i in range(n):
            for j in range(k):
                if not valid[i, j]:
                    continue
                d2 = float(((points[i, j] - target[i, j]) ** 2).sum())
                ks = math.exp(-d2 / (900.0 * 2 * (2 * float(SIGMAS[j])) ** 2)) if present[i, j] else 0.0
                y = ks if target_kind == "ks" else float(ks >= 0.5)
                p = 1 / (1 + math.exp(-float(logits[i, j])))
                total += -(y * math.log(p) + (1 - y) * math.log(1 - p))
                count += 1
        return total / count

    assert float(parts["confidence"]) == pytest.approx(
        reference(out["confidence_logit"], coords, torch.ones(n, k)), rel=1e-5)
    assert float(parts["input_confidence"]) == pytest.approx(
        reference(out["input_confidence_logit"], inputs[..., :2], inputs[..., 2] > 0), rel=1e-5)


def test_the_ks_target_is_learned_as_the_expected_ks():
    """Under the "ks" target the BCE's minimum over the logit is at sigmoid(logit) = KS (its gradient vanishes
    there)."""
    from posefix.codec import ks
    target = torch.full((1, 17, 2), 10.0)
    coords = target + torch.tensor([1.0, 1.5])
    area = torch.tensor([400.0])
    valid = torch.ones(1, 17, dtype=torch.bool)
    expected = ks(coords, target, area)
    assert float(expected.min()) > 0.05 and float(expected.max()) < 0.95
    logit = torch.logit(expected).detach().requires_grad_()
    out = {"logits": torch.zeros(1, 17, 24, 16), "coords": coords, "confidence_logit": logit}
    loss, _ = refiner_loss(out, target, valid, area, confidence_target="ks", confidence_weight=1.0)
    (grad,) = torch.autograd.grad(loss, logit)
    assert float(grad.abs().max()) < 1e-6
    loss_hit, _ = refiner_loss(out, target, valid, area, confidence_weight=1.0)
    (grad_hit,) = torch.autograd.grad(loss_hit, logit)
    assert float(grad_hit.abs().min()) > 1e-3  # the "hit" target pulls the same logits towards 0 or 1


def test_an_unknown_confidence_target_is_refused():
    from posefix.config import load_config
    from posefix.errors import InputError
    with pytest.raises(InputError, match="train.confidence_target"):
        load_config(preset="cpu-small", overrides=["train.confidence_target=oks"])


def test_calibration_persons_train_only_the_confidence_heads():
    """With a calibration mask, the refinement's parts are those of the other persons alone and the confidence
    parts those of the calibration persons alone (each equal to the loss over that subset)."""
    torch.manual_seed(0)
    model = PoseFixNet(SMALL)
    image, kp, _ = model_inputs(4, SMALL, seed=3)
    out = model(image, keypoints=kp)
    g = torch.Generator().manual_seed(5)
    out["confidence_logit"], out["input_confidence_logit"] = torch.randn(2, 4, 17, generator=g) * 2
    target, valid, area = kp[..., :2] + 2.0, kp[..., 2] > 0, torch.full((4,), 900.0)
    cal = torch.tensor([True, False, True, False])
    _, parts = refiner_loss(out, target, valid, area, inputs=kp, calibration=cal)

    def subset(rows):
        sub = {k: v[rows] for k, v in out.items()}
        return refiner_loss(sub, target[rows], valid[rows], area[rows], inputs=kp[rows])[1]

    train, held = subset(~cal), subset(cal)
    for key in ("heatmap", "coord"):
        assert float(parts[key]) == pytest.approx(float(train[key]), rel=1e-5)
    for key in ("confidence", "input_confidence"):
        assert float(parts[key]) == pytest.approx(float(held[key]), rel=1e-5)
    assert float(held["confidence"]) != pytest.approx(float(train["confidence"]), rel=1e-3)
    _, none_held = refiner_loss(out, target, valid, area, inputs=kp, calibration=torch.zeros(4, dtype=torch.bool))
    assert float(none_held["confidence"]) == 0 and float(none_held["input_confidence"]) == 0
