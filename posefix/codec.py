"""Keypoints ↔ heatmaps and crop geometry, shared by training, offline refinement and the service.

Glossary:
    N       persons (crops) in a batch
    K       keypoints per person (17 for COCO)
    B       images in a batch; ``image_index`` (N,) says which image each person is in
    C       image channels
    H, W    height and width of a heatmap or crop; sizes are always given as (H, W)
    Hi, Wi  height and width of a full image
    (x, y)  a point in pixels, x to the right, y down; (w, h) a box's width and height
    v       a joint's flag; a joint is valid where v > 0 and x, y are finite

Pixel convention: pixel centres lie at integer coordinates, so pixel (0, 0) covers [-0.5, 0.5)² and a map of
width W spans x ∈ [-0.5, W - 0.5). A crop spans its (w, h) box edge to edge, so the heatmaps of a crop at a
quarter of its resolution have their own affine ``crop_affine(center, size, (H // 4, W // 4))``; no stride
arithmetic is needed (it works out to x_heatmap = (x_crop + 0.5) / 4 - 0.5).

Affines are (N, 2, 3) matrices [M | t] acting as p ↦ M p + t. ``crop_affine`` maps crop pixels to image pixels,
``invert_affine`` of it maps image pixels to crop pixels.

Every function is batched (no per-person or per-joint Python loops), returns tensors on its inputs' device in
their dtype unless a dtype is given (soft_argmax: at least float32), and keeps the autograd graph.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .keypoints import FLIP_PAIRS, KS_SCALE

# The reference's test-time crop enlarges the min/max box of the input keypoints by this factor.
KEYPOINT_BOX_ENLARGE = 1.2


def _float_dtype(t: Tensor) -> torch.dtype:
    return t.dtype if t.is_floating_point() else torch.get_default_dtype()


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else (bf16, fp16, integers) is computed in float32."""
    return torch.promote_types(dtype, torch.float32)


def _valid(keypoints: Tensor) -> Tensor:
    """(N, K, 3) → (N, K) bool: v > 0 and x, y finite."""
    return (keypoints[..., 2] > 0) & torch.isfinite(keypoints[..., :2]).all(-1)


# A Gaussian factor below e^-34.5 (about 1e-15 of its peak) is taken as zero: far below float32's rounding of
# the peak, and the products of such factors in the stem's contraction would be subnormal numbers, which x86
# CPUs multiply tens of times more slowly than normal ones (ONNX Runtime's int8 graph of ResNet-18 at 128×96 ran
# at 0.6× its speed with them).
LOG_FACTOR_FLOOR = -34.5


def _gaussian_1d(centre: Tensor, length: int, scale: Tensor | float) -> Tensor:
    """exp(scale · (i - centre)²) for i in 0..length-1, and 0 where that is below e^LOG_FACTOR_FLOOR:
    centre (N, K), scale a negative float or (N, K) → (N, K, length)."""
    grid = torch.arange(length, dtype=centre.dtype, device=centre.device)
    exponent = (grid - centre[..., None]) ** 2 * (scale[..., None] if isinstance(scale, Tensor) else scale)
    return torch.exp(exponent).masked_fill(exponent < LOG_FACTOR_FLOOR, 0.0)


