"""posefix.synth: COCO keypoint conventions, synthesis of estimator-like errors, and their diagnosis.

Needs numpy and scipy only (no torch), so error synthesis and diagnosis run in a light environment.
"""
from ..errors import InputError, PosefixError
from ..keypoints import FLIP_PAIRS, NAMES, NUM_KEYPOINTS, PARTNER, SIGMAS, SKELETON, box_iou, ks, ks_radius, oks
from .dataset import read_dataset
from .profile import OUTCOMES, Profile, load_profile, parse_profile, published_profile
from .synthesize import UNLABELLED, SynthResult, synthesize

__all__ = [
    "FLIP_PAIRS", "NAMES", "NUM_KEYPOINTS", "OUTCOMES", "PARTNER", "SIGMAS", "SKELETON", "UNLABELLED",
    "InputError", "PosefixError", "Profile", "SynthResult", "box_iou", "ks", "ks_radius", "load_profile",
    "oks", "parse_profile", "published_profile", "read_dataset", "synthesize",
]
