"""The per-joint choice fitted to one estimator: when to take the refiner's correction over the input joint.

The choice built into a checkpoint compares two estimates learned on synthesized errors (the refined joint's
confidence and the input joint's, "KS >= 0.5 to the truth"). Neither is calibrated on a real estimator: such an
estimator's right joints are more precise than synthesized ones, and its errors sit where the image is hard.
:func:`fit_choice` learns the choice on that estimator's own results for labelled images instead: a logistic
rule over a few features of each joint (both confidences, the estimator's own keypoint score, how far the
correction moves the joint relative to the person's size, which joint it is) trained to predict whether the
refined joint lies closer to the truth than the input joint, each joint weighted by how much KS is at stake
(|KS refined − KS input|), so the rule maximises the KS gained. The rule travels in the checkpoint's metadata
(``posefix fit-choice``) and :func:`choose` applies it wherever the checkpoint is loaded.

This module is the whole per-joint choice: the rule (:func:`choose`, built in or fitted), its margins and
defaults, the notice for a checkpoint whose choice keeps every input joint, what follows the choice
(:func:`finish`: ``keep_input_below`` and the instance scores), and the fitting of a rule
(:func:`fit_choice`, :func:`select_margin`). The refiner applies it (:meth:`posefix.refiner.Refiner.refine`),
and so does the refinement of files (:mod:`posefix.refine`).

Glossary: P persons, K = 17 joints; F features. numpy and scipy only.
"""
from __future__ import annotations

import json

import numpy as np

from .errors import InputError
from .keypoints import NUM_KEYPOINTS, ks, present
from .synth.diagnose import diagnose

# What a refiner puts out: "choice", per joint the input or the refined one; "raw", every joint as refined.
OUTPUTS = ("choice", "raw")
# The default choice margin of a checkpoint without a fitted rule: the refined confidence (at most 1) never
# exceeds the input joint's estimate by more, so every input joint is kept.
UNFITTED_MARGIN = 1.0
# What refine, refine-video and serve say when that default applies.
KEEPS_INPUT_NOTICE = ("the checkpoint's choice is not fitted to an estimator, so every input joint is kept "
                      "(posefix fit-choice fits it; --choice-margin 0 takes the heads' own choice, --output raw "
                      "every correction)")
METADATA_KEY = "posefix_choice"
VERSION = 1
NUMERIC = ("refined_confidence_logit", "input_confidence_logit", "input_score", "input_present", "log_move")
_LOGIT_CLIP = 8.0


def _logit(p):
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-6, 1 - 1e-6)
    return np.clip(np.log(p / (1 - p)), -_LOGIT_CLIP, _LOGIT_CLIP)


def person_scale(poses: np.ndarray) -> np.ndarray:
    """(P,) the square root of the area of each input pose's box (present, finite joints); 1 without two."""
    poses = np.asarray(poses, dtype=np.float64)
    ok = present(poses)
    low = np.where(ok[..., None], poses[..., :2], np.inf).min(-2)
    high = np.where(ok[..., None], poses[..., :2], -np.inf).max(-2)
    with np.errstate(invalid="ignore"):
        size = np.sqrt(np.prod(high - low, axis=-1))
    return np.where((ok.sum(-1) >= 2) & np.isfinite(size) & (size > 1.0), size, 1.0)


def features(poses, xy, conf, input_conf) -> np.ndarray:
    """The numeric features (P, K, 5) of each joint, in the order of :data:`NUMERIC`: poses (P, K, 3) the input,
    xy (P, K, 2) and conf (P, K) the refined joints, input_conf (P, K) the head's estimate for the input joint."""
    poses = np.asarray(poses, dtype=np.float64)
    given = np.nan_to_num(poses[..., :2], nan=0.0, posinf=0.0, neginf=0.0)
    score = np.clip(np.nan_to_num(poses[..., 2], nan=0.0), 0.0, 1.0)
    move = np.linalg.norm(np.asarray(xy, dtype=np.float64) - given, axis=-1) / person_scale(poses)[:, None]
    return np.stack([_logit(conf), _logit(input_conf), score, present(poses).astype(np.float64),
                     np.log(np.minimum(move, 10.0) + 1e-2)], -1)


