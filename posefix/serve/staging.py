"""Pinned staging: decoded images of calls in flight in page-locked host memory, so that their copies to a
GPU wait for nothing, within a budget of bytes (page-locked memory is the machine's)."""
from __future__ import annotations

import threading
import weakref
from collections.abc import Callable

import torch


class PinnedBudget:
    """At most ``limit`` bytes of the images of calls in flight staged in pinned (page-locked) host memory, for
    asynchronous copies to a GPU; past it an image stays in ordinary memory (its copy then waits for the
    device). The bytes of an image come back when its tensor is freed."""

    def __init__(self, limit: int):
        self.limit, self.used = limit, 0
        self._lock = threading.Lock()

    def stage(self, stage: Callable[[torch.Tensor], torch.Tensor], image: torch.Tensor) -> torch.Tensor:
        size = image.numel() * image.element_size()
        with self._lock:
            if self.used + size > self.limit:
                return image
            self.used += size
        try:
            staged = stage(image)
        except BaseException:
            self._release(size)
            raise
        if staged is image:  # nothing was pinned (a CPU refiner)
            self._release(size)
        else:
            weakref.finalize(staged, self._release, size)
        return staged

    def _release(self, size: int) -> None:
        with self._lock:
            self.used -= size
