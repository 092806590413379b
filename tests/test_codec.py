"""posefix.codec against plain per-person, per-joint, per-pixel loops written here with math and numpy."""
import math

import numpy as np
import pytest
import torch

from posefix import codec, keypoints
from posefix.codec import (
    apply_affine,
    box_from_keypoints,
    center_scale,
    crop_affine,
    flip_keypoints,
    invert_affine,
    onehot_target,
    person_crop_affine,
    render_heatmaps,
    soft_argmax,
    warp_crops,
)
from posefix.keypoints import FLIP_PAIRS, KS_HIT, NUM_KEYPOINTS, PARTNER, SIGMAS

F64 = torch.float64
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _keypoints(seed, n, k, size, margin=4.0):
    """(n, k, 3) random keypoints over a (H, W) map ± margin, with v = 0 joints, a NaN joint and far-out joints."""
    rng = np.random.default_rng(seed)
    height, width = size
    kp = np.zeros((n, k, 3))
    kp[..., 0] = rng.uniform(-margin, width - 1 + margin, (n, k))
    kp[..., 1] = rng.uniform(-margin, height - 1 + margin, (n, k))
    kp[..., 2] = np.where(rng.random((n, k)) < 0.75, 2.0, 0.0)
    kp[0, 0] = [np.nan, 3.0, 2.0]
    kp[0, 1] = [2.0, np.inf, 1.0]
    kp[-1, -1] = [width + 50.0, height + 50.0, 2.0]
    return torch.from_numpy(kp)


def _valid_joint(x, y, v):
    return v > 0 and math.isfinite(x) and math.isfinite(y)


# ---------------------------------------------------------------------------------------------- plain references

def _render_loop(kp, size, sigma):
    kp = kp.double().numpy()
    height, width = size
    out = np.zeros(kp.shape[:2] + (height, width))
    for n, k in np.ndindex(kp.shape[:2]):
        x, y, v = kp[n, k]
        if not _valid_joint(x, y, v):
            continue
        for i in range(height):
            for j in range(width):
                out[n, k, i, j] = math.exp(-((j - x) ** 2 + (i - y) ** 2) / (2 * sigma ** 2))
    return out


def _onehot_loop(coords, valid, size):
    height, width = size
    target = np.zeros(coords.shape[:2] + (height * width,))
    ok = np.zeros(coords.shape[:2], dtype=bool)
    for n, k in np.ndindex(coords.shape[:2]):
        x, y = float(coords[n, k, 0]), float(coords[n, k, 1])
        if not (valid[n, k] and 0 <= x <= width - 1 and 0 <= y <= height - 1):
            continue
        ok[n, k] = True
        x0, y0 = min(math.floor(x), width - 2), min(math.floor(y), height - 2)
        fx, fy = x - x0, y - y0
        for dx, dy, w in ((0, 0, (1 - fx) * (1 - fy)), (1, 0, fx * (1 - fy)), (0, 1, (1 - fx) * fy), (1, 1, fx * fy)):
            target[n, k, (y0 + dy) * width + x0 + dx] += w
    return target, ok


def _soft_argmax_loop(logits):
    logits = logits.double().numpy()
    coords = np.zeros(logits.shape[:2] + (2,))
    for n, k in np.ndindex(logits.shape[:2]):
        peak = logits[n, k].max()
        total = sx = sy = 0.0
        for i, j in np.ndindex(logits.shape[2:]):
            e = math.exp(logits[n, k, i, j] - peak)
            total, sx, sy = total + e, sx + e * j, sy + e * i
        coords[n, k] = sx / total, sy / total
    return coords


def _box_loop(kp, min_size):
    boxes = np.zeros((len(kp), 4))
    for n, person in enumerate(kp.numpy()):
        pts = [(x, y) for x, y, v in person if _valid_joint(x, y, v)]
        if not pts:
            continue
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        cx, cy = (min(xs) + max(xs)) / 2, (min(ys) + max(ys)) / 2
        w, h = max((max(xs) - min(xs)) * 1.2, min_size), max((max(ys) - min(ys)) * 1.2, min_size)
        boxes[n] = cx - w / 2, cy - h / 2, w, h
    return boxes


def _center_scale_loop(boxes, aspect, padding):
    centers, sizes = [], []
    for x, y, w, h in boxes.numpy():
        centers.append((x + w / 2, y + h / 2))
        if w > aspect * h:
            h = w / aspect
        elif w < aspect * h:
            w = h * aspect
        sizes.append((w * padding, h * padding))
    return np.array(centers), np.array(sizes)


