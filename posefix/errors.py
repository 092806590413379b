"""The errors posefix raises: bad input (every message names the offending field), a missing optional extra."""
from __future__ import annotations

import importlib


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


class MissingExtra(PosefixError):
    """An optional dependency is not installed; the message names the extra that brings it."""


def require(module: str, extra: str, purpose: str):
    """Import and return ``module`` (an optional dependency, in the extra ``extra``), or raise
    :class:`MissingExtra` with one line naming what needs it (``purpose``) and the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtra(f"{purpose} needs the {extra} extra: pip install 'posefix[{extra}]'") from None
