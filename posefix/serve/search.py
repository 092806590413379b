"""SearchPoses, the service's pose similarity search (proto/posefix/v1/posefix.proto) over the
:class:`~posefix.search.PoseIndex` the server was started with: the query as sent, or refined first on its
image through the same batcher and refiner as RefinePose."""
from __future__ import annotations

import asyncio
import functools
import math

import numpy as np

from .._proto import pb2
from ..errors import InputError
from ..formats import to_coco17
from .validation import NoIndex, layout_of, persons_array


def _as_query(error: InputError) -> InputError:
    """An error about ``persons[0]`` of the RefinePoseRequest built from a query, about ``query`` instead."""
    field = error.field.replace("persons[0]", "query", 1).replace("query[0]", "query", 1)
    return InputError(field, error.problem, error.source)


async def search_poses(servicer, request: pb2.SearchPosesRequest, context) -> pb2.SearchPosesResponse:
    """Validate the request, refine the query when it comes with an image (``servicer``: the
    :class:`~posefix.serve.servicer.PoseRefinerServicer`), search the index in the servicer's worker threads
    and answer the matches, nearest first."""
    index = servicer.index
    if index is None:
        raise NoIndex("no pose index is loaded: start the server with posefix serve --index POSES.index")
    layout = layout_of(request.format)
    if not request.HasField("query"):
        raise InputError("query", "is not set: send the query pose")
    if request.k < 1:
        raise InputError("k", "must be at least 1, got 0 (not set?)")
    if request.k > servicer.limits.max_search_k:
        raise InputError("k", f"{request.k} exceeds the limit of {servicer.limits.max_search_k} matches per call")
    if request.k > len(index):
        raise InputError("k", f"{request.k} is more than the {len(index)} poses in the index")
    try:
        if request.HasField("image"):
            job = await servicer.decode_request(pb2.RefinePoseRequest(image=request.image, format=request.format,
                                                               persons=[request.query]),
                                         context.time_remaining())
            xy, conf = await servicer.refine(job.image, job.coco, context)
            coco = np.concatenate([xy, conf[..., None]], axis=-1)
        else:  # no image, no bounds: only the count of keypoints and their finiteness are checked
            native = persons_array([request.query], request.format, (math.inf, math.inf), servicer.limits)
            coco = to_coco17(native, layout)
        search = functools.partial(_answer, index, coco, request.k, request.mirror)
        return await asyncio.get_running_loop().run_in_executor(servicer.decoder, search)
    except InputError as e:
        raise _as_query(e) from None


def _answer(index, coco: np.ndarray, k: int, mirror: bool) -> pb2.SearchPosesResponse:
    """The search and its reply, built in a worker thread (not on the serving loop). Every number in it is
    finite (the index holds finite numbers only, and distances are finite for any finite query); a reply that
    were not is an error (INTERNAL), never sent."""
    matches = index.search(coco, k, mirror_too=mirror)
    rows = matches.rows[0]
    numbers = (coco, matches.distances[0], index.boxes[rows], index.keypoints[rows])
    if not all(np.isfinite(a).all() for a in numbers):
        raise RuntimeError("a SearchPoses reply would hold a non-finite number")
    response = pb2.SearchPosesResponse(query=[pb2.Keypoint(x=x, y=y, score=s) for x, y, s in coco[0].tolist()])
    for row, d, m in zip(rows.tolist(), matches.distances[0].tolist(), matches.mirrored[0].tolist()):
        x, y, w, h = index.boxes[row].tolist()
        response.matches.add(pose_id=int(index.ids[row]), image_id=int(index.image_ids[row]),
                             box=pb2.Box(x=x, y=y, width=w, height=h), distance=d, mirrored=m,
                             keypoints=[pb2.Keypoint(x=kx, y=ky, score=ks)
                                        for kx, ky, ks in index.keypoints[row].tolist()])
    return response