def _crop_affine_loop(center, size, out_size, rotation):
    """The reference's construction: three crop points (centre, right edge, bottom edge) ↔ the rotated box's."""
    height, width = out_size
    affines = []
    for (cx, cy), (w, h), deg in zip(center.numpy(), size.numpy(), rotation.numpy()):
        cs, sn = math.cos(math.radians(deg)), math.sin(math.radians(deg))
        image = [(cx, cy), (cx + w / 2 * cs, cy + w / 2 * sn), (cx - h / 2 * sn, cy + h / 2 * cs)]
        u0, v0 = (width - 1) / 2, (height - 1) / 2
        crop = [(u0, v0, 1), (u0 + width / 2, v0, 1), (u0, v0 + height / 2, 1)]
        affines.append(np.linalg.solve(np.array(crop), np.array(image)).T)
    return np.array(affines)


def _warp_loop(images, image_index, affine, out_size, fill):
    images, affine = images.double().numpy(), affine.double().numpy()
    height, width = out_size
    _, channels, image_h, image_w = images.shape
    fill = np.broadcast_to(np.asarray(fill, dtype=float), (channels,))
    out = np.zeros((len(image_index), channels, height, width))
    for n, b in enumerate(image_index.tolist()):
        for i in range(height):
            for j in range(width):
                x, y = affine[n] @ (j, i, 1)
                x0, y0 = math.floor(x), math.floor(y)
                for xx, yy in ((x0, y0), (x0 + 1, y0), (x0, y0 + 1), (x0 + 1, y0 + 1)):
                    w = (1 - abs(x - xx)) * (1 - abs(y - yy))
                    for c in range(channels):
                        inside = 0 <= xx < image_w and 0 <= yy < image_h
                        out[n, c, i, j] += w * (images[b, c, yy, xx] if inside else fill[c])
    return out


# ---------------------------------------------------------------------------------------------- render_heatmaps

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("seed", range(3))
def test_render_heatmaps_matches_loop(seed, dtype):
    size, sigma = (12, 10), 1.7
    kp = _keypoints(seed, 3, 5, size).to(dtype)
    heat = render_heatmaps(kp, size, sigma)
    assert heat.shape == (3, 5, 12, 10) and heat.dtype == dtype
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    np.testing.assert_allclose(heat.double().numpy(), _render_loop(kp, size, sigma), atol=tol, rtol=0)
    assert heat[0, 0].abs().sum() == 0 and heat[0, 1].abs().sum() == 0  # NaN x, infinite y


def test_render_heatmaps_into_a_reused_buffer():
    size, sigma = (12, 10), 1.7
    buffer = torch.full((3, 5, 12, 10), 7.0)
    for seed in range(2):  # the second render overwrites the first everywhere
        kp = _keypoints(seed, 3, 5, size)
        heat = render_heatmaps(kp, size, sigma, out=buffer)
        assert heat.data_ptr() == buffer.data_ptr() and heat.dtype == torch.float32
        np.testing.assert_allclose(buffer.double().numpy(), _render_loop(kp, size, sigma), atol=1e-6, rtol=0)


def test_render_heatmaps_outside_map_renders_its_tail():
    kp = torch.tensor([[[-2.0, 3.0, 1.0], [4.0, 9.5, 1.0], [-30.0, 3.0, 1.0]]])
    heat = render_heatmaps(kp, (8, 6), 2.0)
    assert math.isclose(heat[0, 0, 3, 0].item(), math.exp(-4 / 8), rel_tol=1e-6)
    assert math.isclose(heat[0, 1, 7, 4].item(), math.exp(-2.5 ** 2 / 8), rel_tol=1e-6)
    assert heat[0, 2].max() < 1e-20


