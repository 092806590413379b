"""The refiner as one ONNX graph, run by ONNX Runtime behind the same :class:`~posefix.refiner.Refiner`.

Glossary: N persons, K = 17 joints, (H, W) the model's input size.

The graph's inputs are ``image`` (N, 3, H, W) float32 RGB crops in [0, 1] and ``keypoints`` (N, K, 3) float32
= (x, y, v) in crop pixels, a joint present where v > 0 and x, y are finite: exactly what
:meth:`PoseFixNet.forward` takes. The fused stem's Gaussian factors, the convolutions (BatchNorm folded),
soft-argmax and the confidence head are all inside, so nothing renders heatmaps outside the graph. Its
outputs are every tensor of the forward's dict, named by the dict's keys (``coords`` (N, K, 2) in crop
pixels, ``confidence_logit`` (N, K), ``logits`` and ``prob`` (N, K, H/4, W/4), and any other the model
returns), plus ``confidence`` = sigmoid(confidence_logit). :class:`OnnxModel` is called like the
PoseFixNet and returns the same dict, so the refiner's batching, flip test and decoding are the same code
whichever backend runs the model.

The file's metadata (``posefix_*`` keys) holds the model config (input size, σ, backbone), the keypoint
layout, the output names, the precision and the posefix version; a model without them is refused.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import torch

from . import __version__
from .choice import METADATA_KEY as CHOICE_KEY
from .choice import FittedChoice
from .config import model_config_from_json
from .errors import InputError
from .errors import require as require_extra
from .fileio import TMP_SUFFIX, _remove_stale, _umask, atomic_path
from .formats import image_file, load_estimates
from .images import decode
from .keypoints import NAMES
from .model import ModelConfig, PoseFixNet, fold_batchnorm, merge_output_convs, subpixel_head
from .protocols import RefinerLike
from .weights import load_weights

INPUTS = ("image", "keypoints")
PROVIDERS = {  # --provider → ONNX Runtime execution providers, in order of preference
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}
DEFAULT_OPSET = 18


def require(module: str, what: str):
    """Import ``module`` (onnx, onnxruntime, onnxscript) or raise a one-line MissingExtra naming the extra."""
    return require_extra(module, "onnx", what)


class _Graph(torch.nn.Module):
    """The exported function: (image, keypoints) → the forward dict's tensors in its order, then confidence."""

    def __init__(self, model: PoseFixNet):
        super().__init__()
        self.model = model

    def forward(self, image, keypoints):
        out = self.model(image, keypoints=keypoints)
        return (*(v for v in out.values() if isinstance(v, torch.Tensor)), torch.sigmoid(out["confidence_logit"]))


def metadata(cfg: ModelConfig, outputs: list[str], precision: str, **extra) -> dict[str, str]:

    meta = {"posefix_model_config": json.dumps(dataclasses.asdict(cfg)), "posefix_version": __version__,
            "posefix_outputs": json.dumps(outputs), "posefix_precision": precision,
            "posefix_keypoints": json.dumps({"format": "coco_17", "names": list(NAMES)}),
            "posefix_inputs": json.dumps({
                "image": "(N, 3, H, W) float32 RGB crop in [0, 1]",
                "keypoints": "(N, K, 3) float32 (x, y, v) in crop pixels; a joint is present where v > 0"})}
    meta.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in extra.items()})
    return meta


FOLD_SIZE_LIMIT = 1 << 22  # elements: above the stem's weight, O·(3 + K)·kh·kw (the one folded at export)


