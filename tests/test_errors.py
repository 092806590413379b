"""One way to report a missing optional extra: posefix.errors.require and MissingExtra."""
import sys

import pytest

from posefix.errors import MissingExtra, PosefixError, require


def test_require_returns_the_module():
    assert require("json", "none", "reading") is sys.modules["json"]


def test_a_missing_module_names_the_extra_and_what_needs_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "posefix_no_such_module", None)
    with pytest.raises(MissingExtra) as err:
        require("posefix_no_such_module", "things", "doing this")
    assert str(err.value) == "doing this needs the things extra: pip install 'posefix[things]'"
    assert isinstance(err.value, PosefixError) and not isinstance(err.value, ValueError)


def test_the_onnx_helper_names_the_onnx_extra(monkeypatch):
    onnx_backend = pytest.importorskip("posefix.onnx_backend")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(MissingExtra,
                       match=r"^--backend onnxruntime needs the onnx extra: pip install 'posefix\[onnx\]'$"):
        onnx_backend.require("onnxruntime", "--backend onnxruntime")
