"""Training configuration: frozen dataclasses, presets, TOML files and ``--set key=value`` overrides.

Every function takes the narrow piece it needs (``ModelConfig``, ``DataConfig``, ``TrainConfig``);
nothing reads configuration at import time. Unknown keys are rejected with the key named.
"""
from __future__ import annotations

import dataclasses
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from .errors import InputError
from .model import ModelConfig


@dataclass(frozen=True)
class DataConfig:
    train_annotations: str = ""  # COCO person-keypoints JSON of the training set
    train_images: str = ""  # its image directory
    val_annotations: str = ""  # optional validation set: input AP vs refined AP on synthesized inputs
    val_images: str = ""
    profile: str = ""  # error profile JSON ("" = the published PoseFix tables; or one from `posefix synth fit`)
    # An estimator's own results on the training images (any --format), matched to their GT persons as COCO
    # evaluation matches them: a matched person's input is that estimator's pose with probability
    # train_results_prob, else synthesized.
    train_results: str = ""
    train_results_format: str = "coco"
    train_results_prob: float = 0.5
    # A dataset directory of `posefix synth --variants N` made from train_annotations: each sample's input is one
    # of its variants for that person (drawn by (seed, epoch, index)) instead of one synthesized on the fly.
    train_dataset: str = ""
    # Fraction of the training persons (drawn by train.seed) whose samples train only the two confidence heads:
    # the refinement's own losses leave them out, so the heads learn how often the refiner and the input are
    # right on persons the refiner did not learn from.
    calibration_split: float = 0.0
    scale_factor: float = 0.3  # crop scale ~ clip(N(1, 0.3), 0.7, 1.3), as the reference
    rotation_factor: float = 40.0  # rotation ~ clip(N(0, 40°), ±80°) ...
    rotation_prob: float = 0.6  # ... with this probability
    flip_prob: float = 0.5
    leg_shortening_prob: float = 0.0  # lower-body occlusion: shortened legs + cutout (posefix.synth.occlusion)
    occluder_prob: float = 0.0  # BlazePose-style random rectangles over joints
    workers: int = 2  # DataLoader worker processes per training process
    val_max_persons: int = 0  # validate on at most this many persons (0 = all)


CONFIDENCE_TARGETS = ("hit", "ks")


@dataclass(frozen=True)
class TrainConfig:
    max_steps: int = 1000
    batch_size: int = 32  # per process
    lr: float = 5e-4  # Adam, as the reference
    lr_milestones: tuple[float, ...] = (90 / 140, 120 / 140)  # ÷10 at these fractions of max_steps
    seed: int = 0
    pretrained: str = "imagenet"  # "imagenet" (from torch's cache, never downloaded), a file, or "none"
    device: str = "auto"  # "auto", "cpu", "cuda" (each process's LOCAL_RANK GPU), "cuda:N"
    precision: str = "auto"  # "auto" (bf16 autocast on CUDA), "bf16", "fp32"
    channels_last: str = "auto"  # "auto" (on CUDA), "on", "off"
    log_every: int = 20
    val_every: int = 0  # steps between validations (0 = only at the end)
    checkpoint_every: int = 200
    confidence_weight: float = 0.1  # weight of the confidence head's BCE
    input_confidence_weight: float = 0.1  # weight of the input-confidence head's BCE (the per-joint choice)
    # What both confidence heads learn: "hit", the probability of KS >= 0.5 to the truth; "ks", the expected KS.
    confidence_target: str = "hit"

    def __post_init__(self):
        if self.confidence_target not in CONFIDENCE_TARGETS:
            raise InputError("train.confidence_target",
                             f"must be one of {list(CONFIDENCE_TARGETS)}, got {self.confidence_target!r}")


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


PRESETS: dict[str, dict] = {
    "cpu-small": {
        "_about": "ResNet-18 at 128×96 from scratch: trains on a CPU in minutes (the demo and tests)",
        "model": {"backbone": "resnet18", "input_size": [128, 96], "sigma": 3.5, "head_channels": 128},
        "train": {"max_steps": 600, "batch_size": 32, "lr": 1e-3, "pretrained": "none", "log_every": 10,
                  "checkpoint_every": 100},
        "data": {"workers": 1},
    },
    "realtime-cpu": {
        "_about": "MobileNetV3-Large at 256×192, σ 7, light head: batch-1 latency on one CPU core near a "
                  "MobileNetV3-Large classifier's at 224×224 (docs/deployment.md)",
        "model": {"backbone": "mobilenet_v3_large", "input_size": [256, 192], "sigma": 7.0, "head_channels": 64},
        "train": {"max_steps": 140 * 4700, "batch_size": 32, "lr": 1e-3},
    },
    "realtime-cpu-small": {
        "_about": "MobileNetV3-Small at 256×192, σ 7, light head: about half realtime-cpu's latency",
        "model": {"backbone": "mobilenet_v3_small", "input_size": [256, 192], "sigma": 7.0, "head_channels": 64},
        "train": {"max_steps": 140 * 4700, "batch_size": 32, "lr": 1e-3},
    },
    "server-gpu": {
        "_about": "ResNet-50 at 256×192, σ 7, batch 64: for a GPU server (bf16, channels-last by default on CUDA)",
        "model": {"backbone": "resnet50", "input_size": [256, 192], "sigma": 7.0},
        "train": {"max_steps": 140 * 2350, "batch_size": 64},
    },
    "r50-256x192": {
        "_about": "ResNet-50 at 256×192, σ 7 (a published configuration)",
        "model": {"backbone": "resnet50", "input_size": [256, 192], "sigma": 7.0},
        "train": {"max_steps": 140 * 4700, "batch_size": 32},
    },
    "r50-384x288": {
        "_about": "ResNet-50 at 384×288, σ 9",
        "model": {"backbone": "resnet50", "input_size": [384, 288], "sigma": 9.0},
        "train": {"max_steps": 140 * 9400, "batch_size": 16},
    },
    "r101-384x288": {
        "_about": "ResNet-101 at 384×288, σ 9",
        "model": {"backbone": "resnet101", "input_size": [384, 288], "sigma": 9.0},
        "train": {"max_steps": 140 * 9400, "batch_size": 16},
    },
    "r152-384x288": {
        "_about": "ResNet-152 at 384×288, σ 9: the released PoseFix models (140 epochs, batch 16 × 2 GPUs)",
        "model": {"backbone": "resnet152", "input_size": [384, 288], "sigma": 9.0},
        "train": {"max_steps": 140 * 4700, "batch_size": 16},
    },
}