def export_onnx(model: PoseFixNet, opset: int = DEFAULT_OPSET, batch: int | None = None, for_int8: bool = False,
                **extra_meta):
    """The refiner (BatchNorm folded) as an ONNX ModelProto, checked with ``onnx.checker``.

    batch: None for a dynamic batch axis, else the fixed batch size. Exported with ``torch.onnx.export``'s
    torch.export-based exporter (``dynamo=True``, which needs onnxscript). ``extra_meta`` joins the metadata.
    for_int8: the head's transposed convolutions as 3×3 convolutions and a pixel shuffle
    (:func:`~posefix.model.subpixel_head`, the same function), so that :func:`quantize_int8` quantises them too.
    """
    import warnings

    onnx = require("onnx", "--onnx")
    require("onnxscript", "--onnx")
    from onnxscript import optimizer

    folded = merge_output_convs(fold_batchnorm(model))
    if for_int8:
        folded = subpixel_head(folded)
    cfg = model.cfg
    h, w = cfg.input_size
    n = batch or 2
    gen = torch.Generator().manual_seed(0)
    image = torch.rand(n, 3, h, w, generator=gen)
    keypoints = torch.cat([torch.rand(n, cfg.num_keypoints, 2, generator=gen) * torch.tensor([w, h]),
                           torch.ones(n, cfg.num_keypoints, 1)], -1)
    with torch.no_grad():
        sample = folded(image, keypoints=keypoints)
    names = [k for k, v in sample.items() if isinstance(v, torch.Tensor)]
    outputs = [*names, "confidence"]
    dynamic = None
    if batch is None:
        dim = torch.export.Dim("batch", min=1)
        dynamic = {"image": {0: dim}, "keypoints": {0: dim}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's notes on axis names and deprecations of its own
        program = torch.onnx.export(_Graph(folded).eval(), (image, keypoints), None, dynamo=True,
                                    input_names=list(INPUTS), output_names=outputs, dynamic_shapes=dynamic,
                                    opset_version=opset, optimize=True, verbose=False)
    proto = program.model_proto
    # Fold what depends on the weights alone — the stem's slices of its weight among them, which the exporter's
    # own pass leaves above its size limit — so that the image's stem convolution has constant weights (and is
    # quantised with the trunk) and nothing is recomputed per call.
    proto = optimizer.optimize(proto, input_size_limit=FOLD_SIZE_LIMIT, output_size_limit=FOLD_SIZE_LIMIT)
    fitted = getattr(model, "fitted_choice", None)
    if fitted is not None:  # a choice fitted to one estimator travels with the weights (posefix fit-choice)
        extra_meta[CHOICE_KEY] = fitted.to_json()
    shapes = {k: list(sample[k].shape[1:]) for k in names}
    shapes["confidence"] = list(sample["confidence_logit"].shape[1:])
    _set_metadata(proto, metadata(cfg, names, "fp32", output_shapes=shapes, batch=batch or "dynamic",
                                  opset=opset, **extra_meta))
    onnx.checker.check_model(proto)
    return proto


def _set_metadata(proto, meta: dict[str, str]) -> None:
    del proto.metadata_props[:]
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value


def save_model(proto, path: str | Path) -> None:
    """Write a ModelProto atomically (a reader sees the old file or the whole new one)."""

    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(proto.SerializeToString())


def read_metadata(proto) -> dict[str, str]:
    return {p.key: p.value for p in proto.metadata_props}


# Static int8 quantisation.

TRUNK_OPS = ("Conv", "ConvTranspose", "Add", "Relu", "MaxPool", "MatMul", "Resize")  # and hard_activations_for_int8's

def calibration_crops(refiner: RefinerLike, images_dir: str | Path, poses_path: str | Path, max_persons: int = 128,
                      fmt: str = "coco", allow_outside: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Real crops for calibration: the persons of an estimator's results ``poses_path`` (any format
    ``posefix refine`` reads) on the images of ``images_dir``, cut as the refiner cuts them. Returns image
    (P, 3, H, W) and keypoints (P, K, 3) float32, P <= max_persons, in the file's order."""
    est = load_estimates(poses_path, fmt, images_dir, allow_outside=allow_outside)
    keep = np.flatnonzero((est.keypoints[..., 2] > 0).sum(-1) > 0)[:max_persons]
    if len(keep) == 0:
        raise InputError("calibration_poses", f"{poses_path} has no person with a present keypoint")
    keys = [est.image_keys[i] for i in keep]
    order = list(dict.fromkeys(keys))
    images = []
    for key in order:
        path = image_file(images_dir, key, allow_outside=allow_outside)
        if not path.is_file():
            raise InputError("calibration_images", f"no image {path.name} in {images_dir} for image {key!r}")
        images.append(decode(path))
    index = np.array([order.index(k) for k in keys])
    poses = torch.as_tensor(est.keypoints[keep], dtype=torch.float64)
    crops, kp_crop, _, _ = refiner.crop(images, index, poses, poses)
    return crops.float().numpy(), kp_crop.float().numpy()


def quantize_int8(fp32, image: np.ndarray, keypoints: np.ndarray, batch: int = 8):
    """A statically quantised int8 copy of an fp32 posefix ModelProto (ONNX Runtime's quantisation tools,
    QDQ format, per-channel int8 weights, uint8 activations calibrated by min-max on the given crops: the
    U8S8 form that ONNX Runtime's x86 kernels and QDQ fusions are built for).

    Only the trunk is quantised — the stem's convolution of the image and its contraction of the input pose's
    Gaussian factors (two matrix products), the backbone's and the head's convolutions and transposed
    convolutions, the residual additions, activations, squeeze-excitation, pooling and upsampling between them
    (hard-swish and hard-sigmoid respelled by :func:`hard_activations_for_int8`, their 1/6 then moved into
    scales by :func:`scalings_into_scales`); the 1×1 output convolution, soft-argmax and the confidence readout
    stay float, so the coordinates are decoded at full precision. Each pixel shuffle of the head is then moved
    onto the uint8 tensor (:func:`shuffles_on_int8`).
    """
    import logging
    import tempfile

    onnx = require("onnx", "--int8")
    quant = require("onnxruntime.quantization", "--int8")
    k = json.loads(read_metadata(fp32)["posefix_model_config"])["num_keypoints"]
    weights = {t.name: tuple(t.dims) for t in fp32.graph.initializer}
    weights.update({node.output[0]: tuple(a.t.dims) for node in fp32.graph.node if node.op_type == "Constant"
                    for a in node.attribute if a.name == "value"})  # constants, whichever way they are stored
    producer = {out: node for node in fp32.graph.node for out in node.output}
    # The output convolution (export_onnx merges them into one, named for OutputConvs), or each of them.
    heads = [n for n in fp32.graph.node if n.op_type == "Conv" and len(n.input) > 1
             and (n.input[1].endswith("merged_outputs.conv.weight") or weights.get(n.input[1], (0,))[0] == k)]
    trunk, todo = set(), [n.input[0] for n in heads]  # every node the output convolutions' features come from
    while todo:
        node = producer.get(todo.pop())
        if node is not None and node.name not in trunk:
            trunk.add(node.name)
            todo.extend(node.input)
    # The trunk's convolutions with constant weights (the stem's of the image among them; not a convolution
    # whose weights are computed), the stem's matrix products of the pose's factors, its residual additions,
    # ReLUs, pooling and upsampling: whole blocks stay int8 between convolutions.
    convs = [n.name for n in fp32.graph.node if n.name in trunk and n.op_type in TRUNK_OPS
             and not (n.op_type in ("Conv", "ConvTranspose") and n.input[1] not in weights)]
    fp32, hard, scalings = hard_activations_for_int8(fp32, trunk)
    convs += hard
    exclude = [n.name for n in fp32.graph.node if n.name not in set(convs)]

    class Reader(quant.CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"image": image[i:i + batch], "keypoints": keypoints[i:i + batch]}
                                 for i in range(0, len(image), batch)])

        def get_next(self):
            return next(self.batches, None)

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantiser logs its advice on the root logger
    try:
        with tempfile.TemporaryDirectory(prefix="posefix-int8-") as tmp:
            src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
            src.write_bytes(fp32.SerializeToString())
            quant.quantize_static(str(src), str(dst), Reader(), quant_format=quant.QuantFormat.QDQ,
                                  activation_type=quant.QuantType.QUInt8, weight_type=quant.QuantType.QInt8,
                                  per_channel=True, nodes_to_quantize=convs, nodes_to_exclude=exclude,
                                  calibrate_method=quant.CalibrationMethod.MinMax)
            proto = onnx.load(str(dst))
    finally:
        root.setLevel(level)
    scalings_into_scales(proto, scalings)
    shuffles_on_int8(proto)
    meta = read_metadata(fp32)
    meta.update(posefix_precision="int8", posefix_calibration_persons=str(len(image)))
    _set_metadata(proto, meta)
    onnx.checker.check_model(proto)
    return proto


