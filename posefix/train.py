"""Training: one loop for one CPU, one GPU or many (``torchrun``, DistributedDataParallel).

The run directory holds ``config.toml`` (the resolved config), ``metrics.jsonl`` (one JSON object per
log line and per validation), ``last.pt`` (plain state dicts for ``--resume``, written atomically),
``model.safetensors`` (the weights to deploy, with the model config in its metadata) and
``calibration.json`` (how well the keypoint confidences are calibrated on the validation set).
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from . import __version__
from .config import Config, dump_toml, to_dict
from .data import PersonCrops, StepBatches, check_generated
from .devices import resolve_device
from .errors import InputError
from .evaluate import calibration, refine_synthesized
from .fileio import atomic_path, write_json_atomic
from .formats import FORMATS
from .losses import refiner_loss
from .model import PoseFixNet, load_pretrained
from .refiner import Refiner
from .synth.cocoio import load_ground_truth
from .synth.profile import load_profile
from .weights import export_weights

DISTRIBUTED_TIMEOUT = timedelta(hours=2)


def _setup_distributed(device_kind: str):
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, 0
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    # Rank 0 validates and exports alone while the others wait in their next collective: a full COCO val
    # pass can outlast the default 10-minute collective timeout.
    dist.init_process_group("nccl" if device_kind == "cuda" else "gloo", timeout=DISTRIBUTED_TIMEOUT)
    return rank, world, local


def _device(want: str) -> torch.device:
    """``train.device`` resolved (:func:`posefix.devices.resolve_device`): cpu or cuda; "cuda" without an
    index becomes each process's LOCAL_RANK GPU once the processes are set up, "cuda:N" is for one process."""
    if not (isinstance(want, str) and (want in ("auto", "cpu") or want.split(":")[0] == "cuda")):
        raise InputError("train.device", f"must be auto, cpu, cuda or cuda:N, got {want!r}")
    device = resolve_device(want, "train.device")
    if device.index is not None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise InputError("train.device", f"{device} would put every process on one GPU; give cuda (each "
                         "process takes its LOCAL_RANK's)")
    return device


def _lr_factor(milestones, max_steps):
    steps = [int(m * max_steps) for m in milestones]
    return lambda step: 0.1 ** sum(step >= s for s in steps)


def _check_data(cfg: Config):
    d = cfg.data
    for key in ("train_annotations", "train_images"):
        if not getattr(d, key):
            raise InputError(f"data.{key}", "is required (set it in the config or with --set)")
    for key in ("train_annotations", "val_annotations"):
        path = getattr(d, key)
        if path and not Path(path).is_file():
            raise InputError(f"data.{key}", f"{path} is not a file")
    for key in ("train_images", "val_images"):
        path = getattr(d, key)
        if path and not Path(path).is_dir():
            raise InputError(f"data.{key}", f"{path} is not a directory")
    if d.train_results and not Path(d.train_results).exists():
        raise InputError("data.train_results", f"{d.train_results} does not exist")
    if d.train_dataset:
        check_generated(d.train_dataset, d.train_annotations)
    if d.train_results_format not in FORMATS:
        raise InputError("data.train_results_format",
                         f"must be one of {sorted(FORMATS)}, got {d.train_results_format!r}")
    if not 0 <= d.train_results_prob <= 1:
        raise InputError("data.train_results_prob", f"must be in [0, 1], got {d.train_results_prob}")
    if not 0 <= d.calibration_split < 1:
        raise InputError("data.calibration_split", f"must be in [0, 1), got {d.calibration_split}")
    if bool(d.val_annotations) != bool(d.val_images):
        raise InputError("data.val_images", "give both data.val_annotations and data.val_images, or neither")


