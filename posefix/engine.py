"""The refinement engine: persons of many images → crops → model → refined keypoints + confidence.

Glossary: P persons, K = 17 joints, (H, W) the model's input size. Every path that refines —
validation during training, ``posefix refine``, the service — goes through :class:`Refiner`, so a
refinement is the same number wherever it is asked for.
"""
from __future__ import annotations

import dataclasses
import json
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from . import codec
from .choice import METADATA_KEY, FittedChoice
from .devices import resolve_device
from .errors import InputError
from .keypoints import NUM_KEYPOINTS
from .model import ModelConfig, PoseFixNet, fold_batchnorm
from .protocols import RefinerLike

PRECISIONS = ("fp32", "bf16")
BACKENDS = ("torch", "onnxruntime")
OUTPUTS = ("choice", "raw")
# The default choice margin of a checkpoint without a fitted rule: the refined confidence (at most 1) never
# exceeds the input joint's estimate by more, so every input joint is kept.
UNFITTED_MARGIN = 1.0
# What refine, refine-video and serve say when that default applies.
KEEPS_INPUT_NOTICE = ("the checkpoint's choice is not fitted to an estimator, so every input joint is kept "
                      "(posefix fit-choice fits it; --choice-margin 0 takes the heads' own choice, --output raw "
                      "every correction)")