_SIXTH = float(np.float32(1 / 6))  # torch's hard-sigmoid slope, as a float attribute holds it


def hard_activations_for_int8(fp32, trunk: set[str]):
    """A copy of ``fp32`` in which each hard-swish and hard-sigmoid of the trunk is spelled in operations that
    ONNX Runtime runs on uint8: hardswish(x) = x · clip(x + 3, 0, 6) · 1/6 and hardsigmoid(x) = clip(x + 3, 0,
    6) · 1/6 (an ``Add``, a ``Clip`` that the quantiser folds into the addition's range, a ``Mul``, and a
    scaling by 1/6 that :func:`scalings_into_scales` moves into the next dequantisation), and each spatial mean
    of a 4-D tensor (squeeze-and-excitation's pooling) as a ``GlobalAveragePool``. The same function. Returns
    the copy, the names of the nodes to quantise and the names of the scalings."""
    import onnx
    from onnx import helper, numpy_helper

    proto = onnx.ModelProto()
    proto.CopyFrom(fp32)
    nodes, names, scalings = [], [], []
    consts = {"posefix_hard_3": 3.0, "posefix_hard_0": 0.0, "posefix_hard_6": 6.0, "posefix_hard_sixth": 1 / 6}
    init = {t.name: t for t in proto.graph.initializer}
    rank = {v.name: len(v.type.tensor_type.shape.dim) for v in proto.graph.value_info
            if v.type.tensor_type.HasField("shape")}
    for n in proto.graph.node:
        hsig = n.op_type == "HardSigmoid" and {a.name: a.f for a in n.attribute} == {"alpha": _SIXTH, "beta": 0.5}
        if n.name in trunk and n.op_type == "ReduceMean" and len(n.input) == 2 and n.input[1] in init and \
                rank.get(n.input[0]) == 4 and sorted(numpy_helper.to_array(init[n.input[1]]) % 4) == [2, 3] and \
                {a.name: a.i for a in n.attribute}.get("keepdims", 1) == 1:
            pool = helper.make_node("GlobalAveragePool", [n.input[0]], [n.output[0]], name=f"{n.name}/pool")
            nodes.append(pool)
            names.append(pool.name)
            continue
        if n.name not in trunk or not (n.op_type == "HardSwish" or hsig):
            nodes.append(n)
            continue
        x, y, tag = n.input[0], n.output[0], n.name
        new = [helper.make_node("Add", [x, "posefix_hard_3"], [f"{tag}/plus3"], name=f"{tag}/add"),
               helper.make_node("Clip", [f"{tag}/plus3", "posefix_hard_0", "posefix_hard_6"], [f"{tag}/relu6"],
                                name=f"{tag}/clip")]
        if hsig:
            new.append(helper.make_node("Mul", [f"{tag}/relu6", "posefix_hard_sixth"], [y], name=f"{tag}/sixth"))
        else:
            new += [helper.make_node("Mul", [x, f"{tag}/relu6"], [f"{tag}/times"], name=f"{tag}/mul"),
                    helper.make_node("Mul", [f"{tag}/times", "posefix_hard_sixth"], [y], name=f"{tag}/sixth")]
        nodes += new
        names += [m.name for m in new]
        scalings.append(f"{tag}/sixth")
    if scalings:
        proto.graph.initializer.extend(numpy_helper.from_array(np.array(v, np.float32), k) for k, v in consts.items())
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    _drop_unused_initializers(proto)  # the means' axes
    return proto, names, scalings


