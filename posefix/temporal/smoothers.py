"""Trajectory smoothers: what a smoother is, and the classical ones.

A smoother is a callable ``smoother(xy, score, present, scale, causal) -> xy_out`` over one track's arrays:
xy float64 (T, 17, 2) pixels, score float64 (T, 17), present bool (T, 17) (the joint is reported there, or
filled), scale float64 (T,) the person's size in pixels (:func:`posefix.temporal.person_scale`), causal: each
output frame may use only that frame and earlier ones. It returns xy_out (T, 17, 2); a frame's output for a
joint that is not present there is not used. A smoother whose ``batched`` attribute is true also takes any
number of leading track dimensions ((N, T, 17, 2) ...), and the pipeline then calls it once for all tracks.
Smoothers are made by name from the registry, :mod:`posefix.temporal.registry`.

The classical smoothers (``body``, the default):

- ``body``: the person's per-frame whole-body motion (a similarity fitted to its joints relative to their
  smoothed articulated positions, so a joint that goes missing does not move it) is separated from the
  articulated residual of each joint. The residual changes slowly even when the camera pans fast. Both are
  smoothed by score-weighted local polynomials (quadratic offline, linear causal: both exact on constant
  velocity, so a steadily moving joint has no lag) whose window adapts per frame and joint
  (:func:`adaptive_poly`; :class:`BodySmoother` has the noise model and the options).
- ``sg9``, ``ma9``: plain per-joint references (Savitzky–Golay window 9, order 2; centred moving average over
  9 frames; causal: a one-sided linear fit, a trailing average).
- ``none``: the input unchanged.

The learned one, ``learned`` (:mod:`posefix.temporal.learned`): the ``body`` smoother's output corrected by a
small network trained with ``posefix train-temporal``; it needs ``weights``.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

Smoother = Callable[..., np.ndarray]


def _shift(padded: np.ndarray, pad: int, k: int, t: int) -> np.ndarray:
    """padded along axis -3 by ``pad`` zeros before and after; the view whose frame i is the original i + k."""
    return padded[..., pad + k:pad + k + t, :, :]


def local_poly(y: np.ndarray, w: np.ndarray, offsets: range, degree: int, kernel: str = "tricube") -> np.ndarray:
    """Weighted local polynomial fit, evaluated at each frame: y (..., T, J, C), w (..., T, J) observation
    weights (0 = not observed). For frame t the polynomial of ``degree`` (0, 1 or 2) in u = k / h minimises
    sum over k in ``offsets`` of kernel(k) · w[t + k] · (y[t + k] − p(u))², and p(0) is returned. Where the
    window holds too few observations for the degree, the next lower degree is used; where none, y itself."""
    t = y.shape[-3]
    h = max(abs(offsets.start), abs(offsets.stop - 1), 1)
    pad = h
    widths = [(0, 0)] * y.ndim
    widths[-3] = (pad, pad)
    yp = np.pad(y * w[..., None], widths)
    wp = np.pad(w, widths[:-1])
    s = [np.zeros(w.shape) for _ in range(2 * degree + 1)]
    b = [np.zeros(y.shape) for _ in range(degree + 1)]
    for k in offsets:
        u = k / h
        if kernel == "tricube":
            kw = (1.0 - (abs(k) / (h + 1)) ** 3) ** 3
        else:
            kw = 1.0
        wk = kw * wp[..., pad + k:pad + k + t, :]
        yk = kw * _shift(yp, pad, k, t)
        for m in range(2 * degree + 1):
            s[m] += wk * u ** m
        for m in range(degree + 1):
            b[m] += yk * u ** m
    out = y.copy()
    s0 = s[0]
    has = s0 > 1e-12
    out[has] = (b[0][has] / s0[has][..., None])
    if degree >= 1:
        det1 = s[0] * s[2] - s[1] ** 2
        ok1 = det1 > 1e-6 * np.maximum(s[0] * s[2], 1e-300)
        a1 = (s[2][..., None] * b[0] - s[1][..., None] * b[1]) / np.where(ok1, det1, 1.0)[..., None]
        out = np.where(ok1[..., None], a1, out)
    if degree >= 2:
        s0, s1, s2, s3, s4 = s
        det2 = s0 * (s2 * s4 - s3 * s3) - s1 * (s1 * s4 - s3 * s2) + s2 * (s1 * s3 - s2 * s2)
        ok2 = det2 > 1e-6 * np.maximum(s0 * s2 * s4, 1e-300)
        c0 = (s2 * s4 - s3 * s3)[..., None]
        c1 = (s2 * s3 - s1 * s4)[..., None]
        c2 = (s1 * s3 - s2 * s2)[..., None]
        a2 = (c0 * b[0] + c1 * b[1] + c2 * b[2]) / np.where(ok2, det2, 1.0)[..., None]
        out = np.where(ok2[..., None], a2, out)
    return out


def observation_weight(score: np.ndarray, present: np.ndarray, floor: float) -> np.ndarray:
    """A joint's weight in a fit: its score (clipped to [floor, 1]) where present, else 0."""
    return np.where(present, np.clip(score, floor, 1.0), 0.0)


