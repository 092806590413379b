"""The weights file: a refiner's ``model.safetensors``, its model config and fitted choice in the header.

:func:`export_weights` writes one, :func:`load_weights` reads one back as a :class:`~posefix.model.PoseFixNet`
(with its :class:`~posefix.choice.FittedChoice`, where it carries one), :func:`write_fitted_choice` writes a
copy that carries a fitted choice. Every file is written atomically, with the mode the umask gives.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from .choice import METADATA_KEY, FittedChoice
from .config import model_config_from_json
from .errors import InputError
from .fileio import write_bytes_atomic
from .model import PoseFixNet

CONFIG_KEY = "posefix_model_config"


def export_weights(model: PoseFixNet, path: str | Path, metadata: dict) -> None:
    """Write the model's weights as safetensors with its ModelConfig (and ``metadata``) in the header."""
    meta = {CONFIG_KEY: json.dumps(dataclasses.asdict(model.cfg))}  # input_size: a list in JSON
    meta.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()})
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_safetensors(state, path, meta)


def save_safetensors(state: dict, path: str | Path, metadata: dict) -> None:
    """Write tensors as a safetensors file atomically, with the mode the umask gives. The bytes are made in
    memory and written by :func:`posefix.fileio.write_bytes_atomic`: safetensors' own file writer makes a
    temporary file of its own (mode 0600, named ``.tmpXXXXXX``) that a killed process would leave behind.
    The same tensors and metadata give the same bytes in every process (:func:`canonical_header`)."""
    write_bytes_atomic(path, canonical_header(save(state, metadata=metadata)))


def canonical_header(data: bytes) -> bytes:
    """A safetensors file's bytes with its header's metadata in sorted order. safetensors keeps the metadata
    in a hash map whose order changes from process to process, so the same weights would hash differently
    (and ``posefix serve`` would report another model version). The header stays compact JSON, padded with
    spaces to a multiple of 8 bytes as the format's writer pads it; the tensors' bytes are unchanged."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    if "__metadata__" in header:
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + data[8 + n:]


def read_safetensors(path: str | Path) -> tuple[dict, dict]:
    """The tensors and the header's metadata of a safetensors file; an InputError naming the file where it
    is missing or not one."""
    path = Path(path)
    if not path.is_file():
        raise InputError("checkpoint", "file not found", str(path))
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except (SafetensorError, OSError, ValueError) as e:
        raise InputError("checkpoint", f"not a safetensors file: {e}", str(path)) from None
    return state, meta


def load_weights(path: str | Path) -> PoseFixNet:
    """A :class:`PoseFixNet` from a ``model.safetensors`` written by :func:`export_weights`."""
    state, meta = read_safetensors(path)
    if CONFIG_KEY not in meta:
        raise InputError("checkpoint", "has no posefix model config in its metadata", str(path))
    model = PoseFixNet(model_config_from_json(meta[CONFIG_KEY], CONFIG_KEY, str(path)))
    # Weights written before the input-confidence head existed load with that head at its initial state: the
    # per-joint choice then keeps every input joint (output="raw" refines as such weights always did).
    for name, value in model.state_dict().items():
        if name.startswith("input_confidence.") and name not in state:
            state[name] = value
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise InputError("checkpoint", f"weights do not match the model: {str(e).splitlines()[0]}", str(path)) from None
    if METADATA_KEY in meta:
        model.fitted_choice = FittedChoice.from_json(meta[METADATA_KEY], str(path))
    return model


def has_fitted_choice(path: str | Path) -> bool:
    """Whether the weights file at ``path`` carries a choice fitted by ``posefix fit-choice`` (read from its header)."""
    with safe_open(str(path), framework="pt") as f:
        return METADATA_KEY in (f.metadata() or {})


def write_fitted_choice(checkpoint: str | Path, rule: FittedChoice, out: str | Path) -> None:
    """Write a copy of the weights file ``checkpoint`` to ``out`` whose per-joint choice is ``rule``."""
    with safe_open(str(checkpoint), framework="pt") as f:
        meta = dict(f.metadata() or {})
        state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    meta[METADATA_KEY] = rule.to_json()
    save_safetensors(state, out, meta)
