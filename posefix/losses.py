"""The refiner's training loss: heatmap cross-entropy + coordinate L1 (PoseFix) + confidence BCEs.

Glossary: N persons, K joints, (h, w) output heatmaps at stride 4 of the (H, W) input.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .synth.keypoints import SIGMAS

from . import codec
from .model import STRIDE


def to_output_grid(points: torch.Tensor) -> torch.Tensor:
    """Input-pixel coordinates (..., 2) → output-grid coordinates (output pixel i is centred at 4i + 1.5)."""
    return (points - (STRIDE - 1) / 2) / STRIDE


def ks_to_truth(coords, target, area, sigmas=None):
    """KS of each predicted joint to its GT joint: coords, target (N, K, 2) crop px; area (N,) crop px²."""
    sig = torch.tensor(np.array(SIGMAS if sigmas is None else sigmas), dtype=coords.dtype, device=coords.device)
    d2 = ((coords - target) ** 2).sum(-1)
    return torch.exp(-d2 / (2 * area[:, None] * (2 * sig) ** 2))


def refiner_loss(out: dict, target: torch.Tensor, valid: torch.Tensor, area: torch.Tensor,
                 confidence_weight: float = 0.1, inputs: torch.Tensor | None = None,
                 input_confidence_weight: float = 0.1) -> tuple[torch.Tensor, dict]:
    """out: the model's outputs; target (N, K, 2) GT joints in input pixels; valid (N, K) bool;
    area (N,) the persons' areas in input pixels²; inputs (N, K, 3) the input pose in input pixels
    (v > 0 where present), for the input-confidence head (None: that part is left out). Returns the total loss and its parts (detached scalar tensors:
    reading one waits for the device, so a training loop reads them only when it logs).

    - ``heatmap``: softmax cross-entropy against the GT splatted bilinearly on its 4 neighbouring
      output pixels, over joints whose 4 neighbours lie in the grid;
    - ``coord``: L1 of the soft-argmax coordinates, in output pixels, over valid joints;
    - ``confidence``: BCE of the confidence logit against "KS of the refined joint to the truth >= 0.5";
    - ``input_confidence``: BCE of the input-confidence logit against "KS of the input joint to the
      truth >= 0.5" (an absent input joint is never right), over valid joints.
    """
    logits = out["logits"].float()
    n, k, h, w = logits.shape
    onehot, on_grid = codec.onehot_target(to_output_grid(target.float()), valid, (h, w))  # (N, K, h*w)
    logp = F.log_softmax(logits.reshape(n, k, h * w), dim=-1)
    ce = -(onehot * logp).sum(-1)  # (N, K)
    mask = on_grid.float()
    heat = (ce * mask).sum() / mask.sum().clamp(min=1)
    vmask = valid.float()
    l1 = ((out["coords"].float() - target.float()).abs().sum(-1) / STRIDE * vmask).sum() / vmask.sum().clamp(min=1)
    conf = _hit_bce(out["confidence_logit"], out["coords"].detach(), target, area, vmask)
    total = heat + l1 + confidence_weight * conf
    parts = {"heatmap": heat.detach(), "coord": l1.detach(), "confidence": conf.detach()}
    if inputs is not None and "input_confidence_logit" in out:
        present = (inputs[..., 2] > 0).float()
        inp = _hit_bce(out["input_confidence_logit"], inputs[..., :2], target, area, vmask, present)
        total = total + input_confidence_weight * inp
        parts["input_confidence"] = inp.detach()
    return total, parts


def _hit_bce(logit, coords, target, area, vmask, present=None):
    """Mean BCE over valid joints of ``logit`` against "KS of ``coords`` to ``target`` >= 0.5" (and present)."""
    hit = (ks_to_truth(coords.float(), target.float(), area.float()) >= 0.5).float()
    if present is not None:
        hit = hit * present
    bce = F.binary_cross_entropy_with_logits(logit.float(), hit, reduction="none")
    return (bce * vmask).sum() / vmask.sum().clamp(min=1)
