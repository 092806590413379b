"""Error profiles: the probabilities of each synthesized error, as data.

A profile is a JSON document (``posefix/synth/profiles/published.json`` is the default, the PoseFix tables).
For each error outcome it gives joint groups and a probability per bin of a person-level condition:

- ``"by": "nv"`` — bins of the person's labelled-joint count, with inclusive upper edges ``nv_upper``;
- ``"by": "crowded"`` — two bins, ``crowded`` and ``otherwise``
  (crowded = (nv ≤ 10 and ov > 0) or (nv ≤ 15 and ov ≥ 3));
- ``"by": "none"`` — one bin.

"good" takes what the four errors leave. A group may carry ``"n"``, the number of observations
behind each cell (written by ``posefix synth fit``). ``scores`` holds Beta(a, b) parameters of the
per-keypoint confidences given to each outcome, and ``miss_own_anchor_weight`` the weight of a
miss around the joint's own GT position against each wrong anchor.
"""
from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..keypoints import NUM_KEYPOINTS

OUTCOMES: tuple[str, ...] = ("good", "jitter", "inversion", "swap", "miss")
GOOD, JITTER, INVERSION, SWAP, MISS = range(5)
ERRORS: tuple[str, ...] = OUTCOMES[1:]
SCORE_KEYS: tuple[str, ...] = OUTCOMES + ("unlabelled",)
CROWDING_BINS = ("crowded", "otherwise")
FORMAT = "posefix-profile/1"


def crowded(nv, ov):
    """PoseFix's crowding condition. nv, ov: (N,) → (N,) bool."""
    nv, ov = np.asarray(nv), np.asarray(ov)
    return ((nv <= 10) & (ov > 0)) | ((nv <= 15) & (ov >= 3))


@dataclass(frozen=True)
class OutcomeTable:
    """One error's probabilities: ``table[j, b]`` for joint j in bin b."""

    by: str
    bins: tuple[str, ...]
    nv_upper: tuple[int, ...] | None
    groups: tuple[tuple[str, tuple[int, ...]], ...]
    table: np.ndarray  # (K, B)
    counts: np.ndarray | None  # (K, B) observations behind each cell, or None

    def bin_index(self, nv, is_crowded):
        """(N,) nv and crowding → (N,) bin index."""
        nv = np.asarray(nv)
        if self.by == "nv":
            return np.minimum(np.searchsorted(np.asarray(self.nv_upper), nv, side="left"), len(self.bins) - 1)
        if self.by == "crowded":
            return np.where(np.asarray(is_crowded), 0, 1)
        return np.zeros(nv.shape, dtype=np.int64)


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    outcomes: dict  # error name -> OutcomeTable, for the four errors
    miss_own_anchor_weight: float
    scores: dict  # outcome name (and "unlabelled") -> (a, b)
    severity: tuple = (1.0, 1.0, 1.0, 1.0)  # factors on the ERRORS' probabilities (see with_severity)

    def probabilities(self, nv, ov):
        """Nominal outcome probabilities before feasibility: (N,) nv, ov → (N, K, 5) in OUTCOMES order."""
        nv = np.asarray(nv)
        is_crowded = crowded(nv, ov)
        p = np.empty(nv.shape + (NUM_KEYPOINTS, len(OUTCOMES)))
        for e, name in enumerate(ERRORS, start=1):
            t = self.outcomes[name]
            p[..., e] = t.table.T[t.bin_index(nv, is_crowded)]  # (N, K)
        if self.severity != (1.0, 1.0, 1.0, 1.0):
            p[..., 1:] *= np.asarray(self.severity)
            total = p[..., 1:].sum(-1, keepdims=True)
            p[..., 1:] /= np.maximum(total, 1.0)  # errors beyond certainty share it in proportion
        p[..., GOOD] = 1.0 - p[..., 1:].sum(-1)
        if self.severity != (1.0, 1.0, 1.0, 1.0):
            p[..., GOOD] = np.maximum(p[..., GOOD], 0.0)
        return p

    def with_severity(self, factors: dict) -> Profile:
        """A copy whose error probabilities are scaled: ``factors`` maps error names (jitter, inversion,
        swap, miss) to non-negative factors, combined with this profile's. Where the scaled errors of a
        joint sum above 1 they are divided by their sum (no good joint left); as in synthesis, an
        outcome that is impossible for a joint gives its share to the others in proportion."""
        sev = list(self.severity)
        for name, f in factors.items():
            if name not in ERRORS:
                raise InputError("severity", f"unknown error {name!r}; one of {list(ERRORS)}")
            if not (isinstance(f, (int, float)) and not isinstance(f, bool) and np.isfinite(f) and f >= 0):
                raise InputError(f"severity.{name}", f"must be a finite number >= 0, got {f!r}")
            sev[ERRORS.index(name)] *= float(f)
        return Profile(self.name, self.description, self.outcomes, self.miss_own_anchor_weight, dict(self.scores),
                       tuple(sev))

    def to_dict(self) -> dict:
        out = {"format": FORMAT, "name": self.name, "description": self.description, "outcomes": {}}
        for name in ERRORS:
            t = self.outcomes[name]
            d = {"by": t.by, "bins": list(t.bins)}
            if t.nv_upper is not None:
                d["nv_upper"] = list(t.nv_upper)
            d["groups"] = []
            for gname, joints in t.groups:
                g = {"name": gname, "joints": list(joints), "p": [round(float(x), 6) for x in t.table[joints[0]]]}
                if t.counts is not None:
                    g["n"] = [int(x) for x in t.counts[joints[0]]]
                d["groups"].append(g)
            out["outcomes"][name] = d
        out["miss_own_anchor_weight"] = self.miss_own_anchor_weight
        out["scores"] = {k: list(v) for k, v in self.scores.items()}
        return out

    def with_tables(self, tables: dict, counts: dict | None = None, name: str | None = None,
                    description: str | None = None) -> Profile:
        """A copy with new (K, B) tables (and counts) for some errors, same groups and bins."""
        outcomes = dict(self.outcomes)
        for err, table in tables.items():
            t = outcomes[err]
            c = None if counts is None else np.asarray(counts[err])
            outcomes[err] = OutcomeTable(t.by, t.bins, t.nv_upper, t.groups, np.asarray(table, float), c)
        prof = Profile(name or self.name, description or self.description, outcomes,
                       self.miss_own_anchor_weight, dict(self.scores), self.severity)
        _check_sums(prof, "profile")
        return prof


