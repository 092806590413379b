"""The weights file: the same weights and metadata are the same bytes in every process, and read back as
written."""
import json
import subprocess
import sys

import torch
from safetensors import safe_open

from posefix.weights import canonical_header, read_safetensors, save_safetensors

WRITE = """
import sys, torch
from posefix.weights import save_safetensors
state = {"b.weight": torch.arange(6, dtype=torch.float32).reshape(2, 3), "a": torch.ones(5, dtype=torch.int64)}
meta = {f"key{i}": f"value {i} é" for i in range(12)}
save_safetensors(state, sys.argv[1], meta)
"""


def test_the_same_weights_are_the_same_bytes_in_every_process(tmp_path):
    files = [tmp_path / f"w{i}.safetensors" for i in range(4)]
    for f in files:  # a process each: safetensors' metadata order changes between processes
        subprocess.run([sys.executable, "-c", WRITE, str(f)], check=True)
    assert len({f.read_bytes() for f in files}) == 1
    state, meta = read_safetensors(files[0])
    assert meta == {f"key{i}": f"value {i} é" for i in range(12)}
    assert torch.equal(state["b.weight"], torch.arange(6, dtype=torch.float32).reshape(2, 3))
    assert torch.equal(state["a"], torch.ones(5, dtype=torch.int64))


def test_the_canonical_header_is_a_valid_aligned_header_with_the_same_tensors(tmp_path):
    from safetensors.torch import save

    state = {"x": torch.randn(3, 4, generator=torch.Generator().manual_seed(0)), "y": torch.zeros(1)}
    for meta in ({"z": "1", "a": "2", "m": json.dumps({"deep": [1, 2]})}, {}, {"only": "one"}):
        raw = save(state, metadata=meta)
        out = canonical_header(raw)
        n = int.from_bytes(out[:8], "little")
        assert n % 8 == 0 and out[8 + n:] == raw[8 + int.from_bytes(raw[:8], "little"):]
        header = json.loads(out[8:8 + n])
        assert list(header.get("__metadata__", {})) == sorted(meta)
        path = tmp_path / "w.safetensors"
        save_safetensors(state, path, meta)
        with safe_open(str(path), framework="pt") as f:
            assert (f.metadata() or {}) == meta
            assert all(torch.equal(f.get_tensor(k), v) for k, v in state.items())
