"""The refinement engine: persons of many images → crops → model → refined keypoints + confidence.

Glossary: P persons, K = 17 joints, (H, W) the model's input size. Every path that refines —
validation during training, ``posefix refine``, the service — goes through :class:`Refiner`, so a
refinement is the same number wherever it is asked for.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from synth.exceptions import InputError

from . import codec
from .model import ModelConfig, PoseFixNet


class Refiner:
    """Refines poses with a trained :class:`PoseFixNet` (in eval mode, no gradients)."""

    def __init__(self, model: PoseFixNet, device: str | torch.device = "cpu", batch_size: int = 64):
        self.model = model.to(device).eval()
        self.cfg: ModelConfig = model.cfg
        self.device = torch.device(device)
        self.batch_size = batch_size

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str = "cpu", batch_size: int = 64) -> Refiner:
        model = load_weights(path)
        return cls(model, device, batch_size)

    @torch.no_grad()
    def refine(self, images: list[torch.Tensor], image_index, poses) -> tuple[np.ndarray, np.ndarray]:
        """images: decoded (3, Hi, Wi) uint8 tensors; image_index (P,) which image each person is in;
        poses (P, K, 3) input keypoints (x, y, score) in image pixels, a joint present where its
        score > 0 and x, y are finite. Returns refined (P, K, 2) in image pixels and confidence (P, K).
        Persons without a present joint come back unchanged with confidence 0."""
        poses = torch.as_tensor(np.asarray(poses, dtype=np.float64))
        image_index = np.asarray(image_index, dtype=np.int64)
        xy = poses[..., :2].clone().numpy()
        conf = np.zeros(poses.shape[:2])
        for lo in range(0, poses.shape[0], self.batch_size):
            sl = slice(lo, lo + self.batch_size)
            out_xy, out_conf, ok = self._batch(images, image_index[sl], poses[sl])
            xy[sl][ok], conf[sl][ok] = out_xy[ok], out_conf[ok]
        return xy, conf

    def _batch(self, images, image_index, poses):
        h, w = self.cfg.input_size
        present = (poses[..., 2] > 0) & torch.isfinite(poses[..., :2]).all(-1)  # (P, K)
        kp = torch.cat([torch.nan_to_num(poses[..., :2]), present[..., None].double()], dim=-1)
        ok = present.any(-1).numpy()
        center, size = codec.center_scale(codec.box_from_keypoints(kp), aspect=w / h)
        affine = codec.crop_affine(center, size, (h, w))  # (P, 2, 3) crop → image
        crops = torch.zeros((kp.shape[0], 3, h, w), device=self.device)
        for img in np.unique(image_index):
            sel = np.flatnonzero(image_index == img)
            picture = images[img].to(self.device, non_blocking=True).float().div_(255)[None]
            crops[sel] = codec.warp_crops(picture, torch.zeros(sel.size, dtype=torch.long, device=self.device),
                                          affine[sel].float().to(self.device), (h, w))
        kp_crop = torch.cat([codec.apply_affine(kp, codec.invert_affine(affine)), kp[..., 2:]], dim=-1)
        heat = codec.render_heatmaps(kp_crop.float().to(self.device), (h, w), self.cfg.sigma)
        out = self.model(crops, heat)
        coords = out["coords"].double().cpu()
        xy = codec.apply_affine(coords, affine).numpy()
        conf = torch.sigmoid(out["confidence_logit"].float()).cpu().numpy()
        return xy, conf, ok


def export_weights(model: PoseFixNet, path: str | Path, metadata: dict) -> None:
    """Write the model's weights as safetensors with its ModelConfig (and ``metadata``) in the header."""
    from safetensors.torch import save_file

    from synth.cocoio import atomic_path

    cfg = model.cfg
    meta = {"posefix_model_config": json.dumps({"backbone": cfg.backbone, "input_size": list(cfg.input_size),
                                                 "sigma": cfg.sigma, "num_keypoints": cfg.num_keypoints,
                                                 "head_channels": cfg.head_channels, "input_prior": cfg.input_prior})}
    meta.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()})
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=meta)


def load_weights(path: str | Path) -> PoseFixNet:
    """A :class:`PoseFixNet` from a ``model.safetensors`` written by :func:`export_weights`."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise InputError("checkpoint", "file not found", str(path))
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise InputError("checkpoint", f"not a safetensors file: {e}", str(path)) from None
    if "posefix_model_config" not in meta:
        raise InputError("checkpoint", "has no posefix model config in its metadata", str(path))
    raw = json.loads(meta["posefix_model_config"])
    raw["input_size"] = tuple(raw["input_size"])
    model = PoseFixNet(ModelConfig(**raw))
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise InputError("checkpoint", f"weights do not match the model: {str(e).splitlines()[0]}", str(path)) from None
    return model


def refine_results(refiner: Refiner, results: list[dict], image_paths: dict) -> list[dict]:
    """Refine COCO keypoint results (validated): each image is decoded once, its persons refined
    together. ``image_paths`` maps image_id → file. Each refined keypoint's third value is the
    refiner's confidence; the instance score and every other field are kept."""
    from .images import decode

    if not results:
        return []
    ids = sorted({r["image_id"] for r in results})
    missing = [i for i in ids if i not in image_paths]
    if missing:
        raise InputError("image", f"no image file for image_id {missing[0]}")
    images = [decode(image_paths[i]) for i in ids]
    where = {img: n for n, img in enumerate(ids)}
    poses = np.array([r["keypoints"] for r in results], dtype=np.float64).reshape(len(results), -1, 3)
    xy, conf = refiner.refine(images, [where[r["image_id"]] for r in results], poses)
    return [dict(r, keypoints=np.concatenate([xy[n], conf[n][:, None]], axis=1).reshape(-1).tolist())
            for n, r in enumerate(results)]
