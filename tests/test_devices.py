"""posefix.devices.resolve_device, the one reading of --device, and the commands that take it, on machines with
and without CUDA devices (torch's view of them replaced in the tests that need one)."""
import pytest
import torch

from posefix import SAMPLE_DIR
from posefix.cli import build_parser, main
from posefix.devices import resolve_device
from posefix.errors import InputError

MODEL_COMMANDS = ("refine", "refine-video", "fit-choice", "search", "serve")


def _cuda(monkeypatch, count: int):
    """torch sees ``count`` CUDA devices."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


def test_cpu_and_other_torch_devices_resolve_as_named():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    assert resolve_device("meta") == torch.device("meta")


def test_auto_is_cuda_where_there_is_one(monkeypatch):
    _cuda(monkeypatch, 0)
    assert resolve_device("auto") == torch.device("cpu")
    _cuda(monkeypatch, 2)
    assert resolve_device("auto") == torch.device("cuda")


def test_cuda_and_cuda_n_on_a_machine_with_two(monkeypatch):
    _cuda(monkeypatch, 2)
    assert resolve_device("cuda") == torch.device("cuda")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device(torch.device("cuda", 0)) == torch.device("cuda", 0)
    with pytest.raises(InputError, match=r"^--device: cuda:2: this machine has 2 CUDA device\(s\), cuda:0 to cuda:1$"):
        resolve_device("cuda:2")


@pytest.mark.parametrize("name", ["cuda", "cuda:0", "auto"])
def test_cuda_without_a_cuda_device(monkeypatch, name):
    _cuda(monkeypatch, 0)
    if name == "auto":
        assert resolve_device(name).type == "cpu"
        return
    with pytest.raises(InputError, match=f"^--device: {name} was asked for but no CUDA device is available$"):
        resolve_device(name)


@pytest.mark.parametrize("name", ["gpu0", "cuda:x", "", "cpu:-1x"])
def test_names_that_are_no_device_name_the_option(name):
    with pytest.raises(InputError, match="^train.device: ") as e:
        resolve_device(name, "train.device")
    assert len(str(e.value).splitlines()) == 1


def test_train_device(monkeypatch):
    from posefix.train import _device

    with pytest.raises(InputError, match="^train.device: must be auto, cpu, cuda or cuda:N, got 'meta'$"):
        _device("meta")
    _cuda(monkeypatch, 0)
    assert _device("auto") == torch.device("cpu")
    with pytest.raises(InputError, match="^train.device: cuda was asked for but no CUDA device is available$"):
        _device("cuda")
    _cuda(monkeypatch, 2)
    assert _device("cuda") == torch.device("cuda") and _device("cuda:1") == torch.device("cuda", 1)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert _device("cuda") == torch.device("cuda")  # each process's LOCAL_RANK GPU, chosen once they are set up
    with pytest.raises(InputError, match="^train.device: cuda:1 would put every process on one GPU"):
        _device("cuda:1")


def _subparsers(parser):
    return next(a for a in parser._actions if a.dest == "command").choices


@pytest.mark.parametrize("command", MODEL_COMMANDS)
def test_every_command_takes_cuda_n_and_says_so(command):
    sub = _subparsers(build_parser())[command]
    device = next(a for a in sub._actions if "--device" in a.option_strings)
    assert device.choices is None and "cuda:N" in device.help and "auto" in device.help
    assert device.default == ("auto" if command == "serve" else "cpu")
    required = {"refine": ["--images", "i", "--input", "p", "--out", "o"],
                "refine-video": ["--video", "v", "--input", "p", "--out", "o"],
                "fit-choice": ["--checkpoint", "c", "--images", "i", "--input", "p", "--annotations", "a",
                               "--out", "o"],
                "search": ["--index", "x", "--query", "q"], "serve": []}[command]
    assert build_parser().parse_args([command, *required, "--device", "cuda:3"]).device == "cuda:3"


def test_refine_names_a_cuda_index_beyond_the_machine_in_one_line(monkeypatch, tmp_path, capsys):
    _cuda(monkeypatch, 1)
    out = tmp_path / "out.json"
    code = main(["refine", "--checkpoint", str(tmp_path / "never-read.safetensors"), "--images",
                 str(SAMPLE_DIR / "images"), "--input", str(SAMPLE_DIR / "topdown_keypoints_val4.json"),
                 "--annotations", str(SAMPLE_DIR / "person_keypoints_val_sample.json"), "--out", str(out),
                 "--device", "cuda:1"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and not out.exists()
    assert err == "posefix: error: --device: cuda:1: this machine has 1 CUDA device(s), cuda:0 to cuda:0"
