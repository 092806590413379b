"""Rendering input poses into heatmaps: the batched renderer against the earlier port's way and a loop.

    python benchmarks/bench_render.py [--device cpu|cuda] [--batches 1 4 16 64 256] [--json PATH]

(a) the port's way: dense float64 Gaussians on the CPU with numpy, one (H, W) grid per joint, then
    converted to float32 and copied to the device; (b) a per-person, per-joint loop of torch calls on
    the device; (c) ``posefix.codec.render_heatmaps``: one batched, separable call on the device from
    coordinates (nothing crosses PCIe but the (N, 17, 3) keypoints). The end-to-end column is one
    ResNet-50 refiner forward pass at the same size and batch (model only), so the renderer's share of
    a person's time is visible. Memory bound: a dense 17×384×288 float32 map is 7.5 MB per person.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from common import machine, timed, write
from posefix import codec
from posefix.model import ModelConfig, PoseFixNet


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


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16, 64, 256])
    ap.add_argument("--json", default=str(Path(__file__).parent / "results" / "render.json"))
    ap.add_argument("--no-model", action="store_true", help="skip the end-to-end model column")
    args = ap.parse_args()
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    rng = np.random.default_rng(0)
    rows = []
    print(f"device {device} ({machine(args.device).get('gpu', machine(args.device)['processor'])}); ms per person")
    print(f"{'size':>8} {'batch':>5} | {'port (f64 CPU + copy)':>21} {'loop':>8} {'batched':>8} | "
          f"{'vs port':>8} {'vs loop':>8} | {'R-50 fwd':>8} {'render share':>12}")
    for size, sigma in (((384, 288), 9.0), ((256, 192), 7.0)):
        model = None
        if not args.no_model:
            model = PoseFixNet(ModelConfig(backbone="resnet50", input_size=size, sigma=sigma)).to(device).eval()
        for n in args.batches:
            kp_np = np.concatenate([rng.uniform(0, size[1], (n, 17, 1)), rng.uniform(0, size[0], (n, 17, 1)),
                                    (rng.random((n, 17, 1)) > 0.1).astype(np.float64)], axis=-1)
            kp = torch.from_numpy(kp_np).float().to(device)
            t_port = timed(lambda: port_way(kp_np, size, sigma, device), 1 if n >= 64 else 3, sync)
            t_loop = timed(lambda: loop_way(kp, size, sigma), 1 if n >= 64 else 3, sync)
            t_ours = timed(lambda: codec.render_heatmaps(kp, size, sigma), 3, sync)
            np.testing.assert_allclose(codec.render_heatmaps(kp, size, sigma).cpu().numpy(),
                                       port_way(kp_np, size, sigma, "cpu").numpy(), atol=1e-5)
            t_model = None
            if model is not None and (device.type == "cuda" or n <= 16):
                image = torch.rand(n, 3, *size, device=device)
                heat = codec.render_heatmaps(kp, size, sigma)
                with torch.no_grad():
                    t_model = timed(lambda: model(image, heat), 1, sync)
            per = lambda t: 1e3 * t / n  # noqa: E731
            share = t_ours / (t_ours + t_model) if t_model else None
            rows.append({"size": list(size), "batch": n, "port_ms": per(t_port), "loop_ms": per(t_loop),
                         "batched_ms": per(t_ours), "speedup_vs_port": t_port / t_ours,
                         "speedup_vs_loop": t_loop / t_ours, "model_ms": per(t_model) if t_model else None,
                         "render_share": share})
            model_s = f"{per(t_model):8.1f}" if t_model else f"{'-':>8}"
            share_s = f"{100 * share:11.2f}%" if share is not None else f"{'-':>12}"
            print(f"{size[0]}x{size[1]:<4} {n:5d} | {per(t_port):21.3f} {per(t_loop):8.3f} {per(t_ours):8.3f} | "
                  f"{t_port / t_ours:7.1f}× {t_loop / t_ours:7.1f}× | {model_s} {share_s}")
    write(args.json, {"benchmark": "render", "rows": rows, "machine": machine(args.device)})


if __name__ == "__main__":
    main()
