"""The gRPC service under faults, against real servers on 127.0.0.1 (port 0) and a small random-weight
refiner on the CPU: thousands of malformed requests, overload, and SIGTERM under load.

What each test shows is stated in docs/reliability.md. Every call has a deadline, every test is bounded
in time and in the number of calls, and each outcome is counted.
"""
import collections
import gc
import io
import logging
import os
import select
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import grpc
import numpy as np
import pytest
import torch
from PIL import Image

from posefix import SAMPLE_DIR
from posefix._proto import pb2, pb2_grpc
from posefix.client import request_message
from posefix.formats import LAYOUTS
from posefix.images import check_png, decode, decode_encoded
from posefix.refiner import Refiner
from posefix.serve import Limits, create_server
from posefix.viz import encode_png

from .conftest import IMAGE_785, LoopThread, StandIn, as_array

IMAGES = sorted((SAMPLE_DIR / "images").glob("*.jpg"))
TIMEOUT = 10  # seconds: the deadline of every call
TOL = 1e-4  # pixels and confidence
STARTUP_S = 90  # seconds for `posefix serve` to print its port
MAX_MESSAGE = Limits().max_message_bytes  # what `posefix serve` accepts
OK = grpc.StatusCode.OK
FORMATS = {"coco17": pb2.KEYPOINT_FORMAT_COCO_17, "blazepose33": pb2.KEYPOINT_FORMAT_BLAZEPOSE_33,
           "body25": pb2.KEYPOINT_FORMAT_OPENPOSE_BODY_25, "coco18": pb2.KEYPOINT_FORMAT_OPENPOSE_COCO_18}


# Fixtures: a refiner that moves joints (so equal numbers mean equal computation), its offline results.

@pytest.fixture(scope="module")
def pixels_785():
    return decode(IMAGE_785)  # (3, H, W) uint8


def xy_tolerance(poses: np.ndarray) -> float:
    """TOL in pixels of the model's crop, as image pixels, for poses (P, 17, 3): float32 rounding in the crop
    scales with it. A crop spans about 1.5 × the extent of a person's present keypoints over the model's
    96 columns, and one far-apart pair of keypoints makes a crop many times the image's pixels."""
    present = poses[..., 2] > 0
    extents = [np.ptp(p[m, :2], axis=0).max() for p, m in zip(poses, present) if m.any()]
    return TOL * max([1.0] + [1.5 * e / 96 for e in extents])


def whole(response, persons: int, keypoints: int) -> str | None:
    """Why a response is not a whole result for ``persons`` persons of ``keypoints`` keypoints (None: it is)."""
    if len(response.persons) != persons:
        return f"{len(response.persons)} persons for {persons} sent"
    counts = {len(p.keypoints) for p in response.persons}
    if counts - {keypoints}:
        return f"persons with {sorted(counts)} keypoints for {keypoints} sent"
    if persons and not np.isfinite(as_array(response)).all():
        return "non-finite values"
    return None


def call(stub, request, timeout=TIMEOUT):
    """One RefinePose call: (status code, response or None, details, posefix-field or None, seconds)."""
    t0 = time.perf_counter()
    try:
        response = stub.RefinePose(request, timeout=timeout)
    except grpc.RpcError as e:
        field = dict(e.trailing_metadata() or ()).get("posefix-field")
        return e.code(), None, e.details() or "", field, time.perf_counter() - t0
    return OK, response, "", None, time.perf_counter() - t0


# `posefix serve` as a subprocess.

def rss_mib(pid: int) -> float:
    """Resident set size of a process in MiB (Linux /proc)."""
    with open(f"/proc/{pid}/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return kib / 1024


@contextmanager
def serve_process(checkpoint, tmp_path, *options):
    """Run ``python -m posefix serve --port 0`` with ``options``; yields (process, port), killed at the end
    if it still runs. Its stderr goes to a file (libjpeg and libpng warnings must not fill a pipe)."""
    cmd = [sys.executable, "-m", "posefix", "serve", "--checkpoint", str(checkpoint), "--host", "127.0.0.1",
           "--port", "0", "--device", "cpu", "--choice-margin", "0", *options]  # as the offline refiner
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the machine has 2 cores; the test process needs one
    with open(tmp_path / "serve.stderr", "w+") as stderr, \
            subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=stderr, text=True, env=env) as proc:
        try:
            ready, _, _ = select.select([proc.stdout], [], [], STARTUP_S)
            line = proc.stdout.readline() if ready else ""
            if "listening on 127.0.0.1:" not in line:
                stderr.seek(0)
                pytest.fail(f"posefix serve did not start in {STARTUP_S} s: {line!r}\n{stderr.read()[-3000:]}")
            yield proc, int(line.split("127.0.0.1:")[1].split()[0].rstrip(";"))
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(TIMEOUT)


# Fuzzing: generated requests, each with the status it must get.

# request: a message, or a function building one when it is sent (large ones); field: posefix-field or None;
# expected (valid requests): layout, the offline engine's xy and confidence, and the tolerance on xy.
Case = collections.namedtuple("Case", "kind request code field expected")