def gaussian_axes(keypoints: Tensor, size: tuple[int, int], sigma: float | Tensor) -> tuple[Tensor, Tensor]:
    """The two 1-D factors of each joint's Gaussian: heatmap = gy[..., :, None] * gx[..., None, :].

    keypoints: (N, K, 3) = (x, y, v) in the heatmap's pixels; size: (H, W); sigma: pixels, a float or a tensor
    broadcastable to (N, K). Returns gy (N, K, H) and gx (N, K, W) in at least float32 (float64 stays float64);
    gy is zero for an invalid joint (v <= 0 or x or y not finite), so its whole heatmap is. A factor below
    e^LOG_FACTOR_FLOOR (about 1e-15 of the peak) is exactly zero.
    """
    height, width = size
    work = _work_dtype(keypoints.dtype)
    valid = _valid(keypoints)  # (N, K)
    xy = torch.where(valid[..., None], keypoints[..., :2], 0).to(work)  # (N, K, 2)
    if isinstance(sigma, (int, float)):
        scale = -0.5 / float(sigma) ** 2  # a plain number: nothing is copied to the device, nothing waits on it
    else:
        sigma = torch.as_tensor(sigma, dtype=work, device=keypoints.device)
        scale = (-0.5 / sigma ** 2).expand(valid.shape)  # (N, K)
    gx = _gaussian_1d(xy[..., 0], width, scale)  # (N, K, W)
    gy = _gaussian_1d(xy[..., 1], height, scale) * valid[..., None]  # (N, K, H)
    return gy, gx


def render_heatmaps(keypoints: Tensor, size: tuple[int, int], sigma: float | Tensor,
                    dtype: torch.dtype | None = None, out: Tensor | None = None) -> Tensor:
    """One Gaussian exp(-((X - x)² + (Y - y)²) / (2σ²)) with peak 1 per joint (the product of the 1-D factors of
    :func:`gaussian_axes`, each zero below about 1e-15 of its peak).

    keypoints: (N, K, 3) = (x, y, v) in the heatmap's pixels. size: (H, W). sigma: pixels, a float or a tensor
    broadcastable to (N, K). dtype: the result's, by default the keypoints' (floating) dtype.
    Returns (N, K, H, W). A channel is all zero where v <= 0 or x or y is not finite; a joint outside the map
    renders the part of its Gaussian that falls inside. The per-axis Gaussians are computed in at least float32
    and their outer product is the only full-size write. ``out``: an (N, K, H, W) tensor to write into (its
    dtype wins); reusing one across batches spares the allocation and first-touch page faults of a fresh
    7.5 MB per person at 384×288, which cost several times the arithmetic on a CPU.
    """
    dtype = out.dtype if out is not None else dtype or _float_dtype(keypoints)
    gy, gx = gaussian_axes(keypoints, size, sigma)
    return torch.mul(gy.to(dtype)[..., :, None], gx.to(dtype)[..., None, :], out=out)  # (N, K, H, W)


def pooled_heatmaps(keypoints: Tensor, size: tuple[int, int], sigma: float | Tensor, stride: int) -> Tensor:
    """``F.avg_pool2d(render_heatmaps(keypoints, size, sigma), stride)`` without rendering the full maps.

    The mean of gy ⊗ gx over a stride × stride block is the product of the blocks' 1-D means. size: (H, W),
    multiples of stride. Returns (N, K, H / stride, W / stride) in at least float32.
    """
    gy, gx = gaussian_axes(keypoints, size, sigma)
    gy = gy.unflatten(-1, (-1, stride)).mean(-1)  # (N, K, H / stride)
    gx = gx.unflatten(-1, (-1, stride)).mean(-1)  # (N, K, W / stride)
    return gy[..., :, None] * gx[..., None, :]


