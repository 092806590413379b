"""ONNX export, the ONNX Runtime backend behind refine and serve, int8 quantisation and the Triton repository.

The exported graph is compared with the torch refiner it came from (coordinates within 0.05 px, confidences
within 1e-3) on random and real crops; the int8 model with the fp32 one (a stated bound, and keypoint AP on the
bundled sample's synthesized inputs and a real estimator's results within 0.5 AP points)."""
import json

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from posefix.cli import main
from posefix.errors import InputError
from posefix.images import coco_image_path, decode
from posefix.model import ModelConfig, PoseFixNet
from posefix.onnx_backend import OnnxModel, calibration_crops, export_onnx, quantize_int8, triton_config
from posefix.options import RefineOptions
from posefix.protocols import RefinerLike
from posefix.refiner import Refiner
from posefix.serve import ServeOptions, create_server, serve_main
from posefix.synth.cocoio import load_ground_truth, load_results
from posefix.synth.diagnose import keypoint_ap
from posefix.weights import export_weights

from .conftest import IMAGE_785, VAL_GT, VAL_RESULTS, LoopThread, refine_results

IMAGES = VAL_GT.parent / "images"
PX, CONF = 0.05, 1e-3  # fp32: ONNX Runtime against torch
INT8_PX, INT8_CONF = 1.0, 0.05  # int8 against fp32: the largest coordinate and confidence difference
INT8_AP = 0.005  # 0.5 AP points


def moving_model(backbone="resnet18", size=(128, 96), sigma=3.5, seed=0) -> PoseFixNet:
    """An untrained refiner whose heads are random, so that it moves joints: equal outputs mean equal computation."""
    torch.manual_seed(seed)
    model = PoseFixNet(ModelConfig(backbone=backbone, input_size=size, sigma=sigma, head_channels=32))
    with torch.no_grad():
        torch.nn.init.normal_(model.final.weight, std=0.2)
        torch.nn.init.normal_(model.confidence.weight, std=0.2)
    return model


def random_inputs(cfg, n, seed):
    gen = torch.Generator().manual_seed(seed)
    h, w = cfg.input_size
    image = torch.rand(n, 3, h, w, generator=gen)
    kp = torch.cat([torch.rand(n, 17, 2, generator=gen) * torch.tensor([w * 1.2, h * 1.2]) - 0.1 * torch.tensor([w, h]),
                    (torch.rand(n, 17, 1, generator=gen) > 0.2).float()], -1)
    kp[0, 3, :2] = float("nan")  # a joint without coordinates
    return image, kp


def assert_equal_outputs(torch_out, onnx_out):
    assert set(torch_out) <= set(onnx_out)  # every output of the forward dict, by its name
    np.testing.assert_allclose(onnx_out["coords"].numpy(), torch_out["coords"].numpy(), atol=PX, rtol=0)
    np.testing.assert_allclose(torch.sigmoid(onnx_out["confidence_logit"]).numpy(),
                               torch.sigmoid(torch_out["confidence_logit"]).numpy(), atol=CONF, rtol=0)
    for key in torch_out:  # within 1e-3 of each output's scale (a deep random model's logits reach 1e3)
        want = torch_out[key].numpy()
        scale = max(1.0, float(np.abs(want[np.isfinite(want)]).max(initial=0)))
        np.testing.assert_allclose(onnx_out[key].numpy(), want, atol=1e-3 * scale, rtol=1e-3,
                                   err_msg=key)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The moving model's checkpoint, and its fp32 export by ``posefix export``."""
    tmp = tmp_path_factory.mktemp("onnx")
    checkpoint, out = tmp / "model.safetensors", tmp / "refiner.onnx"
    export_weights(moving_model(), checkpoint, {})
    assert main(["export", "--checkpoint", str(checkpoint), "--onnx", str(out)]) == 0
    return checkpoint, out


@pytest.fixture(scope="module")
def torch_refiner(files):
    return Refiner.from_checkpoint(files[0], choice_margin=0.0)  # the heads' own choice: both kinds of joint


@pytest.fixture(scope="module")
def real_crops(torch_refiner):
    """Crops of the bundled real estimator's persons, cut as the engine cuts them (64 of them)."""
    return calibration_crops(torch_refiner, IMAGES, VAL_RESULTS, max_persons=64)