def test_gaussian_factors_and_the_stem_contraction_hold_no_subnormal_numbers():
    """Factors below e^LOG_FACTOR_FLOOR are zero, so neither they, their products nor the fused stem's output
    are subnormal floats (which x86 CPUs compute tens of times more slowly); what is cut is below 1e-15 of the
    peak."""
    size, sigma = (128, 96), 3.5
    rng = np.random.default_rng(0)
    kp = torch.from_numpy(np.concatenate([rng.uniform(-20, 116, (16, NUM_KEYPOINTS, 1)),
                                          rng.uniform(-20, 148, (16, NUM_KEYPOINTS, 1)),
                                          np.ones((16, NUM_KEYPOINTS, 1))], -1))
    tiny = torch.finfo(torch.float32).tiny
    gy, gx = codec.gaussian_axes(kp.float(), size, sigma)
    weight = torch.randn(64, NUM_KEYPOINTS, 7, 7, generator=torch.Generator().manual_seed(0)) * 1e-3
    out = codec.heatmap_conv2d(kp.float(), size, sigma, weight, stride=2, padding=3)
    for t in (gy, gx, gy[:, :, :, None] * gx[:, :, None, :], out):  # the factors, their products, the stem's
        assert not ((t != 0) & (t.abs() < tiny)).any()
    exact = torch.exp(-(torch.arange(size[1], dtype=torch.float64) - kp[..., :1].double()) ** 2 / (2 * sigma ** 2))
    assert exact[gx == 0].max() < 1.1e-15  # only factors below 1e-15 of the peak are cut
    assert (gx == 0).float().mean() > 0.5  # and most of a 96-pixel axis is beyond it at σ 3.5


def test_render_heatmaps_dtype_argument_and_per_joint_sigma():
    size = (9, 11)
    kp = _keypoints(7, 2, 4, size)
    sigma = torch.tensor([1.0, 1.5, 2.0, 3.0], dtype=F64)
    expected = np.stack([_render_loop(kp[:, k:k + 1], size, s.item())[:, 0] for k, s in enumerate(sigma)], 1)
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-6), (torch.bfloat16, 1e-2)):
        heat = render_heatmaps(kp, size, sigma, dtype=dtype)
        assert heat.dtype == dtype
        np.testing.assert_allclose(heat.double().numpy(), expected, atol=tol, rtol=0)
    assert render_heatmaps(kp.bfloat16(), size, 2.0).dtype == torch.bfloat16


def test_render_heatmaps_mirrors_with_flip_keypoints():
    size = (10, 13)
    kp = _keypoints(3, 2, NUM_KEYPOINTS, size)
    heat = render_heatmaps(kp, size, 1.5)
    flipped = render_heatmaps(flip_keypoints(kp, size[1]), size, 1.5)
    torch.testing.assert_close(flipped, torch.flip(heat, [-1])[:, PARTNER.tolist()])


# ---------------------------------------------------------------------------------------------- onehot_target

@pytest.mark.parametrize("seed", range(3))
def test_onehot_target_matches_loop(seed):
    size = (7, 9)
    kp = _keypoints(seed, 4, 6, size, margin=2.0)
    coords, valid = kp[..., :2], kp[..., 2] > 0
    target, ok = onehot_target(coords, valid, size)
    expected, expected_ok = _onehot_loop(coords.numpy(), valid.numpy(), size)
    assert target.shape == (4, 6, 63) and target.dtype == F64 and ok.dtype == torch.bool
    np.testing.assert_array_equal(ok.numpy(), expected_ok)
    np.testing.assert_allclose(target.numpy(), expected, atol=1e-12)
    assert target[~ok].abs().sum() == 0


def test_onehot_target_sums_to_one_with_the_point_as_expectation():
    height, width = 6, 8
    coords = torch.tensor([[[0.0, 0.0], [7.0, 5.0], [3.25, 4.5], [7.0, 2.75], [6.999, 4.999],
                            [-1e-9, 2.0], [7.0 + 1e-9, 2.0], [2.0, 5.5]]], dtype=F64)
    target, ok = onehot_target(coords, torch.ones(coords.shape[:2], dtype=torch.bool), (height, width))
    assert ok.tolist() == [[True] * 5 + [False] * 3]
    grid = target.reshape(1, -1, height, width)  # (N, K, H, W)
    torch.testing.assert_close(grid.sum((-2, -1))[ok], torch.ones(5, dtype=F64))
    xs, ys = torch.arange(width, dtype=F64), torch.arange(height, dtype=F64)
    expectation = torch.stack([(grid.sum(-2) * xs).sum(-1), (grid.sum(-1) * ys).sum(-1)], -1)  # (N, K, 2)
    torch.testing.assert_close(expectation[ok], coords[ok])
    assert (target >= 0).all() and (target > 0).sum(-1).max() <= 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_onehot_target_follows_the_dtype(dtype):
    coords = torch.tensor([[[1.5, 2.25], [70.5, 90.0]]], dtype=dtype)  # 90 * 72 + 70 is not a bf16 integer
    target, ok = onehot_target(coords, torch.ones(1, 2, dtype=torch.bool), (96, 72))
    assert target.dtype == dtype and ok.all()
    np.testing.assert_allclose(target.float().sum(-1).numpy(), 1.0, rtol=1e-6)
    assert target[0, 1].nonzero().flatten().tolist() == [90 * 72 + 70, 90 * 72 + 71]