class FittedChoice:
    """A fitted rule: P(refined joint closer to the truth) = sigmoid(standardised features · w + intercept +
    bias[joint])."""

    def __init__(self, mean, std, weights, intercept, joint_bias, info: dict | None = None, margin: float = 0.0):
        self.intercept = float(intercept)
        self.margin = float(margin)  # the correction is taken where 2p - 1 > margin (see choose)
        self.mean = np.asarray(mean, dtype=np.float64)
        self.std = np.asarray(std, dtype=np.float64)
        self.weights = np.asarray(weights, dtype=np.float64)
        self.joint_bias = np.asarray(joint_bias, dtype=np.float64)
        self.info = dict(info or {})
        n = len(NUMERIC)
        if not (self.mean.shape == self.std.shape == self.weights.shape == (n,)
                and self.joint_bias.shape == (NUM_KEYPOINTS,)):
            raise InputError(METADATA_KEY, f"expects {n} feature means, stds and weights and {NUM_KEYPOINTS} joint "
                             "biases")
        if not all(np.isfinite(a).all() for a in (self.mean, self.std, self.weights, self.joint_bias, self.intercept)) \
                or (self.std <= 0).any() or not -1.0 <= self.margin <= 1.0:
            raise InputError(METADATA_KEY, "holds a non-finite number, a non-positive std or a margin outside [-1, 1]")

    def logit(self, poses, xy, conf, input_conf) -> np.ndarray:
        """(P, K) the log-odds that each refined joint is closer to the truth than the input joint."""
        f = (features(poses, xy, conf, input_conf) - self.mean) / self.std
        return f @ self.weights + self.intercept + self.joint_bias

    def to_json(self) -> str:
        return json.dumps({"version": VERSION, "features": list(NUMERIC), "mean": self.mean.tolist(),
                           "std": self.std.tolist(), "weights": self.weights.tolist(),
                           "intercept": self.intercept, "joint_bias": self.joint_bias.tolist(), "margin": self.margin,
                           "info": self.info})

    @classmethod
    def from_json(cls, text: str, source: str = "checkpoint") -> FittedChoice:
        try:
            doc = json.loads(text)
        except (TypeError, ValueError) as e:
            raise InputError(METADATA_KEY, f"is not JSON: {e}", source) from None
        except RecursionError:
            raise InputError(METADATA_KEY, "is not valid JSON (nested too deep)", source) from None
        if not isinstance(doc, dict):
            raise InputError(METADATA_KEY, f"must be a JSON object, got {type(doc).__name__}", source)
        if doc.get("version") != VERSION or doc.get("features") != list(NUMERIC):
            raise InputError(METADATA_KEY, f"is version {doc.get('version')!r} with features {doc.get('features')!r}; "
                             f"this posefix reads version {VERSION} with {list(NUMERIC)}", source)
        try:
            return cls(doc["mean"], doc["std"], doc["weights"], doc["intercept"], doc["joint_bias"], doc.get("info"),
                       doc["margin"])
        except (KeyError, TypeError, ValueError, RecursionError) as e:
            raise InputError(METADATA_KEY, f"is incomplete or malformed: {type(e).__name__}: {str(e)[:200]}",
                             source) from None


