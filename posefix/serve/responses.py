"""Responses: the refined COCO joints put back into the keypoints of the request's format, with the fields
sent; never a non-finite number (:class:`NonFiniteResult`)."""
from __future__ import annotations

import numpy as np

from .._proto import pb2
from ..formats import Layout, from_coco17


class NonFiniteResult(RuntimeError):
    """A response would carry a non-finite number (a fault of the server's, not of the request)."""


def build_response(request: pb2.RefinePoseRequest, layout: Layout, native: np.ndarray, xy: np.ndarray,
                   conf: np.ndarray, kept: np.ndarray | None = None) -> pb2.RefinePoseResponse:
    """The response: ``native`` (P, Kf, 3) with its COCO joints replaced by xy (P, 17, 2) pixels and
    confidence (P, 17); each person's box, score and track id as sent. ``kept`` (P, 17) bool: where the
    COCO joint is the input's (``kept_input``; keypoints without a COCO counterpart are always kept)."""
    refined = from_coco17(np.concatenate([xy, conf[..., None]], axis=-1), native, layout)  # (P, Kf, 3)
    if not np.isfinite(refined).all():  # never sent: the call ends INTERNAL, logged
        raise NonFiniteResult(f"{int((~np.isfinite(refined)).sum())} non-finite refined values")
    is_refined = np.zeros(len(layout.names), dtype=bool)
    is_refined[list(layout.coco_index)] = True
    as_sent = np.broadcast_to(~is_refined, refined.shape[:2]).copy()  # (P, Kf)
    if kept is not None and len(kept):
        as_sent[:, list(layout.coco_index)] = kept
    response = pb2.RefinePoseResponse()
    for person, values, same in zip(request.persons, refined.tolist(), as_sent.tolist()):
        out = response.persons.add(track_id=person.track_id)
        if person.HasField("box"):
            out.box.CopyFrom(person.box)
        if person.HasField("score"):
            out.score = person.score
        for (x, y, c), r, k in zip(values, is_refined.tolist(), same):
            out.keypoints.add(x=x, y=y, confidence=c, refined=r, kept_input=k)
    return response
