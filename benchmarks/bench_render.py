"""Rendering input poses into heatmaps: posefix's renderers against the earlier port's way and a loop.

    python benchmarks/bench_render.py [--device cpu|cuda] [--batches 1 4 16 64 256] [--json PATH]

Per person, for 384×288 (σ 9) and 256×192 (σ 7), 17 joints, on one device:

  port      the earlier port's way: dense float64 Gaussians on the CPU with numpy, one (H, W) grid per
            joint, then converted to float32 and copied to the device (render-and-copy);
  loop      a per-person, per-joint loop of torch calls on the device;
  dense     ``codec.render_heatmaps``: one batched, separable call on the device from the (N, 17, 3)
            coordinates (nothing crosses PCIe but those), into a fresh tensor;
  reused    the same into a buffer kept across batches (no allocation, no first-touch page faults);
  factors   ``codec.gaussian_axes``: the 1-D Gaussian factors, all that the refiner renders when given
            keypoints (its fused stem never materialises the 17 full-resolution maps).

The stem columns compare the heatmap channels' share of the 7×7/2 stem convolution: rendered maps then
F.conv2d (``plain``) against ``codec.heatmap_conv2d`` from the factors (``fused``), and check they agree.
``R-50`` is one ResNet-50 refiner forward pass (fused path, model only) at the same size and batch; the
share columns are the renderer's part of (render + forward): the dense renderer as a model fed rendered
maps would pay it, and the factors as posefix pays it. Memory bound: a dense 17×384×288 float32 map is
7.5 MB per person, and a fresh one costs its page faults on top of the writes.
"""
from __future__ import annotations

import argparse
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from common import machine, timed, write

from posefix import codec
from posefix.model import ModelConfig, PoseFixNet
from posefix.runtime import keep_freed_memory


def port_way(kp: np.ndarray, size, sigma, device):
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)  # (H, W)
    maps = np.zeros((kp.shape[0], kp.shape[1], h, w), dtype=np.float64)
    for n in range(kp.shape[0]):
        for j in range(kp.shape[1]):
            if kp[n, j, 2] > 0:
                maps[n, j] = np.exp(-((xx - kp[n, j, 0]) ** 2 + (yy - kp[n, j, 1]) ** 2) / (2 * sigma ** 2))
    return torch.from_numpy(maps).float().to(device)


def loop_way(kp: torch.Tensor, size, sigma):
    h, w = size
    ys = torch.arange(h, device=kp.device, dtype=torch.float32)[:, None]
    xs = torch.arange(w, device=kp.device, dtype=torch.float32)[None, :]
    out = torch.zeros(kp.shape[0], kp.shape[1], h, w, device=kp.device)
    for n in range(kp.shape[0]):
        for j in range(kp.shape[1]):
            if kp[n, j, 2] > 0:
                out[n, j] = torch.exp(-((xs - kp[n, j, 0]) ** 2 + (ys - kp[n, j, 1]) ** 2) / (2 * sigma ** 2))
    return out


def rendered_stem(kp, size, sigma, weight):
    """The stem's heatmap part by convolving the rendered maps (the plain path)."""
    return F.conv2d(codec.render_heatmaps(kp, size, sigma), weight, stride=2, padding=3)


