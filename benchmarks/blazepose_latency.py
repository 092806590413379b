"""BlazePose full's own per-frame latency (MediaPipe's pose solution, ``model_complexity=1``), for
bench_realtime.py. Run by a Python that has ``mediapipe`` (a separate virtual environment: see
docs/deployment.md), pinned to one core by its caller (``taskset``):

    python blazepose_latency.py [--frames 100] IMAGE.jpg ...

Prints one JSON line: ``video_ms``, the median per-frame latency of video mode (the landmark model on the
region tracked from the frame before: the steady state of a stream) over ``--frames`` frames cycling through
the images; ``still_ms``, the same in still-image mode (the person detector and the landmark model on every
frame); the mediapipe version, the images and the frames that found a person."""
from __future__ import annotations

import argparse
import json
import statistics
import time


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("images", nargs="+")
    p.add_argument("--frames", type=int, default=100)
    args = p.parse_args()
    import mediapipe as mp
    import numpy as np
    from PIL import Image

    frames = [np.ascontiguousarray(np.asarray(Image.open(path).convert("RGB"))) for path in args.images]
    out = {"mediapipe": mp.__version__, "images": len(frames), "frames": args.frames}
    for name, still in (("video", False), ("still", True)):
        with mp.solutions.pose.Pose(static_image_mode=still, model_complexity=1, smooth_landmarks=False,
                                    enable_segmentation=False) as pose:
            pose.process(frames[0])  # warm-up
            times, found = [], 0
            for i in range(args.frames):
                # Video mode: the same image for runs of 10 frames, so the tracker holds the person as in a stream.
                frame = frames[(i // 10) % len(frames)] if not still else frames[i % len(frames)]
                t0 = time.perf_counter()
                result = pose.process(frame)
                times.append(time.perf_counter() - t0)
                found += result.pose_landmarks is not None
        out[f"{name}_ms"] = 1e3 * statistics.median(times)
        out[f"{name}_found"] = found
    print(json.dumps(out))


if __name__ == "__main__":
    main()
