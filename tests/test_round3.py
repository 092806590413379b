"""Reliability, round three: no command destroys its own input, killed writers' leftovers are removed,
outputs get the umask's mode, hostile files and arguments are one line (docs/reliability.md)."""
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from posefix import SAMPLE_DIR
from posefix.cli import main

from .test_reliability import _one_error_line

IMAGES = SAMPLE_DIR / "images"
RESULTS = SAMPLE_DIR / "topdown_keypoints_val4.json"
VAL_GT = SAMPLE_DIR / "person_keypoints_val_sample.json"


def _digests(folder: Path) -> dict:
    """Every file under ``folder`` (links as links) → its SHA-256, so that any change shows."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_symlink():
            out[str(p)] = "-> " + os.readlink(p)
        elif p.is_file():
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
        else:
            out[str(p)] = "dir"
    return out


@pytest.fixture
def workspace(tmp_path, checkpoint):
    """A copy of the sample images, results and the checkpoint, to be attacked."""
    images = tmp_path / "images"
    shutil.copytree(IMAGES, images)
    shutil.copy(RESULTS, tmp_path / "results.json")
    shutil.copy(checkpoint, tmp_path / "model.safetensors")
    return tmp_path


# 1. No output replaces or deletes an input of the same command, under any naming.

def test_no_command_writes_over_or_deletes_its_own_input(workspace, capsys):
    w = workspace
    image = w / "images" / "000000000785.jpg"
    (w / "link.json").symlink_to(w / "results.json")
    os.link(w / "results.json", w / "hard.json")
    (w / "repo").mkdir()
    (w / "repo" / "precious").mkdir()
    (w / "repo" / "precious" / "thesis.txt").write_text("years of work")
    before = _digests(w)
    refine = ["refine", "--checkpoint", w / "model.safetensors", "--images", w / "images", "--quiet"]
    attacks = [
        # an output inside --images: the JPEG itself, by a plain and a roundabout name
        (refine + ["--input", w / "results.json", "--out", image], "--out"),
        (refine + ["--input", w / "results.json", "--out", w / "images" / ".." / "images" / image.name], "--out"),
        # the input through a symbolic link and a hard link
        (refine + ["--input", w / "link.json", "--out", w / "results.json"], "--out"),
        (refine + ["--input", w / "results.json", "--out", w / "hard.json"], "--out"),
        # a shard's name that is the input
        (refine + ["--input", w / "r-00000-of-00001.json", "--out", w / "r.json", "--shards", "1",
                   "--ray"], "--shards"),
        # fit-choice over its images and its checkpoint
        (["fit-choice", "--checkpoint", w / "model.safetensors", "--images", w / "images", "--input",
          w / "results.json", "--annotations", VAL_GT, "--out", w / "link.json"], "--out"),
        # export: the Triton model directory holding the checkpoint, the ONNX file over the checkpoint
        (["export", "--checkpoint", w / "repo" / "m" / "model.safetensors", "--triton", w / "repo",
          "--triton-name", "m"], "--triton"),
        (["export", "--checkpoint", w / "model.safetensors", "--onnx", w / "model.safetensors"], "--onnx"),
        # a training run written into its own images
        (["train", "--preset", "cpu-small", "--set", f"data.train_annotations={VAL_GT}", "--set",
          f"data.train_images={w / 'images'}", "--out", w / "images"], "--out"),
        # an index written among the images it indexes
        (["index", "build", "--results", w / "results.json", "--images", w / "images", "--out",
          w / "images" / "x.index"], "--out"),
    ]
    (w / "repo" / "m").mkdir()
    shutil.copy(w / "model.safetensors", w / "repo" / "m" / "model.safetensors")
    shutil.copy(w / "results.json", w / "r-00000-of-00001.json")
    before = _digests(w)
    for argv, field in attacks:
        err = _one_error_line(capsys, argv)
        assert f"{field}: " in err and "input" in err, (argv, err)
        assert _digests(w) == before, argv
    # Triton never deletes what it did not write: a directory of other files, a file, a symbolic link
    export = ["export", "--checkpoint", w / "model.safetensors", "--triton", w / "repo"]
    (w / "repo" / "afile").write_text("mine")
    (w / "repo" / "alink").symlink_to(w / "images")
    before = _digests(w)
    for name in ("precious", "afile", "alink"):
        err = _one_error_line(capsys, export + ["--triton-name", name])
        assert "--triton: " in err and "refusing to replace it" in err, err
        assert _digests(w) == before


def test_triton_names_and_repositories_are_checked(workspace, capsys):
    w = workspace
    (w / "afile").write_text("x")
    export = ["export", "--checkpoint", w / "model.safetensors"]
    for name in ("../x", str(w / "abs"), 'a"b', "", ".hidden", "a/b"):
        assert "--triton-name: " in _one_error_line(capsys, export + ["--triton", w / "repo", "--triton-name", name])
    assert "--triton: " in _one_error_line(capsys, export + ["--triton", w / "afile"])
    assert sorted(p.name for p in w.iterdir()) == ["afile", "images", "model.safetensors", "results.json"]


# 2. Leftovers of killed writers are removed by a rerun; 12. every output gets the umask's mode.

def test_a_rerun_removes_what_a_killed_writer_left_and_outputs_get_the_umask_mode(workspace):
    w = workspace
    # A temporary of a process that no longer runs, as a kill leaves one, beside each output.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    fitted, repo = w / "fitted.safetensors", w / "repo"
    repo.mkdir()
    stale_file = w / f".fitted.safetensors.{dead.pid}.abc.posefix-tmp"
    stale_file.write_bytes(b"\0" * 1000)
    stale_dir = repo / f".m.{dead.pid}.abc.posefix-tmp"
    (stale_dir / "1").mkdir(parents=True)
    old = os.umask(0o002)
    try:
        assert main(["fit-choice", "--checkpoint", str(w / "model.safetensors"), "--images", str(w / "images"),
                     "--input", str(w / "results.json"), "--annotations", str(VAL_GT), "--out", str(fitted)]) == 0
        assert main(["export", "--checkpoint", str(w / "model.safetensors"), "--triton", str(repo),
                     "--triton-name", "m"]) == 0
        assert main(["export", "--checkpoint", str(w / "model.safetensors"), "--triton", str(repo),
                     "--triton-name", "m"]) == 0  # replaces its own earlier model directory
    finally:
        os.umask(old)
    assert not stale_file.exists() and not stale_dir.exists()
    assert sorted(p.name for p in w.iterdir() if p.name.startswith(".")) == []
    assert sorted(p.name for p in repo.iterdir()) == ["m"]
    assert fitted.stat().st_mode & 0o777 == 0o664
    assert (repo / "m").stat().st_mode & 0o777 == 0o775
    assert (repo / "m" / "1").stat().st_mode & 0o777 == 0o775
    assert (repo / "m" / "1" / "model.onnx").stat().st_mode & 0o777 == 0o664
    assert not [p for p in w.iterdir() if p.name.startswith(".tmp")]  # safetensors' own temporary files


def test_train_writes_its_weights_with_the_umask_mode(tmp_path):
    from posefix.model import ModelConfig, PoseFixNet
    from posefix.weights import export_weights

    old = os.umask(0o022)
    try:
        export_weights(PoseFixNet(ModelConfig(backbone="resnet18", input_size=(64, 64), head_channels=16)),
                       tmp_path / "model.safetensors", {"step": 0})
    finally:
        os.umask(old)
    assert (tmp_path / "model.safetensors").stat().st_mode & 0o777 == 0o644


def test_index_add_writes_through_a_symbolic_link(tmp_path):
    from posefix.search import PoseIndex

    index = tmp_path / "real.index"
    assert main(["index", "build", "--results", str(RESULTS), "--out", str(index), "--method", "exact"]) == 0
    n = len(PoseIndex.load(index))
    link = tmp_path / "link.index"
    link.symlink_to(index)
    assert main(["index", "add", "--index", str(link), "--results", str(RESULTS)]) == 0
    assert link.is_symlink() and len(PoseIndex.load(index)) == 2 * n


# 8. ONNX files whose graph is not what posefix needs: one line naming the file, at load or at the first batch.

@pytest.fixture(scope="module")
def small_onnx(tmp_path_factory):
    import torch

    from posefix.model import ModelConfig, PoseFixNet
    from posefix.weights import export_weights

    d = tmp_path_factory.mktemp("onnx")
    torch.manual_seed(0)
    export_weights(PoseFixNet(ModelConfig(backbone="resnet18", input_size=(64, 64), sigma=2.0, head_channels=16)),
                   d / "good.safetensors", {})
    assert main(["export", "--checkpoint", str(d / "good.safetensors"), "--onnx", str(d / "good.onnx")]) == 0
    return d


def _mutated(small_onnx, name, change):
    import onnx

    model = onnx.load(str(small_onnx / "good.onnx"))
    change(model)
    path = small_onnx / f"{name}.onnx"
    onnx.save(model, str(path))
    return path


def _set_meta(model, key, value):
    next(p for p in model.metadata_props if p.key == key).value = value


def test_onnx_models_that_do_not_fit_are_one_line(small_onnx, capsys):
    import json as json_

    import onnx
    from onnx import helper

    def config_disagrees(m):
        cfg = json_.loads(next(p.value for p in m.metadata_props if p.key == "posefix_model_config"))
        _set_meta(m, "posefix_model_config", json_.dumps({**cfg, "input_size": [96, 64]}))

    def drop_output(m):
        keep = [o for o in m.graph.output if o.name != "input_confidence_logit"]
        del m.graph.output[:]
        m.graph.output.extend(keep)
        outs = json_.loads(next(p.value for p in m.metadata_props if p.key == "posefix_outputs"))
        _set_meta(m, "posefix_outputs", json_.dumps([o for o in outs if o != "input_confidence_logit"]))

    def coords_rank(m):  # coords flattened to (N, 34) by a Reshape after the graph's own
        out = next(o for o in m.graph.output if o.name == "coords")
        producer = next(n for n in m.graph.node if "coords" in n.output)
        producer.output[list(producer.output).index("coords")] = "coords_3d"
        m.graph.initializer.append(helper.make_tensor("flat", onnx.TensorProto.INT64, [2], [0, -1]))
        m.graph.node.append(helper.make_node("Reshape", ["coords_3d", "flat"], ["coords"]))
        del out.type.tensor_type.shape.dim[:]
        out.type.tensor_type.shape.dim.add().dim_param = "N"
        out.type.tensor_type.shape.dim.add().dim_value = 34

    def huge_constant(m):  # an extra output of 2^40 floats, made at run time
        m.graph.initializer.append(helper.make_tensor("huge_shape", onnx.TensorProto.INT64, [1], [1 << 40]))
        m.graph.node.append(helper.make_node("ConstantOfShape", ["huge_shape"], ["huge"],
                                             value=helper.make_tensor("v", onnx.TensorProto.FLOAT, [1], [1.0])))
        m.graph.output.append(helper.make_tensor_value_info("huge", onnx.TensorProto.FLOAT, [1 << 40]))
        outs = json_.loads(next(p.value for p in m.metadata_props if p.key == "posefix_outputs"))
        _set_meta(m, "posefix_outputs", json_.dumps([*outs, "huge"]))

    cases = {"config": (config_disagrees, "input 'image' has shape"),
             "missing": (drop_output, "has no output 'input_confidence_logit'"),
             "rank": (coords_rank, "output 'coords' has shape"),
             "huge": (huge_constant, "ONNX Runtime failed to run the model")}
    for name, (change, message) in cases.items():
        path = _mutated(small_onnx, name, change)
        refine = ["refine", "--onnx", path, "--images", IMAGES, "--input", RESULTS, "--out",
                  small_onnx / "out.json", "--quiet"]
        err = _one_error_line(capsys, refine)
        assert f"{path}: " in err and message in err, (name, err)
        assert not (small_onnx / "out.json").exists()


# 9. A fitted-choice entry nested too deep is one line, like the model-config entry.

def test_a_deeply_nested_fitted_choice_is_one_line(small_onnx, capsys):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from posefix.choice import METADATA_KEY

    good = small_onnx / "good.safetensors"
    with safe_open(str(good), framework="pt") as f:
        meta = dict(f.metadata())
        state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    for n, value in enumerate(["[" * 100_000 + "]" * 100_000, '{"version": 1, "mean": ' + "[" * 100_000 + "]" * 100_000
                               + "}"]):
        bad = small_onnx / f"deep{n}.safetensors"
        save_file(state, str(bad), metadata={**meta, METADATA_KEY: value})
        err = _one_error_line(capsys, ["refine", "--checkpoint", bad, "--images", IMAGES, "--input", RESULTS,
                                       "--out", small_onnx / "out.json", "--quiet"])
        assert f"{bad}: {METADATA_KEY}: " in err, err


# 10. Image files offline: a header declaring more pixels than the limit is refused before decoding.

def _png_header_only(height, width) -> bytes:
    """A PNG whose IHDR declares height × width (its image data is a few bytes: a decompression bomb's shape)."""
    import struct
    import zlib

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_offline_commands_refuse_images_above_the_pixel_limit_before_decoding(tmp_path, checkpoint, capsys,
                                                                               monkeypatch):
    import json as json_

    import PIL.Image

    images = tmp_path / "images"
    images.mkdir()
    (images / "000000000785.jpg").write_bytes(_png_header_only(20_000, 20_000))
    results = [r for r in json_.loads(RESULTS.read_text()) if r["image_id"] == 785]
    (tmp_path / "r.json").write_text(json_.dumps(results))
    decoded = []
    monkeypatch.setattr(PIL.Image, "open", lambda *a, **k: decoded.append(1))  # the decoder
    refine = ["refine", "--checkpoint", checkpoint, "--images", images, "--input", tmp_path / "r.json",
              "--out", tmp_path / "out.json", "--quiet"]
    err = _one_error_line(capsys, refine)
    assert "000000000785.jpg" in err and "20000×20000 pixels exceed the limit of 67108864" in err, err
    assert "--max-image-pixels" in err and not decoded and not (tmp_path / "out.json").exists()
    # The limit is an option: raised, the header passes and the file's data is checked next.
    err = _one_error_line(capsys, refine + ["--max-image-pixels", str(20_000 * 20_000)])
    assert "exceed the limit" not in err and "truncated" in err, err
    # ...and lowered below a real image, the real image is refused.
    shutil.copy(IMAGES / "000000000785.jpg", images / "000000000785.jpg")
    monkeypatch.undo()
    err = _one_error_line(capsys, refine + ["--max-image-pixels", "1000"])
    assert "exceed the limit of 1000 pixels" in err
    assert main([str(a) for a in refine]) == 0  # the default again, without the option


# 11. Small ones: scores at float64's edge, an empty approximate index, ids beyond int64.

def test_instance_scores_at_float64s_edge_stay_finite_and_equal_a_plain_formula():
    import numpy as np

    from posefix.choice import instance_scores

    rng = np.random.default_rng(3)
    conf = rng.random((50, 17))
    present = rng.random((50, 17)) < 0.8
    scores = np.concatenate([rng.random(25), rng.uniform(1e307, 1.7e308, 25)])
    got = instance_scores(scores, conf, present, "raw")
    plain = np.array([s * (sum(float(c) for c, p in zip(cs, ps) if p) / max(int(ps.sum()), 1))
                      for s, cs, ps in zip(scores, conf, present)])
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, plain, rtol=1e-12)


