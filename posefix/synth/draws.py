"""Where the synthesizer's random numbers come from.

:func:`posefix.synth.synthesize.synthesize` asks for every random number by the joint it is for (row id
``person · K + joint`` in its call), a site (what the number decides) and an attempt (the retry round of
that joint). Two sources answer:

- :class:`StreamDraws` wraps a numpy ``Generator`` and answers every request from its stream, in the order
  asked: the draws of a call depend on the seed and on every person of the call.
- :class:`KeyedDraws` is counter-based: each number is a hash of (person key, joint, site, attempt, index),
  the person key a hash of (seed, annotation id, variant). Every number for a person is then the same
  whichever persons are synthesized with it, in whatever order or blocks, so each person-variant is
  reproducible from (seed, person, variant) alone. The hash is SplitMix64's finaliser (Steele, Lea &
  Flood, OOPSLA 2014) over 64-bit counters, the 53 high bits giving a uniform in [0, 1); a beta variate
  is the inverse of its CDF (tabulated on 2^12 + 1 points, linearly interpolated) at a uniform.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np

from ..keypoints import NUM_KEYPOINTS

# Sites: what a number decides. A retry round adds ATTEMPT · attempt.
OUTCOME, ANCHOR, RADII, PICK, THETA, RHO, ANGLE, CONFIDENCE = range(1, 9)
ATTEMPT = 16
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31, _S11 = np.uint64(30), np.uint64(27), np.uint64(31), np.uint64(11)
_TABLE_POINTS = (1 << 12) + 1


def mix64(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser of uint64 values (a bijection with full avalanche), elementwise."""
    z = np.asarray(z, dtype=np.uint64)
    z = (z ^ (z >> _S30)) * _M1
    z = (z ^ (z >> _S27)) * _M2
    return z ^ (z >> _S31)


def person_keys(seed: int, annotation_ids, variant: int) -> np.ndarray:
    """(N,) uint64 keys of persons by (seed, annotation id, variant)."""
    with np.errstate(over="ignore"):
        s = mix64(np.uint64(seed % (1 << 64)) + _GOLDEN)
        a = mix64(s ^ (np.asarray(annotation_ids).astype(np.int64).astype(np.uint64) * _GOLDEN))
        return mix64(a + np.uint64(variant % (1 << 64)) * _M2)


class StreamDraws:
    """Every request answered from one numpy Generator's stream, in the order asked."""

    def __init__(self, rng: np.random.Generator):
        self.rng = rng

    def take(self, persons) -> StreamDraws:
        return self

    def random(self, rows: np.ndarray, site: int, count: int | None = None) -> np.ndarray:
        return self.rng.random(rows.shape if count is None else rows.shape + (count,))

    def beta(self, a: float, b: float, rows: np.ndarray, site: int) -> np.ndarray:
        return self.rng.beta(a, b, size=rows.shape)


class KeyedDraws:
    """Counter-based draws for N persons with keys (N,) uint64 (:func:`person_keys`)."""

    def __init__(self, keys: np.ndarray):
        self.keys = np.asarray(keys, dtype=np.uint64).reshape(-1)
        with np.errstate(over="ignore"):  # each joint's key, rows person · K + joint
            self._rows = mix64(self.keys[:, None] ^ np.arange(NUM_KEYPOINTS, dtype=np.uint64) * _M1).reshape(-1)

    def take(self, persons) -> KeyedDraws:
        """The draws of persons ``persons`` (indices), as persons 0, 1, ... of a call."""
        return KeyedDraws(self.keys[np.asarray(persons)])

    def uint64(self, rows: np.ndarray, site: int, count: int | None = None) -> np.ndarray:
        with np.errstate(over="ignore"):
            base = self._rows[rows] + np.uint64(site) * _GOLDEN
            if count is not None:
                base = base[..., None] + np.arange(1, count + 1, dtype=np.uint64) * _M2
            return mix64(base)

    def random(self, rows: np.ndarray, site: int, count: int | None = None) -> np.ndarray:
        """Uniforms in [0, 1): rows.shape, or rows.shape + (count,)."""
        return (self.uint64(rows, site, count) >> _S11).astype(np.float64) * 2.0 ** -53

    def random_at(self, rows: np.ndarray, site: int, count: int, col: np.ndarray) -> np.ndarray:
        """``random(rows, site, count)[i, col[i]]`` for each i, without the other columns."""
        with np.errstate(over="ignore"):
            z = self._rows[rows] + np.uint64(site) * _GOLDEN + (np.asarray(col) + 1).astype(np.uint64) * _M2
        return (mix64(z) >> _S11).astype(np.float64) * 2.0 ** -53

    def beta(self, a: float, b: float, rows: np.ndarray, site: int) -> np.ndarray:
        q = _beta_quantiles(float(a), float(b))
        t = self.random(rows, site) * (_TABLE_POINTS - 1)
        i = t.astype(np.int64)  # t < _TABLE_POINTS - 1, so i + 1 is in the table
        return q[i] + (t - i) * (q[i + 1] - q[i])


_UNIT = np.linspace(0.0, 1.0, _TABLE_POINTS)


@lru_cache(maxsize=64)
def _beta_quantiles(a: float, b: float) -> np.ndarray:
    from scipy.special import betaincinv

    q = betaincinv(a, b, _UNIT)
    q.setflags(write=False)
    return q


def as_draws(rng) -> StreamDraws | KeyedDraws:
    """A Generator wrapped as :class:`StreamDraws`; draws objects as they are."""
    if isinstance(rng, (StreamDraws, KeyedDraws)):
        return rng
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy Generator or a KeyedDraws, got {type(rng).__name__}")
    return StreamDraws(rng)
