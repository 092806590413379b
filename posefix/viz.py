"""Drawing poses on images: skeletons before and after refinement, side by side, as PNG files."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from .fileio import write_bytes_atomic
from .images import coco_image_path, decode
from .keypoints import NUM_KEYPOINTS, SKELETON

INPUT_COLOUR = (255, 140, 0)  # orange
REFINED_COLOUR = (0, 200, 255)  # cyan


def draw_poses(image: torch.Tensor, poses, colour, min_keypoint_score: float = 0.0) -> torch.Tensor:
    """image (3, H, W) uint8; poses (P, K, 3) x, y, score in pixels. Joints with a score at or below
    ``min_keypoint_score`` (or non-finite) are not drawn, nor their bones. Returns a new image."""
    poses = np.asarray(poses, dtype=np.float64).reshape(-1, NUM_KEYPOINTS, 3)
    picture = Image.fromarray(image.permute(1, 2, 0).contiguous().numpy())
    draw = ImageDraw.Draw(picture)
    h, w = image.shape[1:]
    width = max(2, round(min(h, w) / 160))
    for pose in poses:
        visible = (pose[:, 2] > min_keypoint_score) & np.isfinite(pose[:, :2]).all(-1)
        for a, b in SKELETON:
            if visible[a] and visible[b]:
                draw.line([tuple(pose[a, :2]), tuple(pose[b, :2])], fill=colour, width=width)
        for x, y in pose[visible, :2]:
            r = width + 1
            draw.ellipse([x - r, y - r, x + r, y + r], fill=colour, outline=(255, 255, 255))
    return torch.from_numpy(np.asarray(picture).copy()).permute(2, 0, 1)


def side_by_side(left: torch.Tensor, right: torch.Tensor, gap: int = 8) -> torch.Tensor:
    """Two (3, H, W) images with a white gap between them: (3, H, 2W + gap)."""
    spacer = torch.full((3, left.shape[1], gap), 255, dtype=left.dtype)
    return torch.cat([left, spacer, right], dim=2)


def encode_png(image: torch.Tensor, compress_level: int = 6) -> bytes:
    """A (3, H, W) uint8 image as PNG bytes (Pillow)."""
    buffer = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).contiguous().numpy()).save(buffer, format="PNG",
                                                                      compress_level=compress_level)
    return buffer.getvalue()


def write_png(image: torch.Tensor, path: str | Path) -> None:
    """Write a (3, H, W) uint8 image as PNG, atomically."""
    write_bytes_atomic(path, encode_png(image))


def selected_images(results: list[dict], min_score: float = 0.2, max_images: int = 0) -> list[int]:
    """The image ids :func:`write_overlays` draws: those with a person scored at least ``min_score``, in id
    order, at most ``max_images`` (0: all)."""
    return sorted({r["image_id"] for r in results if r["score"] >= min_score})[: max_images or None]


def write_overlays(images_dir, results: list[dict], compare: list[dict] | None, entries: dict, out,
                   min_score: float = 0.2, min_keypoint_score: float = 0.0, max_images: int = 0,
                   allow_outside: bool = False) -> list[Path]:
    """Draw the persons of COCO ``results`` (validated) scored at least ``min_score`` on their images under
    ``images_dir`` (``entries``: {image_id: COCO image dict} naming the files), with ``compare`` (the refined
    results of the same input, in the same order) side by side, one PNG per image ``out/<image_id>.png``.
    Returns the files written."""
    by_image: dict[int, list[int]] = {}
    for n, r in enumerate(results):
        if r["score"] >= min_score:
            by_image.setdefault(r["image_id"], []).append(n)
    out = Path(out)
    written = []
    for image_id in selected_images(results, min_score, max_images):
        entry = entries.get(image_id, {"id": image_id})
        image = decode(coco_image_path(images_dir, entry, allow_outside))
        rows = by_image[image_id]
        before = draw_poses(image, [results[n]["keypoints"] for n in rows], INPUT_COLOUR, min_keypoint_score)
        if compare is not None:
            after = draw_poses(image, [compare[n]["keypoints"] for n in rows], REFINED_COLOUR, min_keypoint_score)
            before = side_by_side(before, after)
        path = out / f"{image_id:012d}.png"
        write_png(before, path)
        written.append(path)
    return written
