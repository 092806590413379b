"""Refinement at dataset scale on a Ray cluster: :func:`posefix.engine.refine_images`, run as a Ray Data
pipeline (``pip install 'posefix[ray]'``).

The driver hands Ray one row per image (the image's path or URI and its persons' poses), a few images to a
block. A pool of actors, each holding one :class:`~posefix.engine.Refiner` on its device, takes the blocks:
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
from pathlib import Path

import numpy as np

from .errors import InputError, PosefixError
from .keypoints import NUM_KEYPOINTS

EXTRA = "refining on Ray needs the ray extra: pip install 'posefix[ray]'"


class MissingExtra(PosefixError):
    """An optional dependency is not installed; the message names the extra that brings it."""


def _ray():
    try:
        import ray
        import ray.data
    except ImportError:
        raise MissingExtra(EXTRA) from None
    return ray


def is_uri(path) -> bool:
    """Whether ``path`` is a URI (``s3://bucket/key``, ``file:///dir/x.jpg``) rather than a file path."""
    return isinstance(path, str) and "://" in path


def read_image(source: str):
    """Decode an image file or URI to (3, H, W) uint8 RGB, as :func:`posefix.images.decode` does; a URI is
    read through pyarrow's file systems (the ones Ray Data reads with). An InputError names the source."""
    from .images import decode, decode_encoded

    if not is_uri(source):
        return decode(source)
    import pyarrow.fs

    try:
        fs, path = pyarrow.fs.FileSystem.from_uri(source)
        with fs.open_input_stream(path) as f:
            data = f.read()
    except (OSError, pyarrow.ArrowException) as e:
        reason = "file not found" if isinstance(e, FileNotFoundError) else f"cannot read: {str(e).splitlines()[0]}"
        raise InputError("image", reason, source) from None
    try:
        return decode_encoded(data, "image")
    except InputError as e:
        raise InputError("image", e.problem, source) from None


class _RefineBlock:
    """One actor of the pool: a Refiner, loaded once, refining a block of images per call."""

    def __init__(self, checkpoint: str, options: dict, workers: int, threads: int | None):
        import torch

        from .engine import Refiner
        from .runtime import keep_freed_memory

        if threads:
            torch.set_num_threads(threads)
        keep_freed_memory()  # full batches of one shape, as in posefix refine
        self.refiner = Refiner.from_checkpoint(checkpoint, **options)
        self.workers = max(workers, 1)

    def __call__(self, batch: dict) -> dict:
        from concurrent.futures import ThreadPoolExecutor

        from .engine import refine_images

        rows = range(len(batch["job"]))
        results, errors = [b""] * len(rows), [""] * len(rows)
        with ThreadPoolExecutor(self.workers, thread_name_prefix="posefix-read") as pool:
            images = [pool.submit(read_image, str(batch["image"][i])) for i in rows]

            def jobs():
                for i in rows:
                    try:
                        image = images[i].result()
                    except InputError as e:
                        errors[i] = json.dumps([e.field, e.problem, e.source])
                        continue
                    poses = np.frombuffer(batch["poses"][i], dtype=np.float64).reshape(-1, NUM_KEYPOINTS, 3)
                    yield i, image, poses

            for i, *outputs in refine_images(self.refiner, jobs(), workers=self.workers):
                results[i] = pickle.dumps(tuple(outputs), protocol=pickle.HIGHEST_PROTOCOL)
        return {"job": np.asarray(batch["job"], dtype=np.int64), "result": np.array(results, dtype=object),
                "error": np.array(errors, dtype=object)}


def refine_images_ray(checkpoint, jobs, *, actors: int | None = None, num_gpus: float = 0.0, device: str = "cpu",
                      batch_size: int = 64, flip_test: bool = False, precision: str = "fp32",
                      channels_last: bool = False, output: str = "choice", choice_margin: float | None = None,
                      workers: int = 2, images_per_block: int = 16,
                      address: str | None = None, skipped: list | None = None, progress=None,
                      show_progress: bool = True):
    """:func:`posefix.engine.refine_images` on a Ray cluster: yields what it yields per image, ``(key, xy,
    confidence, ...)``, in the order the images are done.

    jobs: iterable of (key, image path or URI, poses (P, K, 3) image pixels). ``actors`` actors (default: as
    many as the cluster's GPUs or CPUs allow), each with ``num_gpus`` GPUs (a fraction shares one; 0: a CPU
    actor with the cluster's CPUs split between the actors) and a Refiner built from ``checkpoint`` (a path
    every node reads) with ``device``, ``batch_size``, ``flip_test``, ``precision`` and ``channels_last``;
    ``workers`` reading threads per actor; ``images_per_block`` images per block of work. An actor whose
    process dies is restarted and its blocks run again (Ray Data's actor pools retry without limit).

    Uses the Ray the process is connected to; if none, starts a local one (``address`` None) or joins the
    cluster at ``address``, and shuts it down when done. An image that cannot be read or decoded raises an
    InputError naming it, or, with ``skipped`` a list, is appended to it as (key, message) and left out.
    ``progress(n)`` is called with the number of persons of each image done; ``show_progress``: Ray Data's
    progress bars.
    """
    from .devices import resolve_device
    from .engine import load_weights

    ray = _ray()
    if actors is not None and actors < 1:
        raise InputError("--actors", f"must be at least 1, got {actors}")
    if not (num_gpus >= 0 and math.isfinite(num_gpus)):
        raise InputError("--num-gpus", f"must be a non-negative number, got {num_gpus}")
    if (num_gpus > 0) != (str(device).startswith("cuda")):
        raise InputError("--num-gpus", f"{num_gpus} GPUs per actor do not go with --device {device}: "
                         "give --device cuda with --num-gpus above 0, --device cpu with 0")
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
                        progress, show_progress, {"device": device, "batch_size": batch_size, "flip_test": flip_test,
                                                  "precision": precision, "channels_last": channels_last,
                                                  "output": output, "choice_margin": choice_margin})
    finally:
        if started:
            ray.shutdown()


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
        raise PosefixError(f"--ray: cannot start or join Ray at {address or 'a new local cluster'}: "
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
            raise InputError("--num-gpus", f"{num_gpus} GPUs per actor, but the Ray cluster has {have:g}")
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


# posefix refine --ray: the command line's part.

def check_ray_args(args) -> None:
    """The Ray options of ``posefix refine``: only with ``--ray``, and in range."""
    if args.ray is None:
        for name in ("actors", "num_gpus", "shards"):
            if getattr(args, name) is not None:
                raise InputError(f"--{name.replace('_', '-')}", "only goes with --ray")
        return
    _ray()
    if args.shards is not None and args.shards < 1:
        raise InputError("--shards", f"must be at least 1, got {args.shards}")


def image_sources(args, groups: dict, coco_images, skipped: list) -> dict:
    """{image key: its file under ``--images``, or its URI there} for the keys of ``groups``. A name leading out
    of ``--images`` (without ``--allow-outside-images``) is an InputError naming it, or with ``--skip-invalid``
    appended to ``skipped`` as (key, message) and left out."""
    import posixpath

    from .formats import OUTSIDE_HINT, image_file

    allow = args.allow_outside_images
    sources = {}
    for key in groups:
        try:
            if not is_uri(args.images):
                sources[key] = image_file(args.images, key, coco_images, allow)
                continue
            name = image_file("", key, coco_images, allow_outside=True).as_posix()
            if not allow and (name.startswith("/") or posixpath.normpath(name).split("/")[0] == ".."):
                raise InputError("image", f"leads outside {args.images} ({OUTSIDE_HINT})", repr(name))
            sources[key] = args.images.rstrip("/") + "/" + name
        except InputError as e:
            if not args.skip_invalid:
                raise
            skipped.append((key, str(e)))
    return sources


def ray_options(args, skipped: list) -> dict:
    """The keyword arguments of :func:`refine_images_ray` for ``posefix refine --ray``."""
    from .devices import resolve_device

    # An actor sees only the GPUs Ray gives it: cuda:N is "cuda" there; auto is decided on this machine (the
    # driver need not have a GPU for --device cuda).
    device = resolve_device("auto").type if args.device == "auto" else args.device
    device = "cuda" if device.startswith("cuda") else device
    num_gpus = args.num_gpus if args.num_gpus is not None else float(device == "cuda")
    return {"actors": args.actors, "num_gpus": num_gpus, "device": device, "batch_size": args.batch_size,
            "flip_test": args.flip_test, "precision": args.precision, "channels_last": args.channels_last,
            "output": args.output, "choice_margin": args.choice_margin, "workers": args.workers,
            "address": args.ray or None, "skipped": skipped if args.skip_invalid else None,
            "show_progress": not args.quiet}


def write_refined(args, est, xy, conf, scores, ids, groups: dict, skipped: list, kept=None) -> tuple[int, str]:
    """``posefix refine``'s output, with or without ``--ray``: the refined persons as COCO results in ``--out``
    (or ``--shards`` files beside it, each image's persons in one), the persons of ``skipped`` images left out;
    every file is written in full before any replaces what was there. Returns (persons written, where)."""
    from dataclasses import replace

    from .formats import write_coco_results

    keep = np.ones(len(est.image_keys), dtype=bool)
    for key, _ in skipped:
        keep[groups[key]] = False
    rows = np.flatnonzero(keep)
    if not keep.all():
        est = replace(est, image_keys=[est.image_keys[i] for i in rows], keypoints=est.keypoints[rows],
                      scores=est.scores[rows], native=est.native[rows], records=[est.records[i] for i in rows],
                      sizes=None if est.sizes is None else est.sizes[rows])
    results = write_coco_results(est, xy[rows], conf[rows], scores[rows], ids[rows],
                                 None if kept is None else kept[rows])
    image_of = np.zeros(len(keep), dtype=np.int64)
    for g, group in enumerate(groups.values()):
        image_of[group] = g
    paths = shard_paths(args.out, args.shards)
    shard = image_of[rows] * len(paths) // max(len(groups), 1)
    write_json_files(paths, [[results[i] for i in np.flatnonzero(shard == s)] for s in range(len(paths))])
    return len(results), str(args.out) if args.shards is None else f"{paths[0]} ... {paths[-1].name}"


def shard_paths(out, shards: int | None) -> list[Path]:
    """``out`` itself, or ``shards`` files beside it: ``refined.json`` → ``refined-00000-of-00004.json``..."""
    out = Path(out)
    if shards is None:
        return [out]
    return [out.with_name(f"{out.stem}-{i:05d}-of-{shards:05d}{out.suffix}") for i in range(shards)]


def write_json_files(paths: list[Path], docs: list) -> None:
    """Write each doc as JSON to its path, atomically as :func:`posefix.fileio.write_json_atomic` does; all
    are written to temporary files before the first is renamed onto its path."""
    from contextlib import ExitStack

    from .fileio import atomic_path

    with ExitStack() as stack:
        for path, doc in zip(paths, docs):
            tmp = stack.enter_context(atomic_path(path))
            with open(tmp, "w") as f:
                json.dump(doc, f, separators=(",", ":"), allow_nan=False)