class Refiner:
    """Refines poses with a trained :class:`PoseFixNet`: an inference copy of it (eval mode, BatchNorm folded
    into the convolutions, no gradients), on ``device``.

    ``output``: "choice" (the default) gives, for every joint, either the input joint or the refined one: the
    refined one where the checkpoint's fitted rule (``posefix fit-choice``) takes it — ``2p - 1`` above the
    margin — or, without a fitted rule, where the refined joint's confidence exceeds the input-confidence
    head's estimate for the input joint by more than the margin. ``choice_margin`` None (the default): the
    fitted rule's own margin, else ``UNFITTED_MARGIN``, which keeps every input joint (the heads learn on
    synthesized errors, and on real estimators' outputs their comparison alone lowered AP); 0 is the heads'
    own comparison. A kept input joint is the input's exact coordinates, with the input-confidence as its
    confidence (0 for an absent input joint); an input joint with non-finite coordinates is never kept. An untrained model returns the
    input exactly. "raw": every joint refined, as the model puts it out.
    """

    def __init__(self, model: PoseFixNet, device: str | torch.device = "cpu", batch_size: int = 64,
                 flip_test: bool = False, precision: str = "fp32", channels_last: bool = False,
                 output: str = "choice", choice_margin: float | None = None):
        if precision not in PRECISIONS:
            raise InputError("precision", f"must be one of {list(PRECISIONS)}, got {precision!r}")
        if output not in OUTPUTS:
            raise InputError("output", f"must be one of {list(OUTPUTS)}, got {output!r}")
        if choice_margin is not None and not np.isfinite(choice_margin):
            raise InputError("choice_margin", f"must be a finite number, got {choice_margin!r}")
        self.device = resolve_device(device)
        # The backend that executes the model: "torch", or another called like a PoseFixNet that returns its
        # dict (posefix.onnx_backend.OnnxModel: "onnxruntime"), so batching and decoding are the same code.
        self.backend = "torch" if isinstance(model, PoseFixNet) else model.backend
        if self.backend != "torch" and precision != "fp32":
            raise InputError("--precision", f"{precision} is for the torch backend; the {self.backend} model's "
                             "arithmetic is its file's")
        if self.backend == "torch":
            # BatchNorm folded into the convolutions (the same function, a memory pass less per layer), on a
            # copy: the model given, which may still be training, is left as it is.
            self.model = fold_batchnorm(model).to(self.device)
            if channels_last:
                self.model = self.model.to(memory_format=torch.channels_last)
        else:
            self.model = model
        self.cfg: ModelConfig = model.cfg
        self.batch_size = batch_size
        self.flip_test = flip_test
        self.precision = precision  # "bf16": the model under bfloat16 autocast (coordinates stay float32/64)
        self.channels_last = channels_last and self.backend == "torch"
        self.output = output
        # A choice fitted to one estimator (posefix fit-choice), carried by the checkpoint; None: the heads' own.
        self.fitted_choice = getattr(model, "fitted_choice", None)
        # None: the fitted rule's own margin (chosen on its labelled images), else every input joint kept.
        if choice_margin is None:
            choice_margin = self.fitted_choice.margin if self.fitted_choice is not None else UNFITTED_MARGIN
        self.choice_margin = float(choice_margin)

    @property
    def keeps_every_input(self) -> bool:
        """Whether the choice, as configured, returns every finite input joint exactly (the default for a
        checkpoint whose choice was not fitted to an estimator)."""
        return keeps_every_input(self.output, self.choice_margin, self.fitted_choice is not None)

    @classmethod
    def from_checkpoint(cls, path: str | Path | None, device: str = "cpu", batch_size: int = 64,
                        flip_test: bool = False, precision: str = "fp32", channels_last: bool = False,
                        output: str = "choice", choice_margin: float | None = None, backend: str | None = None,
                        onnx: str | Path | None = None, provider: str | None = None) -> Refiner:
        """``backend`` "onnxruntime" (the default where an ``onnx`` file is given, else "torch"): ONNX Runtime runs
        the model, from the file ``onnx`` or, without one, the checkpoint ``path`` exported in memory, on the
        execution ``provider`` (see :mod:`posefix.onnx_backend`)."""
        device = resolve_device(device)
        backend = backend or ("onnxruntime" if onnx is not None else "torch")
        if backend not in BACKENDS:
            raise InputError("--backend", f"must be one of {list(BACKENDS)}, got {backend!r}")
        if onnx is None and path is None:
            raise InputError("--checkpoint", "is required (or --onnx FILE with --backend onnxruntime)")
        if backend == "torch" and onnx is None:
            return cls(load_weights(path), device, batch_size, flip_test, precision, channels_last, output,
                       choice_margin)
        if backend == "torch":
            raise InputError("--onnx", "is run by --backend onnxruntime, not torch")
        from .onnx_backend import onnx_model

        return cls(onnx_model(path, onnx, device, provider), device, batch_size, flip_test, precision, channels_last,
                   output, choice_margin)

    @torch.no_grad()
    def refine(self, images: list[torch.Tensor], image_index, poses, crop_poses=None) -> tuple[np.ndarray, np.ndarray]:
        """images: decoded (3, Hi, Wi) uint8 tensors; image_index (P,) which image each person is in;
        poses (P, K, 3) input keypoints (x, y, score) in image pixels, a joint present where its
        score > 0 and x, y are finite; crop_poses (P, K, 3), optional: crop around these instead (a
        video's previous refined pose). Returns refined (P, K, 2) in image pixels and confidence (P, K)
        (with ``output="choice"`` a joint kept from the input is its input coordinates exactly, see
        :func:`kept_input`). Persons without a present joint come back unchanged with confidence 0."""
        xy, conf, input_conf = self.refine_parts(images, image_index, poses, crop_poses)
        if self.output == "choice":
            xy, conf = choose(poses, xy, conf, input_conf, self.choice_margin, self.fitted_choice)
        return xy, conf

    @torch.no_grad()
    def refine_parts(self, images: list[torch.Tensor], image_index, poses, crop_poses=None):
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
            out_xy, out_conf, out_input, ok = self._batch(images, image_index[sl], poses[sl], crops[sl])
            xy[sl][ok], conf[sl][ok], input_conf[sl][ok] = out_xy[ok], out_conf[ok], out_input[ok]
        return xy, conf, input_conf

    @staticmethod
    def _present(poses):
        present = (poses[..., 2] > 0) & torch.isfinite(poses[..., :2]).all(-1)  # (P, K)
        return torch.cat([torch.nan_to_num(poses[..., :2]), present[..., None].double()], dim=-1)

    def _batch(self, images, image_index, poses, crop_poses):
        crops, kp_crop, affine, ok = self.prepare(images, image_index, poses, crop_poses)
        coords, conf, input_conf = self._forward(crops, kp_crop)
        return self.back(coords, affine), conf.cpu().numpy(), input_conf.cpu().numpy(), ok

    def prepare(self, images, image_index, poses, crop_poses):
        """The crops and the input keypoints in crop pixels on the device: crops (P, 3, H, W) float in [0, 1],
        kp_crop (P, K, 3), affine (P, 2, 3) float64 crop → image (on the CPU), ok (P,) bool: persons that can
        be refined. ``poses`` and ``crop_poses`` are float64 tensors (P, K, 3)."""
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
        crops = codec.warp_crops(pictures, torch.from_numpy(local.reshape(-1)), self._to_device(affine.float()), (h, w))
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
        """The model on prepared crops: refined coords (P, K, 2) float64 in crop pixels and confidence (P, K),
        both on the device. With ``flip_test``, averaged with the mirrored crop's, mapped back."""
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
                input_conf = (input_conf + codec.swap_partners(torch.sigmoid(out_f["input_confidence_logit"].float()), 1)) / 2
        return coords, conf, input_conf

    @staticmethod
    def back(coords, affine) -> np.ndarray:
        """Crop-pixel coords (P, K, 2) on the device → image pixels (P, K, 2), a numpy array."""
        return codec.apply_affine(coords.cpu(), affine).numpy()


