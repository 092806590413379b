"""Motion capture as exact 2-D keypoint trajectories: a BVH file's joints by forward kinematics, mapped onto
COCO-17 and projected through a virtual camera that may pan, zoom and roll over the clip.

numpy only. Glossary: F frames, J BVH joints, K = 17 COCO keypoints; trajectories (T, K, 3) = x, y in image
pixels and a visibility (2 labelled, 0 unlabelled, as COCO GT).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..keypoints import NUM_KEYPOINTS

# COCO-17 index ← BVH joint name (the CMU convention). The face has no joints of its own: the nose is placed at
# the middle of the head segment, the eyes and ears stay unlabelled.
COCO_FROM_BVH = {5: "LeftShoulder", 6: "RightShoulder", 7: "LeftElbow", 8: "RightElbow", 9: "LeftWrist",
                 10: "RightWrist", 11: "LeftHip", 12: "RightHip", 13: "LeftKnee", 14: "RightKnee",
                 15: "LeftAnkle", 16: "RightAnkle"}
HEAD = "Head"

_AXES = {"X": 0, "Y": 1, "Z": 2}


@dataclass
class Skeleton:
    names: list[str]
    parents: list[int]                 # -1 for the root
    offsets: np.ndarray                # (J, 3)
    channels: list[list[str]]          # per joint, e.g. ["Xposition", ..., "Zrotation"]
    end_offsets: dict[int, np.ndarray]  # joint → its End Site offset
    motion: np.ndarray                 # (F, C) channel values, degrees for rotations
    frame_time: float


def load_bvh(path) -> Skeleton:
    """Parse a BVH file (hierarchy and motion). Errors name the file and line."""
    path = Path(path)
    try:
        tokens_by_line = [line.split() for line in path.read_text().splitlines()]
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(str(path), f"cannot read a BVH file: {e}") from None
    names, parents, offsets, channels, end_offsets = [], [], [], [], {}
    stack: list[int] = []
    in_end = False
    i = 0

    def fail(what):
        raise InputError(f"{path}:{i + 1}", what)

    while i < len(tokens_by_line):
        tok = tokens_by_line[i]
        if not tok:
            i += 1
            continue
        head = tok[0]
        if head in ("ROOT", "JOINT"):
            if len(tok) < 2:
                fail("a joint without a name")
            names.append(tok[1])
            parents.append(stack[-1] if stack else -1)
            offsets.append(np.zeros(3))
            channels.append([])
        elif head == "End":
            in_end = True
        elif head == "{":
            if not in_end:
                stack.append(len(names) - 1)
        elif head == "}":
            if in_end:
                in_end = False
            elif stack:
                stack.pop()
            else:
                fail("an unmatched '}'")
        elif head == "OFFSET":
            try:
                value = np.array([float(v) for v in tok[1:4]])
            except ValueError:
                fail("OFFSET takes three numbers")
            if value.shape != (3,) or not np.isfinite(value).all():
                fail("OFFSET takes three finite numbers")
            if in_end:
                end_offsets[len(names) - 1] = value
            elif names:
                offsets[-1] = value
        elif head == "CHANNELS":
            if not names:
                fail("CHANNELS before any joint")
            channels[-1] = tok[2:]
            for c in channels[-1]:
                if c[0] not in _AXES or c[1:] not in ("position", "rotation"):
                    fail(f"unknown channel {c!r}")
        elif head == "MOTION":
            break
        i += 1
    if not names:
        raise InputError(str(path), "no joints in the HIERARCHY")
    try:
        frames = int(tokens_by_line[i + 1][1])
        frame_time = float(tokens_by_line[i + 2][2])
    except (IndexError, ValueError):
        raise InputError(f"{path}:{i + 2}", "MOTION takes 'Frames: N' and 'Frame Time: S'") from None
    n_channels = sum(len(c) for c in channels)
    rows = [r for r in tokens_by_line[i + 3:] if r]
    if len(rows) < frames:
        raise InputError(str(path), f"declares {frames} frames but holds {len(rows)}")
    for f, r in enumerate(rows[:frames]):
        if len(r) != n_channels:
            raise InputError(f"{path}: motion frame {f}", f"must hold {n_channels} finite numbers, holds {len(r)}")
    try:
        motion = np.array([[float(v) for v in r] for r in rows[:frames]]).reshape(frames, n_channels)
    except ValueError:
        raise InputError(str(path), "a motion row holds a value that is not a number") from None
    if not np.isfinite(motion).all():
        raise InputError(str(path), f"each motion row must hold {n_channels} finite numbers")
    return Skeleton(names, parents, np.array(offsets), channels, end_offsets, motion, frame_time)


def _rotation(axis: int, degrees: np.ndarray) -> np.ndarray:
    """(F, 3, 3) rotations about one axis."""
    a = np.radians(degrees)
    c, s = np.cos(a), np.sin(a)
    r = np.zeros(a.shape + (3, 3))
    i, j = [(1, 2), (2, 0), (0, 1)][axis]
    r[:, axis, axis] = 1
    r[:, i, i], r[:, i, j], r[:, j, i], r[:, j, j] = c, -s, s, c
    return r


def world_positions(skeleton: Skeleton) -> tuple[np.ndarray, np.ndarray]:
    """Forward kinematics: (F, J, 3) joint positions and (F, J, 3) End Site positions (the joint's own where
    it has none)."""
    f = len(skeleton.motion)
    n = len(skeleton.names)
    rot = np.zeros((f, n, 3, 3))
    pos = np.zeros((f, n, 3))
    ends = np.zeros((f, n, 3))
    col = 0
    for j in range(n):
        local_r = np.broadcast_to(np.eye(3), (f, 3, 3)).copy()
        local_t = np.broadcast_to(skeleton.offsets[j], (f, 3)).copy()
        for c in skeleton.channels[j]:
            axis = _AXES[c[0]]
            values = skeleton.motion[:, col]
            col += 1
            if c[1:] == "position":
                local_t[:, axis] += values
            else:
                local_r = local_r @ _rotation(axis, values)
        p = skeleton.parents[j]
        if p < 0:
            rot[:, j], pos[:, j] = local_r, local_t
        else:
            rot[:, j] = rot[:, p] @ local_r
            pos[:, j] = pos[:, p] + np.einsum("fab,fb->fa", rot[:, p], local_t)
        end = skeleton.end_offsets.get(j)
        ends[:, j] = pos[:, j] if end is None else pos[:, j] + np.einsum("fab,b->fa", rot[:, j], end)
    return pos, ends


def coco_joints(skeleton: Skeleton) -> tuple[np.ndarray, np.ndarray]:
    """(F, K, 3) COCO-17 joints in the file's world units and (K,) labelled flags."""
    pos, ends = world_positions(skeleton)
    index = {name: j for j, name in enumerate(skeleton.names)}
    missing = [name for name in [*COCO_FROM_BVH.values(), HEAD] if name not in index]
    if missing:
        raise InputError("skeleton", f"has no joint named {', '.join(missing)}")
    out = np.zeros((len(pos), NUM_KEYPOINTS, 3))
    labelled = np.zeros(NUM_KEYPOINTS, bool)
    for k, name in COCO_FROM_BVH.items():
        out[:, k] = pos[:, index[name]]
        labelled[k] = True
    h = index[HEAD]
    out[:, 0] = 0.5 * (pos[:, h] + ends[:, h])
    labelled[0] = True
    return out, labelled


