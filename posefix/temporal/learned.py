"""A learned temporal refiner after SmoothNet (Zeng et al., ECCV 2022): a small network over a window of a
person's scale-normalised keypoint trajectories and scores that corrects the ``body`` smoother's output.

What it sees, per joint and frame of a window of W frames: the ``body`` smoother's position of the joint, what
that smoother took away from the input there, the joint's score and presence, and its left/right partner's
smoothed position and score, all relative to the frame's own (smoothed) centre; and the centre's motion since
the previous frame; all in units of the person's size (the median over the window of the keypoint box's
√area), so one network serves near and far persons and any frame size. One set of weights is shared by all
joints (a one-hot of the joint is an input); its output is a correction of the joint's smoothed window, zero
for an untrained network. Absent joints enter as the linear interpolation of their neighbours in time,
flagged absent.

Offline, a frame is the weighted mean of the corrections of the W windows that hold it (a Hann weight, so
frames near a window's edge count less); causal, a frame is the last frame of the window that ends on it,
from a second network trained for that position. Both live in one safetensors file with their settings.

Glossary: T frames, K = 17 COCO joints, W window length, xy (T, K, 2) pixels, score (T, K), present (T, K).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from ..errors import InputError
from ..keypoints import NUM_KEYPOINTS, PARTNER
from .core import person_scale
from .smoothers import BodySmoother

FEATURES_PER_FRAME = 12  # own u (2), residual (2), score, present; partner u (2), score; centre's step (2); inside
RESIDUAL_CLIP = 3.0
MIN_SCALE_PX = 4.0


@dataclass(frozen=True)
class NetConfig:
    window: int = 15
    hidden: int = 256
    blocks: int = 2

    def __post_init__(self):
        if not (isinstance(self.window, int) and 3 <= self.window <= 129 and self.window % 2 == 1):
            raise InputError("window", f"must be an odd whole number in [3, 129], got {self.window!r}")
        if not (isinstance(self.hidden, int) and 8 <= self.hidden <= 4096):
            raise InputError("hidden", f"must be a whole number in [8, 4096], got {self.hidden!r}")
        if not (isinstance(self.blocks, int) and 0 <= self.blocks <= 16):
            raise InputError("blocks", f"must be a whole number in [0, 16], got {self.blocks!r}")


class TemporalNet(nn.Module):
    """Per joint: (W · FEATURES_PER_FRAME + K) → hidden → residual blocks → W · 2 corrections."""

    def __init__(self, config: NetConfig):
        super().__init__()
        self.config = config
        w, h = config.window, config.hidden
        self.inp = nn.Linear(w * FEATURES_PER_FRAME + NUM_KEYPOINTS, h)
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(h), nn.Linear(h, h), nn.SiLU(), nn.Linear(h, h))
                                    for _ in range(config.blocks))
        self.out = nn.Sequential(nn.LayerNorm(h), nn.Linear(h, w * 2))
        nn.init.zeros_(self.out[1].weight)
        nn.init.zeros_(self.out[1].bias)
        self.register_buffer("joint_code", torch.eye(NUM_KEYPOINTS), persistent=False)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        """(N, K, W, F) features → (N, K, W, 2) corrections of the own-position channels."""
        n, k, w, f = feats.shape
        x = torch.cat([feats.reshape(n, k, w * f), self.joint_code.expand(n, k, k)], dim=-1)
        x = nn.functional.silu(self.inp(x))
        for block in self.blocks:
            x = x + block(x)
        return self.out(x).reshape(n, k, w, 2)


# ---------------------------------------------------------------------------------------------- features


def fill_gaps(xy: np.ndarray, present: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Absent joints by linear interpolation in time between their nearest present frames (held constant
    before the first and after the last); joints never present take the person's centre. Returns the filled
    (T, K, 2) and the centre (T, 2): the mean of each frame's filled joints that are present somewhere."""
    t = xy.shape[0]
    frames = np.arange(t)[:, None]
    idx = np.where(present, frames, -1)
    prev = np.maximum.accumulate(idx, axis=0)
    nxt = np.where(present, frames, t)
    nxt = np.minimum.accumulate(nxt[::-1], axis=0)[::-1]
    ever = present.any(axis=0)
    prev_c = np.where(prev < 0, nxt, prev).clip(0, t - 1)
    nxt_c = np.where(nxt >= t, prev, nxt).clip(0, t - 1)
    k = np.arange(xy.shape[1])[None, :]
    a, b = xy[prev_c, k], xy[nxt_c, k]
    span = (nxt_c - prev_c).astype(float)
    w = np.where(span > 0, (frames - prev_c) / np.where(span > 0, span, 1), 0.0)[..., None]
    filled = np.where(present[..., None], xy, a + w * (b - a))
    if ever.any():
        centre = filled[:, ever].mean(axis=1)
    else:
        centre = np.zeros((t, 2))
    filled[:, ~ever] = centre[:, None]
    return filled, centre