# ---------------------------------------------------------------------------------------------- soft_argmax

@pytest.mark.parametrize("seed", range(3))
def test_soft_argmax_matches_loop(seed):
    logits = torch.randn(3, 4, 5, 7, generator=torch.Generator().manual_seed(seed), dtype=F64) * 3
    coords, prob = soft_argmax(logits)
    assert coords.shape == (3, 4, 2) and prob.shape == (3, 4, 5, 7) and coords.dtype == F64
    np.testing.assert_allclose(coords.numpy(), _soft_argmax_loop(logits), atol=1e-12)
    torch.testing.assert_close(prob.sum((-2, -1)), torch.ones(3, 4, dtype=F64))
    coords32, _ = soft_argmax(logits.float())
    assert coords32.dtype == torch.float32
    np.testing.assert_allclose(coords32.numpy(), coords.numpy(), atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_soft_argmax_low_precision_computes_in_float32(dtype):
    logits = (torch.randn(2, 3, 16, 12, generator=torch.Generator().manual_seed(0)) * 4).to(dtype)
    coords, prob = soft_argmax(logits)
    assert coords.dtype == prob.dtype == torch.float32
    np.testing.assert_allclose(coords.numpy(), _soft_argmax_loop(logits.float()), atol=1e-4)


def test_soft_argmax_under_autocast_keeps_float32_coordinates():
    """Under bf16 autocast (as ``--precision bf16`` runs the model) the expectation is not rounded to bf16:
    the coordinates equal the float32 ones, on a map large enough that bf16 steps would be whole pixels."""
    logits = torch.randn(2, 17, 96, 72, generator=torch.Generator().manual_seed(0)) * 3
    logits[..., 60:, 50:] += 6  # mass far from the origin: x near 60, y near 80, where bf16 steps are 0.25-0.5
    plain, _ = soft_argmax(logits)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        coords, prob = soft_argmax(logits.bfloat16())
    assert coords.dtype == prob.dtype == torch.float32
    reference = soft_argmax(logits.bfloat16().float())[0]  # the same bf16 logits, computed without autocast
    np.testing.assert_allclose(coords.numpy(), reference.numpy(), atol=1e-4)
    assert (plain - reference).abs().max() < 0.5  # and the logits' own bf16 rounding moves them little


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_render_then_soft_argmax_recovers_the_point(dtype):
    size, sigma = (24, 20), 1.0
    rng = np.random.default_rng(0)
    kp = torch.from_numpy(np.concatenate([rng.uniform(4, 15, (5, 17, 1)), rng.uniform(4, 19, (5, 17, 1)),
                                          np.ones((5, 17, 1))], -1)).to(dtype)
    logits = render_heatmaps(kp, size, sigma).clamp_min(1e-30).log()
    coords, _ = soft_argmax(logits)
    torch.testing.assert_close(coords, kp[..., :2], atol=1e-3, rtol=0)


def test_soft_argmax_gradcheck():
    logits = torch.randn(1, 2, 3, 4, generator=torch.Generator().manual_seed(0), dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(soft_argmax, (logits,))


def test_soft_argmax_coordinate_loss_reaches_the_logits():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 17, 8, 6, generator=gen, requires_grad=True)
    target = torch.rand(2, 17, 2, generator=gen) * torch.tensor([5.0, 7.0])
    coords, _ = soft_argmax(logits.bfloat16())
    (coords - target).abs().sum().backward()
    assert torch.isfinite(logits.grad).all()
    assert (logits.grad.abs().sum((-2, -1)) > 0).all()


# ---------------------------------------------------------------------------------------------- ks

def _ks_loop(pred, gt, area):
    """COCO's KS, joint by joint: exp(-d² / (2·A·(2σ)²))."""
    out = np.zeros(pred.shape[:-1])
    for index in np.ndindex(*pred.shape[:-2]):
        for k in range(pred.shape[-2]):
            d2 = sum((float(pred[index][k, c]) - float(gt[index][k, c])) ** 2 for c in (0, 1))
            out[index][k] = math.exp(-d2 / (2 * float(area[index]) * (2 * SIGMAS[k]) ** 2))
    return out


@pytest.mark.parametrize("seed", [0, 1])
def test_ks_in_torch_and_numpy_match_loop(seed):
    rng = np.random.default_rng(seed)
    gt = np.concatenate([rng.uniform(0, 500, (3, 8, NUM_KEYPOINTS, 2)), np.ones((3, 8, NUM_KEYPOINTS, 1))], -1)
    pred = gt[..., :2] + rng.normal(0, 1, gt[..., :2].shape) * rng.uniform(0.5, 60, (3, 8, 1, 1))
    area = rng.uniform(50, 1e5, (3, 8))
    expected = _ks_loop(pred, gt, area)  # (3, 8, K)
    np.testing.assert_allclose(keypoints.ks(pred, gt, area), expected, rtol=1e-12, atol=1e-300)
    got = codec.ks(torch.from_numpy(pred), torch.from_numpy(gt), torch.from_numpy(area))
    assert got.shape == (3, 8, NUM_KEYPOINTS) and got.dtype == F64
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12, atol=1e-300)
    got32 = codec.ks(torch.from_numpy(pred).float(), torch.from_numpy(gt).float(), torch.from_numpy(area).float())
    assert got32.dtype == torch.float32
    np.testing.assert_allclose(got32.numpy(), expected, rtol=1e-4, atol=1e-6)
    # at the KS_HIT radius both give KS_HIT; at d = 0 both give 1, even for a zero area
    on = gt.copy()
    on[..., 0] += keypoints.ks_radius(KS_HIT, area)
    np.testing.assert_allclose(keypoints.ks(on, gt, area), KS_HIT, rtol=1e-12)
    np.testing.assert_allclose(codec.ks(*map(torch.from_numpy, (on, gt, area))).numpy(), KS_HIT, rtol=1e-12)
    zero = np.zeros((1, 2))
    assert np.all(keypoints.ks(gt[0, :2], gt[0, :2], zero) == 1.0)
    assert torch.all(codec.ks(torch.from_numpy(gt[0, :2]), torch.from_numpy(gt[0, :2]), torch.zeros(1, 2)) == 1.0)