@dataclass(frozen=True)
class Camera:
    """A virtual camera: it looks at the performer from ``yaw`` degrees around the vertical axis and
    ``pitch`` above it; the person's height is ``height_px`` pixels on average, centred in a ``size`` frame.
    Over the clip the image is moved by a similarity transform (pan, zoom, roll) along ``path``."""

    yaw: float = 0.0
    pitch: float = 10.0
    height_px: float = 160.0
    size: tuple[int, int] = (384, 288)
    distance: float = 4.0  # in person heights: sets the perspective


def project(joints: np.ndarray, labelled: np.ndarray, camera: Camera, path: np.ndarray | None = None,
            up_axis: int = 1) -> np.ndarray:
    """(F, K, 3) world joints → (F, K, 2) pixels, the labelled joints' mean over the clip at the frame's centre
    (unlabelled joints: 0). ``path`` (F, 4) = per frame (dx, dy, log zoom, roll radians) of the image-plane
    motion applied about the frame's centre (None: a still camera)."""
    f = len(joints)
    labelled = np.asarray(labelled, bool)
    pts = joints - joints[:, labelled].reshape(-1, 3).mean(0)
    # world → camera: the up axis becomes −y (image y points down), the camera looks along +z
    other = [a for a in range(3) if a != up_axis]
    p = np.stack([pts[..., other[0]], -pts[..., up_axis], pts[..., other[1]]], axis=-1)
    height = np.ptp(p[:, labelled, 1], axis=1).mean()
    yaw, pitch = np.radians(camera.yaw), np.radians(camera.pitch)
    ry = np.array([[np.cos(yaw), 0, np.sin(yaw)], [0, 1, 0], [-np.sin(yaw), 0, np.cos(yaw)]])
    rx = np.array([[1, 0, 0], [0, np.cos(pitch), -np.sin(pitch)], [0, np.sin(pitch), np.cos(pitch)]])
    p = p @ (rx @ ry).T
    z = p[..., 2] + camera.distance * height
    focal = camera.height_px * camera.distance  # a person of height `height` at the distance → height_px
    w, h = camera.size
    xy = focal * p[..., :2] / z[..., None]
    xy = xy + np.array([w / 2, h / 2])
    if path is not None:
        path = np.asarray(path, float)
        if path.shape != (f, 4):
            raise InputError("path", f"must be ({f}, 4), got {path.shape}")
        centre = np.array([w / 2, h / 2])
        s = np.exp(path[:, 2])[:, None, None]
        c, sn = np.cos(path[:, 3])[:, None], np.sin(path[:, 3])[:, None]
        d = xy - centre
        rotated = np.stack([c * d[..., 0] - sn * d[..., 1], sn * d[..., 0] + c * d[..., 1]], axis=-1)
        xy = centre + s * rotated + path[:, None, :2]
    xy[:, ~labelled] = 0.0
    return xy