def _drop_unused_initializers(proto) -> None:
    used = {i for n in proto.graph.node for i in n.input} | {o.name for o in proto.graph.output}
    for t in [t for t in proto.graph.initializer if t.name not in used]:
        proto.graph.initializer.remove(t)


def scalings_into_scales(proto, names) -> int:
    """Remove each named ``Mul`` by a constant k that sits between a ``DequantizeLinear`` and a
    ``QuantizeLinear`` in a quantised graph: the tensors the ``QuantizeLinear`` fed are read as the
    ``Mul``'s input with k times its scale (exact: what was a rounding to a new scale is no rounding at
    all). Returns how many were removed."""
    from onnx import numpy_helper

    init = {t.name: t for t in proto.graph.initializer}
    nodes = list(proto.graph.node)
    made_by = {out: n for n in nodes for out in n.output}
    readers: dict[str, list] = {}
    for n in nodes:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    outputs = {o.name for o in proto.graph.output}
    gone, removed = set(), 0
    names = set(names)
    for mul in [n for n in nodes if n.name in names]:
        ins = [made_by.get(i) for i in mul.input]
        dq = next((d for d in ins if d is not None and d.op_type == "DequantizeLinear"
                   and d.input[0] not in init), None)
        other = [i for i in mul.input if dq is None or i != dq.output[0]]
        q = readers.get(mul.output[0], [])
        if dq is None or len(other) != 1 or len(q) != 1 or q[0].op_type != "QuantizeLinear" or \
                mul.output[0] in outputs or len(readers.get(dq.output[0], [])) != 1:
            continue
        k = _constant(other[0], init, made_by)
        after = readers.get(q[0].output[0], [])
        if k is None or k <= 0 or q[0].output[0] in outputs or not after or \
                any(d.op_type != "DequantizeLinear" for d in after) or len(dq.input) < 3 or \
                dq.input[1] not in init or numpy_helper.to_array(init[dq.input[1]]).size != 1:
            continue
        scale = numpy_helper.to_array(init[dq.input[1]]).astype(np.float32) * np.float32(k)
        name = f"{mul.name}/scale"
        proto.graph.initializer.append(numpy_helper.from_array(scale, name))
        for d in after:
            d.input[0], d.input[1], d.input[2] = dq.input[0], name, dq.input[2]
        gone |= {id(dq), id(mul), id(q[0])}
        removed += 1
    kept = [n for n in nodes if id(n) not in gone]
    del proto.graph.node[:]
    proto.graph.node.extend(kept)
    _drop_unused_initializers(proto)  # the scales the removed nodes read
    return removed


