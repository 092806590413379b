"""posefix.serve.staging: the budget of pinned host memory for decoded images of calls in flight."""
import gc

import pytest
import torch

from posefix.serve.staging import PinnedBudget


def test_pinned_images_stay_within_their_budget():
    """Decoded images staged for a GPU (pinned) count against the server's budget until they are freed;
    past it an image is left as it is. A stand-in copies where pin_memory would (no GPU needed)."""
    budget = PinnedBudget(3000)
    pin = torch.Tensor.clone
    first = budget.stage(pin, torch.zeros(1000, dtype=torch.uint8))
    second = budget.stage(pin, torch.zeros(500, dtype=torch.int16))  # 1000 bytes
    assert budget.used == 2000
    over = torch.zeros(1001, dtype=torch.uint8)
    assert budget.stage(pin, over) is over and budget.used == 2000  # would pass the budget: not staged
    del first
    gc.collect()
    assert budget.used == 1000
    kept = torch.zeros(10, dtype=torch.uint8)
    assert budget.stage(lambda t: t, kept) is kept and budget.used == 1000  # nothing pinned (a CPU refiner)

    def broken(t):
        raise RuntimeError("no pinned memory")

    with pytest.raises(RuntimeError):
        budget.stage(broken, torch.zeros(5, dtype=torch.uint8))
    assert budget.used == 1000
    del second
    gc.collect()
    assert budget.used == 0
