"""The command line's shared pieces: the options several commands take, each declared once, and the guard
that keeps a command's outputs off its inputs. :mod:`posefix.cli` and :mod:`posefix.search_cli` build their
parsers from them."""
from __future__ import annotations

import argparse
from pathlib import Path

from .devices import DEVICE_HELP
from .errors import InputError
from .fileio import check_outputs
from .formats import FORMATS


def seed_type(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text!r}")
    return value


def check_command_outputs(args, inputs: tuple[str, ...], outputs: tuple[str, ...], extra=(), trees=()):
    """Refuse to write an output over (or inside) an input, or over another output (see
    :func:`posefix.fileio.check_outputs`); ``extra``, ``trees``: (field, path) of more outputs, of directories
    replaced whole."""
    def named(names):
        return [(f"--{name.replace('_', '-')}", getattr(args, name, None)) for name in names]

    check_outputs(named(inputs), named(outputs) + list(extra), trees)
    for field, path in named(outputs):
        if path is not None and Path(path).is_dir():
            raise InputError(field, f"{path} is a directory; give a file path")


# Options several commands share, each declared once: ``name_arg(parser, **overrides)`` adds it to a command's
# parser (keyword arguments replace the shared ones, e.g. required=True or a command's own help).
FORMAT_NAMES = tuple(FORMATS)  # --format's choices: the registered formats


def _option(*names: str, **spec):
    """The shared option ``names`` (``spec``: its add_argument keywords) as a function that adds it to a parser."""
    def add(parser, **overrides) -> None:
        parser.add_argument(*names, **{**spec, **overrides})
    return add


checkpoint_arg = _option("--checkpoint", metavar="CKPT", help="model.safetensors from posefix train (or --onnx)")
images_arg = _option("--images", metavar="DIR")
gt_arg = _option("--gt", required=True, metavar="ANNOTATIONS.json", help="COCO person-keypoints annotations")
annotations_arg = _option("--annotations", metavar="ANNOTATIONS.json",
                          help="COCO annotations: image file names and ids")
format_arg = _option("--format", default="coco", choices=FORMAT_NAMES)
flip_test_arg = _option("--flip-test", action="store_true", help="average with the refinement of the mirrored crop")
batch_size_arg = _option("--batch-size", type=int, default=64, help="persons per model call (64)")
workers_arg = _option("--workers", type=int, default=2, help="image decoding threads (2)")
reduced_decoding_arg = _option("--reduced-decoding", action=argparse.BooleanOptionalAction, default=None,
                               help="decode a JPEG at 1/2, 1/4 or 1/8 of its size where every crop of its persons "
                                    "samples it at least that coarsely (on by default)")
skip_invalid_arg = _option("--skip-invalid", action="store_true", help="leave out malformed entries and the persons "
                           "of images that cannot be read; refine the rest")
quiet_arg = _option("--quiet", action="store_true", help="no progress bar")


def precision_args(parser) -> None:
    """``--precision`` and ``--channels-last``, for every command that runs the torch model."""
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"),
                        help="the model's arithmetic (fp32; bf16: bfloat16 autocast, for GPUs)")
    parser.add_argument("--channels-last", action="store_true", help="NHWC memory layout (faster with bf16 on GPUs)")


def device_arg(parser, default: str = "cpu") -> None:
    """``--device``, for every command that runs the model (read by posefix.devices.resolve_device)."""
    parser.add_argument("--device", default=default, help=f"{DEVICE_HELP} ({default})")


def allow_outside_images_arg(parser) -> None:
    """``--allow-outside-images``, for every command that reads images by the names an input file gives."""
    parser.add_argument("--allow-outside-images", action="store_true",
                        help="read image names that lead out of the image directory (.., absolute paths, "
                             "symbolic links out); refused by default")
    parser.add_argument("--max-image-pixels", type=int, default=None, metavar="N",
                        help="refuse image files whose header declares more than N pixels, before decoding "
                             "(67108864 = 64 Mi)")
