"""The smoothers by name: the registry :data:`SMOOTHERS` (the smoothers themselves are in
:mod:`posefix.temporal.smoothers` and :mod:`posefix.temporal.learned`).

:data:`SMOOTHERS` maps a name to a factory ``make(**options) -> smoother``; ``posefix refine-video
--smoother NAME``, the stream (StreamOptions.temporal.smoother) and ``benchmarks/bench_temporal.py`` list it,
so a smoother registered here (in this dict, at import; a factory may import its module lazily) appears in
each of them. Options the command line and the benchmark pass to every factory: ``weights`` (the path given as
``--temporal-weights``, None when not given; a factory that needs none ignores it). A factory raises
:class:`posefix.errors.InputError` naming the option (``smoother.NAME``) for a bad one.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..errors import InputError
from .smoothers import BodySmoother, NoSmoother, PlainSmoother, Smoother


def _check_int(options: dict, name: str, default: int, lo: int, hi: int) -> int:
    value = options.get(name, default)
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or not lo <= value <= hi:
        raise InputError(f"smoother.{name}", f"must be an integer in [{lo}, {hi}], got {value!r}")
    return int(value)


def _check_float(options: dict, name: str, default: float, lo: float, hi: float) -> float:
    value = options.get(name, default)
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)) \
            or not lo <= float(value) <= hi:  # NaN included
        raise InputError(f"smoother.{name}", f"must be a number in [{lo:g}, {hi:g}], got {value!r}")
    return float(value)


def _unknown(options: dict, known: set[str]) -> None:
    for name in options:
        if name not in known | {"weights"}:
            raise InputError(f"smoother.{name}", f"unknown option; known: {sorted(known)}")


def _make_body(**options) -> Smoother:
    known = {"joint_noise", "body_noise", "body_power", "noise_cap", "gamma", "causal_gamma", "floor"}
    _unknown(options, known)
    d = BodySmoother()
    return BodySmoother(joint_noise=_check_float(options, "joint_noise", d.joint_noise, 1e-6, 100.0),
                        body_noise=_check_float(options, "body_noise", d.body_noise, 1e-6, 100.0),
                        body_power=_check_float(options, "body_power", d.body_power, 0.0, 10.0),
                        noise_cap=_check_float(options, "noise_cap", d.noise_cap, 1e-6, 100.0),
                        gamma=_check_float(options, "gamma", d.gamma, 0.0, 100.0),
                        causal_gamma=_check_float(options, "causal_gamma", d.causal_gamma, 0.0, 100.0),
                        floor=_check_float(options, "floor", d.floor, 1e-6, 1.0))


def _make_plain(window: int, degree: int):
    def make(**options) -> Smoother:
        _unknown(options, {"window"})
        return PlainSmoother(_check_int(options, "window", window, 1, 301), degree)
    return make


def _make_none(**options) -> Smoother:
    _unknown(options, set())
    return NoSmoother()


def _make_learned(**options) -> Smoother:
    _unknown(options, {"weights"})
    weights = options.get("weights")
    if weights is None:
        raise InputError("weights", "the learned smoother needs its weights (--temporal-weights FILE from "
                         "posefix train-temporal)")
    from .learned import LearnedSmoother  # start-up time: torch is imported only when a learned smoother is made

    return LearnedSmoother.load(weights)


_make_learned.needs_weights = True  # made only with --temporal-weights (listings skip it without)


SMOOTHERS: dict[str, Callable[..., Smoother]] = {
    "body": _make_body,
    "sg9": _make_plain(9, 2),
    "ma9": _make_plain(9, 0),
    "none": _make_none,
    "learned": _make_learned,
}
DEFAULT_SMOOTHER = "body"


def needs_weights(name: str) -> bool:
    """Whether the smoother registered as ``name`` is made only from a weights file."""
    return getattr(SMOOTHERS[name], "needs_weights", False)


def make_smoother(name: str, **options) -> Smoother:
    """The smoother registered as ``name``, made with ``options``; an unknown name is an InputError."""
    if name not in SMOOTHERS:
        raise InputError("smoother", f"unknown smoother {name!r}; one of {sorted(SMOOTHERS)}")
    return SMOOTHERS[name](**options)


__all__ = ["DEFAULT_SMOOTHER", "SMOOTHERS", "make_smoother", "needs_weights"]