def _constant(name, init, made_by):
    from onnx import numpy_helper

    if name in init:
        a = numpy_helper.to_array(init[name])
    else:
        d = made_by.get(name)
        if d is None or d.op_type != "DequantizeLinear" or d.input[0] not in init:
            return None
        a = numpy_helper.to_array(init[d.input[0]]).astype(np.float64)
        zp = numpy_helper.to_array(init[d.input[2]]) if len(d.input) > 2 else 0
        a = (a - zp) * numpy_helper.to_array(init[d.input[1]])
    return float(a) if a.size == 1 else None


def shuffles_on_int8(proto) -> int:
    """Move each pixel shuffle (``DepthToSpace``) that reads a ``DequantizeLinear``'s output (and is its only
    reader) before it, in place: the shuffle then moves the uint8 tensor, and the dequantisation follows.
    ONNX Runtime's quantiser has no quantised form of the shuffle; a shuffle is a permutation and a per-tensor
    dequantisation acts on each element alike, so the two commute exactly. A dequantised tensor that is also
    read elsewhere (another node, a graph output) stays; a graph with subgraphs is left as it is. Returns how
    many moved."""
    import math

    from onnx import AttributeProto

    nodes = list(proto.graph.node)
    if any(a.type in (AttributeProto.GRAPH, AttributeProto.GRAPHS) for n in nodes for a in n.attribute):
        return 0
    scalar = {t.name for t in proto.graph.initializer if math.prod(t.dims) == 1}
    made_by = {out: i for i, n in enumerate(nodes) for out in n.output}
    readers: dict[str, int] = {}
    for name in [i for n in nodes for i in n.input] + [o.name for o in proto.graph.output]:
        readers[name] = readers.get(name, 0) + 1
    moved = 0
    for j, shuffle in enumerate(nodes):
        i = made_by.get(shuffle.input[0]) if shuffle.op_type == "DepthToSpace" else None
        if i is None:
            continue
        dq = nodes[i]
        if dq.op_type != "DequantizeLinear" or readers[dq.output[0]] != 1 or not set(dq.input[1:]) <= scalar:
            continue
        x_q, between, y = dq.input[0], dq.output[0], shuffle.output[0]
        shuffle.input[0], shuffle.output[0] = x_q, between
        dq.input[0], dq.output[0] = between, y
        nodes[i], nodes[j] = shuffle, dq  # still in topological order: the shuffle where its input was read
        moved += 1
        stale = [v for v in proto.graph.value_info if v.name == between]  # its type and shape changed
        for v in stale:
            proto.graph.value_info.remove(v)
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    return moved


# Running a model.

