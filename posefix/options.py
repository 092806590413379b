"""How a refiner runs: one frozen object of options, built once (from the command line, a service's options
or a Python caller) and taken by every path that refines — :class:`posefix.refiner.Refiner`, ``posefix serve``,
the Ray pipeline and ONNX Runtime.

Adding an option is one field here (with its check in :meth:`RefineOptions.__post_init__`) and its flag.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from .choice import OUTPUTS
from .errors import InputError

PRECISIONS = ("fp32", "bf16")
BACKENDS = ("torch", "onnxruntime")
PROVIDERS = ("cpu", "cuda", "tensorrt")


@dataclass(frozen=True)
class RefineOptions:
    """The options of a refiner; a bad value raises an InputError naming the field.

    device: "cpu", "cuda", "cuda:N", "mps" or "auto" (see :mod:`posefix.devices`); batch_size: persons per
    model call; flip_test: average with the refinement of the mirrored crop; precision: "fp32" or "bf16"
    (bfloat16 autocast, torch only); channels_last: NHWC memory layout (torch only); output: "choice" (per
    joint the input or the refined joint, see :func:`posefix.choice.choose`) or "raw" (every joint as
    refined); choice_margin: the choice's margin (None: the fitted rule's own, else every input joint kept);
    backend: what runs the model, "torch" or "onnxruntime" (None: onnxruntime where ``onnx`` is given, else
    torch); onnx: a model file of ``posefix export`` for ONNX Runtime; provider: ONNX Runtime's execution
    provider, "cpu", "cuda" or "tensorrt" (None: cuda on a CUDA device, else cpu); reduced_decoding: decode a
    JPEG file at 1/2, 1/4 or 1/8 of its size where every crop of its persons samples it at least that coarsely
    (:meth:`posefix.refiner.Refiner.decode_reduction`; files refined by :func:`posefix.refine.refine_images`)."""

    device: str = "cpu"
    batch_size: int = 64
    flip_test: bool = False
    precision: str = "fp32"
    channels_last: bool = False
    output: str = "choice"
    choice_margin: float | None = None
    backend: str | None = None
    onnx: str | None = None
    provider: str | None = None
    reduced_decoding: bool = True

    def __post_init__(self):
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise InputError("batch_size", f"must be at least 1, got {self.batch_size}")
        if self.precision not in PRECISIONS:
            raise InputError("precision", f"must be one of {list(PRECISIONS)}, got {self.precision!r}")
        if self.output not in OUTPUTS:
            raise InputError("output", f"must be one of {list(OUTPUTS)}, got {self.output!r}")
        if self.choice_margin is not None and not _finite(self.choice_margin):
            raise InputError("choice_margin", f"must be a finite number, got {self.choice_margin!r}")
        if self.backend is not None and self.backend not in BACKENDS:
            raise InputError("backend", f"must be one of {list(BACKENDS)}, got {self.backend!r}")
        if self.provider is not None and self.provider not in PROVIDERS:
            raise InputError("provider", f"must be one of {list(PROVIDERS)}, got {self.provider!r}")
        if not isinstance(self.reduced_decoding, bool):
            raise InputError("reduced_decoding", f"must be true or false, got {self.reduced_decoding!r}")
        if self.resolved_backend == "torch" and self.onnx is not None:
            raise InputError("onnx", "is run by the onnxruntime backend, not torch")
        if self.resolved_backend != "torch" and self.precision != "fp32":
            raise InputError("precision", f"{self.precision} is for the torch backend; the "
                             f"{self.resolved_backend} model's arithmetic is its file's")

    @property
    def resolved_backend(self) -> str:
        """The backend that runs the model: ``backend``, or where it is None onnxruntime with an ``onnx`` file,
        else torch."""
        return self.backend or ("onnxruntime" if self.onnx is not None else "torch")

    def replace(self, **changes) -> RefineOptions:
        """A copy with ``changes`` (checked as a new object)."""
        return dataclasses.replace(self, **changes)


def _finite(value) -> bool:
    try:
        return not isinstance(value, (bool, str)) and math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


# The fields' command-line flags, for the command line's messages.
FLAGS = {f.name: "--" + f.name.replace("_", "-") for f in dataclasses.fields(RefineOptions)}