def _solve(s, b, degree):
    """The fitted value at offset 0 and its variance factor for moments s (2·degree + 1 of them) and b; NaN
    where the window's observations do not determine the polynomial."""
    with np.errstate(divide="ignore", invalid="ignore"):
        if degree == 0:
            ok = s[0] > 0
            return b[0] / s[0][..., None], np.where(ok, 1.0 / s[0], np.nan)
        if degree == 1:
            det = s[0] * s[2] - s[1] ** 2
            ok = det > 1e-9 * np.maximum(s[0] * s[2], 1e-300)
            det = np.where(ok, det, np.nan)
            return (s[2][..., None] * b[0] - s[1][..., None] * b[1]) / det[..., None], s[2] / det
        s0, s1, s2, s3, s4 = s
        c0, c1, c2 = s2 * s4 - s3 * s3, s2 * s3 - s1 * s4, s1 * s3 - s2 * s2
        det = s0 * c0 + s1 * c1 + s2 * c2
        ok = det > 1e-9 * np.maximum(s0 * s2 * s4, 1e-300)
        det = np.where(ok, det, np.nan)
        return (c0[..., None] * b[0] + c1[..., None] * b[1] + c2[..., None] * b[2]) / det[..., None], c0 / det


# Joint-frames an adaptive fit works on at once: its many passes then run in the CPU's cache.
FIT_BLOCK = 16_384