class OnnxModel:
    """An exported posefix model in an ONNX Runtime session, called like :class:`PoseFixNet`:
    ``model(image, keypoints=kp)`` → the forward's dict (torch tensors on ``device``).

    source: a file path or the serialized model; provider: "cpu", "cuda" or "tensorrt" (None: "cuda" on a
    CUDA device, else "cpu"); fp16: TensorRT builds fp16 engines. Inputs go to the session as host arrays.
    """

    backend = "onnxruntime"

    def __init__(self, source: str | Path | bytes, device: str | torch.device = "cpu", provider: str | None = None,
                 fp16: bool = False, field: str = "--onnx"):
        ort = require("onnxruntime", "--backend onnxruntime")
        self.device = torch.device(device)
        provider = provider or ("cuda" if self.device.type == "cuda" else "cpu")
        if provider not in PROVIDERS:
            raise InputError("provider", f"must be one of {list(PROVIDERS)}, got {provider!r}")
        available = ort.get_available_providers()
        if PROVIDERS[provider][0] not in available:
            raise InputError("provider", f"{provider} needs {PROVIDERS[provider][0]}, which this onnxruntime "
                             f"does not have (it has {', '.join(available)})")
        gpu = {"device_id": self.device.index or 0} if self.device.type == "cuda" else {}  # cuda:N: GPU N
        providers = [(p, {**gpu, **({"trt_fp16_enable": True} if fp16 and p.startswith("Tensorrt") else {})})
                     if p != "CPUExecutionProvider" else p for p in PROVIDERS[provider] if p in available]
        name = "the exported model" if isinstance(source, bytes) else str(source)
        if not isinstance(source, bytes):
            if not Path(source).is_file():
                raise InputError(field, "file not found", name)
            source = str(source)
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()  # the torch backend's thread count (OMP_NUM_THREADS)
        options.log_severity_level = 3
        # Its threads sleep between runs instead of spinning: the decoding threads and the crops (torch) run
        # between model calls on the same cores (posefix refine 5-10 % faster on two cores, RESULTS § 12).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(source, options, providers=providers)
        except Exception as e:  # noqa: BLE001 — onnxruntime raises its own exception types for a bad file
            raise InputError(field, f"not an ONNX model ONNX Runtime can load: {str(e).splitlines()[0][:300]}",
                             name) from None
        meta = self.session.get_modelmeta().custom_metadata_map
        if "posefix_model_config" not in meta or "posefix_outputs" not in meta:
            raise InputError(field, "has no posefix metadata (posefix_model_config); export it with posefix export",
                             name)

        self.cfg = model_config_from_json(meta["posefix_model_config"], "posefix_model_config", name)
        try:
            self.outputs = json.loads(meta["posefix_outputs"])
        except (ValueError, RecursionError):
            self.outputs = None
        if not (isinstance(self.outputs, list) and self.outputs and all(isinstance(o, str) for o in self.outputs)):
            raise InputError("posefix_outputs", "must be a JSON list of the model's output names", name)
        self.precision = meta.get("posefix_precision", "fp32")
        self.metadata = meta
        self.fitted_choice = FittedChoice.from_json(meta[CHOICE_KEY], name) if CHOICE_KEY in meta else None
        self.providers = self.session.get_providers()
        given = {i.name for i in self.session.get_inputs()}
        if given != set(INPUTS):
            raise InputError(field, f"has inputs {sorted(given)}, a posefix model has {list(INPUTS)}", name)
        self.name, self.field = name, field
        self._check_signature()
        self.upsamplings_as_copies = 0
        if self.precision == "int8" and self.providers == ["CPUExecutionProvider"]:
            session, self.upsamplings_as_copies = _int8_cpu_session(ort, source, options)
            self.session = session or self.session

    def _check_signature(self) -> None:
        """The graph's inputs and outputs against what posefix feeds and reads (names, element types, ranks and
        every fixed dimension, from the model config): an InputError naming the file and the tensor otherwise."""
        h, w = self.cfg.input_size
        k = self.cfg.num_keypoints
        want_in = {"image": (None, 3, h, w), "keypoints": (None, k, 3)}
        want_out = {"coords": (None, k, 2), "confidence_logit": (None, k), "input_confidence_logit": (None, k)}
        outputs = {o.name: o for o in self.session.get_outputs()}
        missing = [o for o in [*want_out, *self.outputs] if o not in outputs]
        if missing:
            raise InputError(self.field, f"has no output {missing[0]!r} (outputs: {sorted(outputs)}); export the "
                             "model with posefix export", self.name)
        tensors = [("input", t, want_in[t.name]) for t in self.session.get_inputs()]
        tensors += [("output", outputs[n], shape) for n, shape in want_out.items()]
        for kind, t, shape in tensors:
            if t.type != "tensor(float)":
                raise InputError(self.field, f"{kind} {t.name!r} is {t.type}, posefix needs tensor(float)", self.name)
            dims = list(t.shape)
            if len(dims) != len(shape) or any(isinstance(d, int) and want is not None and d != want
                                              for d, want in zip(dims, shape)):
                expected = ", ".join("N" if d is None else str(d) for d in shape)
                raise InputError(self.field, f"{kind} {t.name!r} has shape {dims}, this model's config needs "
                                 f"({expected})", self.name)

    def describe(self) -> str:
        """The backend as GetModelInfo names it: "onnxruntime (CPUExecutionProvider, int8)"."""
        return f"onnxruntime ({', '.join(self.providers)}, {self.precision})"

    def __call__(self, image: torch.Tensor, heatmaps=None, *, keypoints: torch.Tensor) -> dict:
        if heatmaps is not None:
            raise ValueError("an exported model takes the input pose as keypoints")
        feeds = {"image": np.ascontiguousarray(image.detach().float().cpu().numpy()),
                 "keypoints": np.ascontiguousarray(keypoints.detach().float().cpu().numpy())}
        try:
            out = self.session.run(self.outputs, feeds)
        except Exception as e:  # noqa: BLE001 — onnxruntime raises its own exception types
            raise InputError(self.field, f"ONNX Runtime failed to run the model: {str(e).splitlines()[0][:300]}",
                             self.name) from None
        n = feeds["image"].shape[0]
        shapes = {"coords": (n, self.cfg.num_keypoints, 2), "confidence_logit": (n, self.cfg.num_keypoints),
                  "input_confidence_logit": (n, self.cfg.num_keypoints)}
        for name, v in zip(self.outputs, out):
            if name in shapes and v.shape != shapes[name]:
                raise InputError(self.field, f"output {name!r} came out of shape {v.shape}, expected "
                                 f"{shapes[name]}", self.name)
        return {k: torch.from_numpy(v).to(self.device) for k, v in zip(self.outputs, out)}