def test_ks_in_torch_is_differentiable():
    rng = np.random.default_rng(3)
    pred = torch.from_numpy(rng.uniform(0, 10, (2, NUM_KEYPOINTS, 2))).requires_grad_()
    gt = torch.from_numpy(rng.uniform(0, 10, (2, NUM_KEYPOINTS, 2)))
    area = torch.tensor([40.0, 90.0], dtype=F64)
    assert torch.autograd.gradcheck(lambda p: codec.ks(p, gt, area), (pred,))


# ---------------------------------------------------------------------------------------------- boxes and crops

@pytest.mark.parametrize("min_size", [1.0, 20.0])
def test_box_from_keypoints_matches_loop(min_size):
    kp = _keypoints(1, 6, NUM_KEYPOINTS, (200, 150))
    kp[1, :, 2] = 0  # no valid joint
    kp[2, :, 2] = 0
    kp[2, 5, 2] = 2  # a single valid joint
    boxes = box_from_keypoints(kp, min_size)
    assert boxes.shape == (6, 4) and boxes.dtype == F64
    np.testing.assert_allclose(boxes.numpy(), _box_loop(kp, min_size), atol=1e-9)
    assert boxes[1].abs().sum() == 0
    torch.testing.assert_close(boxes[2, 2:], torch.full((2,), min_size, dtype=F64))
    assert box_from_keypoints(kp.float()).dtype == torch.float32


def test_center_scale_matches_loop():
    rng = np.random.default_rng(2)
    boxes = torch.from_numpy(np.concatenate([rng.uniform(0, 500, (20, 2)), rng.uniform(5, 300, (20, 2))], -1))
    boxes[0, 2:] = torch.tensor([75.0, 100.0], dtype=F64)  # already 3:4
    center, size = center_scale(boxes, 288 / 384)
    expected_center, expected_size = _center_scale_loop(boxes, 288 / 384, 1.25)
    np.testing.assert_allclose(center.numpy(), expected_center)
    np.testing.assert_allclose(size.numpy(), expected_size)
    np.testing.assert_allclose((size[:, 0] / size[:, 1]).numpy(), 0.75)