def choose(poses: np.ndarray, xy: np.ndarray, conf: np.ndarray, input_conf: np.ndarray,
           margin: float = 0.0, fitted=None) -> tuple[np.ndarray, np.ndarray]:
    """The per-joint choice: poses (P, K, 3) the input (image pixels), xy (P, K, 2) and conf (P, K) the refined
    joints and their confidence, input_conf (P, K) the input joints' estimated confidence. A joint is the
    refined one where ``conf > input_conf + margin`` — with a ``fitted`` rule (:class:`posefix.choice.FittedChoice`),
    where its probability p that the refined joint is closer to the truth gives ``2p - 1 > margin`` — or where
    the input joint is not finite; else the input joint's exact coordinates with ``input_conf``, 0 where the
    input joint is absent (score <= 0): kept as given, it is no more there than it was. Returns the chosen
    xy (P, K, 2) and confidence (P, K)."""
    poses = np.asarray(poses, dtype=np.float64)
    given = poses[..., :2]
    if fitted is None:
        take = conf > input_conf + margin
    else:
        take = np.tanh(fitted.logit(poses, xy, conf, input_conf) / 2) > margin  # tanh(t / 2) = 2 sigmoid(t) - 1
    refined = take | ~np.isfinite(given).all(-1)
    kept_conf = np.where(poses[..., 2] > 0, input_conf, 0.0)
    return np.where(refined[..., None], xy, given), np.where(refined, conf, kept_conf)


def keeps_every_input(output: str, choice_margin: float | None, fitted: bool) -> bool:
    """Whether refining with ``output`` and ``choice_margin`` (None: the default) returns every finite input joint
    exactly, for a checkpoint with (``fitted``) or without a fitted choice."""
    if output != "choice" or fitted:
        return False
    return choice_margin is None or choice_margin >= UNFITTED_MARGIN


def has_fitted_choice(path: str | Path) -> bool:
    """Whether the weights file at ``path`` carries a choice fitted by ``posefix fit-choice`` (read from its header)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return METADATA_KEY in (f.metadata() or {})


def kept_input(poses, xy) -> np.ndarray:
    """(P, K) bool: where the output joint xy (P, K, 2) is the input joint of poses (P, K, 3) exactly."""
    return (np.asarray(xy, dtype=np.float64) == np.asarray(poses, dtype=np.float64)[..., :2]).all(-1)


def export_weights(model: PoseFixNet, path: str | Path, metadata: dict) -> None:
    """Write the model's weights as safetensors with its ModelConfig (and ``metadata``) in the header."""
    meta = {"posefix_model_config": json.dumps(dataclasses.asdict(model.cfg))}  # input_size: a list in JSON
    meta.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()})
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_safetensors(state, path, meta)


