"""The committed posefix/_proto is what scripts/gen_proto.py makes of proto/posefix/v1/*.proto today.

Lines that only record the generating tools' versions are compared without the version, so a
different grpcio-tools release passes as long as the code it generates is the same."""
import difflib
import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
COMMITTED = ROOT / "posefix" / "_proto"
VERSION_LINES = [
    (re.compile(r"^# Protobuf Python Version: .*$", re.MULTILINE), "# Protobuf Python Version: X"),
    (re.compile(r"ValidateProtobufRuntimeVersion\([^)]*\)", re.DOTALL), "ValidateProtobufRuntimeVersion(X)"),
    (re.compile(r"^GRPC_GENERATED_VERSION = .*$", re.MULTILINE), "GRPC_GENERATED_VERSION = X"),
]


def _load_gen_proto():
    spec = importlib.util.spec_from_file_location("gen_proto", ROOT / "scripts" / "gen_proto.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _normalised(path: Path) -> str:
    text = path.read_text()
    for pattern, replacement in VERSION_LINES:
        text = pattern.sub(replacement, text)
    return text


def test_committed_generated_code_is_up_to_date(tmp_path):
    pytest.importorskip("grpc_tools", reason="grpcio-tools regenerates the code")
    gen = _load_gen_proto()
    written = gen.generate(tmp_path)
    fresh = {p.relative_to(tmp_path) for p in written}
    committed = {p.relative_to(COMMITTED) for p in COMMITTED.rglob("*")
                 if p.is_file() and p.suffix in (".py", ".pyi") and p != COMMITTED / "__init__.py"}
    hint = "run: python scripts/gen_proto.py"
    assert fresh == committed, f"generated files differ from the committed ones ({hint}): " \
                               f"missing {sorted(map(str, fresh - committed))}, " \
                               f"stale {sorted(map(str, committed - fresh))}"
    for rel in sorted(fresh):
        new, old = _normalised(tmp_path / rel), _normalised(COMMITTED / rel)
        if new != old:
            diff = "".join(difflib.unified_diff(old.splitlines(True), new.splitlines(True),
                                                f"committed/{rel}", f"generated/{rel}", n=1))
            pytest.fail(f"posefix/_proto/{rel} is out of date with the .proto ({hint}):\n{diff[:3000]}")


def test_generated_code_imports_from_the_package():
    from posefix._proto import SERVICE_NAME, pb2, pb2_grpc

    assert SERVICE_NAME == "posefix.v1.PoseRefiner"
    assert pb2.DESCRIPTOR.name == "posefix/v1/posefix.proto"
    assert hasattr(pb2_grpc, "PoseRefinerStub")