def test_export_is_one_checked_graph_with_posefix_metadata(files):
    proto = onnx.load(str(files[1]))
    onnx.checker.check_model(proto)
    assert [i.name for i in proto.graph.input] == ["image", "keypoints"]
    assert [o.name for o in proto.graph.output] == ["logits", "prob", "coords", "confidence_logit",
                                                  "input_confidence_logit", "confidence"]
    assert all(i.type.tensor_type.shape.dim[0].dim_param for i in proto.graph.input)  # a dynamic batch axis
    meta = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(meta["posefix_model_config"])["input_size"] == [128, 96]
    assert json.loads(meta["posefix_model_config"])["sigma"] == 3.5
    assert json.loads(meta["posefix_keypoints"])["names"][5] == "left_shoulder"
    assert meta["posefix_precision"] == "fp32" and meta["posefix_version"]
    assert not any(n.op_type == "Resize" or "heatmap" in n.name for n in proto.graph.node)
    # Nothing is computed from the weights alone at run time (the stem's weight slices are folded at export).
    constant = {t.name for t in proto.graph.initializer} | {""}
    for node in proto.graph.node:
        assert node.op_type == "Constant" or not set(node.input) <= constant, node.name
        if node.op_type == "Constant":
            constant.update(node.output)


@pytest.mark.parametrize("batch", [1, 7, 64])
def test_fp32_equals_torch_on_random_crops(files, torch_refiner, batch):
    image, kp = random_inputs(torch_refiner.cfg, batch, seed=batch)
    with torch.no_grad():
        expected = torch_refiner.model(image, keypoints=kp)
    assert_equal_outputs(expected, OnnxModel(files[1])(image, keypoints=kp))


def test_fp32_equals_torch_on_real_crops(files, torch_refiner, real_crops):
    image, kp = (torch.from_numpy(a) for a in real_crops)
    with torch.no_grad():
        expected = torch_refiner.model(image, keypoints=kp)
    assert_equal_outputs(expected, OnnxModel(files[1])(image, keypoints=kp))


@pytest.mark.slow
@pytest.mark.parametrize("backbone", ["resnet50", "resnet101", "resnet152"])
def test_fp32_equals_torch_for_every_backbone(backbone):
    """The presets' other backbones, at a tiny input size (64×64) to keep the export short."""
    model = moving_model(backbone, (64, 64), 2.0, seed=1)
    session = OnnxModel(export_onnx(model).SerializeToString())
    folded = Refiner(model).model
    for batch in (1, 7, 64):
        image, kp = random_inputs(model.cfg, batch, seed=batch)
        with torch.no_grad():
            assert_equal_outputs(folded(image, keypoints=kp), session(image, keypoints=kp))


@pytest.mark.parametrize("backbone", [
    "mobilenet_v3_large", *(pytest.param(b, marks=pytest.mark.slow)
                            for b in ("mobilenet_v3_small", "shufflenet_v2_x1_0", "regnet_x_400mf"))])
def test_mobile_backbone_exports_and_equals_torch(backbone):
    """Each mobile-class backbone's graph (fused stem, light head) gives torch's outputs on random crops."""
    model = moving_model(backbone, (96, 64), 2.5, seed=4)
    folded = Refiner(model).model
    proto = export_onnx(model)
    assert not any(n.op_type in ("ConvTranspose", "Einsum") for n in proto.graph.node)  # all int8-quantisable
    session = OnnxModel(proto.SerializeToString())
    assert session.cfg.backbone == backbone
    for batch in (1, 9):
        image, kp = random_inputs(model.cfg, batch, seed=batch)
        with torch.no_grad():
            expected = folded(image, keypoints=kp)
        assert (expected["coords"] - kp[..., :2]).nan_to_num().abs().max() > 1  # the random heads move joints
        assert_equal_outputs(expected, session(image, keypoints=kp))


def test_offset_head_exports_and_equals_torch():
    """The G-RMI head's peak + offset decoding inside the graph: the same joints, offsets and confidences."""
    torch.manual_seed(2)
    model = PoseFixNet(ModelConfig(backbone="resnet18", input_size=(128, 96), sigma=3.5, head_channels=32,
                                   head="offset"))
    with torch.no_grad():
        torch.nn.init.normal_(model.final.weight, std=0.2)
        torch.nn.init.normal_(model.offset.weight, std=0.2)
    session = OnnxModel(export_onnx(model).SerializeToString())
    folded = Refiner(model).model
    image, kp = random_inputs(model.cfg, 7, seed=3)
    with torch.no_grad():
        expected = folded(image, keypoints=kp)
    got = session(image, keypoints=kp)
    assert "offsets" in got
    # A peak is the first of equal maxima in both; where two logits are within float rounding of each other
    # the two runtimes may pick different pixels, so the comparison is over joints with a clear peak.
    top2 = expected["logits"].flatten(2).topk(2, dim=-1).values
    clear = (top2[..., 0] - top2[..., 1]) > 1e-3 * top2[..., 0].abs().clamp(min=1)
    assert clear.float().mean() > 0.75
    np.testing.assert_allclose(got["coords"][clear].numpy(), expected["coords"][clear].numpy(), atol=PX, rtol=0)
    np.testing.assert_allclose(torch.sigmoid(got["confidence_logit"]).numpy(),
                               torch.sigmoid(expected["confidence_logit"]).numpy(), atol=CONF, rtol=0)