def camera_path(frames: int, kind: str, size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """(F, 4) image-plane motion of a virtual camera like the video sample's: ``still``; ``slow`` drift (a few
    % of the frame over the clip); ``fast`` pans and zooms (steps up to ~12 % of the frame per frame); ``shake``
    (a still camera with sudden decaying jumps)."""
    long_side = max(size)
    t = np.arange(frames, dtype=float)
    path = np.zeros((frames, 4))
    if kind == "still":
        return path
    if kind in ("slow", "fast"):
        every = max(frames // 3, 2) if kind == "slow" else 5
        knots = np.arange(0, frames + every, every, dtype=float)
        amp = np.array([0.05 * long_side, 0.05 * long_side, 0.08, np.radians(2)])
        if kind == "fast":
            amp = np.array([0.12 * long_side * every / 2, 0.12 * long_side * every / 2, 0.15, np.radians(6)])
        values = rng.uniform(-1, 1, (len(knots), 4)) * amp
        for c in range(4):
            path[:, c] = np.interp(t, knots, values[:, c])
        if kind == "fast":  # keep the largest step within ~12 % of the frame
            step = np.abs(np.diff(path[:, :2], axis=0)).max()
            if step > 0:
                path[:, :2] *= min(1.0, 0.12 * long_side / step)
        path[:, :2] -= path[0, :2]
        return path
    if kind == "shake":
        n = rng.integers(2, 5)
        for start in np.sort(rng.choice(max(frames - 4, 1), size=min(n, max(frames - 4, 1)), replace=False)):
            dt = np.clip(t - start, 0, None)
            tau, period = rng.uniform(1.5, 3), rng.uniform(3, 6)
            decay = np.where(t >= start, np.exp(-dt / tau) * np.cos(2 * np.pi * dt / period), 0.0)
            jump = rng.uniform(-1, 1, 4) * np.array([0.08 * long_side, 0.08 * long_side, 0.04, np.radians(3)])
            path += decay[:, None] * jump
        return path
    raise InputError("kind", f"must be still, slow, fast or shake, got {kind!r}")
