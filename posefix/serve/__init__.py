"""The gRPC service (proto/posefix/v1/posefix.proto): estimators anywhere send an image and the poses
they found in it, and get the poses back refined.

Glossary: P persons of a request, Kf keypoints of its format, K = 17 COCO joints (the model's own);
poses are (x, y, score) in pixels of the image as sent. A call: :mod:`.validation` (an
:class:`~posefix.errors.InputError` naming the field) → the :class:`~posefix.batcher.DynamicBatcher`, which
runs the refiner on the persons of many concurrent calls at once → :mod:`.responses`, orchestrated by
:mod:`.servicer`. :mod:`.server` builds, starts and stops servers; :mod:`.stream` holds a RefinePoseStream's
state, :mod:`.search` SearchPoses, :mod:`.metrics` the Prometheus metrics, :mod:`.staging` the pinned-memory
budget.
"""
# The public API: create_server (a server in process), serve (one run until SIGTERM/SIGINT), serve_main
# (posefix serve); PoseRefinerServer, what create_server returns; ServeOptions, what serve_main takes; Limits,
# create_server's ``limits``.
from .server import PoseRefinerServer, ServeOptions, create_server, serve, serve_main
from .validation import Limits

__all__ = ["Limits", "PoseRefinerServer", "ServeOptions", "create_server", "serve", "serve_main"]
