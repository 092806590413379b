import asyncio
import json
import threading
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from posefix import SAMPLE_DIR, codec
from posefix._proto import pb2_grpc
from posefix.errors import InputError
from posefix.images import decode
from posefix.keypoints import NUM_KEYPOINTS
from posefix.model import ModelConfig, PoseFixNet
from posefix.refiner import Refiner
from posefix.serve import create_server
from posefix.weights import export_weights

VAL_GT = SAMPLE_DIR / "person_keypoints_val_sample.json"
TRAIN_GT = SAMPLE_DIR / "person_keypoints_train_sample.json"
VAL_RESULTS = SAMPLE_DIR / "topdown_keypoints_val4.json"
IMAGE_785 = SAMPLE_DIR / "images" / "000000000785.jpg"
RESULTS = VAL_RESULTS
TIMEOUT = 10  # seconds, for every call of the service tests

# A plain standing figure, unit height, used to build synthetic persons (independent of synth.TEMPLATE).
FIGURE = np.array([
    [0.00, -0.34], [0.03, -0.37], [-0.03, -0.37], [0.08, -0.35], [-0.08, -0.35],
    [0.13, -0.20], [-0.13, -0.20], [0.19, -0.02], [-0.19, -0.02], [0.21, 0.14], [-0.21, 0.14],
    [0.09, 0.15], [-0.09, 0.15], [0.10, 0.40], [-0.10, 0.40], [0.10, 0.64], [-0.10, 0.64],
])


@pytest.fixture
def sample_dir() -> Path:
    return SAMPLE_DIR


def make_crowd(rng, n, m, labelled=0.85, spread=0.35, height=(80.0, 300.0)):
    """n persons, each with m overlapping persons: gt (n, K, 3), area (n,), others (n, m, K, 3), others_area (n, m)."""
    h = rng.uniform(*height, size=n)
    centre = rng.uniform(300, 700, size=(n, 1, 2))
    gt = np.zeros((n, NUM_KEYPOINTS, 3))
    gt[..., :2] = FIGURE * h[:, None, None] + centre + rng.normal(0, 0.015, (n, NUM_KEYPOINTS, 2)) * h[:, None, None]
    gt[..., 2] = np.where(rng.random((n, NUM_KEYPOINTS)) < labelled, 2, 0)
    gt[gt[..., 2].sum(1) == 0, 0, 2] = 2
    area = (h / 1.8) ** 2
    scale = rng.uniform(0.7, 1.3, size=(n, m))
    others = np.zeros((n, m, NUM_KEYPOINTS, 3))
    shift = rng.normal(0, spread, (n, m, 1, 2)) * h[:, None, None, None]
    others[..., :2] = FIGURE * (h[:, None] * scale)[..., None, None] + centre[:, None] + shift
    others[..., 2] = np.where(rng.random((n, m, NUM_KEYPOINTS)) < labelled, 2, 0)
    return gt, area, others, area[:, None] * scale ** 2


# Shared by the service tests: a small refiner that moves joints, and image 785's real poses.

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = PoseFixNet(ModelConfig(backbone="resnet18", input_size=(128, 96), sigma=3.5, head_channels=32))
    with torch.no_grad():  # a refiner that moves joints, so equal numbers mean equal computation
        torch.nn.init.normal_(model.final.weight, std=0.2)
        torch.nn.init.normal_(model.confidence.weight, std=0.2)
        # and whose per-joint choice keeps some input joints and takes some refined ones
        torch.nn.init.normal_(model.input_confidence.weight, std=0.2)
        torch.nn.init.zeros_(model.input_confidence.bias)
    path = tmp_path_factory.mktemp("model") / "model.safetensors"
    export_weights(model, path, {"step": 0})
    return path


@pytest.fixture(scope="module")
def refiner(checkpoint):
    """The heads' own choice (margin 0), so the served and offline paths take some joints of each kind."""
    return Refiner.from_checkpoint(checkpoint, device="cpu", batch_size=64, choice_margin=0.0)


@pytest.fixture(scope="module")
def poses_785():
    results = [r for r in json.loads(RESULTS.read_text()) if r["image_id"] == 785]
    return np.array([r["keypoints"] for r in results], dtype=np.float64).reshape(len(results), 17, 3)


@pytest.fixture(scope="module")
def offline_785(refiner, poses_785):
    xy, conf = refiner.refine([decode(IMAGE_785)], np.zeros(len(poses_785), dtype=np.int64), poses_785)
    return xy, conf


def as_array(response) -> np.ndarray:
    return np.array([[(k.x, k.y, k.confidence) for k in p.keypoints] for p in response.persons]).reshape(
        len(response.persons), -1, 3)


# Shared by the service tests: servers in an event loop of their own, stand-in refiners, stubs and metrics.

