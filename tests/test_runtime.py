"""keep_freed_memory: repeated model calls of one shape reuse their memory instead of faulting it in afresh."""
import json
import platform
import subprocess
import sys

import pytest

PROGRAM = r"""
import json, resource, sys, torch, torchvision
if sys.argv[1] == "keep":
    from posefix.runtime import keep_freed_memory
    assert keep_freed_memory()
torch.set_num_threads(1)
model = torchvision.models.resnet18().eval()
image = torch.rand(8, 3, 256, 192)
faults = []
with torch.no_grad():
    for _ in range(7):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        model(image)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"faults": faults, "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_calls_of_one_shape_reuse_their_memory():
    runs = {mode: json.loads(subprocess.run([sys.executable, "-c", PROGRAM, mode], capture_output=True, text=True,
                                            check=True).stdout) for mode in ("default", "keep")}
    default, keep = runs["default"]["faults"][3:], runs["keep"]["faults"][3:]
    assert min(default) > 2000  # each call faults its activations' pages in again
    # After the first calls the same memory serves the calls: at most one of them (the kernel may move a page
    # now and then, e.g. merging huge pages) faults in more than a twentieth of what a call faults by default.
    assert sum(f > 0.05 * min(default) for f in keep) <= 1, (keep, default)
    assert sum(keep) < 0.25 * sum(default)
    assert runs["keep"]["rss_mb"] < 1.2 * runs["default"]["rss_mb"]
