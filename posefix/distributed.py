"""Refinement at dataset scale on a Ray cluster: :func:`posefix.refine.refine_images`, run as a Ray Data
pipeline (``pip install 'posefix[ray]'``).

The driver hands Ray one row per image (the image's path or URI and its persons' poses), a few images to a
block. A pool of actors, each holding one :class:`~posefix.refiner.Refiner` on its device, takes the blocks:
an actor reads and decodes its images itself (a path every node sees, or a URI that pyarrow's file systems
read, ``s3://``, ``gs://``...), refines their persons with ``refine_images`` and sends back, per image,
exactly what ``refine_images`` yields for it. Ray restarts an actor whose process dies and runs its blocks
again; the driver keeps the first result of each image, so every person comes back once. An image that
cannot be read or decoded is reported by name instead of failing its block.
"""
from __future__ import annotations

import json
import logging
import math
import pickle
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from .devices import resolve_device
from .errors import InputError, PosefixError, require
from .images import Reduced, decode_bytes_reduced, decode_reduced, is_uri
from .keypoints import NUM_KEYPOINTS
from .options import RefineOptions
from .refine import refine_images
from .refiner import Refiner
from .runtime import keep_freed_memory
from .weights import load_weights


def _ray():
    require("ray.data", "ray", "refining on Ray")
    import ray

    return ray


def read_image(source: str, reduce: int = 1) -> Reduced:
    """Decode an image file or URI to (3, H, W) uint8 RGB, as :func:`posefix.images.decode_reduced` does (at
    1/``reduce`` where it can be); a URI is read through pyarrow's file systems (the ones Ray Data reads with).
    An InputError names the source."""
    if not is_uri(source):
        return decode_reduced(source, reduce)
    import pyarrow.fs  # with the ray extra

    try:
        fs, path = pyarrow.fs.FileSystem.from_uri(source)
        with fs.open_input_stream(path) as f:
            data = f.read()
    except (OSError, pyarrow.ArrowException) as e:
        reason = "file not found" if isinstance(e, FileNotFoundError) else f"cannot read: {str(e).splitlines()[0]}"
        raise InputError("image", reason, source) from None
    try:
        return decode_bytes_reduced(data, "image", reduce)
    except InputError as e:
        raise InputError("image", e.problem, source) from None


class _RefineBlock:
    """One actor of the pool: a Refiner, loaded once, refining a block of images per call."""

    def __init__(self, checkpoint: str, options: RefineOptions, workers: int, threads: int | None):
        if threads:
            torch.set_num_threads(threads)
        keep_freed_memory()  # full batches of one shape, as in posefix refine
        self.refiner = Refiner.from_checkpoint(checkpoint, options)
        self.workers = max(workers, 1)

    def __call__(self, batch: dict) -> dict:
        rows = range(len(batch["job"]))
        results, errors = [b""] * len(rows), [""] * len(rows)
        poses = [np.frombuffer(batch["poses"][i], dtype=np.float64).reshape(-1, NUM_KEYPOINTS, 3) for i in rows]
        with ThreadPoolExecutor(self.workers, thread_name_prefix="posefix-read") as pool:
            images = [pool.submit(read_image, str(batch["image"][i]), self.refiner.decode_reduction(poses[i]))
                      for i in rows]

            def jobs():
                for i in rows:
                    try:
                        image = images[i].result()
                    except InputError as e:
                        errors[i] = json.dumps([e.field, e.problem, e.source])
                        continue
                    yield i, image, poses[i]

            for i, *outputs in refine_images(self.refiner, jobs(), workers=self.workers):
                results[i] = pickle.dumps(tuple(outputs), protocol=pickle.HIGHEST_PROTOCOL)
        return {"job": np.asarray(batch["job"], dtype=np.int64), "result": np.array(results, dtype=object),
                "error": np.array(errors, dtype=object)}


def refine_images_ray(checkpoint, jobs, options: RefineOptions | None = None, *, actors: int | None = None,
                      num_gpus: float | None = None, workers: int = 2, images_per_block: int = 16,
                      address: str | None = None, skipped: list | None = None, progress=None,
                      show_progress: bool = True):
    """:func:`posefix.refine.refine_images` on a Ray cluster: yields what it yields per image, ``(key, xy,
    confidence, ...)``, in the order the images are done.

    jobs: iterable of (key, image path or URI, poses (P, K, 3) image pixels). ``actors`` actors (default: as
    many as the cluster's GPUs or CPUs allow), each with ``num_gpus`` GPUs (a fraction shares one; 0: a CPU
    actor with the cluster's CPUs split between the actors; None: 1 on a CUDA device, else 0) and a Refiner
    built from ``checkpoint`` (a path every node reads) as ``options`` say (an actor sees only the GPUs Ray
    gives it: device "cuda:N" is "cuda" there, "auto" is decided on this machine); ``workers`` reading threads
    per actor; ``images_per_block`` images per block of work. An actor whose process dies is restarted and its
    blocks run again (Ray Data's actor pools retry without limit).

    Uses the Ray the process is connected to; if none, starts a local one (``address`` None) or joins the
    cluster at ``address``, and shuts it down when done. An image that cannot be read or decoded raises an
    InputError naming it, or, with ``skipped`` a list, is appended to it as (key, message) and left out.
    ``progress(n)`` is called with the number of persons of each image done; ``show_progress``: Ray Data's
    progress bars.
    """
    ray = _ray()
    options, num_gpus = actor_options(options or RefineOptions(), num_gpus)
    device = options.device
    if actors is not None and actors < 1:
        raise InputError("actors", f"must be at least 1, got {actors}")
    if not (num_gpus >= 0 and math.isfinite(num_gpus)):
        raise InputError("num_gpus", f"must be a non-negative number, got {num_gpus}")
    if (num_gpus > 0) != (str(device).startswith("cuda")):
        raise InputError("num_gpus", f"{num_gpus} GPUs per actor do not go with device {device}: "
                         "give device cuda with num_gpus above 0, device cpu with 0")
    if images_per_block < 1:
        raise InputError("images_per_block", f"must be at least 1, got {images_per_block}")
    if num_gpus == 0:
        resolve_device(device)
    checkpoint = str(Path(checkpoint).absolute())
    load_weights(checkpoint)  # a bad checkpoint is reported here, before any actor starts
    keys, images, poses = _rows(jobs)
    started = not ray.is_initialized()
    if started:
        connect(address)
    try:
        yield from _run(ray, checkpoint, keys, images, poses, images_per_block, actors, num_gpus, workers, skipped,
                        progress, show_progress, options)
    finally:
        if started:
            ray.shutdown()