def fit_choice(poses, xy, conf, input_conf, gt, gt_area, l2: float = 1.0) -> FittedChoice:
    """Fit the rule on labelled joints. poses (P, K, 3) the estimator's input poses, xy/conf/input_conf the raw
    refinement of them (as :func:`features`), gt (P, K, 3) the matched ground truth (v > 0 labelled; persons
    without a match have v = 0 throughout), gt_area (P,) its area. ``l2``: the ridge penalty on the weights
    and the joints' own biases, in units of the KS at stake in one joint; the intercept is not penalised, so
    where the corrections are never closer the rule keeps every input joint, however the features vary. The
    rule's ``info`` holds what was measured on these joints at margin 0 (``taken``, ``ks_gain_fitted``; the
    oracle's ``ks_gain_oracle``); its margin is set by the caller (see :func:`select_margin`)."""
    poses = np.asarray(poses, dtype=np.float64)
    gt = np.asarray(gt, dtype=np.float64)
    labelled = gt[..., 2] > 0
    if labelled.sum() < 20:
        raise InputError("annotations", f"only {int(labelled.sum())} labelled joints match the input; at least "
                         "20 are needed to fit the choice")
    given = np.nan_to_num(poses[..., :2], nan=0.0, posinf=0.0, neginf=0.0)
    gain = ks(xy, gt, gt_area) - ks(given, gt, gt_area)  # (P, K) KS won by taking the correction
    f = features(poses, xy, conf, input_conf)[labelled]  # (N, F)
    joint = np.broadcast_to(np.arange(NUM_KEYPOINTS), labelled.shape)[labelled]  # (N,)
    y, w = (gain[labelled] > 0).astype(np.float64), np.abs(gain[labelled])
    mean, std = f.mean(0), f.std(0)
    std = np.where(std > 1e-6, std, 1.0)
    z = (f - mean) / std
    onehot = np.eye(NUM_KEYPOINTS)[joint]
    x = np.concatenate([z, np.ones((len(z), 1)), onehot], axis=1)  # (N, F + 1 + K)
    penalised = np.ones(x.shape[1])
    penalised[len(NUMERIC)] = 0.0
    wsum = max(w.sum(), 1e-12)

    def loss(theta):
        t = x @ theta
        # weighted logistic loss and its gradient, stable for large |t|
        lp = np.logaddexp(0.0, -t)  # -log sigmoid(t)
        ln = np.logaddexp(0.0, t)  # -log(1 - sigmoid(t))
        value = (w * (y * lp + (1 - y) * ln)).sum() / wsum + l2 * (penalised * theta ** 2).sum() / wsum
        p = 0.5 * (1 + np.tanh(t / 2))
        grad = x.T @ (w * (p - y)) / wsum + 2 * l2 * penalised * theta / wsum
        return value, grad

    from scipy.optimize import minimize  # here, not at the top: start-up time of every command that imports the rule

    bound = [(-30.0, 30.0)] * x.shape[1]  # the unpenalised intercept runs off where every label is the same
    theta = minimize(loss, np.zeros(x.shape[1]), jac=True, method="L-BFGS-B", bounds=bound).x
    n = len(NUMERIC)
    info = {"joints": int(labelled.sum()), "refined_closer": float(y.mean()),
            "ks_gain_all_refined": float(gain[labelled].mean())}
    rule = FittedChoice(mean, std, theta[:n], theta[n], theta[n + 1:], info)
    take = rule.logit(poses, xy, conf, input_conf)[labelled] > 0
    rule.info.update(taken=float(take.mean()), ks_gain_fitted=float(np.where(take, gain[labelled], 0.0).mean()),
                     ks_gain_oracle=float(np.maximum(gain[labelled], 0.0).mean()))
    return rule


def matched_truth(gt, results: list[dict]):
    """The GT person COCO's matching (as :func:`posefix.synth.diagnose.diagnose`) pairs with each result: keypoints
    (P, K, 3), v = 0 throughout where a result has no labelled match, and areas (P,)."""
    truth, area = np.zeros((len(results), NUM_KEYPOINTS, 3)), np.ones(len(results))
    for n, g in enumerate(matched_person(gt, results)):
        if g is not None:
            truth[n], area[n] = gt.keypoints[g], gt.areas[g]
    return truth, area


def matched_person(gt, results: list[dict]) -> list[int | None]:
    """For each result, the index in ``gt`` of the non-crowd GT person COCO's matching (as
    :func:`posefix.synth.diagnose.diagnose`) pairs it with, None where there is none."""
    index_of = {int(a): i for i, a in enumerate(gt.ids)}
    out = []
    for d in diagnose(gt, results, with_ap=False)["detections"]:
        g = index_of.get(d["matched_gt"]) if d["matched_gt"] is not None else None
        out.append(g if g is not None and not gt.crowd[g] else None)
    return out


MARGINS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.6, 0.8, 1.0)  # 1: never the correction (2p - 1 > 1 never holds)
AP_TOLERANCE = 0.005


def select_margin(ap_of, margins=MARGINS, tolerance: float = AP_TOLERANCE) -> tuple[float, dict]:
    """The margin of a fitted rule: of ``margins``, the largest (the most joints kept from the input) whose AP
    ``ap_of(margin)`` on the fitting images is within ``tolerance`` (half an AP point) of the best. A correction
    must so earn its place by more than that on the fitting images, or the rule keeps every input joint
    (margin 1). Returns the margin and every AP by margin."""
    aps = {float(m): float(ap_of(m)) for m in margins}
    best = max(aps.values())
    return max(m for m, a in aps.items() if a >= best - tolerance), aps