class LoopThread:
    """An asyncio event loop in a daemon thread: the servers run there, the tests call them from here."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro, timeout=TIMEOUT):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def submit(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def close(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(TIMEOUT)
        self.loop.close()


class StandIn:
    """A refiner (a posefix.protocols.RefinerLike) that is ``inner`` but for what a subclass defines, its
    ``refine`` above all."""

    def __init__(self, inner: Refiner):
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)


@pytest.fixture(scope="module")
def loop():
    lt = LoopThread()
    yield lt
    lt.close()


@pytest.fixture(scope="module")
def start(loop):
    """start(refiner, **create_server options) → a started server, stopped after the module."""
    handles = []

    async def create_and_start(refiner, options):
        handle = create_server(refiner, "127.0.0.1", 0, **options)
        await handle.start()
        return handle

    def _start(refiner, **options):
        options = {"max_batch_size": 64, "max_queue_delay_ms": 5.0, "max_queue_size": 1024, **options}
        handle = loop.run(create_and_start(refiner, options))
        handles.append(handle)
        return handle

    yield _start
    for handle in handles:
        loop.run(handle.stop(grace_s=1.0))


@pytest.fixture(scope="module")
def server(start, refiner):
    return start(refiner, metrics_port=0)


def stub_for(handle):
    channel = grpc.insecure_channel(f"127.0.0.1:{handle.port}")
    return pb2_grpc.PoseRefinerStub(channel), channel


@pytest.fixture(scope="module")
def stub(server):
    stub, channel = stub_for(server)
    yield stub
    channel.close()


def metric_samples(handle) -> dict:
    """{(sample name, frozenset(labels)): value} scraped from the server's /metrics over HTTP."""
    with urllib.request.urlopen(f"http://127.0.0.1:{handle.metrics_port}/metrics", timeout=TIMEOUT) as r:
        text = r.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def profile_doc_with_misses(p_miss: float) -> dict:
    """The published profile as a dict with no jitter, inversion or swap and misses at ``p_miss`` everywhere."""
    from posefix.synth.profile import published_profile

    doc = published_profile().to_dict()
    for err in ("jitter", "inversion", "swap"):
        for g in doc["outcomes"][err]["groups"]:
            g["p"] = [0.0] * len(g["p"])
    for g in doc["outcomes"]["miss"]["groups"]:
        g["p"] = [p_miss] * len(g["p"])
    return doc


SMALL_MODEL = ModelConfig(backbone="resnet18", input_size=(96, 64), sigma=2.5, head_channels=32)


def model_inputs(n, cfg, seed=0):
    """n random crops of cfg's size, input poses (n, 17, 3) in crop pixels (80 % present) and their heatmaps."""
    g = torch.Generator().manual_seed(seed)
    h, w = cfg.input_size
    image = torch.rand(n, 3, h, w, generator=g)
    kp = torch.cat([torch.rand(n, 17, 1, generator=g) * (w - 16) + 8, torch.rand(n, 17, 1, generator=g) * (h - 16) + 8,
                    (torch.rand(n, 17, 1, generator=g) > 0.2).float()], dim=-1)
    return image, kp, codec.render_heatmaps(kp, cfg.input_size, cfg.sigma)


def handful_annotations(path: Path) -> Path:
    """The bundled val images holding 1–3 labelled persons, the first five of them (six persons), written to
    ``path`` as COCO annotations."""
    doc = json.loads(VAL_GT.read_text())
    count = {}
    for a in doc["annotations"]:
        if a["num_keypoints"] > 0:
            count[a["image_id"]] = count.get(a["image_id"], 0) + 1
    pick = sorted(i for i, n in count.items() if n <= 3)[:5]
    sub = {"images": [im for im in doc["images"] if im["id"] in pick],
           "annotations": [a for a in doc["annotations"] if a["image_id"] in pick], "categories": doc["categories"]}
    path.write_text(json.dumps(sub))
    return path


@pytest.fixture(scope="session")
def handful_run(tmp_path_factory):
    """A cpu-small refiner trained for 180 steps of 16 (about a minute and a half on 2 CPU cores) on the
    handful's persons, once for every test that needs a trained refiner: (the handful's annotations, the
    checkpoint)."""
    from posefix.config import load_config
    from posefix.train import train

    tmp = tmp_path_factory.mktemp("handful")
    gt_path = handful_annotations(tmp / "handful.json")
    cfg = load_config(preset="cpu-small", overrides=[f"data.train_annotations={gt_path}",
                                                     f"data.train_images={SAMPLE_DIR / 'images'}",
                                                     "train.max_steps=180", "train.lr_milestones=[0.9]",
                                                     "train.batch_size=16", "data.workers=1"])
    train(cfg, tmp / "run", progress=False)
    return gt_path, tmp / "run" / "model.safetensors"


def refine_results(refiner, results: list[dict], image_paths: dict) -> list[dict]:
    """COCO keypoint results (validated) refined as ``posefix refine`` refines them
    (:func:`posefix.refine.refine_estimates`); ``image_paths`` maps image_id → file."""
    from posefix.formats import LAYOUTS, Estimates, write_coco_results
    from posefix.refine import by_image, refine_estimates

    if not results:
        return []
    keys = [r["image_id"] for r in results]
    missing = [i for i in by_image(keys) if i not in image_paths]
    if missing:
        raise InputError("image", f"no image file for image_id {missing[0]}")
    poses = np.array([r["keypoints"] for r in results], dtype=np.float64).reshape(len(results), -1, 3)
    est = Estimates("coco", LAYOUTS["coco17"], keys, poses, np.array([r["score"] for r in results], dtype=np.float64),
                    poses, list(results), False)
    out = refine_estimates(refiner, est, {i: image_paths[i] for i in by_image(keys)})
    return write_coco_results(est, out.xy, out.conf, out.scores, keys, out.kept)
