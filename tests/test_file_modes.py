"""Outputs of the atomic writer get the mode the umask gives any new file, not mkstemp's 0600."""
import os

import pytest

from posefix.fileio import atomic_path, write_json_atomic


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_atomic_outputs_get_the_umask_mode(tmp_path, umask):
    old = os.umask(umask)
    try:
        plain = tmp_path / "plain.txt"
        plain.write_text("x")  # how any new file comes out under this umask
        write_json_atomic(tmp_path / "out.json", {"a": 1})
        with atomic_path(tmp_path / "model.bin") as tmp:
            tmp.write_bytes(b"\0")
    finally:
        os.umask(old)
    want = plain.stat().st_mode & 0o777
    assert want == 0o666 & ~umask
    for name in ("out.json", "model.bin"):
        assert (tmp_path / name).stat().st_mode & 0o777 == want, name
