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
    inside = ((xs - target[..., 0, None, None]) ** 2 + (ys - target[..., 1, None, None]) ** 2 <= 4) & valid[..., None, None]
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