def per_person_ms(t: float, n: int) -> float:
    return 1e3 * t / n


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16, 64, 256])
    ap.add_argument("--model-batches", type=int, nargs="+", default=None,
                    help="batches that also time the R-50 forward (default: all on a GPU, up to 16 on a CPU)")
    ap.add_argument("--json", default=str(Path(__file__).parent / "results" / "render.json"))
    ap.add_argument("--no-model", action="store_true", help="skip the R-50 columns")
    ap.add_argument("--keep-freed-memory", action="store_true",
                    help="as posefix refine and train run: freed memory reused, not faulted in afresh")
    args = ap.parse_args()
    kept = keep_freed_memory() if args.keep_freed_memory else False
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    model_batches = args.model_batches or [n for n in args.batches if device.type == "cuda" or n <= 16]
    rng = np.random.default_rng(0)
    info = machine(args.device)
    info["keep_freed_memory"] = kept
    rows = []
    print(f"device {device} ({info.get('gpu', info['processor'])}, {info['torch_threads']} threads"
          f"{', freed memory kept' if kept else ''}); ms per person; speed-ups are the port's time over each")
    print(f"{'size':>8} {'batch':>5} | {'port':>7} {'loop':>7} {'dense':>7} {'reused':>7} {'factors':>7} | "
          f"{'×loop':>6} {'×dense':>6} {'×reused':>7} {'×factors':>8} | {'stem plain':>10} {'fused':>6} | "
          f"{'R-50':>7} {'dense %':>7} {'factors %':>9}")
    for size, sigma in (((384, 288), 9.0), ((256, 192), 7.0)):
        model = None
        if not args.no_model:
            model = PoseFixNet(ModelConfig(backbone="resnet50", input_size=size, sigma=sigma)).to(device).eval()
        weight = torch.randn(64, 17, 7, 7, generator=torch.Generator().manual_seed(0)).mul_(0.05).to(device)
        for n in args.batches:
            kp_np = np.concatenate([rng.uniform(0, size[1], (n, 17, 1)), rng.uniform(0, size[0], (n, 17, 1)),
                                    (rng.random((n, 17, 1)) > 0.1).astype(np.float64)], axis=-1)
            kp = torch.from_numpy(kp_np).float().to(device)
            big = n >= 64
            t_port = timed(partial(port_way, kp_np, size, sigma, device), 1 if big else 3, sync)
            t_loop = timed(partial(loop_way, kp, size, sigma), 1 if big else 3, sync)
            t_dense = timed(partial(codec.render_heatmaps, kp, size, sigma), 3, sync)
            buffer = torch.empty(n, 17, *size, device=device)
            t_reused = timed(partial(codec.render_heatmaps, kp, size, sigma, out=buffer), 3, sync)
            t_factors = timed(partial(codec.gaussian_axes, kp, size, sigma), 5, sync)
            reference = port_way(kp_np, size, sigma, "cpu").numpy()
            np.testing.assert_allclose(codec.render_heatmaps(kp, size, sigma).cpu().numpy(), reference, atol=1e-5)
            np.testing.assert_allclose(buffer.cpu().numpy(), reference, atol=1e-5)
            del reference
            plain_stem = partial(rendered_stem, kp, size, sigma, weight)
            fused_stem = partial(codec.heatmap_conv2d, kp, size, sigma, weight, stride=2, padding=3)
            t_plain_stem = timed(plain_stem, 1 if big else 3, sync)
            t_fused_stem = timed(fused_stem, 1 if big else 3, sync)
            stem_diff = (plain_stem() - fused_stem()).abs().max().item()
            t_model = None
            if model is not None and n in model_batches:
                image = torch.rand(n, 3, *size, device=device)
                with torch.no_grad():
                    t_model = timed(partial(model, image, keypoints=kp), 1, sync)
            per = partial(per_person_ms, n=n)
            dense_share = t_dense / (t_dense + t_model) if t_model else None
            factors_share = t_factors / (t_factors + t_model) if t_model else None
            rows.append({"size": list(size), "batch": n, "port_ms": per(t_port), "loop_ms": per(t_loop),
                         "dense_ms": per(t_dense), "reused_ms": per(t_reused), "factors_ms": per(t_factors),
                         "speedup_loop": t_port / t_loop, "speedup_dense": t_port / t_dense,
                         "speedup_reused": t_port / t_reused, "speedup_factors": t_port / t_factors,
                         "stem_plain_ms": per(t_plain_stem), "stem_fused_ms": per(t_fused_stem),
                         "stem_max_abs_diff": stem_diff, "model_ms": per(t_model) if t_model else None,
                         "dense_share": dense_share, "factors_share": factors_share})
            model_s = f"{per(t_model):7.1f}" if t_model else f"{'-':>7}"
            shares = (f"{100 * dense_share:6.2f}% {100 * factors_share:8.3f}%" if t_model else f"{'-':>7} {'-':>9}")
            print(f"{size[0]}x{size[1]:<4} {n:5d} | {per(t_port):7.3f} {per(t_loop):7.3f} {per(t_dense):7.3f} "
                  f"{per(t_reused):7.3f} {per(t_factors):7.4f} | {t_port / t_loop:5.1f}× {t_port / t_dense:5.1f}× "
                  f"{t_port / t_reused:6.1f}× {t_port / t_factors:7.0f}× | {per(t_plain_stem):10.3f} "
                  f"{per(t_fused_stem):6.3f} | {model_s} {shares}")
    write(args.json, {"benchmark": "render", "rows": rows, "machine": info})


if __name__ == "__main__":
    main()