@pytest.mark.skipif("CUDAExecutionProvider" not in ort.get_available_providers() or not torch.cuda.is_available(),
                    reason="needs onnxruntime's CUDA execution provider and a CUDA device")
def test_cuda_provider_equals_torch(files, torch_refiner):
    image, kp = random_inputs(torch_refiner.cfg, 7, seed=5)
    with torch.no_grad():
        expected = torch_refiner.model(image, keypoints=kp)
    got = OnnxModel(files[1], "cuda", "cuda")(image.cuda(), keypoints=kp.cuda())
    assert got["coords"].device.type == "cuda"
    assert_equal_outputs(expected, {k: v.cpu() for k, v in got.items()})


def test_refiner_gives_the_same_refinement_with_either_backend(files, torch_refiner, poses_785):
    images, index = [decode(IMAGE_785)], np.zeros(len(poses_785), dtype=np.int64)
    for flip, output in ((False, "raw"), (True, "raw"), (False, "choice")):
        ours = Refiner.from_checkpoint(None, onnx=files[1], batch_size=5, flip_test=flip, output=output,
                                       choice_margin=0.0)
        assert ours.backend == "onnxruntime"
        torch_refiner.flip_test, torch_refiner.output = flip, output
        try:
            xy, conf = torch_refiner.refine(images, index, poses_785)
        finally:
            torch_refiner.flip_test, torch_refiner.output = False, "choice"
        got_xy, got_conf = ours.refine(images, index, poses_785)
        if output == "raw":
            assert np.abs(xy - poses_785[..., :2]).max() > 0.01  # the model moves joints
        np.testing.assert_allclose(got_xy, xy, atol=PX * 4, rtol=0)  # crop pixels → image pixels: up to ×4 here
        np.testing.assert_allclose(got_conf, conf, atol=CONF, rtol=0)


