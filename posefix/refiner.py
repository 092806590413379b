"""The refiner: persons of many images → crops → model → refined keypoints in image pixels + confidence.

Glossary: P persons, K = 17 joints, (H, W) the model's input size. Every path that refines —
validation during training, ``posefix refine``, the service — goes through :class:`Refiner`, so a
refinement is the same number wherever it is asked for. How it runs is a
:class:`~posefix.options.RefineOptions`; which joint it gives, the input's or the refined one, is
:mod:`posefix.choice`'s rule.
"""
from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from . import codec
from .choice import choose, keeps_every_input, resolved_margin
from .devices import resolve_device
from .errors import InputError
from .images import JPEG_REDUCTIONS
from .keypoints import NUM_KEYPOINTS
from .model import ModelConfig, PoseFixNet, fold_batchnorm
from .onnx_backend import onnx_model
from .options import RefineOptions
from .weights import load_weights


class Refiner:
    """Refines poses with a trained :class:`PoseFixNet`: an inference copy of it (eval mode, BatchNorm folded
    into the convolutions, no gradients), run as ``options`` (a :class:`~posefix.options.RefineOptions`, with
    ``changes`` to it) say.

    ``output``: "choice" (the default) gives, for every joint, either the input joint or the refined one: the
    refined one where the checkpoint's fitted rule (``posefix fit-choice``) takes it — ``2p - 1`` above the
    margin — or, without a fitted rule, where the refined joint's confidence exceeds the input-confidence
    head's estimate for the input joint by more than the margin. ``choice_margin`` None (the default): the
    fitted rule's own margin, else :data:`posefix.choice.UNFITTED_MARGIN`, which keeps every input joint (the heads
    learn on synthesized errors, and on real estimators' outputs their comparison alone lowered AP); 0 is the
    heads' own comparison. A kept input joint is the input's exact coordinates, with the input-confidence as its
    confidence (0 for an absent input joint); an input joint with non-finite coordinates is never kept. An
    untrained model returns the input exactly. "raw": every joint refined, as the model puts it out.
    """

    def __init__(self, model: PoseFixNet, options: RefineOptions | None = None, **changes):
        options = _options(options, changes)
        self.options = options
        self.device = resolve_device(options.device)
        # The backend that executes the model: "torch", or another called like a PoseFixNet that returns its
        # dict (posefix.onnx_backend.OnnxModel: "onnxruntime"), so batching and decoding are the same code.
        self.backend = "torch" if isinstance(model, PoseFixNet) else model.backend
        if self.backend != "torch" and options.precision != "fp32":
            raise InputError("precision", f"{options.precision} is for the torch backend; the {self.backend} "
                             "model's arithmetic is its file's")
        if self.backend == "torch":
            # BatchNorm folded into the convolutions (the same function, a memory pass less per layer), on a
            # copy: the model given, which may still be training, is left as it is.
            self.model = fold_batchnorm(model).to(self.device)
            if options.channels_last:
                self.model = self.model.to(memory_format=torch.channels_last)
        else:
            self.model = model
        self.cfg: ModelConfig = model.cfg
        self.batch_size = options.batch_size
        self.flip_test = options.flip_test
        self.precision = options.precision  # "bf16": the model under bfloat16 autocast (coordinates stay float32/64)
        self.channels_last = options.channels_last and self.backend == "torch"
        self.output = options.output
        self.reduced_decoding = options.reduced_decoding
        # A choice fitted to one estimator (posefix fit-choice), carried by the checkpoint; None: the heads' own.
        self.fitted_choice = getattr(model, "fitted_choice", None)
        self.choice_margin = resolved_margin(options.choice_margin, self.fitted_choice)

    @property
    def keeps_every_input(self) -> bool:
        """Whether the choice, as configured, returns every finite input joint exactly (the default for a
        checkpoint whose choice was not fitted to an estimator)."""
        return keeps_every_input(self.output, self.choice_margin, self.fitted_choice is not None)

    @classmethod
    def from_checkpoint(cls, path: str | Path | None, options: RefineOptions | None = None, **changes) -> Refiner:
        """A refiner of the weights file ``path`` (``posefix train``), run as ``options`` say (with ``changes``
        to them, e.g. ``device="cuda"``). With the onnxruntime backend ONNX Runtime runs the model, from the
        file ``options.onnx`` or, without one, ``path`` exported in memory, on the execution ``provider``
        (see :mod:`posefix.onnx_backend`)."""
        options = _options(options, changes)
        device = resolve_device(options.device)
        if options.onnx is None and path is None:
            raise InputError("checkpoint", "is required (or an onnx file with the onnxruntime backend)")
        if options.resolved_backend == "torch":
            return cls(load_weights(path), options)
        return cls(onnx_model(path, options.onnx, device, options.provider), options)

    def decode_reduction(self, poses) -> int:
        """The largest reduction (1, 2, 4 or 8) an image holding ``poses`` (P, K, 3, image pixels) can be
        decoded at for these persons' crops (:func:`posefix.images.decode_reduced`): at most every crop's step,
        the image pixels between two of its pixels, so that no crop samples the image more finely than it was
        decoded. 1 where ``reduced_decoding`` is off; 8 where no person can be refined."""
        if not self.reduced_decoding:
            return 1
        kp = self._present(torch.as_tensor(np.asarray(poses, dtype=np.float64)).reshape(-1, NUM_KEYPOINTS, 3))
        kp = kp[(kp[..., 2] > 0).any(-1)]
        if not len(kp):
            return JPEG_REDUCTIONS[-1]
        affine = codec.person_crop_affine(kp, self.cfg.input_size)  # (P, 2, 3) crop → image
        step = float(torch.linalg.vector_norm(affine[..., :2], dim=1).min())  # image pixels per crop pixel
        return max(r for r in JPEG_REDUCTIONS if r <= max(step, 1))

    @torch.no_grad()
    def refine(self, images: list[torch.Tensor], image_index, poses, crop_poses=None,
               reductions=None) -> tuple[np.ndarray, np.ndarray]:
        """images: decoded (3, Hi, Wi) uint8 tensors; image_index (P,) which image each person is in;
        poses (P, K, 3) input keypoints (x, y, score) in image pixels, a joint present where its
        score > 0 and x, y are finite; crop_poses (P, K, 3), optional: crop around these instead (a
        video's previous refined pose); reductions, optional: per image the reduction it was decoded at
        (:meth:`decode_reduction`; None: every image at full size). Returns refined (P, K, 2) in image pixels
        and confidence (P, K) (with ``output="choice"`` a joint kept from the input is its input coordinates
        exactly, see :func:`posefix.choice.kept_input`). Persons without a present joint come back unchanged
        with confidence 0."""
        xy, conf, input_conf = self.refine_parts(images, image_index, poses, crop_poses, reductions)
        if self.output == "choice":
            xy, conf = choose(poses, xy, conf, input_conf, self.choice_margin, self.fitted_choice)
        return xy, conf

    @torch.no_grad()
    def refine_parts(self, images: list[torch.Tensor], image_index, poses, crop_poses=None, reductions=None):
        """:meth:`refine` before the choice: every joint as refined, (P, K, 2) image pixels, its confidence
        (P, K), and the input-confidence head's estimate for each input joint (P, K). Persons without a present
        joint: their input coordinates and confidences 0."""
        poses = torch.as_tensor(np.asarray(poses, dtype=np.float64))
        crops = poses if crop_poses is None else torch.as_tensor(np.asarray(crop_poses, dtype=np.float64))
        image_index = np.asarray(image_index, dtype=np.int64)
        xy = poses[..., :2].clone().numpy()
        conf = np.zeros(poses.shape[:2])
        input_conf = np.zeros(poses.shape[:2])
        for lo in range(0, poses.shape[0], self.batch_size):
            sl = slice(lo, lo + self.batch_size)
            out_xy, out_conf, out_input, ok = self._batch(images, image_index[sl], poses[sl], crops[sl], reductions)
            xy[sl][ok], conf[sl][ok], input_conf[sl][ok] = out_xy[ok], out_conf[ok], out_input[ok]
        return xy, conf, input_conf

    @staticmethod
    def _present(poses):
        present = (poses[..., 2] > 0) & torch.isfinite(poses[..., :2]).all(-1)  # (P, K)
        return torch.cat([torch.nan_to_num(poses[..., :2]), present[..., None].double()], dim=-1)

    def _batch(self, images, image_index, poses, crop_poses, reductions=None):
        crops, kp_crop, affine, ok = self.crop(images, image_index, poses, crop_poses, reductions)
        coords, conf, input_conf = self._forward(crops, kp_crop)
        return self.to_image(coords, affine), conf.cpu().numpy(), input_conf.cpu().numpy(), ok

    def crop(self, images, image_index, poses, crop_poses, reductions=None):
        """The crops and the input keypoints in crop pixels on the device: crops (P, 3, H, W) float in [0, 1],
        kp_crop (P, K, 3), affine (P, 2, 3) float64 crop → image (on the CPU), ok (P,) bool: persons that can
        be refined. ``poses`` and ``crop_poses`` are float64 tensors (P, K, 3); ``reductions``: per image the
        reduction it was decoded at (None: all at full size)."""
        h, w = self.cfg.input_size
        kp = self._present(poses)
        around = kp if crop_poses is poses else self._present(crop_poses)
        ok = (kp[..., 2] > 0).any(-1).numpy() & (around[..., 2] > 0).any(-1).numpy()
        affine = codec.person_crop_affine(around, (h, w))  # (P, 2, 3) crop → image, as training crops
        kp_crop = torch.cat([codec.apply_affine(kp, codec.invert_affine(affine)), kp[..., 2:]], dim=-1)
        if kp.shape[0] == 0:
            empty = torch.zeros((0, 3, h, w), device=self.device)
            return empty, torch.zeros((0, kp.shape[1], 3), device=self.device), affine, ok
        # Everything the device needs goes in two copies and the used images; nothing is read back before the
        # model's output, so on a GPU the host only queues work (pinned sources make the copies asynchronous).
        used, local = np.unique(image_index, return_inverse=True)
        pictures = [self._to_device(images[i]) for i in used]
        sampled = affine if reductions is None else _reduced(affine, np.asarray(reductions)[image_index])
        local = torch.from_numpy(local.reshape(-1))
        crops = codec.warp_crops(pictures, local, self._to_device(sampled.float()), (h, w))
        crops.div_(255)  # sampling is linear: scaling the crops equals scaling each whole image first
        return crops, self._to_device(kp_crop.float()), affine, ok

    def stage(self, t: torch.Tensor) -> torch.Tensor:
        """A host tensor made ready for this refiner's device: pinned where that is a GPU (an asynchronous copy
        then, that waits for nothing), as it is elsewhere. Decoding threads call it, off the model's thread."""
        if self.device.type == "cuda" and t.device.type == "cpu" and not t.is_pinned():
            return t.pin_memory()
        return t

    def describe(self) -> str:
        """What executes the model, as GetModelInfo names it: "torch", or the ONNX Runtime model's description
        ("onnxruntime (CPUExecutionProvider, int8)")."""
        return "torch" if self.backend == "torch" else self.model.describe()

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        return self.stage(t).to(self.device, non_blocking=True)

    def infer(self, crops, kp_crop):
        """The model on the crops of :meth:`crop`: refined coords (P, K, 2) float64 in crop pixels and confidence
        (P, K), both on the device. With ``flip_test``, averaged with the mirrored crop's, mapped back."""
        return self._forward(crops, kp_crop)[:2]

    def _forward(self, crops, kp_crop):
        """:meth:`infer`'s coords and confidence, and the input joints' confidence (P, K)."""
        w = self.cfg.input_size[1]
        if self.channels_last:
            crops = crops.contiguous(memory_format=torch.channels_last)
        if torch.amp.is_autocast_available(self.device.type):
            autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16")
        else:
            autocast = nullcontext()  # a device without autocast (meta) runs as it is
        with autocast:
            out = self.model(crops, keypoints=kp_crop)
            coords = out["coords"].double()
            conf = torch.sigmoid(out["confidence_logit"].float())
            input_conf = torch.sigmoid(out["input_confidence_logit"].float())
            if self.flip_test:
                out_f = self.model(crops.flip(-1), keypoints=codec.flip_keypoints(kp_crop, w))
                coords = (coords + codec.flip_keypoints(out_f["coords"].double(), w)) / 2
                conf = (conf + codec.swap_partners(torch.sigmoid(out_f["confidence_logit"].float()), 1)) / 2
                input_conf = (input_conf
                              + codec.swap_partners(torch.sigmoid(out_f["input_confidence_logit"].float()), 1)) / 2
        return coords, conf, input_conf

    @staticmethod
    def to_image(coords, affine) -> np.ndarray:
        """Crop-pixel coords (P, K, 2) on the device → image pixels (P, K, 2), a numpy array."""
        return codec.apply_affine(coords.cpu(), affine).numpy()


def _reduced(affine: torch.Tensor, reduction: np.ndarray) -> torch.Tensor:
    """Crop → full-image affines (P, 2, 3) → crop → pixels of each image decoded at 1/r (``reduction`` (P,)):
    pixel i of such an image is centred on r · i + (r - 1) / 2 of the full image."""
    r = torch.as_tensor(reduction, dtype=affine.dtype)[:, None, None]
    out = affine / r
    out[..., 2] -= ((r - 1) / (2 * r))[..., 0]
    return out


def _options(options: RefineOptions | None, changes: dict) -> RefineOptions:
    """``options`` (None: the defaults) with ``changes``."""
    if options is not None and not isinstance(options, RefineOptions):
        raise TypeError(f"options must be a RefineOptions, got {type(options).__name__} (device and the other "
                        "options are keyword arguments)")
    options = options or RefineOptions()
    return options.replace(**changes) if changes else options