def _png(pixels_hwc: np.ndarray, idat_damage=None) -> bytes:
    """A PNG file (colour type 2, no interlace, filter 0 rows) of (H, W, 3) uint8 pixels, built by hand so
    that its image data can be damaged with every CRC still correct: ``idat_damage(raw rows, compressed)``
    returns the compressed stream to store."""
    h, w, _ = pixels_hwc.shape
    rows = np.concatenate([np.zeros((h, 1), np.uint8), pixels_hwc.reshape(h, w * 3)], axis=1).tobytes()
    stream = zlib.compress(rows, 1)
    if idat_damage is not None:
        stream = idat_damage(rows, stream)

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", stream) + chunk(b"IEND", b""))


def corrupt_pngs(pixels_hwc: np.ndarray, rng) -> list[bytes]:
    """PNGs of the image whose chunks are whole with correct CRCs but whose image data are corrupt: the
    files that crash torchvision's PNG decoder (SIGSEGV) unless the server refuses them first."""
    def flipped(rows, stream):
        damaged = bytearray(stream)
        damaged[len(damaged) // 2] ^= 0x5A
        return bytes(damaged)

    def bad_filter(rows, stream):
        damaged = bytearray(rows)
        height = pixels_hwc.shape[0]
        damaged[height // 2 * (len(rows) // height)] = 9  # the filter byte of the middle row
        return zlib.compress(bytes(damaged), 1)

    files = [_png(pixels_hwc, flipped),  # zlib: "incorrect data check" or a bad code
             _png(pixels_hwc, lambda rows, stream: zlib.compress(rows[:len(rows) // 2], 1)),  # too little data
             _png(pixels_hwc, lambda rows, stream: stream[:-4] + bytes(4)),  # a wrong Adler-32
             _png(pixels_hwc, bad_filter)]  # a row filter type 9
    whole_file = _png(pixels_hwc)
    cut = int(rng.integers(60, len(whole_file) - 20))
    files.append(whole_file[:cut])  # cut inside IDAT
    damaged = bytearray(whole_file)
    damaged[int(rng.integers(60, len(whole_file) - 20))] ^= 0xFF  # an IDAT CRC error
    files.append(bytes(damaged))
    return files


@pytest.fixture(scope="module")
def fuzz_material(pixels_785, poses_785, refiner):
    """The valid requests (with their offline refinement) and image bytes the fuzzer draws from."""
    rng = np.random.default_rng(7)
    hwc = pixels_785.permute(1, 2, 0).numpy()
    height, width = hwc.shape[:2]
    jpeg = IMAGE_785.read_bytes()
    png = encode_png(pixels_785, compress_level=1)
    valid = []

    def add(name, image, native, fmt="coco17"):
        layout = LAYOUTS[fmt]
        request = request_message(image, native, FORMATS[fmt])
        coco = native[:, list(layout.coco_index)]
        xy, conf = refiner.refine([pixels_785], np.zeros(len(native), dtype=np.int64), coco)
        valid.append((name, request, layout, xy, conf, xy_tolerance(coco)))

    add("jpeg", jpeg, poses_785[:2])
    edge = poses_785[2:3].copy()
    edge[0, :4, 0] = [-0.9 * width, -1.0, 1.9 * width, 0.0]  # within the image widened by its own size
    edge[0, 4:6, 1] = [-0.5 * height, 1.99 * height]
    edge[0, 6:8, 2] = [-1.0, 0.0]  # absent keypoints: negative or zero score
    edge[0, 8] = [-1e6, 1e6, 0.0]  # absent and far outside: not checked
    add("jpeg, edge coordinates", jpeg, edge)
    absent = poses_785[3:4].copy()
    absent[..., 2] = 0
    add("jpeg, a person without keypoints found", jpeg, np.concatenate([absent, poses_785[4:5]]))
    add("raw pixels", hwc, poses_785[5:8])
    add("png", png, poses_785[8:9])
    for fmt in ("blazepose33", "body25", "coco18"):
        layout = LAYOUTS[fmt]
        native = np.zeros((2, len(layout.names), 3))
        native[..., 0] = rng.uniform(0, width, native.shape[:2])
        native[..., 1] = rng.uniform(0, height, native.shape[:2])
        native[..., 2] = rng.uniform(0.1, 1, native.shape[:2])
        native[:, list(layout.coco_index)] = poses_785[9:11]
        add(fmt, jpeg, native, fmt)
    add("no persons", jpeg, np.zeros((0, 17, 3)))
    truncated_png = [_png(hwc)[:n] for n in (40, 100)]
    return {"valid": valid, "jpegs": [p.read_bytes() for p in IMAGES], "corrupt_pngs": corrupt_pngs(hwc, rng),
            "truncated_pngs": truncated_png, "size": (height, width), "poses": poses_785}


def fuzz_cases(material, rng, n: int, oversize_every: int) -> list[Case]:
    """``n`` requests: about 1 in 8 valid, the others each with one fault; the ``oversize_every``-th is
    over the server's message limit (built when sent)."""
    poses, (height, width) = material["poses"], material["size"]
    jpeg_785 = material["jpegs"][[p.name for p in IMAGES].index(IMAGE_785.name)]
    invalid = grpc.StatusCode.INVALID_ARGUMENT

    def base(persons=None):
        chosen = rng.choice(len(poses), size=rng.integers(1, 4) if persons is None else persons, replace=False)
        return request_message(jpeg_785, poses[chosen]), len(chosen)

    def random_image():
        request, _ = base()
        prefix = [b"", b"\xff\xd8", b"\xff\xd8\xff\xe0", b"\x89PNG\r\n\x1a\n", b"GIF89a", b"RIFF"][rng.integers(6)]
        request.image.encoded = prefix + rng.bytes(int(rng.integers(0, 4000)))
        return request, "image.encoded"

    def truncated_jpeg():
        request, _ = base()
        data = material["jpegs"][rng.integers(len(material["jpegs"]))]
        request.image.encoded = data[:int(rng.integers(0, len(data) - 1))]
        return request, "image.encoded"

    def corrupt_png():
        request, _ = base()
        pngs = material["corrupt_pngs"] + material["truncated_pngs"]
        request.image.encoded = pngs[rng.integers(len(pngs))]
        return request, "image.encoded"

    def huge_header():
        request, _ = base()
        side = int(rng.integers(8193, 2**31))
        if rng.random() < 0.5:
            ihdr = struct.pack(">IIBBBBB", side, int(rng.integers(1, 2**31)), 8, 2, 0, 0, 0)
            request.image.encoded = b"\x89PNG\r\n\x1a\n\x00\x00\x00\x0dIHDR" + ihdr + bytes(4)
        else:
            sof = b"\xff\xc0\x00\x11\x08" + struct.pack(">HH", min(side, 65535), 100) + b"\x03" + bytes(9)
            request.image.encoded = b"\xff\xd8" + sof + b"\xff\xd9"
        return request, "image.encoded"

    def huge_raw():
        request, _ = base()
        choice = rng.integers(4)
        if choice == 0:  # a size over the limits
            h, w = int(rng.integers(8193, 2**32)), int(rng.integers(1, 2**32))
            raw, field = pb2.RawImage(pixels=rng.bytes(16), height=h, width=w, channels=3), "image.raw"
        elif choice == 1:  # within the limits, but the pixels are missing
            h, w = int(rng.integers(1, 4097)), int(rng.integers(1, 4097))
            raw, field = pb2.RawImage(pixels=rng.bytes(16), height=h, width=w, channels=3), "image.raw.pixels"
        elif choice == 2:
            raw = pb2.RawImage(pixels=b"", height=0, width=int(rng.integers(0, 100)), channels=3)
            field = "image.raw"
        else:
            channels = int(rng.choice([0, 2, 5, 2**32 - 1]))
            raw, field = pb2.RawImage(pixels=rng.bytes(12), height=2, width=2, channels=channels), \
                "image.raw.channels"
        request.image.CopyFrom(pb2.Image(raw=raw))
        return request, field

    def non_finite():
        request, p = base()
        i, j = int(rng.integers(p)), int(rng.integers(17))
        axis = ("x", "y", "score")[rng.integers(3)]
        setattr(request.persons[i].keypoints[j], axis, float(rng.choice([np.nan, np.inf, -np.inf])))
        return request, f"persons[{i}].keypoints[{j}].{axis}"

    def far_outside():
        request, p = base()
        i, j = int(rng.integers(p)), int(rng.integers(17))
        keypoint = request.persons[i].keypoints[j]
        keypoint.score = float(rng.uniform(0.01, 1))
        if rng.random() < 0.5:
            keypoint.x = float(rng.choice([-1, 1]) * rng.uniform(2.01 * width, 1e12))
        else:
            keypoint.y = float(-rng.uniform(1.01 * height, 1e300))
        return request, f"persons[{i}].keypoints[{j}]"

    def wrong_count():
        request, p = base()
        i = int(rng.integers(p))
        person = request.persons[i]
        choice = rng.integers(3)
        if choice == 0:
            del person.keypoints[int(rng.integers(0, 17)):]
        elif choice == 1:
            for _ in range(int(rng.integers(1, 40))):
                person.keypoints.add(x=1, y=1, score=1)
        else:  # 17 keypoints sent as another format
            request.format = int(rng.choice([pb2.KEYPOINT_FORMAT_BLAZEPOSE_33, pb2.KEYPOINT_FORMAT_OPENPOSE_BODY_25,
                                              pb2.KEYPOINT_FORMAT_OPENPOSE_COCO_18]))
            i = 0
        return request, f"persons[{i}].keypoints"

    def empty_person():
        request, p = base()
        i = int(rng.integers(p + 1))
        people = list(request.persons)
        people.insert(i, pb2.Person())
        del request.persons[:]
        request.persons.extend(people)
        return request, f"persons[{i}].keypoints"

    def large_refused():  # its 1-4 MiB of pixels are added when it is sent
        request, _ = base()
        size = int(rng.integers(1, 5)) << 20

        def build():
            large = pb2.RefinePoseRequest()
            large.CopyFrom(request)
            large.image.CopyFrom(pb2.Image(raw=pb2.RawImage(pixels=bytes(size), height=1000, width=1000, channels=3)))
            return large

        return build, "image.raw.pixels"

    def bad_format():
        request, _ = base()
        request.format = int(rng.choice([0, 5, 6, 99, 12345, 2**31 - 1, -1, -(2**31)]))
        return request, "format"

    def too_many_persons():
        request, _ = base(1)
        for _ in range(Limits().max_persons_per_image):
            request.persons.add().CopyFrom(request.persons[0])
        return request, "persons"

    def bad_box_or_score():
        request, p = base()
        i = int(rng.integers(p))
        if rng.random() < 0.5:
            request.persons[i].box.CopyFrom(pb2.Box(x=0, y=float(rng.choice([np.nan, np.inf])), width=1, height=1)
                                            if rng.random() < 0.5 else pb2.Box(x=0, y=0, width=-1, height=3))
            return request, f"persons[{i}].box"
        request.persons[i].score = float(rng.choice([np.nan, np.inf]))
        return request, f"persons[{i}].score"

    def no_image():
        request, _ = base()
        request.ClearField("image")
        return request, "image"

    faults = [random_image, truncated_jpeg, corrupt_png, huge_header, huge_raw, large_refused, non_finite,
              far_outside, wrong_count, empty_person, bad_format, too_many_persons, bad_box_or_score, no_image]
    cases = []
    for k in range(n):
        if oversize_every and k % oversize_every == oversize_every - 1:
            extra = int(rng.integers(1, 1 << 20))
            cases.append(Case("oversize", lambda extra=extra: oversize_request(extra),
                              grpc.StatusCode.RESOURCE_EXHAUSTED, None, None))
        elif rng.random() < 1 / 8:
            name, request, *expected = material["valid"][rng.integers(len(material["valid"]))]
            cases.append(Case(f"valid: {name}", request, OK, None, expected))
        else:
            fault = faults[rng.integers(len(faults))]
            request, field = fault()
            cases.append(Case(fault.__name__, request, invalid, field, None))
    return cases


def oversize_request(extra: int) -> pb2.RefinePoseRequest:
    """A request ``extra`` bytes or more over `posefix serve`'s message limit (a raw image's pixels)."""
    return pb2.RefinePoseRequest(image=pb2.Image(raw=pb2.RawImage(pixels=bytes(MAX_MESSAGE + extra), height=1,
                                                                   width=1, channels=3)),
                                 format=pb2.KEYPOINT_FORMAT_COCO_17)


def check_outcome(case: Case, outcome) -> str | None:
    """Why an outcome is wrong for its case (None: as it must be)."""
    code, response, details, field, _ = outcome
    if code != case.code:
        return f"{case.kind}: {code.name} ({details[:200]!r}) where {case.code.name} was due"
    if case.field is not None and field != case.field:
        return f"{case.kind}: field {field!r} ({details[:200]!r}) where {case.field!r} was due"
    if case.field is not None and not details.startswith(f"{case.field}: "):
        return f"{case.kind}: details {details[:200]!r} do not start with the field {case.field!r}"
    if case.expected is not None:
        layout, xy, conf, tol = case.expected
        problem = whole(response, len(case.request.persons), len(layout.names))
        if problem:
            return f"{case.kind}: {problem}"
        if len(xy):
            got = as_array(response)[:, list(layout.coco_index)]
            dxy, dconf = np.abs(got[..., :2] - xy).max(), np.abs(got[..., 2] - conf).max()
            if not (dxy <= tol and dconf <= TOL):
                return f"{case.kind}: the refinement differs from the offline engine's by {dxy:.3g} px " \
                       f"(tolerance {tol:.3g}) and {dconf:.3g} in confidence"
    return None


FUZZ_REQUESTS = 3000
FUZZ_CLIENTS = 4
FUZZ_BLOCKS = 20  # the server's RSS is read after each block of requests
# How far the server's RSS (about 900 MiB, torch included) may rise over the second half of the run: its
# highest reading there against its highest in the first half. 1500 requests a half, so a leak of 22 KiB
# a request fails. The allocator keeps a sawtooth of some 30 MiB with a period of about 1500 requests,
# whose peaks repeat (over 15000 requests they stay between 935 and 951 MiB), and which passes.
RSS_GROWTH_MIB = 32


@pytest.mark.slow
def test_fuzzed_requests_each_get_their_status_and_the_server_stays_up_and_bounded(checkpoint, tmp_path,
                                                                                    fuzz_material):
    rng = np.random.default_rng(2024)
    cases = fuzz_cases(fuzz_material, rng, FUZZ_REQUESTS, oversize_every=FUZZ_REQUESTS // 6)
    name, reference, *expected = fuzz_material["valid"][0]
    with serve_process(checkpoint, tmp_path, "--max-batch-size", "16", "--max-queue-delay-ms", "2",
                       "--grace-s", "2") as (proc, port):
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        stub = pb2_grpc.PoseRefinerStub(channel)
        before = call(stub, reference)
        assert before[0] == OK, f"a valid request before the fuzzing: {before[0].name} {before[2]}"
        rss = [rss_mib(proc.pid)]
        outcomes = [None] * len(cases)

        def send(k):
            request = cases[k].request
            outcomes[k] = call(stub, request() if callable(request) else request)

        block = len(cases) // FUZZ_BLOCKS
        t0 = time.perf_counter()
        with ThreadPoolExecutor(FUZZ_CLIENTS) as pool:
            for b in range(FUZZ_BLOCKS):
                list(pool.map(send, range(b * block, (b + 1) * block if b < FUZZ_BLOCKS - 1 else len(cases))))
                assert proc.poll() is None, f"the server died in block {b}: exit status {proc.returncode}, " \
                    f"stderr: {(tmp_path / 'serve.stderr').read_text()[-2000:]}"
                rss.append(rss_mib(proc.pid))
        seconds = time.perf_counter() - t0
        after = call(stub, reference)
        channel.close()
        assert proc.poll() is None, "the server exited after the fuzzing"
    assert after[0] == OK, f"a valid request after the fuzzing: {after[0].name} {after[2]}"
    np.testing.assert_array_equal(as_array(after[1]), as_array(before[1]),
                                  err_msg="the same request gave other numbers after the fuzzing")
    assert check_outcome(Case(name, reference, OK, None, expected), after) is None
    wrong = [problem for case, outcome in zip(cases, outcomes) if (problem := check_outcome(case, outcome))]
    seen = collections.Counter(outcome[0].name for outcome in outcomes)
    kinds = collections.Counter(case.kind.split(":")[0] for case in cases)
    # Peaks, not single readings: large requests come and go, a leak raises every later peak.
    first, second = rss[1:FUZZ_BLOCKS // 2 + 1], rss[FUZZ_BLOCKS // 2 + 1:]
    growth = max(second) - max(first)
    summary = f"{len(cases)} requests in {seconds:.1f} s, statuses {dict(seen)}, kinds {dict(kinds)}; " \
              f"server RSS per block (MiB) {[round(r) for r in rss]}: highest {max(first):.0f} in the first " \
              f"half, {max(second):.0f} in the second (bound: +{RSS_GROWTH_MIB})"
    print(summary)
    assert not wrong, f"{len(wrong)} of {len(cases)} requests got a wrong answer, e.g. {wrong[:5]}\n{summary}"
    assert set(seen) == {"OK", "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED"}, summary
    assert growth <= RSS_GROWTH_MIB, f"the server's RSS rose {growth:.0f} MiB over the second half of the " \
        f"fuzzing (bound {RSS_GROWTH_MIB} MiB)\n{summary}"


# PNG files: the server checks them before libpng decodes them.

def _adam7_png(pixels: np.ndarray, depth: int, colour: int) -> bytes:
    """An interlaced (Adam7) PNG, filter type 0, of ``pixels`` (H, W, C) in the given bit depth (8 or 16)."""
    h, w = pixels.shape[:2]
    big_endian = pixels.astype(">u2") if depth == 16 else pixels.astype(np.uint8)
    rows = b""
    for x0, y0, dx, dy in ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2),
                           (0, 1, 1, 2)):
        sub = big_endian[y0::dy, x0::dx]
        if sub.size:
            rows += b"".join(b"\x00" + row.tobytes() for row in sub)

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, depth, colour, 0, 0, 1))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def test_every_kind_of_valid_png_passes_the_check_and_decodes():
    """The check that keeps corrupt PNGs from libpng (posefix.images.check_png) refuses no valid file:
    every colour type and bit depth, palette, interlaced, odd sizes; 16-bit files keep the high byte."""
    rng = np.random.default_rng(3)
    files = []
    for h, w in [(1, 1), (3, 5), (17, 1), (1, 23), (9, 7), (40, 50)]:
        rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        for mode in ("RGB", "RGBA", "L", "LA", "P", "1", "I;16"):
            image = Image.fromarray(rgb).convert(mode) if mode != "I;16" else \
                Image.fromarray(rng.integers(0, 65536, (h, w), dtype=np.uint16))
            buffer = io.BytesIO()
            image.save(buffer, "PNG")
            expected = np.asarray(image.convert("RGB")) if mode != "I;16" else \
                np.repeat((np.asarray(image) >> 8).astype(np.uint8)[..., None], 3, axis=2)
            files.append((f"{mode} {h}×{w}", buffer.getvalue(), expected))
        wide = rng.integers(0, 65536, (h, w, 4), dtype=np.uint16)
        files.append((f"interlaced RGB8 {h}×{w}", _adam7_png(rgb, 8, 2), rgb))
        files.append((f"interlaced RGBA16 {h}×{w}", _adam7_png(wide, 16, 6), (wide[..., :3] >> 8).astype(np.uint8)))
    for name, data, expected in files:
        check_png(data)
        got = decode_encoded(data)
        assert got.dtype == torch.uint8 and got.shape == (3, *expected.shape[:2]), name
        np.testing.assert_array_equal(got.permute(1, 2, 0).numpy(), expected, err_msg=name)


# Refused calls leave nothing behind.

class FailingRefiner(StandIn):
    """Returns each pose as it came (confidence 1), but a batch holding a person whose first keypoint has
    x = FAIL_X fails as a broken model would."""
    FAIL_X = 123.25

    def refine(self, images, image_index, poses):
        if (poses[:, 0, 0] == self.FAIL_X).any():
            raise RuntimeError("the model failed")
        return poses[..., :2].copy(), np.ones(poses.shape[:2])


def _served(refiner, **options):
    """A server of ``refiner`` started on its own event-loop thread: (loop, handle, channel, stub)."""
    loop = LoopThread()

    async def create_and_start():
        handle = create_server(refiner, "127.0.0.1", 0, **options)
        await handle.start()
        return handle

    handle = loop.run(create_and_start())
    channel = grpc.insecure_channel(f"127.0.0.1:{handle.port}")
    return loop, handle, channel, pb2_grpc.PoseRefinerStub(channel)


CYCLE_CALLS = 40


def test_a_refused_call_leaves_no_reference_cycle(refiner, poses_785):
    """A refused call must not leave its request, image or frames in reference cycles: those are freed
    only by a full garbage collection, which a process holding torch's many long-lived objects runs
    rarely, so refused requests (up to the 64 MiB message limit each) would pile up. With the collector
    off, gc.collect() after the calls counts what they left in cycles: a refused call (INVALID_ARGUMENT
    from validation, INTERNAL from the model through the batcher) may leave no more than an answered one
    (gRPC's own few objects per call)."""
    loop, handle, channel, stub = _served(FailingRefiner(refiner), max_queue_delay_ms=0)
    jpeg = IMAGE_785.read_bytes()
    invalid = request_message(jpeg, poses_785[:2])
    invalid.format = 99
    failing = poses_785[:2].copy()
    failing[1, 0, 0] = FailingRefiner.FAIL_X
    requests = {"OK": request_message(jpeg, poses_785[:2]), "INVALID_ARGUMENT": invalid,
                "INTERNAL": request_message(jpeg, failing)}
    left = {}
    service_log = logging.getLogger("posefix.serve.servicer")
    service_log.disabled = True  # its INTERNAL records hold the traceback, and pytest keeps every record
    try:
        for name, request in requests.items():
            codes = {call(stub, request)[0].name for _ in range(5)}  # warm up
            gc.collect()
            gc.disable()
            try:
                codes |= {call(stub, request)[0].name for _ in range(CYCLE_CALLS)}
                left[name] = gc.collect() / CYCLE_CALLS
            finally:
                gc.enable()
            assert codes == {name}, f"{name} calls were answered {codes}"
    finally:
        service_log.disabled = False
        channel.close()
        loop.run(handle.stop(grace_s=1.0))
        loop.close()
    assert left["INVALID_ARGUMENT"] <= left["OK"] + 1 and left["INTERNAL"] <= left["OK"] + 1, \
        f"objects left in reference cycles per call, by status: {left}"


# Overload: many more concurrent clients than the queue holds.

class TimedRefiner(StandIn):
    """The refiner, recording each batch it computes: (persons, seconds)."""

    def __init__(self, inner: Refiner):
        super().__init__(inner)
        self.batches: list[tuple[int, float]] = []

    def refine(self, images, image_index, poses):
        t0 = time.perf_counter()
        out = self.inner.refine(images, image_index, poses)
        self.batches.append((len(poses), time.perf_counter() - t0))
        return out


QUEUE_PERSONS = 8  # --max-queue-size
BATCH_PERSONS = 4  # --max-batch-size
QUEUE_DELAY_MS = 2.0
OVERLOAD_CLIENTS = 24
OVERLOAD_S = 5.0  # seconds of load
BACKOFF_S = 0.02  # a refused client waits this long before its next call
OVERHEAD_S = 0.25  # allowance per call for gRPC, validation, JPEG decoding and scheduling on a busy 2-core machine
SHORT_DEADLINE_S = 0.2  # a quarter of the calls have this deadline, shorter than a full queue's wait


@pytest.mark.slow
def test_overload_refuses_with_resource_exhausted_and_bounds_the_latency_of_accepted_calls(refiner, poses_785,
                                                                                            offline_785):
    timed = TimedRefiner(refiner)
    loop, handle, channel, stub = _served(timed, max_batch_size=BATCH_PERSONS, max_queue_size=QUEUE_PERSONS,
                                          max_queue_delay_ms=QUEUE_DELAY_MS,
                                          limits=Limits(max_persons_per_image=BATCH_PERSONS))
    jpeg = IMAGE_785.read_bytes()
    requests = [request_message(jpeg, poses_785[i:i + 1]) for i in range(len(poses_785))]
    started = [0] * OVERLOAD_CLIENTS
    outcomes: list[list] = [[] for _ in range(OVERLOAD_CLIENTS)]
    end = time.perf_counter() + OVERLOAD_S

    def client(n):
        rng = np.random.default_rng([5, n])
        while time.perf_counter() < end:
            i = int(rng.integers(len(requests)))
            deadline = SHORT_DEADLINE_S if rng.random() < 0.25 else TIMEOUT
            started[n] += 1
            outcome = call(stub, requests[i], timeout=deadline)
            outcomes[n].append((i, deadline, outcome))
            if outcome[0] != OK:
                time.sleep(BACKOFF_S)

    try:
        with ThreadPoolExecutor(OVERLOAD_CLIENTS) as pool:
            futures = [pool.submit(client, n) for n in range(OVERLOAD_CLIENTS)]
            for future in futures:
                future.result(timeout=OVERLOAD_S + TIMEOUT + 30)  # each call has a TIMEOUT s deadline
        stats = handle.batcher.stats
    finally:
        channel.close()
        loop.run(handle.stop(grace_s=1.0))
        loop.close()
    done = [o for per_client in outcomes for o in per_client]
    codes = collections.Counter(outcome[0].name for _, _, outcome in done)
    late = [deadline for _, deadline, outcome in done if outcome[0] == grpc.StatusCode.DEADLINE_EXCEEDED]
    assert len(done) == sum(started), f"{sum(started)} calls made, {len(done)} answered"
    assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED"}, f"statuses {dict(codes)}"
    assert set(late) <= {SHORT_DEADLINE_S}, f"calls with a {TIMEOUT} s deadline exceeded it: {dict(codes)}"
    # Every call the batcher took was computed (OK, or too late for its short deadline) or dropped for
    # its deadline (a call can also run out of time before it reaches the batcher, while its image is
    # decoded): the server's counts match the clients'.
    computed, dropped = stats.calls, stats.expired + stats.cancelled
    assert stats.rejected == codes["RESOURCE_EXHAUSTED"], \
        f"the batcher refused {stats.rejected} calls; the clients saw {dict(codes)}"
    assert codes["OK"] <= computed and computed + dropped <= codes["OK"] + codes["DEADLINE_EXCEEDED"], \
        f"the batcher computed {computed} calls and dropped {dropped}; the clients saw {dict(codes)}"
    assert stats.largest_batch <= BATCH_PERSONS
    wrong = []
    for i, _, (code, response, details, _, _) in done:
        if code == OK:
            problem = whole(response, 1, 17)
            if problem is None:
                got = as_array(response)[0]
                dxy = np.abs(got[:, :2] - offline_785[0][i]).max()
                dconf = np.abs(got[:, 2] - offline_785[1][i]).max()
                if not (dxy <= xy_tolerance(poses_785[i:i + 1]) and dconf <= TOL):
                    problem = f"differs from the offline engine by {dxy:.3g} px and {dconf:.3g} in confidence"
            if problem:
                wrong.append(f"person {i}: {problem}")
    assert not wrong, f"{len(wrong)} accepted calls came back wrong, e.g. {wrong[:5]}"
    # A call is accepted with at most QUEUE_PERSONS persons waiting, itself included. Before its batch
    # starts the worker finishes the batch in progress and then the persons ahead of it, in full
    # batches (single-person calls: a batch closes short only when nobody else waits), so it waits at
    # most floor((QUEUE_PERSONS - 1) / BATCH_PERSONS) + 1 batches and the queue delay, then its own.
    compute = np.array([seconds for _, seconds in timed.batches])
    batches_bound = (QUEUE_PERSONS - 1) // BATCH_PERSONS + 2
    bound = batches_bound * compute.max() + QUEUE_DELAY_MS / 1000 + OVERHEAD_S
    latency = np.array([outcome[4] for _, _, outcome in done if outcome[0] == OK])
    p99 = float(np.percentile(latency, 99))
    summary = f"{len(done)} calls from {OVERLOAD_CLIENTS} clients in {OVERLOAD_S:g} s: {dict(codes)}; the " \
              f"batcher computed {computed} and dropped {dropped} for their deadline; {len(compute)} batches, " \
              f"{stats.persons / max(len(compute), 1):.1f} persons each, compute mean {compute.mean() * 1000:.0f} " \
              f"ms, max {compute.max() * 1000:.0f} ms; accepted latency p50 {np.median(latency) * 1000:.0f} ms, " \
              f"p99 {p99 * 1000:.0f} ms, max {latency.max() * 1000:.0f} ms; bound {batches_bound} × " \
              f"{compute.max() * 1000:.0f} + {QUEUE_DELAY_MS:g} + {OVERHEAD_S * 1000:.0f} = {bound * 1000:.0f} ms"
    print(summary)
    assert codes["OK"] >= 20 and codes["RESOURCE_EXHAUSTED"] >= 20, f"not an overload: {summary}"
    assert p99 <= bound, f"the p99 latency of accepted calls exceeds the queue's bound: {summary}"


# SIGTERM under load.

SIGTERM_CLIENTS = 8
SIGTERM_AFTER_OK = 30  # calls answered OK before the SIGTERM
AFTER_EXIT_S = 0.5  # clients go on calling this long after the server exited


@pytest.mark.slow
@pytest.mark.parametrize("grace_s", [5.0, 0.0], ids=["calls-finish", "no-grace"])
def test_sigterm_under_load_never_gives_a_partial_result(checkpoint, tmp_path, poses_785, offline_785, grace_s):
    # With time to finish, calls in flight finish and later ones are refused (UNAVAILABLE), but for gRPC's
    # CANCELLED of a call not yet handled (below); without, grpc answers the calls the stopping server cuts
    # with UNAVAILABLE (GOAWAY) or, at times, CANCELLED.
    allowed = {"OK", "UNAVAILABLE"} if grace_s else {"OK", "UNAVAILABLE", "CANCELLED"}
    jpeg = IMAGE_785.read_bytes()
    stop = threading.Event()
    records: list[list] = [[] for _ in range(SIGTERM_CLIENTS)]
    started = [0] * SIGTERM_CLIENTS
    with serve_process(checkpoint, tmp_path, "--max-batch-size", "8", "--max-queue-delay-ms", "2",
                       "--grace-s", f"{grace_s:g}") as (proc, port):
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        stub = pb2_grpc.PoseRefinerStub(channel)

        def client(n):
            rng = np.random.default_rng([9, n])
            deadline = time.perf_counter() + 120  # a bound on the whole loop, whatever happens
            while not stop.is_set() and time.perf_counter() < deadline:
                chosen = rng.choice(len(poses_785), size=int(rng.integers(1, 4)), replace=False)
                started[n] += 1
                t0 = time.monotonic()
                outcome = call(stub, request_message(jpeg, poses_785[chosen]))
                records[n].append((t0, time.monotonic(), chosen, outcome))
                if outcome[0] != OK:
                    time.sleep(BACKOFF_S)

        with ThreadPoolExecutor(SIGTERM_CLIENTS) as pool:
            futures = [pool.submit(client, n) for n in range(SIGTERM_CLIENTS)]
            end = time.monotonic() + 60
            while sum(r[3][0] == OK for per in records for r in list(per)) < SIGTERM_AFTER_OK:
                assert time.monotonic() < end, f"fewer than {SIGTERM_AFTER_OK} calls answered in 60 s"
                time.sleep(0.05)
            term = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=grace_s + 30)
            finally:
                exited = time.monotonic()
                time.sleep(AFTER_EXIT_S)
                stop.set()
                for future in futures:
                    future.result(timeout=TIMEOUT + 30)
        channel.close()
        out = proc.stdout.read()
    done = [r for per in records for r in per]
    codes = collections.Counter(r[3][0].name for r in done)
    in_flight = collections.Counter(r[3][0].name for r in done if r[0] < term < r[1])
    details = {}  # the first details of each status
    for r in done:
        details.setdefault(r[3][0].name, r[3][2][:150])
    details.pop("OK")
    summary = f"{len(done)} calls: {dict(codes)}; in flight at the SIGTERM: {dict(in_flight)}; the server " \
              f"exited {exited - term:.2f} s after it (--grace-s {grace_s:g}); details {details}"
    print(summary)
    assert proc.returncode == 0, f"posefix serve exited with {proc.returncode}: {summary}"
    assert out.rstrip().endswith("posefix serve: stopped"), out
    assert exited - term <= grace_s + 15, summary
    assert len(done) == sum(started), f"{sum(started)} calls made, {len(done)} answered"
    if grace_s:
        # gRPC core answers CANCELLED, even within the grace period, for a call it had received but not yet
        # handed to a handler when the shutdown began (grpc/grpc#41785): only calls in flight at the SIGTERM,
        # and fewer than those it completed.
        assert codes["CANCELLED"] == in_flight["CANCELLED"] < in_flight["OK"], summary
        allowed = allowed | {"CANCELLED"}
    assert set(codes) <= allowed, f"statuses beyond {sorted(allowed)}: {summary}"
    assert codes["UNAVAILABLE"] >= 1, f"no call was refused after the server stopped: {summary}"
    if grace_s:
        assert in_flight["OK"] >= 1, f"no call in flight at the SIGTERM was completed: {summary}"
    wrong = []
    for _, _, chosen, (code, response, details, _, _) in done:
        if code == OK:
            problem = whole(response, len(chosen), 17)
            if problem is None:
                got = as_array(response)
                dxy = np.abs(got[..., :2] - offline_785[0][chosen]).max()
                if not (dxy <= xy_tolerance(poses_785[chosen]) and np.abs(got[..., 2] - offline_785[1][chosen]).max()
                        <= TOL):
                    problem = f"differs from the offline engine by {dxy:.3g} px"
            if problem:
                wrong.append(f"persons {chosen.tolist()}: {problem}")
    assert not wrong, f"{len(wrong)} OK responses are not whole and right, e.g. {wrong[:5]}\n{summary}"