@pytest.mark.parametrize("backbone", ["resnet18", pytest.param("mobilenet_v3_large", marks=pytest.mark.slow)])
def test_int8_within_its_bound_and_ap_of_fp32(files, torch_refiner, real_crops, backbone):
    """int8 as ``posefix export --int8`` makes it (the head's transposed convolutions in sub-pixel form, so
    that they are quantised too) against the plain fp32 export, for the test's ResNet-18 and the real-time
    preset's backbone."""
    from posefix.synth.coco import synthesize_coco

    if backbone == "resnet18":
        model, fp32 = moving_model(), files[1]
    else:
        model = moving_model(backbone)
        fp32 = export_onnx(model).SerializeToString()
    int8 = quantize_int8(export_onnx(model, for_int8=True), *real_crops)
    assert {p.key: p.value for p in int8.metadata_props}["posefix_precision"] == "int8"
    assert sum(n.op_type == "QuantizeLinear" for n in int8.graph.node) > 10
    assert not any(n.op_type == "ConvTranspose" for n in int8.graph.node)  # every head convolution quantisable
    # Every convolution is quantised but the 1×1 output convolutions (the stem's of the image included), and so
    # are the stem's matrix products.
    made_by = {out: n.op_type for n in int8.graph.node for out in n.output}
    shapes = {t.name: tuple(t.dims) for t in int8.graph.initializer}
    float_convs = [n for n in int8.graph.node if n.op_type == "Conv" and made_by.get(n.input[1]) != "DequantizeLinear"]
    assert float_convs and all(shapes[n.input[1]][2:] == (1, 1) for n in float_convs)
    products = [n for n in int8.graph.node if n.op_type == "MatMul"]  # the stem's contraction of the pose
    assert len(products) == 2 and all(made_by.get(i) == "DequantizeLinear" for n in products for i in n.input)
    shuffles = [n for n in int8.graph.node if n.op_type == "DepthToSpace"]  # each moves the uint8 tensor
    assert all(made_by.get(n.input[0]) != "DequantizeLinear" for n in shuffles)
    assert len(shuffles) == (3 if backbone == "resnet18" else 0)
    # One output convolution (heatmaps, confidence and input confidence merged), float.
    assert len(float_convs) == 1 and shapes[float_convs[0].input[1]][0] == 3 * model.cfg.num_keypoints
    # MobileNetV3's hard-swishes, hard-sigmoids, squeeze-excitation pools and the head's upsamplings run on
    # uint8: nothing of them is left in float between a dequantisation and a quantisation.
    assert not any(n.op_type in ("HardSwish", "HardSigmoid") for n in int8.graph.node)
    readers = {}
    for n in int8.graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n.op_type)
    quantised = {"Resize", "GlobalAveragePool", "Mul", "Add"}
    assert all(readers[n.output[0]] == ["QuantizeLinear"]
               for n in int8.graph.node if n.op_type in quantised and made_by.get(n.input[0]) == "DequantizeLinear")
    if backbone != "resnet18":
        assert sum(n.op_type == "GlobalAveragePool" for n in int8.graph.node) == 8  # each SE block's
        assert sum(made_by.get(n.input[0]) == "DequantizeLinear" for n in int8.graph.node if n.op_type == "Resize") == 3
    a, b = OnnxModel(fp32), OnnxModel(int8.SerializeToString())
    assert b.describe() == "onnxruntime (CPUExecutionProvider, int8)"
    assert b.upsamplings_as_copies == (0 if backbone == "resnet18" else 3)
    plain = ort.InferenceSession(int8.SerializeToString(), providers=["CPUExecutionProvider"])
    image, kp = random_inputs(torch_refiner.cfg, 5, seed=4)
    feeds = {"image": image.numpy(), "keypoints": kp.numpy()}
    for x, y in zip(plain.run(b.outputs, feeds), b.session.run(b.outputs, feeds), strict=True):
        np.testing.assert_array_equal(x, y)  # the upsamplings as copies: the same numbers
    image, kp = random_inputs(torch_refiner.cfg, 16, seed=3)
    real = tuple(torch.from_numpy(x) for x in real_crops)
    for x, k in ((image, kp), real):
        fa, fb = a(x, keypoints=k), b(x, keypoints=k)
        assert (fa["coords"] - fb["coords"]).abs().max() < INT8_PX
        assert (torch.sigmoid(fa["confidence_logit"]) - torch.sigmoid(fb["confidence_logit"])).abs().max() < INT8_CONF
    gt = load_ground_truth(VAL_GT)
    paths = {im["id"]: coco_image_path(IMAGES, im) for im in gt.doc["images"]}
    synthesized, _ = synthesize_coco(gt, np.random.default_rng(1))
    for inputs in (synthesized, load_results(VAL_RESULTS, gt)):
        aps = [keypoint_ap(gt, refine_results(Refiner(m), inputs, paths)) for m in (a, b)]
        assert abs(aps[0] - aps[1]) <= INT8_AP, aps


@pytest.mark.parametrize("case, moves", [("plain", 1), ("second reader", 0), ("graph output", 0),
                                         ("per-channel", 0), ("chain", 2)])