def _build(cls, values: dict, prefix: str):
    """A dataclass from a dict, rejecting unknown keys and converting lists to tuples."""
    if not isinstance(values, dict):
        raise InputError(prefix, "must be a table of keys")
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise InputError(f"{prefix}.{unknown[0]}", f"unknown key; {prefix} has {sorted(known)}")
    kwargs = {}
    for name, value in values.items():
        default = getattr(cls(), name) if name != "input_size" else (0, 0)
        kwargs[name] = _coerce(value, default, f"{prefix}.{name}")
    return cls(**kwargs)


def _coerce(value, default, key):
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise InputError(key, f"must be true or false, got {value!r}")
        return value
    if isinstance(default, int):
        if not isinstance(value, int) or isinstance(value, bool):
            raise InputError(key, f"must be an integer, got {value!r}")
        return value
    if isinstance(default, float):
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise InputError(key, f"must be a number, got {value!r}")
        return float(value)
    if isinstance(default, tuple):
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, (int, float)) for v in value):
            raise InputError(key, f"must be a list of numbers, got {value!r}")
        return tuple(value)
    if not isinstance(value, str):
        raise InputError(key, f"must be a string, got {value!r}")
    return value


def model_config_from_json(text, field: str, source: str) -> ModelConfig:
    """The ModelConfig a model file's metadata holds as JSON text (``field``, e.g. ``posefix_model_config``),
    checked as a config's [model] table is; an InputError naming ``field``, the key and ``source``."""
    try:
        raw = json.loads(text)
    except (TypeError, ValueError, RecursionError) as e:
        raise InputError(field, f"is not valid JSON ({str(e)[:100]})", source) from None
    if not isinstance(raw, dict):
        raise InputError(field, f"must be a JSON object of the model's settings, got {type(raw).__name__}", source)
    try:
        return _build(ModelConfig, raw, field)
    except InputError as e:
        raise InputError(field + e.field.removeprefix("model").removeprefix(field), e.problem, source) from None


def from_dict(doc: dict) -> Config:
    doc = {k: v for k, v in doc.items() if k != "_about"}
    unknown = sorted(set(doc) - {"model", "data", "train"})
    if unknown:
        raise InputError(unknown[0], "unknown section; a config has [model], [data] and [train]")
    try:
        return Config(model=_build(ModelConfig, doc.get("model", {}), "model"),
                      data=_build(DataConfig, doc.get("data", {}), "data"),
                      train=_build(TrainConfig, doc.get("train", {}), "train"))
    except TypeError as e:  # a value a dataclass refused
        raise InputError("config", str(e)) from None


def to_dict(cfg: Config) -> dict:
    return {name: {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(part).items()}
            for name, part in (("model", cfg.model), ("data", cfg.data), ("train", cfg.train))}


def _merge(base: dict, over: dict) -> dict:
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_override(text: str) -> tuple[list[str], object]:
    """``section.key=value`` with a TOML value (bare words are strings): (['section', 'key'], value)."""
    if "=" not in text:
        raise InputError("set", f"expected key=value, got {text!r}")
    key, raw = text.split("=", 1)
    path = key.strip().split(".")
    if len(path) != 2 or not all(path):
        raise InputError("set", f"key must be section.name (e.g. train.max_steps), got {key!r}")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return path, value


def load_config(config: str | None = None, preset: str | None = None, overrides: list[str] = ()) -> Config:
    """The resolved config: a preset or a TOML/JSON file, then ``--set`` overrides."""
    if preset is not None:
        if preset not in PRESETS:
            raise InputError("preset", f"unknown preset {preset!r}; presets: {', '.join(PRESETS)}")
        doc = PRESETS[preset]
    elif config is not None:
        path = Path(config)
        try:
            text = path.read_text()
        except OSError as e:
            raise InputError("config", f"cannot read {config}: {e.strerror or e}") from None
        try:
            doc = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
        except (tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
            raise InputError("config",
                             f"{config} is not valid {'JSON' if path.suffix == '.json' else 'TOML'}: {e}") from None
    else:
        doc = {}
    for text in overrides:
        (section, key), value = parse_override(text)
        doc = _merge(doc, {section: {key: value}})
    return from_dict(doc)


def dump_toml(cfg: Config) -> str:
    """The config as TOML that ``load_config(config=...)`` reads back."""
    lines = []
    for section, values in to_dict(cfg).items():
        lines.append(f"[{section}]")
        for k, v in values.items():
            lines.append(f"{k} = {json.dumps(v)}")
        lines.append("")
    return "\n".join(lines)