def save_checkpoint(path: Path, model, optimizer, scheduler, step: int, cfg: Config):
    """``last.pt``: plain state dicts and numbers only, so ``torch.load(weights_only=True)`` reads it."""
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "step": step, "config": json.dumps(to_dict(cfg)), "torch_rng": torch.get_rng_state()}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: Path, model, optimizer, scheduler) -> int:
    """Restore a run from ``last.pt`` (see :func:`save_checkpoint`); returns its step. A file that is no such
    checkpoint, or one of another model, is an InputError naming it and the part that does not fit."""
    def bad(part: str, problem: str) -> InputError:
        return InputError(f"resume: {part}", problem, str(path))

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 (torch.load raises many types; its message may quote the file's bytes)
        raise bad("last.pt", f"not a checkpoint of posefix train ({type(e).__name__})") from None
    if not isinstance(state, dict):
        raise bad("last.pt", f"not a checkpoint of posefix train (it holds a {type(state).__name__})")
    fresh = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
    for key in ("model", "optimizer", "scheduler", "step", "torch_rng"):
        if key not in state:
            raise bad(key, "missing: not a checkpoint of posefix train")
    for key in fresh:
        if not isinstance(state[key], dict):
            raise bad(key, f"must be a state dict, got {type(state[key]).__name__}")
    step, rng = state["step"], state["torch_rng"]
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise bad("step", f"must be a non-negative integer, got {step!r}"[:200])
    if not (isinstance(rng, torch.Tensor) and rng.dtype == torch.uint8 and rng.shape == torch.get_rng_state().shape):
        raise bad("torch_rng", "must be the state of torch's random generator")
    sched = state["scheduler"]
    for key, value in fresh["scheduler"].items():
        if key not in sched or type(sched[key]) is not type(value) or (
                isinstance(value, list) and len(sched[key]) != len(value)):
            raise bad(f"scheduler.{key}", "missing or not as this run's scheduler has it")
    def number(x) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

    groups = state["optimizer"].get("param_groups")
    if not (isinstance(groups, list) and len(groups) == len(fresh["optimizer"]["param_groups"]) and all(
            isinstance(g, dict) and isinstance(g.get("params"), list) and len(g["params"]) == len(f["params"])
            and all(number(g.get(k)) for k in ("lr", "eps", "weight_decay"))
            and isinstance(g.get("betas"), (tuple, list)) and len(g["betas"]) == 2 and all(map(number, g["betas"]))
            for g, f in zip(groups, fresh["optimizer"]["param_groups"]))):
        raise bad("optimizer.param_groups", "not as this run's optimizer has them")
    for key, target in (("model", model), ("optimizer", optimizer)):
        try:
            target.load_state_dict(state[key])
        except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as e:
            raise bad(key, f"does not fit this run's {key} ({str(e).strip().splitlines()[0][:200]})") from None
    for param, moments in optimizer.state.items():
        if not all(isinstance(v, torch.Tensor) and v.shape in ((), param.shape) for v in moments.values()):
            raise bad("optimizer.state", "holds values that do not fit this run's parameters")
    scheduler.load_state_dict({k: sched[k] for k in fresh["scheduler"]})
    torch.set_rng_state(rng)
    return step


def train(cfg: Config, out_dir: str | Path, resume: bool = False, progress: bool = True) -> dict:
    """Train a refiner; returns the final validation summary (empty without a validation set)."""
    _check_data(cfg)
    out = Path(out_dir)
    t = cfg.train
    device = _device(t.device)
    rank, world, local = _setup_distributed(device.type)
    if device.type == "cuda":
        device = device if device.index is not None else torch.device("cuda", local)
        torch.cuda.set_device(device)
    torch.manual_seed(t.seed + rank)
    bf16 = t.precision == "bf16" or (t.precision == "auto" and device.type == "cuda")
    channels_last = t.channels_last == "on" or (t.channels_last == "auto" and device.type == "cuda")

    profile = load_profile(cfg.data.profile or None)
    dataset = PersonCrops(cfg.data.train_annotations, cfg.data.train_images, cfg.model, cfg.data, profile, t.seed)
    if len(dataset) == 0:
        raise InputError("data.train_annotations", "has no labelled, non-crowd person")
    model = PoseFixNet(cfg.model)
    loaded = load_pretrained(model, t.pretrained)
    model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=t.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_factor(t.lr_milestones, t.max_steps))
    step = 0
    last = out / "last.pt"
    if resume:
        if not last.is_file():
            raise InputError("resume", f"{last} does not exist")
        step = load_checkpoint(last, model, optimizer, scheduler)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.toml").write_text(dump_toml(cfg))
    ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[local] if device.type == "cuda" else None) \
        if world > 1 else model

    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=StepBatches(len(dataset), t.batch_size, t.seed, step, t.max_steps, rank, world),
        num_workers=cfg.data.workers, pin_memory=device.type == "cuda", persistent_workers=False,
        prefetch_factor=4 if cfg.data.workers else None)
    metrics = open(out / "metrics.jsonl", "a") if rank == 0 else None  # noqa: SIM115 (closed in finally)
    bar = _progress(step, t.max_steps, enabled=progress and rank == 0)
    try:
        summary = _loop(cfg, model, ddp, optimizer, scheduler, loader, device, bf16, channels_last, profile,
                        step, rank, world, loaded, len(dataset), out, metrics, bar)
    finally:
        bar.close()
        if metrics is not None:
            metrics.close()
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return summary