def test_pixel_shuffles_move_before_their_dequantisation_and_give_the_same_numbers(case, moves):
    """``shuffles_on_int8`` on a plain graph, uint8 → DequantizeLinear → DepthToSpace → Relu: the shuffle moves
    before the dequantisation where it is the dequantised tensor's only reader and the scale is per tensor
    (a chain of two shuffles both move), and the outputs are the same numbers either way."""
    from onnx import TensorProto, helper, numpy_helper

    from posefix.onnx_backend import shuffles_on_int8

    def graph():
        per_channel = case == "per-channel"
        nodes = [helper.make_node("DequantizeLinear", ["x", "scale", "zero"], ["xf"], axis=1),
                 helper.make_node("DepthToSpace", ["xf"], ["y"], blocksize=2, mode="CRD")]
        shape = [2, 2, 6, 10]
        if case == "chain":
            nodes.append(helper.make_node("DepthToSpace", ["y"], ["y2"], blocksize=2, mode="CRD"))
            shape = [2, 1, 12, 20]
        nodes.append(helper.make_node("Relu", [nodes[-1].output[0]], ["out"]))
        outputs = [helper.make_tensor_value_info("out", TensorProto.FLOAT, shape)]
        if case == "second reader":
            nodes.append(helper.make_node("Neg", ["xf"], ["other"]))
            outputs.append(helper.make_tensor_value_info("other", TensorProto.FLOAT, [2, 16, 3, 5]))
        if case == "graph output":
            outputs.append(helper.make_tensor_value_info("xf", TensorProto.FLOAT, [2, 16, 3, 5]))
        scale = np.linspace(0.01, 0.1, 16, dtype=np.float32) if per_channel else np.array(0.05, np.float32)
        zero = np.full(16, 128, np.uint8) if per_channel else np.array(128, np.uint8)
        inits = [numpy_helper.from_array(scale, "scale"), numpy_helper.from_array(zero, "zero")]
        g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.UINT8, [2, 16, 3, 5])],
                              outputs, inits)
        return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])

    x = np.random.default_rng(0).integers(0, 256, (2, 16, 3, 5), dtype=np.uint8)
    plain, moved = graph(), graph()
    assert shuffles_on_int8(moved) == moves
    onnx.checker.check_model(moved)
    if moves:
        shuffle = next(n for n in moved.graph.node if n.op_type == "DepthToSpace")
        assert shuffle.input[0] == "x"  # the uint8 tensor
    want = ort.InferenceSession(plain.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    got = ort.InferenceSession(moved.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    for a, b in zip(want, got, strict=True):
        np.testing.assert_array_equal(a, b)


def test_merged_output_convolutions_give_the_separate_ones():
    """``merge_output_convs``: one 1×1 convolution split into heatmap logits, confidence, input confidence
    (its bias added after pooling) and offsets gives the outputs of the separate convolutions."""
    from posefix.model import fold_batchnorm, merge_output_convs

    for head in ("soft_argmax", "offset"):
        torch.manual_seed(5)
        model = PoseFixNet(ModelConfig(backbone="resnet18", input_size=(64, 64), sigma=2.0, head_channels=16,
                                       head=head))
        with torch.no_grad():
            for conv in (model.final, model.confidence, model.input_confidence, getattr(model, "offset", None)):
                if conv is not None:
                    torch.nn.init.normal_(conv.weight, std=0.3)
                    torch.nn.init.normal_(conv.bias, std=0.3)
        plain = fold_batchnorm(model)
        merged = merge_output_convs(fold_batchnorm(model))
        image, kp = random_inputs(model.cfg, 4, seed=6)
        with torch.no_grad():
            want, got = plain(image, keypoints=kp), merged(image, keypoints=kp)
        assert set(want) == set(got)
        for key in want:
            torch.testing.assert_close(got[key], want[key], atol=1e-5, rtol=1e-5)


def test_hard_activations_for_int8_are_the_same_function():
    """MobileNetV3's hard-swish and hard-sigmoid respelled as add, clip and multiplications, and its
    squeeze-excitation means as global average pools: the fp32 graph's outputs are unchanged."""
    from posefix.onnx_backend import hard_activations_for_int8

    model = moving_model("mobilenet_v3_small", (96, 64), 2.5, seed=4)
    proto = export_onnx(model, for_int8=True)
    counts = {op: sum(n.op_type == op for n in proto.graph.node) for op in ("HardSwish", "HardSigmoid", "ReduceMean")}
    assert counts["HardSwish"] > 0 and counts["HardSigmoid"] > 0
    rewritten, names, scalings = hard_activations_for_int8(proto, {n.name for n in proto.graph.node})
    ops = [n.op_type for n in rewritten.graph.node]
    assert "HardSwish" not in ops and "HardSigmoid" not in ops
    assert len(scalings) == counts["HardSwish"] + counts["HardSigmoid"]
    assert ops.count("GlobalAveragePool") == counts["HardSigmoid"]  # one pool per squeeze-excitation block
    assert set(names) <= {n.name for n in rewritten.graph.node}
    onnx.checker.check_model(rewritten)
    image, kp = random_inputs(model.cfg, 3, seed=2)
    feeds = {"image": image.numpy(), "keypoints": kp.numpy()}
    want = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    got = ort.InferenceSession(rewritten.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    for a, b in zip(want, got, strict=True):
        np.testing.assert_allclose(b, a, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("case, removed", [("plain", 1), ("graph output", 0), ("vector", 0)])
def test_scalings_move_into_the_next_dequantisation(case, removed):
    """``scalings_into_scales`` on uint8 → DequantizeLinear → Mul(k) → QuantizeLinear → DequantizeLinear: the
    scaling goes into the last dequantisation's scale (k · x exactly, where the graph rounded to a new scale);
    a scaled tensor that is a graph output, or a scaling that is not one number, stays."""
    from onnx import TensorProto, helper, numpy_helper

    from posefix.onnx_backend import scalings_into_scales

    k = np.array(1 / 6, np.float32)
    if case == "vector":
        k = np.array([0.25, 0.5, 1.0, 2.0], np.float32).reshape(1, 4, 1, 1)
    nodes = [helper.make_node("DequantizeLinear", ["x", "s", "z"], ["xf"]),
             helper.make_node("Mul", ["xf", "k"], ["y"], name="scale"),
             helper.make_node("QuantizeLinear", ["y", "s2", "z2"], ["yq"]),
             helper.make_node("DequantizeLinear", ["yq", "s2", "z2"], ["out"])]
    outputs = [helper.make_tensor_value_info("out", TensorProto.FLOAT, [2, 4, 3, 5])]
    if case == "graph output":
        outputs.append(helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4, 3, 5]))
    values = {"s": np.array(0.05, np.float32), "z": np.array(100, np.uint8), "k": k,
              "s2": np.array(0.03, np.float32), "z2": np.array(7, np.uint8)}
    inits = [numpy_helper.from_array(a, n) for n, a in values.items()]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.UINT8, [2, 4, 3, 5])],
                              outputs, inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert scalings_into_scales(proto, ["scale"]) == removed
    onnx.checker.check_model(proto)
    x = np.random.default_rng(0).integers(0, 256, (2, 4, 3, 5), dtype=np.uint8)
    out = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(["out"], {"x": x})[0]
    exact = (x.astype(np.float32) - 100) * np.float32(0.05) * k
    if removed:
        assert not any(n.op_type == "Mul" for n in proto.graph.node)
        np.testing.assert_allclose(out, exact, rtol=1e-6, atol=1e-7)
    else:
        assert any(n.op_type == "Mul" for n in proto.graph.node)
        assert np.abs(out - exact).max() > 1e-3  # still rounded to the second scale