def person_size(filled: np.ndarray, present: np.ndarray) -> np.ndarray:
    """(T,) the √area of the box of the joints present somewhere in the track, ≥ MIN_SCALE_PX."""
    ever = present.any(axis=0)
    if not ever.any():
        return np.full(len(filled), MIN_SCALE_PX)
    pts = filled[:, ever]
    ext = pts.max(axis=1) - pts.min(axis=1)
    return np.maximum(np.sqrt(ext[:, 0] * ext[:, 1]), MIN_SCALE_PX)


def window_features(xy: np.ndarray, base: np.ndarray, score: np.ndarray, present: np.ndarray, window: int,
                    causal: bool):
    """Features of the T windows of one track, each around (offline: centred on; causal: ending at) its frame.

    ``base`` (T, K, 2) is the ``body`` smoother's output for the track. Returns feats (T, K, W, F) float32, the
    windows' frame indices (T, W) clipped into the track, the base's per-frame centres (T, 2) and the windows'
    sizes (T,): a window's u = (base − centre of its frame) / size, so the whole body's motion is not in u and
    passes through untouched, and r = (xy − base) / size is what the base smoothed away."""
    t = xy.shape[0]
    filled, _ = fill_gaps(xy, present)
    base_filled, centre = fill_gaps(base, present)
    size = person_size(filled, present)
    half = window // 2
    offsets = np.arange(window) - (window - 1 if causal else half)
    raw = np.arange(t)[:, None] + offsets[None, :]
    inside = (raw >= 0) & (raw < t)
    frames = raw.clip(0, t - 1)
    wsize = np.median(size[frames], axis=1)
    scale = wsize[:, None, None, None]
    u = (base_filled[frames] - centre[frames][:, :, None]) / scale  # (T, W, K, 2)
    r = np.clip((filled[frames] - base_filled[frames]) / scale, -RESIDUAL_CLIP, RESIDUAL_CLIP)
    step = np.diff(centre, axis=0, prepend=centre[:1])  # the centre's motion since the previous frame
    c = np.clip(step[frames] / wsize[:, None, None], -2.0, 2.0)  # (T, W, 2)
    s = np.where(inside[..., None], score[frames], 0.0)  # (T, W, K)
    p = (present[frames] & inside[..., None]).astype(float)
    feats = np.concatenate([
        u, r, s[..., None], p[..., None],
        u[:, :, PARTNER], s[:, :, PARTNER, None],
        np.broadcast_to(c[:, :, None], u.shape),
        np.broadcast_to(inside[:, :, None, None], s.shape + (1,)).astype(float),
    ], axis=-1)  # (T, W, K, F)
    return feats.transpose(0, 2, 1, 3).astype(np.float32), frames, centre, wsize


def _hann(window: int) -> np.ndarray:
    return 0.5 + 0.5 * np.cos(np.linspace(-np.pi, np.pi, window + 2)[1:-1])


# ---------------------------------------------------------------------------------------------- the smoother


