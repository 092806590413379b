"""A small Python client of the posefix service (proto/posefix/v1/posefix.proto), numpy in and out.

    with PoseRefinerClient("localhost:50051") as client:
        refined = client.refine(open("frame.jpg", "rb").read(), poses, format="coco17")  # (P, Kf, 3)

Glossary: P persons, Kf keypoints of the format (17 coco17, 33 blazepose33, 25 body25, 18 coco18);
poses (P, Kf, 3) = (x, y, score) in image pixels, score 0 for a keypoint not found. A refined pose is
(P, Kf, 3) = (x, y, confidence) in image pixels; keypoints without a COCO-17 counterpart come back as
sent. Calls that fail raise ``grpc.RpcError`` (``.code()``, ``.details()``; INVALID_ARGUMENT details
start with the offending field).
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Self

import grpc
import numpy as np
from google.protobuf import json_format

from ._proto import FORMAT_LAYOUT, pb2, pb2_grpc

FORMATS: dict[str, int] = {name: value for value, name in FORMAT_LAYOUT.items()}  # layout name → enum


def _format(fmt: str | int) -> int:
    if isinstance(fmt, str):
        if fmt not in FORMATS:
            raise ValueError(f"format must be one of {list(FORMATS)}, got {fmt!r}")
        return FORMATS[fmt]
    return int(fmt)


def image_message(image) -> pb2.Image:
    """An Image message from encoded bytes (a JPEG or PNG file's contents), a path to such a file, or
    a uint8 array (H, W, 3) RGB, (H, W, 4) RGBA or (H, W) grey."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return pb2.Image(encoded=bytes(image))
    if isinstance(image, (str, Path)):
        return pb2.Image(encoded=Path(image).read_bytes())
    pixels = np.asarray(image)
    if pixels.dtype != np.uint8 or pixels.ndim not in (2, 3) or (pixels.ndim == 3 and pixels.shape[2] not in (1, 3, 4)):
        raise ValueError(f"image array must be uint8 (H, W), (H, W, 3) or (H, W, 4), got {pixels.dtype} "
                         f"{pixels.shape}")
    channels = 1 if pixels.ndim == 2 else pixels.shape[2]
    raw = pb2.RawImage(pixels=np.ascontiguousarray(pixels).tobytes(), height=pixels.shape[0],
                       width=pixels.shape[1], channels=channels)
    return pb2.Image(raw=raw)


def request_message(image, persons, format: str | int = "coco17", track_ids=None) -> pb2.RefinePoseRequest:
    """A RefinePoseRequest: ``persons`` (P, Kf, 3) array-like; ``track_ids`` (P,) for streams."""
    poses = np.asarray(persons, dtype=np.float64)
    if poses.size == 0:
        poses = poses.reshape(0, 0, 3)
    if poses.ndim != 3 or poses.shape[2] != 3:
        raise ValueError(f"persons must be (P, Kf, 3) = (x, y, score), got shape {poses.shape}")
    request = pb2.RefinePoseRequest(image=image_message(image), format=_format(format))
    for i, pose in enumerate(poses.tolist()):
        person = request.persons.add(track_id=0 if track_ids is None else int(track_ids[i]))
        for x, y, s in pose:
            person.keypoints.add(x=x, y=y, score=s)
    return request


def refined_array(response: pb2.RefinePoseResponse) -> np.ndarray:
    """(P, Kf, 3) = (x, y, confidence) of a RefinePoseResponse."""
    rows = [[(k.x, k.y, k.confidence) for k in p.keypoints] for p in response.persons]
    return np.array(rows, dtype=np.float64).reshape(len(rows), -1, 3)


class PoseRefinerClient:
    """A connection to a posefix server at ``target`` ("host:port"); a context manager that closes it.

    ``timeout``: seconds each call may take (its deadline). ``credentials``: grpc channel credentials
    for TLS (None: plaintext).
    """

    def __init__(self, target: str, *, timeout: float = 30.0, credentials: grpc.ChannelCredentials | None = None,
                 max_message_bytes: int = 64 * 1024 * 1024):
        options = [("grpc.max_send_message_length", max_message_bytes),
                   ("grpc.max_receive_message_length", max_message_bytes)]
        self.channel = (grpc.secure_channel(target, credentials, options) if credentials is not None
                        else grpc.insecure_channel(target, options))
        self.stub = pb2_grpc.PoseRefinerStub(self.channel)
        self.timeout = timeout

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def refine(self, image, persons, format: str | int = "coco17", *, timeout: float | None = None) -> np.ndarray:
        """Refine the persons (P, Kf, 3) of one image (see :func:`image_message`); (P, Kf, 3) refined."""
        response = self.stub.RefinePose(request_message(image, persons, format),
                                        timeout=self.timeout if timeout is None else timeout)
        return refined_array(response)

    def refine_stream(self, frames: Iterable[tuple], format: str | int = "coco17", *, follow_tracks: bool = False,
                      smoothing: dict | None = None, frame_rate_hz: float | None = None,
                      temporal: dict | None = None, timeout: float | None = None) -> Iterator[np.ndarray]:
        """Refine the frames of a video in order over one stream; yields each frame's (P, Kf, 3).

        frames: (image, persons (P, Kf, 3), track_ids (P,) or None[, timestamp_us]) per frame.
        smoothing: One-Euro parameters {"min_cutoff_hz", "beta", "d_cutoff_hz"} ({} for the defaults;
        None: no smoothing). temporal: the temporal refinement {"smoother", "max_gap"} ({} for the defaults;
        None: none, unless the server has no refiner). ``timeout`` bounds the whole stream (default: none).
        """
        def requests():
            for n, frame in enumerate(frames):
                image, persons, tracks = frame[:3]
                message = pb2.RefinePoseStreamRequest(frame=request_message(image, persons, format, tracks),
                                                      timestamp_us=int(frame[3]) if len(frame) > 3 else 0)
                if n == 0:
                    options = pb2.StreamOptions(follow_tracks=follow_tracks)
                    if smoothing is not None:
                        options.smoothing.CopyFrom(pb2.OneEuroFilter(**smoothing))
                    if frame_rate_hz is not None:
                        options.frame_rate_hz = frame_rate_hz
                    if temporal is not None:
                        options.temporal.CopyFrom(pb2.TemporalOptions(**temporal))
                    message.options.CopyFrom(options)
                yield message

        for response in self.stub.RefinePoseStream(requests(), timeout=timeout):
            yield refined_array(response.result)

    def model_info(self, *, timeout: float | None = None) -> dict:
        """The server's ModelInfo as a dict (field names as in the .proto)."""
        info = self.stub.GetModelInfo(pb2.GetModelInfoRequest(), timeout=self.timeout if timeout is None else timeout)
        return json_format.MessageToDict(info, preserving_proto_field_name=True)
