"""posefix: model-agnostic human pose refinement (PoseFix), with error synthesis and diagnosis."""
from importlib import metadata as _metadata
from pathlib import Path as _Path

try:
    __version__ = _metadata.version("posefix")
except _metadata.PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

SAMPLE_DIR = _Path(__file__).with_name("sample")