def test_fit_choice_accepts_the_scores_refine_accepts(tmp_path, checkpoint):
    import json as json_

    results = json_.loads(RESULTS.read_text())
    for r in results:
        r["score"] = 1e308
    (tmp_path / "r.json").write_text(json_.dumps(results))
    assert main(["fit-choice", "--checkpoint", str(checkpoint), "--images", str(IMAGES), "--input",
                 str(tmp_path / "r.json"), "--annotations", str(VAL_GT), "--out", str(tmp_path / "f.safetensors")]) == 0
    assert main(["refine", "--checkpoint", str(tmp_path / "f.safetensors"), "--images", str(IMAGES), "--input",
                 str(tmp_path / "r.json"), "--out", str(tmp_path / "out.json"), "--output", "raw", "--quiet"]) == 0


def test_index_build_refuses_an_empty_ivf_and_ids_beyond_int64(tmp_path, capsys):
    import json as json_

    (tmp_path / "empty.json").write_text("[]")
    err = _one_error_line(capsys, ["index", "build", "--results", tmp_path / "empty.json", "--out",
                                   tmp_path / "x.index", "--method", "ivf"])
    assert "--results: " in err and "ivf" in err
    results = json_.loads(RESULTS.read_text())
    for i, r in enumerate(results):
        r["id"] = i
    results[3]["id"] = 2 ** 70
    (tmp_path / "ids.json").write_text(json_.dumps(results))
    err = _one_error_line(capsys, ["index", "build", "--results", tmp_path / "ids.json", "--out", tmp_path / "x.index"])
    assert "--results[3].id: must be an integer in the int64 range" in err, err
    assert not (tmp_path / "x.index").exists()