def _random_crops(seed, n, dtype=F64):
    rng = np.random.default_rng(seed)
    center = torch.from_numpy(rng.uniform(-20, 120, (n, 2))).to(dtype)
    size = torch.from_numpy(rng.uniform(10, 90, (n, 2))).to(dtype)
    rotation = torch.from_numpy(rng.uniform(-80, 80, n)).to(dtype)
    return center, size, rotation


@pytest.mark.parametrize("out_size", [(16, 12), (7, 5)])
def test_crop_affine_matches_three_point_construction(out_size):
    center, size, rotation = _random_crops(0, 10)
    affine = crop_affine(center, size, out_size, rotation)
    assert affine.shape == (10, 2, 3) and affine.dtype == F64
    np.testing.assert_allclose(affine.numpy(), _crop_affine_loop(center, size, out_size, rotation), atol=1e-9)
    no_rotation = crop_affine(center, size, out_size)
    torch.testing.assert_close(no_rotation, crop_affine(center, size, out_size, torch.zeros(10, dtype=F64)))


def test_crop_affine_geometry():
    height, width = 8, 6
    center = torch.tensor([[40.0, 30.0]], dtype=F64)
    size = torch.tensor([[12.0, 16.0]], dtype=F64)  # 2 image pixels per crop pixel
    affine = crop_affine(center, size, (height, width))
    corners = torch.tensor([[[(width - 1) / 2, (height - 1) / 2], [-0.5, -0.5], [width - 0.5, height - 0.5]]],
                           dtype=F64)
    expected = torch.tensor([[[40.0, 30.0], [34.0, 22.0], [46.0, 38.0]]], dtype=F64)  # centre and box corners
    torch.testing.assert_close(apply_affine(corners, affine), expected)
    rotated = crop_affine(center, size, (height, width), torch.tensor([90.0], dtype=F64))
    right_of_centre = torch.tensor([[[50.0, 30.0]]], dtype=F64)
    # the content turns counter-clockwise: what lies right of the centre in the image lies above it in the crop
    expected = torch.tensor([[[(width - 1) / 2, (height - 1) / 2 - 5.0]]], dtype=F64)
    torch.testing.assert_close(apply_affine(right_of_centre, invert_affine(rotated)), expected)


def test_person_crop_affine_is_the_box_grown_scaled_and_turned():
    kp = _keypoints(4, 5, NUM_KEYPOINTS, (300, 200))
    kp[0, 0], kp[0, 1] = torch.tensor([5.0, 3.0, 2.0], dtype=F64), torch.tensor([2.0, 7.0, 1.0], dtype=F64)
    out_size = (64, 48)
    center, size = center_scale(box_from_keypoints(kp), 48 / 64)
    torch.testing.assert_close(person_crop_affine(kp, out_size), crop_affine(center, size, out_size), rtol=0, atol=0)
    scale, rotation = (torch.tensor([0.7, 1.0, 1.3, 0.9, 1.1], dtype=F64),
                       torch.tensor([0.0, 30, -45, 10, 80], dtype=F64))
    expected = _crop_affine_loop(center, size * scale[:, None], out_size, rotation)
    np.testing.assert_allclose(person_crop_affine(kp, out_size, scale, rotation).numpy(), expected, atol=1e-9)
    np.testing.assert_allclose(person_crop_affine(kp, out_size, 1.3, -45.0)[2].numpy(), expected[2], atol=1e-9)
    wide = person_crop_affine(kp, out_size, padding=1.5)
    torch.testing.assert_close(wide[:, :, :2], person_crop_affine(kp, out_size)[:, :, :2] * 1.2)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_affine_round_trip(dtype):
    center, size, rotation = _random_crops(3, 8, dtype)
    affine = crop_affine(center, size, (24, 18), rotation)
    inverse = invert_affine(affine)
    assert inverse.shape == (8, 2, 3) and inverse.dtype == dtype
    points = torch.from_numpy(np.random.default_rng(0).uniform(-50, 150, (8, 5, 3))).to(dtype)
    crop_points = apply_affine(points, inverse)
    assert crop_points.shape == (8, 5, 2)
    tol = 1e-9 if dtype == torch.float64 else 1e-3
    torch.testing.assert_close(apply_affine(crop_points, affine), points[..., :2], atol=tol, rtol=0)
    torch.testing.assert_close(invert_affine(inverse), affine, atol=tol, rtol=tol)
    square = torch.cat([affine, torch.tensor([0, 0, 1], dtype=dtype).expand(8, 1, 3)], 1)  # (N, 3, 3)
    torch.testing.assert_close(torch.linalg.inv(square)[:, :2], inverse, atol=tol, rtol=tol)


