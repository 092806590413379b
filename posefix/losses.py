"""The refiner's training loss: heatmap cross-entropy + coordinate L1 (PoseFix) + confidence BCEs.

Glossary: N persons, K joints, (h, w) output heatmaps at stride 4 of the (H, W) input.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import codec
from .keypoints import KS_HIT
from .model import STRIDE


def to_output_grid(points: torch.Tensor) -> torch.Tensor:
    """Input-pixel coordinates (..., 2) → output-grid coordinates (output pixel i is centred at 4i + 1.5)."""
    return (points - (STRIDE - 1) / 2) / STRIDE


def refiner_loss(out: dict, target: torch.Tensor, valid: torch.Tensor, area: torch.Tensor,
                 confidence_weight: float = 0.1, inputs: torch.Tensor | None = None,
                 input_confidence_weight: float = 0.1, radius: float = 2.0,
                 confidence_target: str = "hit", calibration: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """out: the model's outputs; target (N, K, 2) GT joints in input pixels; valid (N, K) bool;
    area (N,) the persons' areas in input pixels²; inputs (N, K, 3) the input pose in input pixels
    (v > 0 where present), for the input-confidence head (None: that part is left out); radius the offset
    head's disk radius in output pixels; confidence_target what the confidence heads learn ("hit" or "ks",
    below); calibration (N,) bool, the persons whose samples train only the confidence heads (None: every
    person trains every part). Returns the total loss and its parts (detached scalar tensors:
    reading one waits for the device, so a training loop reads them only when it logs).

    - ``heatmap``: softmax cross-entropy against the GT splatted bilinearly on its 4 neighbouring
      output pixels, over joints whose 4 neighbours lie in the grid;
    - ``coord``: L1 of the soft-argmax coordinates, in output pixels, over valid joints;
    - ``confidence``: BCE of the confidence logit against "KS of the refined joint to the truth >= 0.5"
      (``confidence_target="hit"``) or against that KS itself, a soft label whose sigmoid is the expected
      KS (``"ks"``);
    - ``input_confidence``: the same for the input-confidence logit and the input joint (an absent input
      joint is never right, KS 0), over valid joints.

    For the offset head (``out`` has ``offsets``), ``heatmap`` is G-RMI's disk classification (see
    :func:`offset_head_loss`) and ``offset`` its offset regression.
    """
    logits = out["logits"].float()
    n, k, h, w = logits.shape
    parts, off = {}, 0.0
    conf_valid = valid
    if calibration is not None:  # the refinement learns from the others, the confidence heads from these
        calibration = calibration.bool()
        valid, conf_valid = valid & ~calibration[:, None], valid & calibration[:, None]
    if "offsets" in out:
        heat, off = offset_head_loss(logits, out["offsets"].float(), to_output_grid(target.float()), valid,
                                     radius)
        parts["offset"] = off.detach()
    else:
        onehot, on_grid = codec.onehot_target(to_output_grid(target.float()), valid, (h, w))  # (N, K, h*w)
        logp = F.log_softmax(logits.reshape(n, k, h * w), dim=-1)
        ce = -(onehot * logp).sum(-1)  # (N, K)
        mask = on_grid.float()
        heat = (ce * mask).sum() / mask.sum().clamp(min=1)
    vmask, cmask = valid.float(), conf_valid.float()
    l1 = ((out["coords"].float() - target.float()).abs().sum(-1) / STRIDE * vmask).sum() / vmask.sum().clamp(min=1)
    soft = confidence_target == "ks"
    conf = _confidence_bce(out["confidence_logit"], out["coords"].detach(), target, area, cmask, soft=soft)
    total = heat + off + l1 + confidence_weight * conf
    parts.update({"heatmap": heat.detach(), "coord": l1.detach(), "confidence": conf.detach()})
    if inputs is not None and "input_confidence_logit" in out:
        present = (inputs[..., 2] > 0).float()
        inp = _confidence_bce(out["input_confidence_logit"], inputs[..., :2], target, area, cmask, present, soft)
        total = total + input_confidence_weight * inp
        parts["input_confidence"] = inp.detach()
    return total, parts


def _confidence_bce(logit, coords, target, area, vmask, present=None, soft=False):
    """Mean BCE over valid joints of ``logit`` against "KS of ``coords`` to ``target`` >= 0.5" (and present),
    or with ``soft`` against that KS (0 where absent)."""
    ks = torch.nan_to_num(codec.ks(coords.float(), target.float(), area.float())).clamp(0, 1)
    hit = ks if soft else (ks >= KS_HIT).float()
    if present is not None:
        hit = hit * present
    bce = F.binary_cross_entropy_with_logits(logit.float(), hit, reduction="none")
    return (bce * vmask).sum() / vmask.sum().clamp(min=1)


def offset_head_loss(logits: torch.Tensor, offsets: torch.Tensor, target: torch.Tensor, valid: torch.Tensor,
                     radius: float) -> tuple[torch.Tensor, torch.Tensor]:
    """G-RMI's two losses, over valid joints: logits (N, K, h, w), offsets (N, K, 2, h, w) and target (N, K, 2)
    in output pixels.

    - disk: per-pixel sigmoid BCE against "this pixel lies within ``radius`` of the joint", summed over the
      grid and divided by the disk's area (so the few pixels inside weigh as much as the many outside);
    - offset: L1 of (offset − (joint − pixel)), in units of ``radius``, averaged over the pixels inside.
    """
    h, w = logits.shape[-2:]
    ys = torch.arange(h, dtype=logits.dtype, device=logits.device)[:, None]
    xs = torch.arange(w, dtype=logits.dtype, device=logits.device)[None, :]
    tgt = torch.nan_to_num(target)
    dx = tgt[..., 0, None, None] - xs  # (N, K, h, w): from each pixel to the joint
    dy = tgt[..., 1, None, None] - ys
    disk = ((dx ** 2 + dy ** 2) <= radius ** 2) & valid[..., None, None]  # (N, K, h, w)
    vmask = valid.float()
    bce = F.binary_cross_entropy_with_logits(logits, disk.float(), reduction="none").sum((2, 3))  # (N, K)
    heat = (bce * vmask).sum() / (vmask.sum().clamp(min=1) * math.pi * radius ** 2)
    err = ((offsets[:, :, 0] - dx).abs() + (offsets[:, :, 1] - dy).abs()) / radius  # (N, K, h, w)
    inside = disk.float()
    off = (err * inside).sum() / inside.sum().clamp(min=1)
    return heat, off