def _int8_cpu_session(ort, source, options):
    """The int8 model's CPU session with its ×2 nearest upsamplings as copies: ONNX Runtime's own
    optimisation of the graph (its uint8 convolutions in NHWC; without its CPU-specific blocked layout, which the
    second session adds), each NHWC ``Resize`` then rewritten by :func:`nhwc_upsampling_as_copies`, in a
    session with ``options``; and how many were rewritten. The same outputs bit for bit. (None, 0) where there is
    nothing to rewrite or the runtime does not allow it."""
    import tempfile

    import onnx

    try:
        with tempfile.TemporaryDirectory(prefix="posefix-ort-") as tmp:
            first = ort.SessionOptions()
            first.optimized_model_filepath = str(Path(tmp) / "optimised.onnx")
            first.log_severity_level = 3
            ort.InferenceSession(source, first, providers=["CPUExecutionProvider"],
                                 disabled_optimizers=["NchwcTransformer"])
            proto = onnx.load(first.optimized_model_filepath)
        count = nhwc_upsampling_as_copies(proto)
        if not count:
            return None, 0
        return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"]), count
    except Exception:  # noqa: BLE001 — an optimisation only: the plain session stays
        return None, 0


def nhwc_upsampling_as_copies(proto) -> int:
    """Rewrite, in place, each ×2 nearest ``Resize`` of an NHWC tensor (scales [1, 2, 2, 1], floor of the
    asymmetric coordinate: output (y, x) reads input (y // 2, x // 2)) as ``Unsqueeze`` to (N, H, 1, W, 1, C),
    ``Expand`` to (N, H, 2, W, 2, C) and ``Reshape`` to (N, 2H, 2W, C): the same tensor, made of copies of
    whole pixels instead of ONNX Runtime's element-by-element resize (5-10× faster on uint8). Returns how many."""
    from onnx import helper, numpy_helper

    init = {t.name: t for t in proto.graph.initializer}
    nodes, count = [], 0
    for n in proto.graph.node:
        attrs = {a.name: (a.s.decode() if a.type == a.STRING else a.i if a.type == a.INT else a.f)
                 for a in n.attribute}
        scales = (numpy_helper.to_array(init[n.input[2]]).tolist()
                  if n.op_type == "Resize" and n.domain in ("", "ai.onnx") and len(n.input) == 3
                  and n.input[2] in init else None)
        if scales != [1.0, 2.0, 2.0, 1.0] or attrs.get("mode") != "nearest" or \
                attrs.get("coordinate_transformation_mode") != "asymmetric" or attrs.get("nearest_mode") != "floor" \
                or attrs.get("antialias", 0) or attrs.get("keep_aspect_ratio_policy", "stretch") != "stretch":
            nodes.append(n)
            continue
        x, y, tag = n.input[0], n.output[0], f"posefix_up{count}"
        nodes += [helper.make_node("Unsqueeze", [x, "posefix_up_axes"], [f"{tag}_u"], name=f"{tag}_unsqueeze"),
                  helper.make_node("Expand", [f"{tag}_u", "posefix_up_expand"], [f"{tag}_e"], name=f"{tag}_expand"),
                  helper.make_node("Shape", [x], [f"{tag}_s"], name=f"{tag}_shape"),
                  helper.make_node("Mul", [f"{tag}_s", "posefix_up_twice"], [f"{tag}_t"], name=f"{tag}_size"),
                  helper.make_node("Reshape", [f"{tag}_e", f"{tag}_t"], [y], name=f"{tag}_reshape")]
        count += 1
    if count:
        proto.graph.initializer.extend([
            numpy_helper.from_array(np.array([2, 4], np.int64), "posefix_up_axes"),
            numpy_helper.from_array(np.array([1, 1, 2, 1, 2, 1], np.int64), "posefix_up_expand"),
            numpy_helper.from_array(np.array([1, 2, 2, 1], np.int64), "posefix_up_twice")])
        del proto.graph.node[:]
        proto.graph.node.extend(nodes)
    return count


def onnx_model(checkpoint, onnx, device, provider=None, fp16=False) -> OnnxModel:
    """The ONNX Runtime model of ``posefix refine/serve --backend onnxruntime``: the file ``onnx``, or the
    checkpoint exported in memory when no file is given."""
    if onnx is not None:
        return OnnxModel(onnx, device, provider, fp16)
    proto = export_onnx(load_weights(checkpoint))
    return OnnxModel(proto.SerializeToString(), device, provider, fp16, field="checkpoint")


# Triton Inference Server.

TRITON_TYPES = {1: "TYPE_FP32", 6: "TYPE_INT32", 7: "TYPE_INT64", 9: "TYPE_BOOL", 10: "TYPE_FP16", 11: "TYPE_FP64"}