class LearnedSmoother:
    """The learned temporal refiner as a smoother: ``smoother(xy, score, present, scale, causal) -> xy``, the
    ``body`` smoother's output corrected by the network (an untrained network leaves it as it is)."""

    def __init__(self, offline: TemporalNet, causal: TemporalNet, batch: int = 4096):
        self.nets = {False: offline.eval(), True: causal.eval()}
        self.base = BodySmoother()
        self.batch = batch

    @classmethod
    def load(cls, path) -> LearnedSmoother:
        offline, causal = load_weights(path)
        return cls(offline, causal)

    def base_output(self, xy, score, present, scale, causal: bool) -> np.ndarray:
        """The ``body`` smoother's output the network corrects; ``scale`` None: the person's scale as the
        pipeline measures it."""
        if scale is None:
            scale = person_scale(xy[None], present[None], causal)[0]
        return self.base(xy, score, present, scale, causal)

    @torch.inference_mode()
    def __call__(self, xy, score, present, scale=None, causal: bool = False) -> np.ndarray:
        xy = np.asarray(xy, np.float64)
        score = np.asarray(score, np.float64)
        present = np.asarray(present, bool)
        t = xy.shape[0]
        if t == 0 or not present.any():
            return xy.copy()
        base = self.base_output(xy, score, present, scale, bool(causal))
        net = self.nets[bool(causal)]
        w = net.config.window
        feats, frames, centre, wsize = window_features(xy, base, score, present, w, bool(causal))
        delta = np.concatenate([net(torch.from_numpy(feats[i:i + self.batch])).numpy()
                                for i in range(0, t, self.batch)]).astype(np.float64)  # (T, K, W, 2)
        u = feats[..., :2].astype(np.float64) + delta
        pred = centre[frames][:, None] + wsize[:, None, None, None] * u  # (T, K, W, 2) pixels
        if causal:
            return pred[:, :, -1]
        inside = (np.arange(t)[:, None] + np.arange(w)[None, :] - w // 2)
        valid = (inside >= 0) & (inside < t)
        weight = _hann(w)[None, :] * valid  # (T, W)
        out = np.zeros_like(xy)
        total = np.zeros(t)
        np.add.at(out, frames[valid], (pred * weight[:, None, :, None]).transpose(0, 2, 1, 3)[valid])
        np.add.at(total, frames[valid], weight[valid])
        return out / total[:, None, None]


# ---------------------------------------------------------------------------------------------- weights


def save_weights(path, offline: TemporalNet, causal: TemporalNet, info: dict | None = None) -> None:
    from ..weights import save_safetensors  # start-up time: the refiner's model (torchvision) only when saving

    tensors = {f"offline.{k}": v.detach().clone() for k, v in offline.state_dict().items()}
    tensors.update({f"causal.{k}": v.detach().clone() for k, v in causal.state_dict().items()})
    meta = {"posefix.temporal": json.dumps({"offline": asdict(offline.config), "causal": asdict(causal.config),
                                            **(info or {})})}
    save_safetensors(tensors, path, meta)


def load_weights(path) -> tuple[TemporalNet, TemporalNet]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("posefix.temporal", "null"))
            if not isinstance(meta, dict):
                raise InputError(str(path), "is not a posefix temporal refiner (no posefix.temporal metadata)")
            nets = []
            for part in ("offline", "causal"):
                cfg = meta.get(part)
                if not isinstance(cfg, dict) or set(cfg) - {"window", "hidden", "blocks"}:
                    raise InputError(f"{path}: posefix.temporal.{part}", "must hold window, hidden and blocks")
                net = TemporalNet(NetConfig(**cfg))
                state = {k[len(part) + 1:]: f.get_tensor(k) for k in f.keys() if k.startswith(part + ".")}  # noqa: SIM118
                try:
                    net.load_state_dict(state)
                except RuntimeError as e:
                    raise InputError(f"{path}: {part}", f"weights do not fit the network: {str(e)[:200]}") from None
                nets.append(net)
    except (OSError, SafetensorError, json.JSONDecodeError, RecursionError) as e:
        raise InputError(str(path), f"cannot read temporal refiner weights: {e}") from None
    return nets[0], nets[1]
