"""The typed contract of a refiner: what the service, the batcher and the batching of many images call on one.

:class:`posefix.refiner.Refiner` is one on either backend (its model a PoseFixNet, or an ONNX Runtime session,
:class:`posefix.onnx_backend.OnnxModel`). Glossary as in :mod:`posefix.refiner`: P persons, K = 17 joints, (H, W)
the model's input size.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    import numpy as np
    import torch

    from .model import ModelConfig


@runtime_checkable
class RefinerLike(Protocol):
    """A refiner. ``refine`` is what the batcher runs (:data:`posefix.batcher.RefineFn`) and ``refine_images``
    batches; ``stage`` is called in decoding threads; ``crop``/``infer``/``to_image`` are ``refine``'s stages
    (calibration crops for int8, the benchmarks)."""

    cfg: ModelConfig  # input_size (H, W) and backbone: the crops, GetModelInfo
    device: torch.device  # where crop's crops and infer's outputs are
    batch_size: int  # persons per model call of refine and refine_images
    flip_test: bool  # each crop refined with its mirror too (GetModelInfo)
    backend: str  # what runs the model: "torch" or "onnxruntime"

    def describe(self) -> str:
        """The backend as GetModelInfo names it: "torch", "onnxruntime (CPUExecutionProvider, int8)"."""
        ...

    def refine(self, images: list[torch.Tensor], image_index, poses,
               crop_poses=None, reductions=None) -> tuple[np.ndarray, np.ndarray]:
        """Decoded (3, Hi, Wi) uint8 images, image_index (P,), poses (P, K, 3) in image pixels → refined xy
        (P, K, 2) in image pixels and confidence (P, K). ``reductions``: per image the reduction it was decoded
        at (None: full size)."""
        ...

    def decode_reduction(self, poses) -> int:
        """The largest reduction (1, 2, 4 or 8) an image file holding ``poses`` may be decoded at."""
        ...

    def refine_parts(self, images: list[torch.Tensor], image_index, poses,
                     crop_poses=None, reductions=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``refine`` before the per-joint choice: xy (P, K, 2), confidence (P, K), input confidence (P, K)."""
        ...

    def crop(self, images: list[torch.Tensor], image_index, poses: torch.Tensor, crop_poses: torch.Tensor):
        """Crops (P, 3, H, W), keypoints in crop pixels (P, K, 3) on the device, affine (P, 2, 3) crop → image,
        ok (P,) bool."""
        ...

    def infer(self, crops: torch.Tensor, kp_crop: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The model on the crops of ``crop``: coords (P, K, 2) in crop pixels and confidence (P, K), on the device."""
        ...

    def to_image(self, coords: torch.Tensor, affine: torch.Tensor) -> np.ndarray:
        """Crop-pixel coords (P, K, 2) → image pixels (P, K, 2)."""
        ...

    def stage(self, t: torch.Tensor) -> torch.Tensor:
        """A host tensor made ready for the device (pinned for a GPU; as it is elsewhere)."""
        ...
