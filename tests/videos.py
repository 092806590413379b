"""Test videos: a short clip panned over one image, for the tests of refine-video and the stream."""
import numpy as np
import torch

from posefix.video import VideoWriter


def make_sample_video(image: torch.Tensor, path, num_frames: int = 24, size=(240, 320), fps: float = 12.0,
                      step: float = 4.0) -> np.ndarray:
    """A short video made from one image: a (H, W) = ``size`` window panning by ``step`` pixels per
    frame. Returns each frame's offset (F, 2) = (x, y) of the window in the image, so that poses of the
    image map to frame f by subtracting offset[f]."""
    h, w = size
    _, ih, iw = image.shape
    offsets = np.zeros((num_frames, 2))
    writer = VideoWriter(path, fps, w, h)
    try:
        for f in range(num_frames):
            x0 = int(min(max(0.0, (iw - w) / 2 + step * (f - num_frames / 2)), iw - w))
            y0 = int(max(0, (ih - h) // 2))
            offsets[f] = (x0, y0)
            writer.write(image[:, y0:y0 + h, x0:x0 + w].contiguous())
    except BaseException as e:
        writer.close(e)
        raise
    writer.close()
    return offsets
