"""What every benchmark records beside its numbers: the machine, the device and the versions."""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path


def machine(device: str = "cpu") -> dict:
    import numpy as np
    import torch

    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "python": platform.python_version(), "numpy": np.__version__,
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "device": device}
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def timed(fn, repeat: int = 3, sync=None) -> float:
    """Best wall time of ``repeat`` calls (after one warm-up call), in seconds."""
    fn()
    if sync:
        sync()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        best = min(best, time.perf_counter() - t0)
    return best


def write(path: str | Path, report: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))
    print(f"numbers written to {path}")
