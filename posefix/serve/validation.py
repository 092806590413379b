"""Request validation: what a request may hold (:class:`Limits`), its bytes parsed, its image checked without
decoding, its persons as an array; every problem an :class:`~posefix.errors.InputError` naming the field. Errors
become gRPC status codes in one table, :data:`STATUS`.

Glossary: P persons of a request, Kf keypoints of its format; poses are (x, y, score) in pixels of the image
as sent.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import grpc
import numpy as np
from google.protobuf.message import DecodeError

from .._proto import FORMAT_LAYOUT, pb2
from ..batcher import BatcherStopped, DeadlineExpired, QueueFull
from ..errors import InputError, PosefixError
from ..formats import LAYOUTS, Layout
from ..images import encoded_size
from ..keypoints import check_poses


class NoIndex(PosefixError):
    """SearchPoses on a server started without a pose index (FAILED_PRECONDITION)."""


# Typed errors → gRPC status codes; the first class in an error's MRO that is listed decides.
STATUS: dict[type[BaseException], grpc.StatusCode] = {
    InputError: grpc.StatusCode.INVALID_ARGUMENT,
    QueueFull: grpc.StatusCode.RESOURCE_EXHAUSTED,
    DeadlineExpired: grpc.StatusCode.DEADLINE_EXCEEDED,
    BatcherStopped: grpc.StatusCode.UNAVAILABLE,
    NoIndex: grpc.StatusCode.FAILED_PRECONDITION,
}
FIELD_METADATA_KEY = "posefix-field"  # trailing metadata naming the offending field of an INVALID_ARGUMENT


def status_of(error: BaseException) -> grpc.StatusCode:
    for cls in type(error).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return grpc.StatusCode.INTERNAL


@dataclass(frozen=True)
class Limits:
    """What one request may hold; beyond: INVALID_ARGUMENT (the message size: RESOURCE_EXHAUSTED)."""
    max_persons_per_image: int = 256
    max_image_side: int = 8192  # pixels, height and width each
    max_image_pixels: int = 4096 * 4096  # height × width; 48 MiB as raw RGB
    max_message_bytes: int = 64 * 1024 * 1024  # a request message, image included
    max_search_k: int = 1000  # SearchPoses' k: matches in one reply (about 300 bytes each)


def parse(message_type, data):
    """A request as received: its bytes (the server registers its methods without a deserializer, so
    that bytes that do not parse are answered INVALID_ARGUMENT by posefix, not UNKNOWN by gRPC) or an
    already parsed message. An InputError("request") when the bytes are not a ``message_type``."""
    if not isinstance(data, bytes):
        return data
    try:
        return message_type.FromString(data)
    except DecodeError as e:
        raise InputError("request", f"is not a valid {message_type.DESCRIPTOR.name} message "
                         f"({len(data)} bytes): {e}") from None


def check_request(request: pb2.RefinePoseRequest, limits: Limits) -> tuple[Layout, bytes | pb2.RawImage, np.ndarray]:
    """Validate a RefinePoseRequest without decoding its image: its format's layout, its image's data (see
    :func:`_check_image`) and its persons' keypoints (P, Kf, 3) (see :func:`persons_array`)."""
    layout = layout_of(request.format)
    size, data = _check_image(request.image, limits)
    return layout, data, persons_array(request.persons, request.format, size, limits)


# Images: a header check before any decoding, then decoding (in a worker thread), in posefix.images.

def _check_image_size(height: int, width: int, limits: Limits, field: str) -> None:
    if height == 0 or width == 0:
        raise InputError(field, f"has no pixels ({height}×{width})")
    if max(height, width) > limits.max_image_side or height * width > limits.max_image_pixels:
        raise InputError(field, f"{height}×{width} pixels exceed the limit of {limits.max_image_side} pixels a "
                         f"side and {limits.max_image_pixels} pixels in all")


def _check_image(image: pb2.Image, limits: Limits) -> tuple[tuple[int, int], bytes | pb2.RawImage]:
    """Validate an Image message without decoding it; its (height, width) in pixels and its data (the
    encoded bytes, read once: each read of a bytes field copies it, holding the GIL, or the RawImage)."""
    kind = image.WhichOneof("data")
    if kind is None:
        raise InputError("image", "is empty: set image.encoded (JPEG or PNG bytes) or image.raw")
    if kind == "encoded":
        data = image.encoded
        if not data:
            raise InputError("image.encoded", "is empty")
        height, width = encoded_size(data)
        _check_image_size(height, width, limits, "image.encoded")
        return (height, width), data
    raw = image.raw
    if raw.channels not in (1, 3, 4):
        raise InputError("image.raw.channels", f"must be 1 (grey), 3 (RGB) or 4 (RGBA), got {raw.channels}")
    _check_image_size(raw.height, raw.width, limits, "image.raw")
    expected = raw.height * raw.width * raw.channels
    if len(raw.pixels) != expected:
        raise InputError("image.raw.pixels", f"holds {len(raw.pixels)} bytes; height × width × channels = "
                         f"{raw.height} × {raw.width} × {raw.channels} = {expected}")
    return (raw.height, raw.width), raw


# Persons.

def layout_of(fmt: int) -> Layout:
    """The layout of a KeypointFormat value; InputError("format") for UNSPECIFIED or an unknown value."""
    if fmt not in FORMAT_LAYOUT:
        known = ", ".join(pb2.KeypointFormat.Name(f) for f in FORMAT_LAYOUT)
        what = "is not set" if fmt == pb2.KEYPOINT_FORMAT_UNSPECIFIED else f"{fmt} is not a known format"
        raise InputError("format", f"{what}; one of {known}")
    return LAYOUTS[FORMAT_LAYOUT[fmt]]


def persons_array(persons, fmt: int, image_size: tuple[int, int], limits: Limits) -> np.ndarray:
    """Validate the persons of a request; their keypoints (P, Kf, 3) as (x, y, score) in image pixels.

    Each must have exactly Kf keypoints, finite values, and every present keypoint (score > 0) within
    the image extended by its own width and height on each side; boxes finite with width, height >= 0.
    """
    layout = layout_of(fmt)
    kf = len(layout.names)
    if len(persons) > limits.max_persons_per_image:
        raise InputError("persons", f"{len(persons)} persons exceed the limit of {limits.max_persons_per_image}")
    out = np.zeros((len(persons), kf, 3))
    for i, person in enumerate(persons):
        if len(person.keypoints) != kf:
            raise InputError(f"persons[{i}].keypoints", f"expected {kf} keypoints for "
                             f"{pb2.KeypointFormat.Name(fmt)}, got {len(person.keypoints)}")
        out[i] = [(k.x, k.y, k.score) for k in person.keypoints]
        if person.HasField("box"):
            box = person.box
            values = (box.x, box.y, box.width, box.height)
            if not all(math.isfinite(v) for v in values) or box.width < 0 or box.height < 0:
                raise InputError(f"persons[{i}].box", f"must be finite with width, height >= 0, got {values}")
        if person.HasField("score") and not math.isfinite(person.score):
            raise InputError(f"persons[{i}].score", f"must be finite, got {person.score}")
    return check_poses(out, "persons", kf, image_size=image_size)