# ---------------------------------------------------------------------------------------------- warp_crops

def _warp_case(seed, n=7, dtype=F64):
    images = torch.rand(3, 2, 13, 17, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    center, size, rotation = _random_crops(seed, n)
    center = center * torch.tensor([0.17, 0.13], dtype=F64)  # mostly around the 17 × 13 images, some off them
    size = size * 0.2
    image_index = torch.from_numpy(np.random.default_rng(seed).integers(0, 3, n))
    return images, image_index, crop_affine(center, size, (6, 5), rotation)


@pytest.mark.parametrize("fill", [0.0, 0.5, (0.25, -1.0)])
@pytest.mark.parametrize("seed", range(2))
def test_warp_crops_matches_loop(seed, fill):
    images, image_index, affine = _warp_case(seed)
    affine[0, :, 2] += torch.tensor([40.0, 0.0], dtype=F64)  # wholly off the image
    affine[1, :, 2] -= torch.tensor([0.0, 4.0], dtype=F64)  # partly off the image
    crops = warp_crops(images, image_index, affine, (6, 5), fill)
    assert crops.shape == (7, 2, 6, 5) and crops.dtype == F64
    expected = _warp_loop(images, image_index, affine, (6, 5), fill)
    np.testing.assert_allclose(crops.numpy(), expected, atol=1e-9)
    np.testing.assert_allclose(crops[0].numpy(), np.broadcast_to(np.reshape(fill, (-1, 1, 1)), (2, 6, 5)))


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_warp_crops_follows_the_images_dtype(dtype, tol):
    images, image_index, affine = _warp_case(5)
    crops = warp_crops(images.to(dtype), image_index, affine.float(), (6, 5), 0.5)
    assert crops.dtype == dtype
    expected = _warp_loop(images.to(dtype), image_index, affine, (6, 5), 0.5)
    np.testing.assert_allclose(crops.double().numpy(), expected, atol=tol)


@pytest.mark.parametrize("fill", [0.0, (0.25, -1.0)])
def test_warp_crops_of_images_of_several_sizes(fill):
    """A list of images of their own sizes (uint8 as decoded, or floating) equals warping each one alone."""
    rng = np.random.default_rng(3)
    sizes = ((13, 17), (9, 21), (16, 8))
    images = [torch.from_numpy(rng.integers(0, 256, (2, h, w), dtype=np.uint8)) for h, w in sizes]
    center, size, rotation = _random_crops(3, 7)
    affine = crop_affine(center * torch.tensor([0.17, 0.13], dtype=F64), size * 0.2, (6, 5), rotation)
    image_index = torch.tensor([2, 0, 0, 1, 2, 2, 0])
    crops = warp_crops(images, image_index, affine, (6, 5), fill)
    assert crops.shape == (7, 2, 6, 5) and crops.dtype == torch.float32
    for b, image in enumerate(images):
        sel = image_index == b
        alone = torch.zeros(int(sel.sum()), dtype=torch.long)
        expected = _warp_loop(image[None].double(), alone, affine[sel], (6, 5), fill)
        np.testing.assert_allclose(crops[sel].double().numpy(), expected, atol=2e-3)
    floating = warp_crops([im.double() for im in images], image_index, affine, (6, 5), fill)
    assert floating.dtype == F64
    np.testing.assert_allclose(floating.numpy(), crops.double().numpy(), atol=2e-3)


def test_warp_crops_of_a_drawn_point_lands_where_the_affine_predicts():
    point = torch.tensor([[[37.3, 29.6, 1.0]]], dtype=F64)
    image = render_heatmaps(point, (64, 80), 2.0)  # (1, 1, 64, 80)
    center = point[0, :, :2] + torch.tensor([3.1, -2.4], dtype=F64)
    for rotation in (0.0, 30.0, -65.0):
        affine = crop_affine(center, torch.tensor([[24.0, 32.0]], dtype=F64), (32, 24),
                             torch.tensor([rotation], dtype=F64))
        crop = warp_crops(image, torch.tensor([0]), affine, (32, 24))[0, 0]
        v, u = torch.meshgrid(torch.arange(32, dtype=F64), torch.arange(24, dtype=F64), indexing="ij")
        centroid = torch.stack([(crop * u).sum(), (crop * v).sum()]) / crop.sum()
        torch.testing.assert_close(centroid, apply_affine(point, invert_affine(affine))[0, 0], atol=0.02, rtol=0)


def test_warp_crops_is_differentiable_and_checks_the_index():
    images, image_index, affine = _warp_case(1, dtype=torch.float32)
    images.requires_grad_(True)
    affine = affine.float().requires_grad_(True)
    warp_crops(images, image_index, affine, (6, 5), 0.3).square().sum().backward()
    assert images.grad.abs().sum() > 0 and affine.grad.abs().sum() > 0
    assert warp_crops(images, image_index[:0], affine[:0], (6, 5)).shape == (0, 2, 6, 5)
    with pytest.raises(ValueError, match="image_index"):
        warp_crops(images, torch.tensor([3]), affine[:1], (6, 5))


# ---------------------------------------------------------------------------------------------- flip_keypoints

def test_flip_keypoints_matches_loop_and_twice_is_identity():
    kp = _keypoints(4, 3, NUM_KEYPOINTS, (40, 30))
    flipped = flip_keypoints(kp, 30)
    partner = dict(FLIP_PAIRS) | {b: a for a, b in FLIP_PAIRS}
    for n, k in np.ndindex(kp.shape[:2]):
        x, y, v = kp[n, partner.get(k, k)].tolist()
        np.testing.assert_array_equal(flipped[n, k].numpy(), [30 - 1 - x, y, v])
    torch.testing.assert_close(flip_keypoints(flipped, 30), kp, equal_nan=True)
    widths = torch.tensor([30.0, 12.0, 7.5], dtype=F64)
    per_person = flip_keypoints(kp, widths)
    torch.testing.assert_close(per_person[1], flip_keypoints(kp[1:2], 12.0)[0], equal_nan=True)
    torch.testing.assert_close(flip_keypoints(per_person, widths), kp, equal_nan=True)


# ---------------------------------------------------------------------------------------------- devices

@pytest.mark.parametrize("device", ["meta"] + DEVICES)
def test_functions_follow_the_device(device):
    """Every function runs where its inputs live (on "meta" only shapes and dtypes are computed)."""
    size, gen = (12, 10), torch.Generator().manual_seed(0)
    kp = _keypoints(0, 3, NUM_KEYPOINTS, size).float()
    center, box_size, rotation = _random_crops(0, 3, torch.float32)
    outputs = {
        "heat": render_heatmaps(kp.to(device), size, 2.0, dtype=torch.bfloat16),
        "target": onehot_target(kp[..., :2].to(device), kp[..., 2].to(device) > 0, size)[0],
        "coords": soft_argmax(torch.randn(3, 17, *size, generator=gen).to(device))[0],
        "box": box_from_keypoints(kp.to(device)),
        "center": center_scale(box_from_keypoints(kp.to(device)), 0.75)[1],
        "affine": invert_affine(crop_affine(center.to(device), box_size.to(device), size, rotation.to(device))),
        "flip": flip_keypoints(kp.to(device), size[1]),
        "ks": codec.ks(kp.to(device), kp.flip(0).to(device), torch.ones(3, device=device)),
        "crop": person_crop_affine(kp.to(device), size, torch.ones(3, device=device), rotation.to(device)),
    }
    for name, out in outputs.items():
        assert out.device.type == device, name
    assert outputs["heat"].dtype == torch.bfloat16 and outputs["heat"].shape == (3, 17, 12, 10)
    assert outputs["target"].shape == (3, 17, 120) and outputs["affine"].shape == (3, 2, 3)
    if device != "meta":
        images = torch.rand(2, 3, 20, 30, generator=gen)
        affine = crop_affine(center, box_size, size, rotation)
        crops = warp_crops(images.to(device), torch.tensor([1, 0, 1], device=device), affine.to(device), size, 0.5)
        assert crops.device.type == device
        torch.testing.assert_close(crops.cpu(), warp_crops(images, torch.tensor([1, 0, 1]), affine, size, 0.5))