@pytest.mark.parametrize("case, rewritten", [("uint8", 1), ("float", 1), ("NCHW scales", 0), ("half pixel", 0),
                                             ("three times", 0)])
def test_nhwc_upsampling_as_copies_is_the_same_resize(case, rewritten):
    """``nhwc_upsampling_as_copies``: a ×2 nearest Resize of an NHWC tensor (asymmetric, floor) becomes copies
    giving the same tensor, bit for bit, on a batch of any size; other resizes are left as they are."""
    from onnx import TensorProto, helper, numpy_helper

    from posefix.onnx_backend import nhwc_upsampling_as_copies

    kind = TensorProto.FLOAT if case == "float" else TensorProto.UINT8
    scales = {"NCHW scales": [1, 1, 2, 2], "three times": [1, 3, 3, 1]}.get(case, [1, 2, 2, 1])
    mode = "half_pixel" if case == "half pixel" else "asymmetric"
    nodes = [helper.make_node("Resize", ["x", "", "scales"], ["up"], mode="nearest",
                              coordinate_transformation_mode=mode, nearest_mode="floor"),
             helper.make_node("Identity", ["up"], ["out"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", kind, ["n", 5, 3, 4])],
                              [helper.make_tensor_value_info("out", kind, None)],
                              [numpy_helper.from_array(np.array(scales, np.float32), "scales")])
    plain = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto = onnx.ModelProto()
    proto.CopyFrom(plain)
    assert nhwc_upsampling_as_copies(proto) == rewritten
    assert any(n.op_type == "Resize" for n in proto.graph.node) == (not rewritten)
    rng = np.random.default_rng(1)
    for n in (1, 3):
        x = rng.integers(0, 256, (n, 5, 3, 4)).astype(np.float32 if case == "float" else np.uint8)
        want = ort.InferenceSession(plain.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
        got = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
        np.testing.assert_array_equal(got[0], want[0])
        if rewritten:
            np.testing.assert_array_equal(got[0], x.repeat(2, axis=1).repeat(2, axis=2))


def test_export_int8_and_triton_repository_by_the_cli(files, tmp_path):
    from google.protobuf import text_format

    model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")
    out, repo = tmp_path / "int8.onnx", tmp_path / "repo"
    assert main(["export", "--checkpoint", str(files[0]), "--onnx", str(out), "--int8", "--calibration-images",
                 str(IMAGES), "--calibration-poses", str(VAL_RESULTS), "--calibration-persons", "16",
                 "--triton", str(repo), "--max-batch-size", "32", "--max-queue-delay-ms", "2",
                 "--instances", "2", "--instance-kind", "cpu"]) == 0
    assert OnnxModel(out).precision == "int8"
    assert (repo / "posefix" / "1" / "model.onnx").read_bytes() == out.read_bytes()
    config = text_format.Parse((repo / "posefix" / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert config.max_batch_size == 32 and config.backend == "onnxruntime"
    assert config.dynamic_batching.max_queue_delay_microseconds == 2000
    assert list(config.dynamic_batching.preferred_batch_size) == [8, 16, 32]
    assert ((config.instance_group[0].count, config.instance_group[0].kind)
            == (2, model_config_pb2.ModelInstanceGroup.KIND_CPU))
    for ours, theirs in ((config.input, session.get_inputs()), (config.output, session.get_outputs())):
        assert [(t.name, list(t.dims)) for t in ours] == [(t.name, t.shape[1:]) for t in theirs]
        assert all(t.data_type == model_config_pb2.TYPE_FP32 for t in ours)
    meta = {k: v.string_value for k, v in config.parameters.items()}
    assert json.loads(meta["posefix_model_config"])["backbone"] == "resnet18"
    # The config is what triton_config makes of the model file.
    assert (repo / "posefix" / "config.pbtxt").read_text() == triton_config(onnx.load(str(out)), "posefix", 32, 2, 2,
                                                                             "cpu")


def test_refine_cli_with_onnxruntime_equals_torch(files, tmp_path):
    outs = {}
    for name, extra in (("torch", []), ("ort", ["--onnx", str(files[1])])):
        outs[name] = tmp_path / f"{name}.json"
        args = ["refine", "--images", str(IMAGES), "--input", str(VAL_RESULTS), "--out", str(outs[name]), "--quiet"]
        assert main(args + (["--checkpoint", str(files[0])] if name == "torch" else extra)) == 0
    a, b = (np.array([r["keypoints"] for r in json.loads(outs[n].read_text())]) for n in ("torch", "ort"))
    assert a.shape == b.shape and np.abs(a - b).max() < 4 * PX


def test_serve_names_the_backend_and_refines_the_same(files, torch_refiner, poses_785):
    from posefix.client import PoseRefinerClient

    loop = LoopThread()
    ours = Refiner.from_checkpoint(None, onnx=files[1])
    assert isinstance(ours, RefinerLike)

    async def start():
        handle = create_server(ours, "127.0.0.1", 0, max_batch_size=8, max_queue_delay_ms=1, max_queue_size=512)
        await handle.start()
        return handle

    handle = loop.run(start())
    try:
        with PoseRefinerClient(f"127.0.0.1:{handle.port}") as client:
            info = client.model_info()
            got = client.refine(IMAGE_785.read_bytes(), poses_785)
    finally:
        loop.run(handle.stop(grace_s=1.0))
        loop.close()
    assert info["backend"] == "onnxruntime (CPUExecutionProvider, fp32)"
    xy, conf = torch_refiner.refine([decode(IMAGE_785)], np.zeros(len(poses_785), dtype=np.int64), poses_785)
    np.testing.assert_allclose(got[..., :2], xy, atol=4 * PX, rtol=0)
    np.testing.assert_allclose(got[..., 2], conf, atol=CONF, rtol=0)


# Bad input: one line naming the flag, exit 2, nothing written.

def _error(capsys, args) -> tuple[int, str]:
    capsys.readouterr()
    code = main(args)
    return code, capsys.readouterr().err.strip()


def test_bad_onnx_files_and_providers_are_one_line_errors(files, tmp_path, capsys):
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(files[1].read_bytes()[:5000])
    foreign = tmp_path / "foreign.onnx"
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["image"], ["coords"])], "g",
                                   [onnx.helper.make_tensor_value_info("image", onnx.TensorProto.FLOAT, [1])],
                                   [onnx.helper.make_tensor_value_info("coords", onnx.TensorProto.FLOAT, [1])])
    onnx.save(onnx.helper.make_model(graph), str(foreign))
    cases = [
        (["--onnx", str(tmp_path / "missing.onnx")], "--onnx: file not found"),
        (["--onnx", str(corrupt)], "--onnx: not an ONNX model"),
        (["--onnx", str(foreign)], "--onnx: has no posefix metadata"),
        (["--onnx", str(files[1]), "--provider", "tensorrt"], "--provider: tensorrt needs TensorrtExecutionProvider"),
        (["--onnx", str(files[1]), "--backend", "torch"], "--onnx: is run by the onnxruntime backend, not torch"),
        (["--onnx", str(files[1]), "--precision", "bf16"], "--precision: bf16 is for the torch backend"),
        ([], "--checkpoint: is required"),
    ]
    out = tmp_path / "out.json"
    for extra, message in cases:
        code, err = _error(capsys, ["refine", "--images", str(IMAGES), "--input", str(VAL_RESULTS), "--quiet", *extra,
                                    "--out", str(out)])
        assert code == 2 and err.count("\n") == 0 and message in err and err.startswith("posefix: error:"), (extra, err)
        assert not out.exists()
    options = ServeOptions(checkpoint=None, refine=RefineOptions(onnx=str(foreign), device="cpu", batch_size=8))
    with pytest.raises(InputError, match="--onnx: has no posefix metadata"):
        serve_main(options)


def test_export_bad_input_writes_nothing(files, tmp_path, capsys):
    bad_poses = tmp_path / "poses.json"
    bad_poses.write_text("[]")
    out, repo = tmp_path / "x.onnx", tmp_path / "repo"
    empty = tmp_path / "empty"  # no images (an output inside an input directory would be refused first)
    empty.mkdir()
    for extra, message in (
            (["--int8", "--calibration-images", str(IMAGES)], "--calibration-images/--calibration-poses: --int8 needs"),
            (["--int8", "--calibration-images", str(IMAGES), "--calibration-poses", str(bad_poses)],
             "--calibration-poses: "),
            (["--int8", "--calibration-images", str(empty), "--calibration-poses", str(VAL_RESULTS)],
             "--calibration-images: no image"),
            (["--batch", "zero"], "--batch: must be dynamic or a positive integer"),
            (["--batch", "4", "--triton", str(repo)], "--batch: a Triton repository needs --batch dynamic"),
            (["--triton", str(repo), "--instances", "0"], "--instances: must be at least 1")):
        code, err = _error(capsys, ["export", "--checkpoint", str(files[0]), "--onnx", str(out), *extra])
        assert code == 2 and err.count("\n") == 0 and message in err, (extra, err)
        assert not out.exists() and not repo.exists()
    code, err = _error(capsys, ["export", "--checkpoint", str(tmp_path / "none.safetensors"), "--onnx", str(out)])
    assert code == 2 and "checkpoint: file not found" in err and not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "poses.json"]  # no temporary file left either


def test_refine_video_and_in_memory_export_with_onnxruntime_equal_torch(files, tmp_path):
    """``--backend onnxruntime`` with only ``--checkpoint`` (exported in memory) on refine and refine-video."""
    from .videos import make_sample_video

    image = decode(IMAGE_785)
    offsets = make_sample_video(image, tmp_path / "clip.mp4", num_frames=4, size=(320, 240), fps=10.0)
    rows = [r for r in json.loads(VAL_RESULTS.read_text()) if r["image_id"] == 785][:2]
    poses = []
    for f in range(4):
        for t, r in enumerate(rows):
            k = np.array(r["keypoints"], dtype=np.float64).reshape(17, 3)
            k[:, :2] -= offsets[f]
            poses.append({"image_id": f, "category_id": 1, "keypoints": k.reshape(-1).tolist(), "score": r["score"],
                          "track_id": t + 1})
    (tmp_path / "poses.json").write_text(json.dumps(poses))
    video = ["refine-video", "--checkpoint", str(files[0]), "--video", str(tmp_path / "clip.mp4"), "--input",
             str(tmp_path / "poses.json"), "--quiet"]
    image_run = ["refine", "--checkpoint", str(files[0]), "--images", str(IMAGES), "--input", str(VAL_RESULTS),
                 "--quiet"]
    for name, args in (("video", video), ("images", image_run)):
        a, b = tmp_path / f"{name}_torch.json", tmp_path / f"{name}_ort.json"
        assert main(args + ["--out", str(a)]) == 0
        assert main(args + ["--out", str(b), "--backend", "onnxruntime"]) == 0
        ka, kb = (np.array([r["keypoints"] for r in json.loads(p.read_text())]).reshape(-1, 17, 3) for p in (a, b))
        assert ka.shape == kb.shape and ka.shape[0] > 0
        assert np.abs(ka[..., :2] - kb[..., :2]).max() < 4 * PX, name
        assert np.abs(ka[..., 2] - kb[..., 2]).max() < 4 * CONF, name