def load_profile(path: str | Path | None = None) -> Profile:
    """Load a profile JSON file; ``None`` loads the published PoseFix profile."""
    if path is None:
        text = resources.files("posefix.synth.profiles").joinpath("published.json").read_text()
        source = "published profile"
    else:
        source = str(path)
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise InputError("profile", f"cannot read: {e.strerror or e}", source) from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError("profile", f"not valid JSON ({e.msg} at line {e.lineno})", source) from None
    return parse_profile(doc, source)


def published_profile() -> Profile:
    return load_profile(None)


def _need(cond: bool, field: str, problem: str, source: str):
    if not cond:
        raise InputError(field, problem, source)


def _unknown(d: dict, allowed: set, field: str, source: str):
    extra = sorted(set(d) - allowed)
    _need(not extra, field, f"unknown key(s) {extra}; allowed: {sorted(allowed)}", source)


def _prob(x, field, source) -> float:
    _need(isinstance(x, (int, float)) and not isinstance(x, bool) and 0.0 <= x <= 1.0,
          field, f"must be a probability in [0, 1], got {x!r}", source)
    return float(x)


def parse_profile(doc, source: str = "profile") -> Profile:
    """Validate a profile document (a dict) and build a :class:`Profile`."""
    _need(isinstance(doc, dict), "profile", "must be a JSON object", source)
    _unknown(doc, {"format", "name", "description", "outcomes", "miss_own_anchor_weight", "scores"}, "profile", source)
    _need(doc.get("format", FORMAT) == FORMAT, "format", f"must be {FORMAT!r}", source)
    outs = doc.get("outcomes")
    _need(isinstance(outs, dict), "outcomes", "must be an object with jitter, inversion, swap and miss", source)
    _unknown(outs, set(ERRORS), "outcomes", source)
    outcomes = {}
    for err in ERRORS:
        f = f"outcomes.{err}"
        _need(err in outs, f, "missing", source)
        o = outs[err]
        _need(isinstance(o, dict), f, "must be an object", source)
        _unknown(o, {"by", "bins", "nv_upper", "groups"}, f, source)
        by = o.get("by")
        _need(by in ("nv", "crowded", "none"), f"{f}.by", f"must be 'nv', 'crowded' or 'none', got {by!r}", source)
        bins = o.get("bins")
        _need(isinstance(bins, list) and bins and all(isinstance(b, str) for b in bins),
              f"{f}.bins", "must be a non-empty list of bin names", source)
        nv_upper = None
        if by == "nv":
            nv_upper = o.get("nv_upper")
            _need(isinstance(nv_upper, list) and len(nv_upper) == len(bins)
                  and all(isinstance(x, int) for x in nv_upper)
                  and all(a < b for a, b in itertools.pairwise(nv_upper)) and nv_upper[-1] >= NUM_KEYPOINTS,
                  f"{f}.nv_upper", f"must be {len(bins)} increasing integers, the last >= {NUM_KEYPOINTS}", source)
            nv_upper = tuple(nv_upper)
        elif by == "crowded":
            _need(tuple(bins) == CROWDING_BINS, f"{f}.bins", f"must be {list(CROWDING_BINS)}", source)
        else:
            _need(len(bins) == 1, f"{f}.bins", "must have one bin when by is 'none'", source)
        groups = o.get("groups")
        _need(isinstance(groups, list) and groups, f"{f}.groups", "must be a non-empty list", source)
        table = np.full((NUM_KEYPOINTS, len(bins)), np.nan)
        has_counts = all(isinstance(g, dict) and "n" in g for g in groups)
        counts = np.zeros((NUM_KEYPOINTS, len(bins)), dtype=np.int64) if has_counts else None
        parsed_groups = []
        for gi, g in enumerate(groups):
            gf = f"{f}.groups[{gi}]"
            _need(isinstance(g, dict), gf, "must be an object", source)
            _unknown(g, {"name", "joints", "p", "n"}, gf, source)
            joints = g.get("joints")
            _need(isinstance(joints, list) and joints
                  and all(isinstance(j, int) and not isinstance(j, bool) and 0 <= j < NUM_KEYPOINTS for j in joints),
                  f"{gf}.joints", f"must be a non-empty list of keypoint indices 0..{NUM_KEYPOINTS - 1}", source)
            p = g.get("p")
            _need(isinstance(p, list) and len(p) == len(bins), f"{gf}.p", f"must list {len(bins)} probabilities",
                  source)
            p = [_prob(x, f"{gf}.p[{i}]", source) for i, x in enumerate(p)]
            for j in joints:
                _need(np.isnan(table[j, 0]), f"{gf}.joints", f"keypoint {j} is in more than one group", source)
                table[j] = p
            if counts is not None:
                n = g["n"]
                _need(isinstance(n, list) and len(n) == len(bins) and all(isinstance(x, int) and x >= 0 for x in n),
                      f"{gf}.n", f"must list {len(bins)} non-negative counts", source)
                counts[joints] = n
            parsed_groups.append((str(g.get("name", f"group {gi}")), tuple(joints)))
        missing = np.flatnonzero(np.isnan(table[:, 0]))
        _need(missing.size == 0, f"{f}.groups", f"keypoints {missing.tolist()} are in no group", source)
        outcomes[err] = OutcomeTable(by, tuple(bins), nv_upper, tuple(parsed_groups), table, counts)

    w = doc.get("miss_own_anchor_weight", 4.0)
    _need(isinstance(w, (int, float)) and not isinstance(w, bool) and w > 0,
          "miss_own_anchor_weight", f"must be a positive number, got {w!r}", source)
    scores_doc = doc.get("scores", {})
    _need(isinstance(scores_doc, dict), "scores", "must be an object", source)
    _unknown(scores_doc, set(SCORE_KEYS), "scores", source)
    scores = {}
    for k in SCORE_KEYS:
        ab = scores_doc.get(k, [2.0, 2.0])
        _need(isinstance(ab, list) and len(ab) == 2
              and all(isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0 for x in ab),
              f"scores.{k}", "must be [a, b], two positive Beta parameters", source)
        scores[k] = (float(ab[0]), float(ab[1]))
    prof = Profile(str(doc.get("name", "profile")), str(doc.get("description", "")), outcomes, float(w), scores)
    _check_sums(prof, source)
    return prof


def _check_sums(prof: Profile, source: str):
    nv = np.repeat(np.arange(NUM_KEYPOINTS + 1), 4)
    ov = np.tile([0, 1, 2, 3], NUM_KEYPOINTS + 1)
    p = prof.probabilities(nv, ov)
    bad = np.argwhere(p[..., GOOD] < -1e-9)
    if bad.size:
        i, j = bad[0]
        raise InputError("outcomes", f"error probabilities of keypoint {j} sum to {1 - p[i, j, GOOD]:.3f} > 1 "
                         f"for nv={nv[i]}, ov={ov[i]}", source)