def heatmap_conv2d(keypoints: Tensor, size: tuple[int, int], sigma: float | Tensor, weight: Tensor,
                   stride: int = 1, padding: int = 0) -> Tensor:
    """``F.conv2d(render_heatmaps(keypoints, size, sigma), weight, stride=stride, padding=padding)``, computed
    from the Gaussians' 1-D factors at the convolution's output resolution: the K full-size maps are never made.

    keypoints: (N, K, 3) in the maps' pixels; size: (H, W) of the maps; weight: (O, K, kh, kw).
    Since map k is gy_k ⊗ gx_k, its convolution with W[o, k] is
        out[n, o, i, j] = Σ_k Σ_u Σ_v W[o, k, u, v] · gy_k(s·i + u - p) · gx_k(s·j + v - p),
    one contraction over v (cost ∝ O·K·kh·kw·Wo) and one batched matrix product over (k, u)
    (∝ O·K·kh·Ho·Wo, a kw-th of the direct convolution's O·K·kh·kw·Ho·Wo). Returns (N, O, Ho, Wo) in the
    weight's dtype (or autocast's), laid out channels-last; differentiable in the weight.
    """
    n, k = keypoints.shape[:2]
    out_c, in_c, kh, kw = weight.shape
    if in_c != k:
        raise ValueError(f"weight has {in_c} input channels for {k} keypoints")
    gy, gx = gaussian_axes(keypoints, size, sigma)  # (N, K, H), (N, K, W)
    ay = F.pad(gy, (padding, padding)).unfold(-1, kh, stride)  # (N, K, Ho, kh): gy_k(s·i + u - p)
    ax = F.pad(gx, (padding, padding)).unfold(-1, kw, stride)  # (N, K, Wo, kw)
    out_h, out_w = ay.shape[2], ax.shape[2]
    ay, ax = ay.to(weight.dtype), ax.to(weight.dtype)
    # Σ_v W[o, k, u, v] · ax[n, k, j, v] as a matmul broadcast over n (ONNX Runtime's Einsum is several times
    # slower than its MatMul for this contraction).
    along_x = torch.matmul(ax, weight.permute(1, 3, 2, 0).reshape(k, kw, kh * out_c))  # (N, K, Wo, kh·O)
    along_x = along_x.view(n, k, out_w, kh, out_c).transpose(2, 3).reshape(n, k * kh, out_w * out_c)  # (N, K·kh, Wo·O)
    ay = ay.permute(0, 2, 1, 3).reshape(n, out_h, k * kh)  # (N, Ho, K·kh)
    out = torch.bmm(ay, along_x)  # (N, Ho, Wo·O)
    return out.view(n, out_h, out_w, out_c).permute(0, 3, 1, 2)  # (N, O, Ho, Wo), channels-last strides