def triton_config(proto, name: str = "posefix", max_batch_size: int = 64, max_queue_delay_ms: float = 5.0,
                  instances: int = 1, kind: str = "gpu") -> str:
    """config.pbtxt for Triton's ONNX Runtime backend: the graph's inputs and outputs without the batch axis,
    dynamic batching (preferred sizes up to ``max_batch_size``, queue delay) and an instance group."""
    if kind not in ("gpu", "cpu"):
        raise InputError("instance_kind", f"must be gpu or cpu, got {kind!r}")
    lines = [f'name: "{name}"', 'backend: "onnxruntime"', f"max_batch_size: {max_batch_size}"]

    def tensor(value_info) -> str:
        t = value_info.type.tensor_type
        dims = [d.dim_value for d in t.shape.dim[1:]]
        return (f'  {{ name: "{value_info.name}" data_type: {TRITON_TYPES[t.elem_type]} '
                f'dims: [ {", ".join(map(str, dims))} ] }}')

    for section, values in (("input", proto.graph.input), ("output", proto.graph.output)):
        lines += [f"{section} ["] + [",\n".join(tensor(v) for v in values)] + ["]"]
    preferred = [b for b in (8, 16, 32, 64, 128, 256) if b <= max_batch_size] or [max_batch_size]
    lines += ["dynamic_batching {", f"  preferred_batch_size: [ {', '.join(map(str, preferred))} ]",
              f"  max_queue_delay_microseconds: {round(max_queue_delay_ms * 1000)}", "}",
              "instance_group [", f"  {{ count: {instances} kind: KIND_{kind.upper()} }}", "]"]
    meta = read_metadata(proto)
    lines += ["parameters [", ",\n".join(f'  {{ key: "{k}" value: {{ string_value: {json.dumps(meta[k])} }} }}'
                                         for k in ("posefix_model_config", "posefix_precision", "posefix_version")),
              "]"]
    return "\n".join(lines) + "\n"


def triton_model_dir(repo: str | Path, name: str) -> Path:
    """REPO/NAME, the directory ``--triton REPO --triton-name NAME`` writes, after checking both: NAME a plain
    name (letters, digits, ``_``, ``-``, ``.``; not starting with ``.``), REPO a directory or not yet there."""
    import re

    if not re.fullmatch(r"[A-Za-z0-9_\-][A-Za-z0-9_.\-]{0,127}", name):
        raise InputError("triton_name", f"must be a plain name (letters, digits, _ - .; not starting with ., "
                         f"at most 128 characters), got {name!r}")
    repo = Path(repo)
    if repo.exists() and not repo.is_dir():
        raise InputError("triton", f"{repo} exists and is not a directory")
    return repo / name


def _is_posefix_model_dir(path: Path) -> bool:
    """Whether ``path`` is a directory holding only what :func:`write_triton_repository` writes (a real one, not
    a symbolic link), so that replacing it destroys nothing else."""
    if path.is_symlink() or not path.is_dir():
        return False
    try:
        top = {p.name for p in path.iterdir()}
        inner = {p.name for p in (path / "1").iterdir()} if (path / "1").is_dir() else set()
    except OSError:
        return False
    if not top <= {"config.pbtxt", "1"} or not inner <= {"model.onnx"} or "config.pbtxt" not in top:
        return False
    if (path / "1").is_symlink() or (path / "config.pbtxt").is_symlink():
        return False
    try:
        return 'backend: "onnxruntime"' in (path / "config.pbtxt").read_text(errors="replace")
    except OSError:
        return False


def write_triton_repository(proto, repo: str | Path, config: str, name: str = "posefix") -> Path:
    """REPO/NAME/config.pbtxt and REPO/NAME/1/model.onnx. The model's directory is built beside its place and
    moved there whole, replacing an earlier one: Triton, or a reader, never sees half a model. An existing
    REPO/NAME is replaced only when it is such a model directory (nothing else is ever deleted); temporary
    directories a killed export left beside it are removed."""
    import shutil
    import tempfile


    final = triton_model_dir(repo, name)
    repo = final.parent
    if (final.exists() or final.is_symlink()) and not _is_posefix_model_dir(final):
        raise InputError("triton", f"{final} exists and is not a Triton model directory posefix wrote "
                         "(config.pbtxt and 1/model.onnx only); refusing to replace it")
    repo.mkdir(parents=True, exist_ok=True)
    _remove_stale(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.{os.getpid()}.", suffix=TMP_SUFFIX, dir=repo))
    old = None
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp's directory is 0700; the model's gets a new directory's mode
        (tmp / "1").mkdir()
        (tmp / "1" / "model.onnx").write_bytes(proto.SerializeToString())
        (tmp / "config.pbtxt").write_text(config)
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{name}.{os.getpid()}.", suffix=TMP_SUFFIX, dir=repo))
            os.replace(final, old / name)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return final