def save_safetensors(state: dict, path: str | Path, metadata: dict) -> None:
    """Write tensors as a safetensors file atomically, with the mode the umask gives. The bytes are made in
    memory and written by :func:`posefix.fileio.write_bytes_atomic`: safetensors' own file writer makes a
    temporary file of its own (mode 0600, named ``.tmpXXXXXX``) that a killed process would leave behind."""
    from safetensors.torch import save

    from .fileio import write_bytes_atomic

    write_bytes_atomic(path, save(state, metadata=metadata))


def load_weights(path: str | Path) -> PoseFixNet:
    """A :class:`PoseFixNet` from a ``model.safetensors`` written by :func:`export_weights`."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise InputError("checkpoint", "file not found", str(path))
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except (SafetensorError, OSError, ValueError) as e:
        raise InputError("checkpoint", f"not a safetensors file: {e}", str(path)) from None
    if "posefix_model_config" not in meta:
        raise InputError("checkpoint", "has no posefix model config in its metadata", str(path))
    from .config import model_config_from_json

    model = PoseFixNet(model_config_from_json(meta["posefix_model_config"], "posefix_model_config", str(path)))
    # Weights written before the input-confidence head existed load with that head at its initial state: the
    # per-joint choice then keeps every input joint (output="raw" refines as such weights always did).
    for name, value in model.state_dict().items():
        if name.startswith("input_confidence.") and name not in state:
            state[name] = value
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise InputError("checkpoint", f"weights do not match the model: {str(e).splitlines()[0]}", str(path)) from None
    if METADATA_KEY in meta:
        model.fitted_choice = FittedChoice.from_json(meta[METADATA_KEY], str(path))
    return model


def refine_images(refiner: RefinerLike, jobs, workers: int = 2, lookahead: int = 8, progress=None, skipped=None,
                  parts: bool = False):
    """Refine the persons of many images, batching persons across images.

    jobs: iterable of (key, image path or decoded (3, H, W) uint8 tensor, poses (P, K, 3) image pixels). Images
    are decoded in ``workers`` background threads, up to ``lookahead`` ahead, while the model runs; each is
    decoded once. Every model call but the last gets exactly ``refiner.batch_size`` persons: an image's persons
    may be split between two calls. Fixed shapes keep the device busy and let freed memory be reused as it is
    (see :mod:`posefix.runtime`). Yields (key, xy (P, K, 2), confidence (P, K)) in the order of ``jobs``, each
    as soon as its persons are done. ``progress(n)`` is called with the number of persons of each call. An
    image that cannot be read or decoded raises its InputError or, with ``skipped`` a list, is appended to it
    as (key, message), its persons not refined and not yielded. ``parts``: refine with
    :meth:`Refiner.refine_parts` instead, yielding (key, xy, confidence, input confidence).
    """
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    jobs, want_parts = iter(jobs), parts
    stage = refiner.stage
    with ThreadPoolExecutor(max_workers=max(workers, 1), thread_name_prefix="posefix-decode") as pool:
        queue: deque[_Job] = deque()  # in the order of jobs, not yet yielded

        def add_one() -> bool:
            job = next(jobs, None)
            if job is None:
                return False
            key, source, poses = job
            image = pool.submit(_staged, stage, source)
            queue.append(_Job(key, image, np.asarray(poses, dtype=np.float64).reshape(-1, NUM_KEYPOINTS, 3)))
            return True

        def fill():
            while sum(job.taken == 0 for job in queue) < lookahead and add_one():
                pass

        while True:
            fill()
            parts, need, i = [], refiner.batch_size, 0  # parts: (job, first person, end)
            while need > 0:
                if i == len(queue) and not add_one():
                    break
                job = queue[i]
                if skipped is not None and job.taken == 0 and isinstance(job.image.exception(), InputError):
                    job.taken = len(job.poses)  # its image failed (reported when it leaves the queue)
                    if progress is not None:
                        progress(len(job.poses))
                take = min(len(job.poses) - job.taken, need)
                if take > 0:
                    parts.append((job, job.taken, job.taken + take))
                    job.taken += take
                    need -= take
                i += 1
            if parts:
                jobs_in = list(dict.fromkeys(job for job, _, _ in parts))
                images = [job.image.result() for job in jobs_in]
                where = {id(job): n for n, job in enumerate(jobs_in)}
                index = np.concatenate([np.full(hi - lo, where[id(job)], dtype=np.int64) for job, lo, hi in parts])
                poses = np.concatenate([job.poses[lo:hi] for job, lo, hi in parts])
                out = refiner.refine_parts(images, index, poses) if want_parts else refiner.refine(images, index, poses)
                start = 0
                for job, lo, hi in parts:
                    job.xy[lo:hi], job.conf[lo:hi] = out[0][start:start + hi - lo], out[1][start:start + hi - lo]
                    if want_parts:
                        job.input_conf[lo:hi] = out[2][start:start + hi - lo]
                    start += hi - lo
                if progress is not None:
                    progress(len(poses))
            while queue and queue[0].taken == len(queue[0].poses):
                job = queue.popleft()
                error = job.image.exception() if skipped is not None else None
                if isinstance(error, InputError):
                    skipped.append((job.key, str(error)))
                    continue
                job.image.result()  # an image without persons is still decoded: a broken file is reported
                yield (job.key, job.xy, job.conf, job.input_conf) if want_parts else (job.key, job.xy, job.conf)
            if not parts and not queue:
                return


class _Job:
    """One image of refine_images: its decoding, its poses, how many are in a batch, and their results."""

    __slots__ = ("conf", "image", "input_conf", "key", "poses", "taken", "xy")

    def __init__(self, key, image, poses: np.ndarray):
        self.key, self.image, self.poses, self.taken = key, image, poses, 0
        self.xy = poses[..., :2].copy()
        self.conf = np.zeros(poses.shape[:2])
        self.input_conf = np.zeros(poses.shape[:2])


def _staged(stage, source):
    """A job's image, decoded when it is a file, staged for the refiner's device."""
    from .images import decode

    return stage(source if isinstance(source, torch.Tensor) else decode(source))


def refine_results(refiner: Refiner, results: list[dict], image_paths: dict) -> list[dict]:
    """Refine COCO keypoint results (validated) as ``posefix refine`` does (:func:`posefix.refine.refine_estimates`).
    ``image_paths`` maps image_id → file. Each refined keypoint's third value is the refiner's confidence;
    ``keypoint_source`` says for each whether it is the ``"input"`` joint or the ``"refined"`` one; the instance
    score is :func:`posefix.refine.instance_scores`' (with the choice the input's); every other field is kept."""
    from .formats import LAYOUTS, Estimates, write_coco_results
    from .refine import by_image, refine_estimates

    if not results:
        return []
    keys = [r["image_id"] for r in results]
    missing = [i for i in by_image(keys) if i not in image_paths]
    if missing:
        raise InputError("image", f"no image file for image_id {missing[0]}")
    poses = np.array([r["keypoints"] for r in results], dtype=np.float64).reshape(len(results), -1, 3)
    est = Estimates("coco", LAYOUTS["coco17"], keys, poses, np.array([r["score"] for r in results], dtype=np.float64),
                    poses, list(results), False)
    out = refine_estimates(refiner, est, {i: image_paths[i] for i in by_image(keys)})
    return write_coco_results(est, out.xy, out.conf, out.scores, keys, out.kept)