def onehot_target(coords: Tensor, valid: Tensor, size: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """The reference's "one-hot" training target: each point splatted bilinearly onto its 4 neighbouring pixels.

    coords: (N, K, 2+) = (x, y, ...) in the heatmap's pixels; valid: (N, K) bool; size: (H, W), both >= 2.
    Returns target (N, K, H*W) in the coords' (floating) dtype, computed in at least float32, and valid (N, K)
    bool. A point stays valid where it was, its coordinates are finite and its 4 neighbours lie in the grid:
    0 <= x <= W - 1 and 0 <= y <= H - 1 (a point exactly on the last column or row splats onto it and the one
    before, the latter with weight 0).
    A valid row's 4 weights sum to 1 and its expectation Σ target · (X, Y) is the point; invalid rows are zero.
    """
    height, width = size
    xy = coords[..., :2].to(_work_dtype(coords.dtype))  # (N, K, 2)
    last = torch.tensor([width - 1, height - 1], dtype=xy.dtype, device=xy.device)
    valid = valid & ((xy >= 0) & (xy <= last)).all(-1)  # NaN compares False
    xy = torch.where(valid[..., None], xy, 0)
    corner = torch.minimum(xy.floor(), last - 1)  # (N, K, 2) top-left neighbour
    fx, fy = (xy - corner).unbind(-1)  # (N, K) each
    weight = torch.stack([(1 - fx) * (1 - fy), fx * (1 - fy), (1 - fx) * fy, fx * fy], -1)  # (N, K, 4)
    corner = corner.long()
    offsets = torch.tensor([0, 1, width, width + 1], device=xy.device)
    index = (corner[..., 1] * width + corner[..., 0])[..., None] + offsets  # (N, K, 4)
    target = torch.zeros(*valid.shape, height * width, dtype=_float_dtype(coords), device=xy.device)  # (N, K, H*W)
    return target.scatter(-1, index, (weight * valid[..., None]).to(target.dtype)), valid


def soft_argmax(logits: Tensor) -> tuple[Tensor, Tensor]:
    """Softmax over each heatmap, then the expected (x, y) in the heatmap's pixels (integral regression).

    logits: (N, K, H, W) of any floating dtype. Returns coords (N, K, 2) and prob (N, K, H, W), both computed
    and returned in float32, or float64 for float64 logits. Differentiable with respect to the logits.
    """
    height, width = logits.shape[-2:]
    work = _work_dtype(logits.dtype)
    prob = torch.softmax(logits.to(work).flatten(-2), dim=-1).unflatten(-1, (height, width))  # (N, K, H, W)
    xs = torch.arange(width, dtype=work, device=logits.device)
    ys = torch.arange(height, dtype=work, device=logits.device)
    # Products and sums, not matmul: autocast would run a matmul in bf16 and round the coordinates to its
    # 8-bit mantissa (2 px steps above 256).
    x = (prob.sum(-2) * xs).sum(-1)  # column marginal (N, K, W) → (N, K)
    y = (prob.sum(-1) * ys).sum(-1)  # row marginal (N, K, H) → (N, K)
    return torch.stack([x, y], -1), prob


def ks(pred: Tensor, gt: Tensor, area: Tensor) -> Tensor:
    """Keypoint similarity of each predicted joint to its GT joint: ``posefix.keypoints.ks`` in torch (the same
    KS_SCALE): exp(-d² / (A·KS_SCALE)).

    pred, gt: (..., K, 2+) pixels, extra columns ignored; area: (...,) pixels². Returns (..., K) in (0, 1] in the
    inputs' promoted floating dtype; differentiable.
    """
    d2 = ((pred[..., :2] - gt[..., :2]) ** 2).sum(-1)  # (..., K)
    scale = area[..., None].to(d2.dtype) * _ks_scale(d2.dtype, d2.device)
    return torch.exp(-d2 / (scale + _EPS))


_EPS = float(torch.finfo(torch.float64).eps)  # as numpy's np.spacing(1): a zero area gives KS 1 at d = 0


@functools.lru_cache(maxsize=16)
def _ks_scale(dtype: torch.dtype, device: torch.device) -> Tensor:
    """KS_SCALE (K,) made once per dtype and device (a fresh tensor would be a copy to the device per call)."""
    with torch.inference_mode(False):
        return torch.tensor(KS_SCALE, dtype=dtype, device=device)


def box_from_keypoints(keypoints: Tensor, min_size: float = 1.0) -> Tensor:
    """The min/max box of the valid joints, enlarged ×1.2 about its centre (the reference's test-time crop).

    keypoints: (N, K, 3) = (x, y, v); valid joints have v > 0 and finite x, y. Each side is at least min_size
    pixels, so a single valid joint gives a min_size square about it. Returns (N, 4) = (x, y, w, h); a person
    with no valid joint gets a box of zeros (whose crop is degenerate: callers should skip such persons).
    """
    valid = _valid(keypoints)[..., None]  # (N, K, 1)
    xy = keypoints[..., :2]
    low = torch.where(valid, xy, torch.inf).amin(-2)  # (N, 2)
    high = torch.where(valid, xy, -torch.inf).amax(-2)  # (N, 2)
    centre = (low + high) / 2
    size = ((high - low) * KEYPOINT_BOX_ENLARGE).clamp_min(min_size)
    box = torch.cat([centre - size / 2, size], -1)  # (N, 4)
    return torch.where(valid.any(-2), box, 0)


def center_scale(boxes: Tensor, aspect: float, padding: float = 1.25) -> tuple[Tensor, Tensor]:
    """Box → crop centre and size: the short side grown until w / h = aspect, then both sides ×padding.

    boxes: (N, 4) = (x, y, w, h). aspect: the crop's W / H, e.g. 288 / 384. Returns center (N, 2) = (x, y) and
    size (N, 2) = (w, h) in image pixels.
    """
    center = boxes[..., :2] + boxes[..., 2:4] / 2
    w, h = boxes[..., 2], boxes[..., 3]
    w, h = torch.maximum(w, h * aspect), torch.maximum(h, w / aspect)
    return center, torch.stack([w, h], -1) * padding


def crop_affine(center: Tensor, size: Tensor, out_size: tuple[int, int],
                rotation: Tensor | float | None = None) -> Tensor:
    """The affine from crop pixels (u, v) to image pixels (x, y) of an out_size = (H, W) crop.

    center: (N, 2) = (x, y) and size: (N, 2) = (w, h) of the box in image pixels; rotation: (N,) degrees, one
    float for all, or None (0). Crop pixel ((W - 1) / 2, (H - 1) / 2) maps to center and the crop's W × H pixels
    span the w × h box edge to edge. A positive rotation turns the image content counter-clockwise in the crop,
    as the reference's augmentation (and cv2.getRotationMatrix2D) does: the crop's u axis runs along
    (cos θ, sin θ) in the image, i.e. the box itself is turned clockwise as drawn on the y-down image.
    Returns (N, 2, 3) in the dtype of center and size.
    """
    height, width = out_size
    dtype = torch.promote_types(_float_dtype(center), _float_dtype(size))
    center, size = center.to(dtype), size.to(dtype)
    theta = torch.deg2rad(torch.as_tensor(0.0 if rotation is None else rotation, dtype=dtype, device=center.device))
    cos, sin = theta.cos(), theta.sin()
    sx, sy = size[..., 0] / width, size[..., 1] / height
    m = torch.stack([sx * cos, -sy * sin, sx * sin, sy * cos], -1).unflatten(-1, (2, 2))  # R(θ) diag(sx, sy)
    crop_centre = torch.tensor([(width - 1) / 2, (height - 1) / 2], dtype=dtype, device=center.device)
    t = center - m @ crop_centre  # (N, 2)
    return torch.cat([m, t[..., None]], -1)  # (N, 2, 3)


def person_crop_affine(keypoints: Tensor, out_size: tuple[int, int], scale: Tensor | float = 1.0,
                       rotation: Tensor | float | None = None, padding: float = 1.25) -> Tensor:
    """The crop → image affine of the crop around each person, the one crop of training and inference alike:
    the box of its valid joints (:func:`box_from_keypoints`) grown to the crop's aspect and by ``padding``
    (:func:`center_scale`), its size times ``scale`` and turned by ``rotation`` degrees about its centre
    (:func:`crop_affine`); scale and rotation (a float or (N,) each) are training's augmentation.

    keypoints: (N, K, 3) = (x, y, v) image pixels; out_size: (H, W) of the crop. Returns (N, 2, 3) in the
    keypoints' (floating) dtype.
    """
    height, width = out_size
    center, size = center_scale(box_from_keypoints(keypoints), aspect=width / height, padding=padding)
    size = size * (scale.to(size.dtype)[..., None] if isinstance(scale, Tensor) else scale)
    return crop_affine(center, size, out_size, rotation)


def invert_affine(affine: Tensor) -> Tensor:
    """The inverse of each affine, in closed form (any floating dtype): (N, 2, 3) → (N, 2, 3)."""
    m, t = affine[..., :2], affine[..., 2:]  # (N, 2, 2), (N, 2, 1)
    a, b, c, d = m.flatten(-2).unbind(-1)
    inverse = torch.stack([d, -b, -c, a], -1).unflatten(-1, (2, 2)) / (a * d - b * c)[..., None, None]
    return torch.cat([inverse, -inverse @ t], -1)


def apply_affine(points: Tensor, affine: Tensor) -> Tensor:
    """Each person's points through its affine.

    points: (N, K, 2+) = (x, y, ...), extra columns ignored; affine: (N, 2, 3) (or broadcastable, e.g.
    points (1, K, 2) with affines (N, 2, 3)). Returns (N, K, 2) in the promoted dtype of the two.
    """
    dtype = torch.promote_types(points.dtype, affine.dtype)
    xy, affine = points[..., :2].to(dtype), affine.to(dtype)
    return xy @ affine[..., :2].transpose(-1, -2) + affine[..., None, :, 2]  # (N, K, 2)


def _crop_grid(affine: Tensor, out_size: tuple[int, int]) -> Tensor:
    """affine · (u, v, 1) at every crop pixel centre, one write per element: (N, 2, 3) → (N, H, W, 2)."""
    height, width = out_size
    u = torch.arange(width, dtype=affine.dtype, device=affine.device)
    v = torch.arange(height, dtype=affine.dtype, device=affine.device)
    along_u = u[:, None] * affine[:, None, :, 0]  # (N, W, 2)
    along_v = v[:, None] * affine[:, None, :, 1] + affine[:, None, :, 2]  # (N, H, 2)
    return along_v[:, :, None] + along_u[:, None]  # (N, H, W, 2)


def _to_grid_sample(affine: Tensor, image_size: tuple[int, int]) -> Tensor:
    """An affine into image pixels followed by grid_sample's normalisation: (N, 2, 3) → (N, 2, 3).

    With align_corners=False, x ↦ (2x + 1) / Wi - 1 and y ↦ (2y + 1) / Hi - 1.
    """
    image_h, image_w = image_size
    x = affine[:, 0] * (2 / image_w)  # (N, 3); plain numbers: nothing is copied to the device
    y = affine[:, 1] * (2 / image_h)
    x[:, 2] += 1 / image_w - 1
    y[:, 2] += 1 / image_h - 1
    return torch.stack([x, y], 1)  # (N, 2, 3)


def _group_by_image(image_index: Tensor, batch: int) -> list[tuple[int, slice | Tensor]]:
    """(image, its persons) for every image that holds persons: a slice where they are consecutive, else
    their indices. An index on the host is grouped there; one on a device costs one device sync."""
    order = torch.argsort(image_index, stable=True)
    present, counts = torch.unique_consecutive(image_index[order], return_counts=True)
    present, counts = present.tolist(), counts.tolist()
    if present and not (0 <= present[0] and present[-1] < batch):
        raise ValueError(f"image_index must lie in [0, {batch}) for a batch of {batch} images, "
                         f"got values from {present[0]} to {present[-1]}")
    groups = []
    for image, persons in zip(present, order.split(counts)):
        if persons.device.type == "cpu" and int(persons[-1]) - int(persons[0]) + 1 == len(persons):
            persons = slice(int(persons[0]), int(persons[-1]) + 1)  # ascending (a stable sort): consecutive
        groups.append((image, persons))
    return groups


def warp_crops(images: Tensor | Sequence[Tensor], image_index: Tensor, affine: Tensor, out_size: tuple[int, int],
               fill: float | Sequence[float] | Tensor = 0.0) -> Tensor:
    """Bilinear crops: out[n, :, v, u] = images[image_index[n]] at image point affine[n] · (u, v, 1).

    images: (B, C, Hi, Wi), or a sequence of B (C, Hi, Wi) images of any sizes, all on affine's device;
    image_index: (N,) long; affine: (N, 2, 3) crop → image (``crop_affine``); out_size: (H, W); fill: the value
    outside the image, a float or one per channel (C,). Returns (N, C, H, W) in the images' floating dtype
    (float32 for integer images such as decoded uint8 ones). Sampling is F.grid_sample(align_corners=False) with
    the pixel-centre convention, as if the image were padded with fill (a non-zero fill is applied as
    sample(image - fill) + fill).

    Persons are grouped by image and each image is sampled once for all its persons (one grid_sample call per
    distinct image, its persons' grids stacked along the grid's height), so no image is copied per person. The
    allocations are the output, and per image one group's grid and crops (plus one copy of the image when fill
    is non-zero, the image is bf16/fp16, or it is an integer image: those are sampled in float32, since their
    grids would be too coarse). With image_index and fill on the host, nothing is read back from the device:
    the call only queues work, and with fill 0 and each image's persons consecutive it copies nothing to the
    device either. An image_index on the device is read once.
    """
    stacked = isinstance(images, Tensor)
    if not stacked and not images:
        raise ValueError("images: an empty list (give at least one image, or a (0, C, Hi, Wi) tensor)")
    batch = images.shape[0] if stacked else len(images)
    channels = images.shape[1] if stacked else images[0].shape[0]
    dtype = images.dtype if stacked else images[0].dtype
    device = affine.device
    height, width = out_size
    work = _work_dtype(dtype)
    affine = affine.to(work)
    if isinstance(fill, Tensor) and fill.device.type != "cpu":
        fill = fill.to(dtype=work).reshape(1, -1, 1, 1)  # (1, C or 1, 1, 1)
        blend = bool((fill != 0).any())  # read from the device
    else:
        values = torch.as_tensor(fill, dtype=torch.float64).reshape(-1).tolist()  # on the host
        blend = any(v != 0 for v in values)
        if blend:  # one small copy to the device
            fill = torch.tensor(values, dtype=work).reshape(1, -1, 1, 1).to(device)  # (1, C or 1, 1, 1)
    out = torch.empty(len(image_index), channels, height, width, dtype=dtype if dtype.is_floating_point else work,
                      device=device)  # (N, C, H, W)
    for b, persons in _group_by_image(image_index, batch):
        if isinstance(persons, Tensor) and persons.device != device:  # not consecutive: their indices, sent once
            persons = (persons.pin_memory() if device.type == "cuda" else persons).to(device, non_blocking=True)
        image = images[b:b + 1] if stacked else images[b][None]
        image = image.to(work)  # (1, C, Hi, Wi), a view when already in the work dtype
        grid = _crop_grid(_to_grid_sample(affine[persons], image.shape[-2:]), out_size)  # (n, H, W, 2)
        crops = F.grid_sample(image - fill if blend else image, grid.reshape(1, -1, width, 2), mode="bilinear",
                              padding_mode="zeros", align_corners=False)  # (1, C, n*H, W)
        if blend:
            crops.add_(fill)
        out[persons] = crops.reshape(channels, -1, height, width).transpose(0, 1).to(out.dtype)  # (n, C, H, W)
    return out


def flip_keypoints(keypoints: Tensor, width: float | Tensor,
                   pairs: Sequence[tuple[int, int]] = FLIP_PAIRS) -> Tensor:
    """Keypoints of the horizontally mirrored image: x ↦ width - 1 - x, left/right joints swapped.

    keypoints: (N, K, 2+) = (x, y, ...), extra columns carried along; width: the image's (or crop's) width in
    pixels, a float or (N,); pairs: the left/right index pairs. Returns (N, K, 2+). Applying it twice is the
    identity, and it matches torch.flip(image, [-1]) under the pixel-centre convention.
    """
    swapped = swap_partners(keypoints, -2, pairs)  # (N, K, 2+)
    if not isinstance(width, (int, float)):  # a tensor or an array: one per person
        width = torch.as_tensor(width, dtype=keypoints.dtype, device=keypoints.device)
        width = width[..., None] if width.ndim else width
    x = width - 1 - swapped[..., 0]  # (N, K)
    return torch.cat([x[..., None], swapped[..., 1:]], -1)


def swap_partners(t: Tensor, dim: int, pairs: Sequence[tuple[int, int]] = FLIP_PAIRS) -> Tensor:
    """``t`` with the left/right entries of each pair swapped along ``dim`` (joints)."""
    return t.index_select(dim, _partner_index(t.shape[dim], tuple(map(tuple, pairs)), t.device))


@functools.lru_cache(maxsize=64)
def _partner_index(k: int, pairs: tuple[tuple[int, int], ...], device: torch.device) -> Tensor:
    """The joint permutation of a mirror, made once per device (a fresh index would be a copy to it per call)."""
    partner = list(range(k))
    for a, b in pairs:
        partner[a], partner[b] = b, a
    with torch.inference_mode(False):  # a cached index made under inference_mode would refuse autograd later
        return torch.tensor(partner, device=device)
