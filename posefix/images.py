"""Image files: finding them and decoding them with torchvision.io."""
from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torchvision.io import ImageReadMode, decode_image, read_file

from synth.exceptions import InputError


def decode(path: str | Path) -> torch.Tensor:
    """Decode an image file to (3, H, W) uint8 RGB; a missing or corrupt file is an InputError naming it."""
    path = Path(path)
    if not path.is_file():
        raise InputError("image", "file not found", str(path))
    try:
        with warnings.catch_warnings():
            # torchvision >= 0.29 announces that its image codecs will move to TorchCodec.
            warnings.filterwarnings("ignore", "The image decoding", DeprecationWarning)
            data = read_file(str(path))
            return decode_image(data, mode=ImageReadMode.RGB)
    except (RuntimeError, ValueError) as e:
        raise InputError("image", f"cannot decode: {str(e).splitlines()[0]}", str(path)) from None


def coco_image_path(images_dir: str | Path, image: dict) -> Path:
    """Path of a COCO ``images`` entry: its ``file_name`` under the directory, else COCO's %012d.jpg."""
    name = image.get("file_name") or f"{int(image['id']):012d}.jpg"
    return Path(images_dir) / name