def _loop(cfg, model, ddp, optimizer, scheduler, loader, device, bf16, channels_last, profile, step, rank, world,
          loaded, persons, out, metrics, bar) -> dict:
    t = cfg.train
    last = out / "last.pt"
    if rank == 0:
        _log(metrics, {"event": "start", "step": step, "world_size": world, "device": str(device),
                       "pretrained": loaded, "persons": persons, "posefix": __version__})
    model.train()
    tick, seen = time.perf_counter(), 0
    summary = {}
    held_out = cfg.data.calibration_split > 0  # else every person trains every part of the loss
    for batch in loader:
        image = batch["image"].to(device, non_blocking=True)
        if channels_last:
            image = image.contiguous(memory_format=torch.channels_last)
        inp = batch["input"].to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            result = ddp(image, keypoints=inp)
        loss, parts = refiner_loss(result, batch["target"].to(device, non_blocking=True),
                                   batch["target_valid"].to(device, non_blocking=True),
                                   batch["area"].to(device, non_blocking=True), t.confidence_weight,
                                   inp, t.input_confidence_weight, cfg.model.offset_radius,
                                   t.confidence_target,
                                   batch["calibration"].to(device, non_blocking=True) if held_out else None)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        step += 1
        seen += image.shape[0] * world
        if rank == 0:
            bar.update(1)
            if step % t.log_every == 0 or step == t.max_steps:
                now = time.perf_counter()
                rate = seen / max(now - tick, 1e-9)
                _log(metrics, {"event": "train", "step": step, "loss": loss.item(),
                               **{k: v.item() for k, v in parts.items()},
                               "lr": scheduler.get_last_lr()[0], "samples_per_s": rate})
                bar.set_postfix(loss=f"{loss.item():.3f}", samples_s=f"{rate:.1f}")
                tick, seen = now, 0
        if step % t.checkpoint_every == 0 and step < t.max_steps and rank == 0:
            save_checkpoint(last, model, optimizer, scheduler, step, cfg)
        if t.val_every and step % t.val_every == 0 and step < t.max_steps and rank == 0 and cfg.data.val_annotations:
            _log(metrics, {"event": "val", "step": step, **_validate(model, cfg, device, profile)[0]})
            model.train()
    if rank == 0:
        save_checkpoint(last, model, optimizer, scheduler, step, cfg)
        if cfg.data.val_annotations:
            summary, calib = _validate(model, cfg, device, profile)
            _log(metrics, {"event": "val", "step": step, **summary})
            write_json_atomic(out / "calibration.json", calib)
        export_weights(model, out / "model.safetensors",
                       {"posefix_version": __version__, "config": to_dict(cfg), "step": step})
        _log(metrics, {"event": "end", "step": step})
    return summary


def _validate(model, cfg: Config, device, profile):
    refiner = Refiner(model, device=device, batch_size=max(cfg.train.batch_size, 16),
                      choice_margin=0.0)  # the heads' choice
    gt = load_ground_truth(cfg.data.val_annotations)
    rows = refine_synthesized(refiner, gt, cfg.data.val_images, seed=cfg.train.seed, profile=profile,
                              max_persons=cfg.data.val_max_persons or None)
    calib = calibration(rows["confidence"], rows["hit"])
    summary = {"input_ap": rows["input_ap"], "refined_ap": rows["refined_ap"], "persons": rows["persons"],
               "confidence_ece": calib["ece"]}
    return summary, calib


def _log(stream, record: dict):
    stream.write(json.dumps({k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                             for k, v in record.items()}) + "\n")
    stream.flush()


def _progress(start: int, total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=start, disable=not enabled, unit="step", file=sys.stderr,
                dynamic_ncols=True, mininterval=1.0)


__all__ = ["load_checkpoint", "save_checkpoint", "train"]
