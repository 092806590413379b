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

IMAGES = SAMPLE_DIR / "images"
RESULTS = SAMPLE_DIR / "topdown_keypoints_val4.json"
VAL_GT = SAMPLE_DIR / "person_keypoints_val_sample.json"


def _one_error_line(capsys, argv) -> str:
    capsys.readouterr()
    rc = main([str(a) for a in argv])  # an exception escaping main fails the test: no traceback
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and err.startswith("posefix: error: "), (argv, rc, err)
    return err


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
    from posefix.engine import export_weights
    from posefix.model import ModelConfig, PoseFixNet

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