def actor_options(options: RefineOptions, num_gpus: float | None = None) -> tuple[RefineOptions, float]:
    """The options of an actor's refiner and its GPUs: an actor sees only the GPUs Ray gives it, so device
    "cuda:N" is "cuda" there; "auto" is decided on this machine (the driver need not have a GPU for "cuda").
    ``num_gpus`` None: 1 on a CUDA device, else 0."""
    device = resolve_device("auto").type if options.device == "auto" else str(options.device)
    device = "cuda" if device.startswith("cuda") else device
    return options.replace(device=device), float(device == "cuda") if num_gpus is None else num_gpus


def _batches(ray, ds):
    """The dataset's output batches; a failure of the pipeline itself (not an image's) as one PosefixError."""
    try:
        yield from ds.iter_batches(batch_size=None, batch_format="numpy")
    except ray.exceptions.RayError as e:
        raise PosefixError(f"the Ray pipeline failed: {str(e).strip().splitlines()[-1]}") from None


def connect(address: str | None = None) -> None:
    """Start a local Ray (``address`` None) or join the cluster at ``address``; a PosefixError if that fails."""
    ray = _ray()
    try:
        ray.init(address=address or None, logging_level=logging.WARNING, include_dashboard=False)
    except Exception as e:  # noqa: BLE001 (ray.init raises bare Exceptions too, e.g. a start that timed out)
        raise PosefixError(f"ray: cannot start or join Ray at {address or 'a new local cluster'}: "
                           f"{str(e).strip().splitlines()[0]}") from None


def _rows(jobs):
    """The keys of the images, and the columns of the rows handed to Ray: image (the path made absolute, or
    the URI) and poses (float64 bytes)."""
    keys, images, poses = [], [], []
    for key, source, p in jobs:
        keys.append(key)
        images.append(str(source) if is_uri(str(source)) else str(Path(source).absolute()))
        poses.append(np.ascontiguousarray(p, dtype=np.float64).reshape(-1, NUM_KEYPOINTS, 3).tobytes())
    return keys, images, poses


def _blocks(images: list, poses: list, size: int) -> list:
    """Blocks of ``size`` rows: pyarrow tables of job (the image's index), image and poses."""
    import pyarrow as pa

    return [pa.table({"job": pa.array(range(lo, min(lo + size, len(images))), pa.int64()),
                      "image": pa.array(images[lo:lo + size], pa.string()),
                      "poses": pa.array(poses[lo:lo + size], pa.binary())})
            for lo in range(0, len(images), size)]


def _run(ray, checkpoint, keys, images, poses, images_per_block, actors, num_gpus, workers, skipped, progress,
         show_progress, options):
    if not keys:
        return
    with warnings.catch_warnings():  # Ray Data's own settings warn of their deprecated siblings when first made
        warnings.simplefilter("ignore", DeprecationWarning)
        context = ray.data.DataContext.get_current()
    context.enable_progress_bars = show_progress
    if not show_progress:
        logging.getLogger("ray.data").setLevel(logging.WARNING)  # nor its start and finish lines
    resources = ray.cluster_resources()
    if num_gpus > 0:
        have = resources.get("GPU", 0)
        if have < num_gpus:
            raise InputError("num_gpus", f"{num_gpus} GPUs per actor, but the Ray cluster has {have:g}")
        actors = min(actors or max(int(have // num_gpus), 1), len(keys))  # no more actors than images
        cpus, threads = None, None
    else:
        have = resources.get("CPU", 1)
        actors = min(actors or max(int(have), 1), len(keys))
        cpus = have / actors  # the cluster's CPUs split between the actors, each refiner's threads on its own
        threads = max(int(cpus), 1)
    tables = _blocks(images, poses, min(images_per_block, -(-len(keys) // actors)))  # a block for each at least
    ds = ray.data.from_arrow(tables).map_batches(
        _RefineBlock, fn_constructor_kwargs={"checkpoint": checkpoint, "options": options, "workers": workers,
                                             "threads": threads},
        compute=ray.data.ActorPoolStrategy(size=actors), batch_size=None, batch_format="numpy",
        num_cpus=cpus, num_gpus=num_gpus or None)
    done = np.zeros(len(keys), dtype=bool)
    for batch in _batches(ray, ds):
        for job, result, error in zip(batch["job"], batch["result"], batch["error"]):
            if done[job]:
                continue  # a block that ran again after its actor died: this image came back already
            done[job] = True
            if error:
                e = InputError(*json.loads(error))
                if skipped is None:
                    raise e
                skipped.append((keys[job], str(e)))
                continue
            outputs = pickle.loads(result)
            if progress is not None:
                progress(len(outputs[0]))
            yield (keys[job], *outputs)
    if not done.all():
        raise PosefixError(f"Ray returned no result for {int((~done).sum())} of {len(keys)} images")