def choose(poses: np.ndarray, xy: np.ndarray, conf: np.ndarray, input_conf: np.ndarray,
           margin: float = 0.0, fitted: FittedChoice | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The per-joint choice: poses (P, K, 3) the input (image pixels), xy (P, K, 2) and conf (P, K) the refined
    joints and their confidence, input_conf (P, K) the input joints' estimated confidence. A joint is the
    refined one where ``conf > input_conf + margin`` — with a ``fitted`` rule, where its probability p that the
    refined joint is closer to the truth gives ``2p - 1 > margin`` — or where the input joint is not finite;
    else the input joint's exact coordinates with ``input_conf``, 0 where the input joint is absent
    (score <= 0): kept as given, it is no more there than it was. Returns the chosen xy (P, K, 2) and
    confidence (P, K)."""
    poses = np.asarray(poses, dtype=np.float64)
    given = poses[..., :2]
    if fitted is None:
        take = conf > input_conf + margin
    else:
        take = np.tanh(fitted.logit(poses, xy, conf, input_conf) / 2) > margin  # tanh(t / 2) = 2 sigmoid(t) - 1
    refined = take | ~np.isfinite(given).all(-1)
    kept_conf = np.where(poses[..., 2] > 0, input_conf, 0.0)
    return np.where(refined[..., None], xy, given), np.where(refined, conf, kept_conf)


def resolved_margin(choice_margin: float | None, fitted: FittedChoice | None) -> float:
    """The margin a refiner chooses with: ``choice_margin``, or where it is None the fitted rule's own margin
    (chosen on its labelled images), else :data:`UNFITTED_MARGIN` (every input joint kept)."""
    if choice_margin is None:
        return fitted.margin if fitted is not None else UNFITTED_MARGIN
    return float(choice_margin)


def keeps_every_input(output: str, choice_margin: float | None, fitted: bool) -> bool:
    """Whether refining with ``output`` and ``choice_margin`` (None: the default) returns every finite input joint
    exactly, for a checkpoint with (``fitted``) or without a fitted choice."""
    if output != "choice" or fitted:
        return False
    return choice_margin is None or choice_margin >= UNFITTED_MARGIN


def kept_input(poses, xy) -> np.ndarray:
    """(P, K) bool: where the output joint xy (P, K, 2) is the input joint of poses (P, K, 3) exactly."""
    return (np.asarray(xy, dtype=np.float64) == np.asarray(poses, dtype=np.float64)[..., :2]).all(-1)


def instance_scores(scores, conf, present, output: str) -> np.ndarray:
    """Each refined person's instance score: with the per-joint choice the input's own (an input whose every
    joint is kept comes back exactly as given, and COCO's ranking of the persons is the estimator's); raw, the
    input's × the mean refined confidence of its present joints. scores (P,), conf (P, K), present (P, K) bool.

    Files refined offline (``posefix refine``, ``refine-video``) are scored so. The service returns every
    person's score as it was sent, whatever the output (the contract of ``RefinedPerson.score``): a caller
    that ranks persons by the refinement computes this score from the keypoints' confidences."""
    if output == "choice":
        return np.asarray(scores, dtype=np.float64)
    total, count = (conf * present).sum(1), np.maximum(present.sum(1), 1)
    with np.errstate(over="ignore", invalid="ignore"):
        product = scores * total / count
    # scores near float64's maximum overflow the product; the mean confidence (at most 1) first cannot
    return np.where(np.isfinite(product) | ~np.isfinite(scores), product, scores * (total / count))


def finish(given, scores, xy, conf, output: str, keep_input_below: float | None = None):
    """The policy after the per-joint choice: given (P, K, 3) the input poses, scores (P,) their instance scores,
    xy (P, K, 2) and conf (P, K) the refined (chosen) joints. ``keep_input_below``: the input joint, its score as
    confidence, wherever the refined confidence is below it and below the input joint's score. Returns xy, conf,
    kept (P, K) bool (the input joint exactly: ``keypoint_source`` "input") and the instance scores (P,)."""
    given = np.asarray(given, dtype=np.float64)
    if keep_input_below is not None:
        xy, conf = np.array(xy, dtype=np.float64), np.array(conf, dtype=np.float64)
        keep = (conf < keep_input_below) & (conf < given[..., 2])
        xy[keep], conf[keep] = given[keep][:, :2], given[keep][:, 2]
    return xy, conf, kept_input(given, xy), instance_scores(scores, conf, given[..., 2] > 0, output)
