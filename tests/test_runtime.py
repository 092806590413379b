"""keep_freed_memory: a freed large block is reused, not faulted in afresh."""
import platform
import subprocess
import sys

import pytest

PROGRAM = r"""
import resource, sys, torch
if sys.argv[1] == "keep":
    from posefix.runtime import keep_freed_memory
    assert keep_freed_memory()
faults = []
for _ in range(6):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = torch.ones(16 * 2 ** 20)  # 64 MiB, written once
    del block
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(min(faults[2:]))
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_freed_blocks_are_reused_without_page_faults():
    faults = {mode: int(subprocess.run([sys.executable, "-c", PROGRAM, mode], capture_output=True, text=True,
                                       check=True).stdout) for mode in ("default", "keep")}
    pages = 64 * 2 ** 20 // 4096
    assert faults["default"] > pages // 2  # each fresh block faults its pages in
    assert faults["keep"] < pages // 20  # the kept block is reused