def adaptive_poly(y: np.ndarray, w: np.ndarray, sizes: tuple[int, ...], degree: int, causal: bool,
                  gamma: float) -> np.ndarray:
    """A local polynomial fit whose window adapts to the data (the intersection of confidence intervals rule,
    Goldenshluger & Nemirovski 1997; Katkovnik 1999): y (..., T, J, C), w (..., T, J) inverse noise variances
    (0 = not observed). For each frame the fits over windows of increasing ``sizes`` (offline centred on the
    frame, odd sizes; causal ending at it) give estimates ± ``gamma`` standard deviations; the largest window
    whose interval meets those of all smaller ones is used. Where no window determines a fit, y is kept.

    Computed in blocks of about :data:`FIT_BLOCK` joint-frames (tracks, or stretches of a long track with the
    frames its windows reach around them); each frame's result is the same as over the whole array."""
    t, j, c = y.shape[-3:]
    lead = y.shape[:-3]
    n = int(np.prod(lead))
    yb = y.reshape((n, t, j, c))
    wb = w.reshape((n, t, j))
    if yb.shape[0] * t * j <= FIT_BLOCK:
        return _adaptive_block(yb, wb, sizes, degree, causal, gamma).reshape(y.shape)
    out = np.empty(yb.shape)
    if t * j <= FIT_BLOCK:
        per = FIT_BLOCK // (t * j)
        for i in range(0, len(yb), per):
            out[i:i + per] = _adaptive_block(yb[i:i + per], wb[i:i + per], sizes, degree, causal, gamma)
        return out.reshape(y.shape)
    reach = max(sizes)
    before, after = (reach - 1, 0) if causal else (reach // 2, reach // 2)
    step = max(FIT_BLOCK // j, 4 * reach)
    for t0 in range(0, t, step):
        t1 = min(t0 + step, t)
        a0, a1 = max(t0 - before, 0), min(t1 + after, t)
        part = _adaptive_block(yb[:, a0:a1], wb[:, a0:a1], sizes, degree, causal, gamma)
        out[:, t0:t1] = part[:, t0 - a0:t1 - a0]
    return out.reshape(lead + (t, j, c))


def _adaptive_block(y, w, sizes, degree, causal, gamma):
    """:func:`adaptive_poly` over one block, y (B, T, J, C), w (B, T, J)."""
    t = y.shape[-3]
    reach = max(sizes)
    before = reach - 1 if causal else reach // 2
    after = 0 if causal else reach // 2
    yp = np.pad(y * w[..., None], ((0, 0), (before, after), (0, 0), (0, 0)))
    wp = np.pad(w, ((0, 0), (before, after), (0, 0)))
    s = [np.zeros(w.shape) for _ in range(2 * degree + 1)]
    b = [np.zeros(y.shape) for _ in range(degree + 1)]
    tw, ty = np.empty(w.shape), np.empty(y.shape)
    done: set[int] = set()
    out = y.copy()
    lo = np.full(y.shape, -np.inf)
    hi = np.full(y.shape, np.inf)
    alive = np.ones(w.shape, dtype=bool)

    def add(acc, v, k, m, tmp):
        if m == 0:
            acc += v
        else:
            np.multiply(v, float(k) ** m, out=tmp)
            acc += tmp

    for size in sorted(sizes):
        offsets = range(-(size - 1), 1) if causal else range(size // 2 + 1)
        for k in offsets:
            if k in done:
                continue
            done.add(k)
            wk = wp[:, before + k:before + k + t]
            yk = yp[:, before + k:before + k + t]
            if causal or k == 0:
                for m in range(2 * degree + 1):
                    add(s[m], wk, k, m, tw)
                for m in range(degree + 1):
                    add(b[m], yk, k, m, ty)
                continue
            # offline, the offsets ±k together: even powers take the sum, odd ones the difference
            wn = wp[:, before - k:before - k + t]
            yn = yp[:, before - k:before - k + t]
            ws, wd = wk + wn, wk - wn
            ys, yd = yk + yn, yk - yn
            for m in range(2 * degree + 1):
                add(s[m], ws if m % 2 == 0 else wd, k, m, tw)
            for m in range(degree + 1):
                add(b[m], ys if m % 2 == 0 else yd, k, m, ty)
        est, var = _solve(s, b, min(degree, size - 1))
        with np.errstate(invalid="ignore"):
            valid = var > 0  # NaN: the window does not determine the fit
            sd = gamma * np.sqrt(var)[..., None]
            # NaN bounds (no fit) leave the intersection as it was: fmax / fmin ignore them
            np.fmax(lo, est - sd, out=lo)
            np.fmin(hi, est + sd, out=hi)
        for ci in range(y.shape[-1]):  # (lo <= hi).all(-1), without a slow reduction over a short last axis
            alive &= lo[..., ci] <= hi[..., ci]
        np.copyto(out, est, where=(alive & valid)[..., None])
    return out


class BodySmoother:
    """The ``body`` smoother (module docstring). Noise model, in units of the person's scale s: a joint of
    score p has standard deviation min(``joint_noise`` / p², ``noise_cap``) · s; the whole-body position, where
    the joints' mean score is p̄, min(``body_noise`` / p̄^``body_power``, ``noise_cap``) · s (scores below
    ``floor`` count as ``floor``). ``sizes`` / ``causal_sizes``: the window sizes (frames) the adaptive fits
    choose from; ``gamma`` / ``causal_gamma``: their confidence intervals' half-width in standard deviations
    (causal narrower: a causal fit that extrapolates lags where the motion changes); ``iterations``: the
    alternations of whole-body fit and articulated fit; ``robust``: from the second, an observation further than
    this many standard deviations from the fit is down-weighted (Huber; 0: off).

    The defaults were chosen on video_sample's ``train/`` clips (MoveNet Thunder, BlazePose) and the mocap
    clips: MoveNet Thunder's frame-to-frame noise there measures about 0.0022 s / p² per joint; twice that
    smooths better on those clips, and a larger whole-body noise loses AP on the fast camera pans."""

    batched = True

    def __init__(self, joint_noise: float = 0.005, body_noise: float = 0.0005, noise_cap: float = 1.0,
                 gamma: float = 2.0, sizes: tuple[int, ...] = (3, 5, 7, 9, 13),
                 causal_sizes: tuple[int, ...] = (1, 2, 3, 5, 7, 9), floor: float = 0.05, iterations: int = 3,
                 robust: float = 2.0, body_power: float = 2.0, causal_gamma: float = 1.0):
        self.joint_noise, self.body_noise, self.noise_cap, self.gamma = joint_noise, body_noise, noise_cap, gamma
        self.causal_gamma = causal_gamma
        self.sizes, self.causal_sizes = tuple(sizes), tuple(causal_sizes)
        self.floor, self.iterations, self.robust = floor, iterations, robust
        self.body_power = body_power

    def _inverse_variance(self, score, base, scale, power=2.0):
        """1 / σ² of a value of the given score: σ = min(base / score^power, noise_cap) · scale."""
        p = np.maximum(np.clip(score, 0.0, 1.0), self.floor)
        sd = np.minimum(base / p ** power, self.noise_cap) * scale
        return 1.0 / sd ** 2

    def __call__(self, xy, score, present, scale, causal: bool = False) -> np.ndarray:
        xy = np.asarray(xy, dtype=np.float64)
        score = np.asarray(score, dtype=np.float64)
        present = np.asarray(present, dtype=bool)
        scale = np.asarray(scale, dtype=np.float64)
        scale = np.maximum(scale, 1e-6)
        p = np.where(present, np.maximum(np.clip(score, 0.0, 1.0), self.floor), 0.0)
        w = np.where(present, self._inverse_variance(score, self.joint_noise, scale[..., None]), 0.0)
        sizes = self.causal_sizes if causal else self.sizes
        degree = 1 if causal else 2
        gamma = self.causal_gamma if causal else self.gamma
        z = xy[..., 0] + 1j * xy[..., 1]  # (..., T, J) complex
        wsum = p.sum(-1)
        seen = wsum > 0
        den = np.where(seen, wsum, 1.0)
        # Whole-body motion per frame: a similarity z ≈ c + a · r of the joints' articulated positions r.
        c = (p * z).sum(-1) / den
        a = np.ones_like(c)
        wr = w
        for it in range(self.iterations):
            raw = (z - c[..., None]) / a[..., None]
            rr = adaptive_poly(np.stack([raw.real, raw.imag], -1), wr * np.abs(a[..., None]) ** 2, sizes, degree,
                               causal, gamma)
            r = rr[..., 0] + 1j * rr[..., 1]
            if self.robust and it + 1 < self.iterations:
                # an observation further than `robust` standard deviations from the fit weighs less (Huber)
                e = np.abs(raw - r) * np.abs(a[..., None]) * np.sqrt(w)
                wr = w * np.minimum(1.0, (self.robust / np.maximum(e, 1e-12)) ** 2)
            rm = (p * r).sum(-1) / den
            zm = (p * z).sum(-1) / den
            rc = r - rm[..., None]
            var = (p * np.abs(rc) ** 2).sum(-1)
            fit = seen & (var > 1e-12 * np.maximum(scale, 1e-6) ** 2)
            a = np.where(fit, (p * (z - zm[..., None]) * np.conj(rc)).sum(-1) / np.where(fit, var, 1.0), a)
            c = zm - a * rm
        pbar = np.where(seen, wsum / np.maximum(present.sum(-1), 1), 0.0)
        wc = np.where(seen, self._inverse_variance(pbar, self.body_noise, scale, self.body_power), 0.0)
        # the similarity's factor a (dimensionless) is ~3 times noisier than the centre, relative to the scale
        body = np.stack([c.real, c.imag], -1)[..., None, :]
        c = adaptive_poly(body, wc[..., None], sizes, degree, causal, gamma)[..., 0, :]
        c = c[..., 0] + 1j * c[..., 1]
        fa = np.stack([a.real, a.imag], -1)[..., None, :]
        fa = adaptive_poly(fa, (wc * scale ** 2 / 9.0)[..., None], sizes, degree, causal, gamma)[..., 0, :]
        a = np.where(seen, fa[..., 0] + 1j * fa[..., 1], a)
        out = c[..., None] + a[..., None] * r
        return np.stack([out.real, out.imag], -1)


class PlainSmoother:
    """A per-joint reference: a uniform-kernel local polynomial over ``window`` frames of the present joints
    (``degree`` 2, window 9: Savitzky–Golay; degree 0: a moving average). Causal: trailing, degree ≤ 1."""

    batched = True

    def __init__(self, window: int, degree: int):
        self.window, self.degree = window, degree

    def __call__(self, xy, score, present, scale, causal: bool = False) -> np.ndarray:
        xy = np.asarray(xy, dtype=np.float64)
        w = np.asarray(present, dtype=np.float64)
        if causal:
            return local_poly(xy, w, range(-(self.window - 1), 1), min(self.degree, 1), kernel="uniform")
        return local_poly(xy, w, range(-(self.window // 2), self.window // 2 + 1), self.degree, kernel="uniform")


class NoSmoother:
    batched = True

    def __call__(self, xy, score, present, scale, causal: bool = False) -> np.ndarray:
        return np.array(xy, dtype=np.float64)


def run_smoother(smoother: Smoother, xy, score, present, scale, causal: bool) -> np.ndarray:
    """Call ``smoother`` over tracks stacked as (N, T, ...): once where it is batched, else per track."""
    if getattr(smoother, "batched", False):
        out = smoother(xy, score, present, scale, causal)
    else:
        out = np.stack([smoother(xy[i], score[i], present[i], scale[i], causal) for i in range(len(xy))]) \
            if len(xy) else np.array(xy, dtype=np.float64)
    out = np.asarray(out, dtype=np.float64)
    if out.shape != np.shape(xy):
        raise ValueError(f"smoother returned shape {out.shape} for input {np.shape(xy)}")
    return out


__all__ = ["BodySmoother", "PlainSmoother", "local_poly", "observation_weight", "run_smoother"]
