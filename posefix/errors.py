"""The errors posefix raises for bad input. Every message names the offending field."""
from __future__ import annotations


class PosefixError(Exception):
    """Base class of every error posefix raises on purpose."""


class InputError(PosefixError, ValueError):
    """Input data (a file, a request, an argument) is malformed.

    ``field`` locates the offending value, e.g. ``annotations[12].keypoints``; ``source`` names the
    file or request it came from, where there is one.
    """

    def __init__(self, field: str, problem: str, source: str | None = None):
        self.field = field
        self.problem = problem
        self.source = source
        where = f"{source}: " if source else ""
        super().__init__(f"{where}{field}: {problem}")
