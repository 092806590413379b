"""Pose similarity search: find, among many refined poses, those whose pose matches a query best.

Glossary: N poses in an index, Q queries, K = 17 COCO joints; a pose is (K, 3) = (x, y, score) in image
pixels, a joint present where its score is > 0 and x, y are finite.

Embedding (:func:`embed`): the present joints translated to their centroid and divided by their RMS
distance from it (so neither where the person stands nor how large they are matters), optionally rotated
so that the torso (mid-hip → mid-shoulder) points up; each joint keeps its confidence, the score clipped to
[0, 1], 0 for an absent joint. Only the present joints take part in the centroid and the scale.

Distance (:func:`pose_distance`), the confidence-weighted mean joint distance Move Mirror used, made
symmetric and aware of missing joints: the two poses are first normalised again, each over the joints both
have (centroid and RMS radius of those), so that a joint one pose lacks moves neither pose; then joint k
weighs ω_k = (c_ak + c_bk) / 2 and contributes the Euclidean distance between the two normalised joints
where both poses have it, :data:`MISSING_DISTANCE` (one RMS radius) where only one has it, nothing where
neither has it; D = Σ ω_k d_k / Σ ω_k. With
``mirror``, D is the smaller of the distance to the pose and to its mirror image (x flipped, left and right
swapped), so a person matches their mirror image. This is the one definition every search uses.

Index (:class:`PoseIndex`): the poses as given, their pose ids, image ids, boxes, instance scores and image
files, searched exactly (numpy, every pose) or approximately (faiss' inverted-file index on the normalised
coordinates, each joint's deviation from the index's mean pose weighed by the square root of its confidence,
gives candidates, which the exact distance then ranks; needs the ``search`` extra). Stored as
one uncompressed ``.npz`` of plain arrays (read without pickle: loading a file runs no code of it), with a
format name and a version, written atomically.
"""
from __future__ import annotations

import io
import math
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import InputError, require
from .fileio import atomic_path
from .keypoints import NUM_KEYPOINTS, PARTNER, check_poses, present

FORMAT_NAME = "posefix-pose-index"
VERSION = 1
MISSING_DISTANCE = 1.0  # a joint one pose has and the other lacks: one RMS radius of the person
METHODS = ("auto", "exact", "ivf")
AUTO_EXACT_BELOW = 50_000  # "auto": an exact index below this many poses, an approximate one from there
CHUNK = 1 << 16  # poses compared with a query at once (bounds the temporary memory)
_SHOULDERS, _HIPS = (5, 6), (11, 12)
HUGE = 1e150  # a pose with a coordinate beyond this is scaled down before it is normalised (no overflow)
MAX_POSES = 1 << 28  # the most poses an index file may declare
MAX_FILES = 1 << 24  # the most image file names it may hold
MAX_NPROBE = 1 << 16  # bounds of an index's stored search settings
MAX_CANDIDATES = 1 << 10


def _faiss():
    return require("faiss", "search", "the approximate pose index")


@dataclass(frozen=True)
class Embedding:
    """Normalised poses: x, y (N, K) float32 in RMS radii about the centroid (0 where absent) and weight (N, K)
    float32, the confidence in [0, 1] (0: absent). x and y apart, each contiguous: what the distance sums over."""

    x: np.ndarray
    y: np.ndarray
    weight: np.ndarray

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, rows) -> Embedding:
        return Embedding(self.x[rows], self.y[rows], self.weight[rows])

    @property
    def xy(self) -> np.ndarray:
        """(N, K, 2)."""
        return np.stack([self.x, self.y], axis=-1)

    @staticmethod
    def concatenate(parts) -> Embedding:
        return Embedding(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("x", "y", "weight")))


def mirror(poses) -> np.ndarray:
    """The mirror image of poses (N, K, 3): x negated, left and right joints swapped (a new array)."""
    out = np.array(poses, dtype=np.float64)[..., PARTNER, :]
    out[..., 0] = -out[..., 0]
    return out


def embed(poses, rotate: bool = False) -> Embedding:
    """Poses (N, K, 3) in pixels → their :class:`Embedding`. A pose whose present joints all coincide (one joint)
    keeps them at the centroid, unscaled; a pose without a present joint has weight 0 everywhere (it is at
    :data:`MISSING_DISTANCE` from every pose)."""
    poses = np.asarray(poses, dtype=np.float64).reshape(-1, NUM_KEYPOINTS, 3)
    have = present(poses)
    xy = np.where(have[..., None], np.nan_to_num(poses[..., :2]), 0.0)
    big = np.abs(xy).max((-2, -1)) > HUGE  # (N,): scaled down first, so that sums cannot overflow
    if big.any():
        xy[big] /= np.abs(xy[big]).max((-2, -1))[:, None, None]
    n = have.sum(-1, keepdims=True)  # (N, 1)
    centre = xy.sum(-2) / np.maximum(n, 1)  # (N, 2)
    xy = np.where(have[..., None], xy - centre[:, None], 0.0)
    radius = np.sqrt((xy ** 2).sum((-2, -1)) / np.maximum(n[:, 0], 1))  # (N,)
    xy = xy / np.where(radius > 0, radius, 1.0)[:, None, None]
    if rotate:
        both = have[:, _SHOULDERS].all(-1) & have[:, _HIPS].all(-1)
        torso = xy[:, _SHOULDERS].mean(1) - xy[:, _HIPS].mean(1)  # (N, 2), y down
        angle = np.where(both, np.arctan2(torso[:, 0], -torso[:, 1]), 0.0)  # 0 when the torso points up
        c, s = np.cos(angle)[:, None], np.sin(angle)[:, None]
        x, y = xy[..., 0], xy[..., 1]
        xy = np.stack([c * x + s * y, c * y - s * x], axis=-1)  # turned by -angle
    weight = np.where(have, np.clip(poses[..., 2], 0.0, 1.0), 0.0)
    f32 = np.float32
    return Embedding(np.ascontiguousarray(xy[..., 0], f32), np.ascontiguousarray(xy[..., 1], f32), weight.astype(f32))


def pose_distance(a: Embedding, b: Embedding) -> np.ndarray:
    """The distance (see the module's docstring) of each pose of ``a`` to each of ``b``, broadcasting their
    leading axes: ``a`` (..., K) against ``b`` (..., K) → (...). 0 for equal poses; a pose with no present joint
    is at :data:`MISSING_DISTANCE` from everything.

    Where both poses have all the joints either has, normalising again over the common joints changes nothing
    (each is normalised over its own already): those pairs skip it."""
    shape = np.broadcast_shapes(a.x.shape, b.x.shape)
    ax, ay, wa, bx, by, wb = (np.broadcast_to(v, shape).reshape(-1, shape[-1])
                              for v in (a.x, a.y, a.weight, b.x, b.y, b.weight))
    ha, hb = wa > 0, wb > 0
    both = ha & hb
    dx, dy = ax - bx, ay - by
    d = np.sqrt(dx * dx + dy * dy)
    redo = np.flatnonzero((both != ha).any(-1) | (both != hb).any(-1))
    if redo.size:
        m = both[redo].astype(np.float32)
        count = np.maximum(m.sum(-1, keepdims=True), 1)
        xa, ya, xb, yb = ((v[redo] - (v[redo] * m).sum(-1, keepdims=True) / count) * m for v in (ax, ay, bx, by))
        ra, rb = (np.sqrt((u * u + v * v).sum(-1, keepdims=True) / count) for u, v in ((xa, ya), (xb, yb)))
        ra[ra == 0], rb[rb == 0] = 1, 1
        dx, dy = xa / ra - xb / rb, ya / ra - yb / rb
        d[redo] = np.sqrt(dx * dx + dy * dy)
    d = np.where(both, d, np.float32(MISSING_DISTANCE))
    w = (wa + wb) * np.float32(0.5)
    total = w.sum(-1)
    out = np.where(total > 0, (w * d).sum(-1) / np.where(total > 0, total, 1), np.float32(MISSING_DISTANCE))
    return out.reshape(shape[:-1])


def distances_to(query: Embedding, poses: Embedding) -> np.ndarray:
    """One query (K,) against N poses → (N,) float32, in chunks of :data:`CHUNK` poses."""
    out = np.empty(len(poses), dtype=np.float32)
    q = query[None]
    for lo in range(0, len(poses), CHUNK):
        out[lo:lo + CHUNK] = pose_distance(q, poses[lo:lo + CHUNK])
    return out


def _smallest(d: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k smallest of d, ascending by value then by index."""
    if k < len(d):
        part = np.argpartition(d, k - 1)[:k]
        cut = d[part].max()
        part = np.flatnonzero(d <= cut)  # every tie at the cut, so that the order below is deterministic
    else:
        part = np.arange(len(d))
    return part[np.lexsort((part, d[part]))][:k]


@dataclass
class Matches:
    """A search's answer: per query, the k nearest poses as rows of the index (Q, k), their distances
    (Q, k) ascending and whether the pose's mirror image matched (Q, k) (only with ``mirror``)."""

    rows: np.ndarray
    distances: np.ndarray
    mirrored: np.ndarray


@dataclass
class PoseIndex:
    """Poses to search (see the module's docstring). keypoints (N, K, 3) pixels as given; ids (N,) int64 pose
    ids, unique; image_ids (N,) int64; boxes (N, 4) xywh pixels; scores (N,) instance scores; files: the image
    files named by ``file_index`` (N,) (-1: no file); rotate: whether the embedding aligns the torso;
    method: "exact" or "ivf" (the approximate index, faiss); nprobe: inverted lists an approximate search
    visits; candidates: approximate candidates per query ranked exactly, as a multiple of k (at least 300)."""

    keypoints: np.ndarray
    ids: np.ndarray
    image_ids: np.ndarray
    boxes: np.ndarray
    scores: np.ndarray
    files: list[str]
    file_index: np.ndarray
    rotate: bool = False
    method: str = "exact"
    nprobe: int = 32
    candidates: int = 30
    template: np.ndarray | None = None  # (K, 2) the mean normalised pose the approximate index's vectors deviate from
    _embedding: Embedding | None = field(default=None, repr=False)
    _ann: object = field(default=None, repr=False)

    def __len__(self) -> int:
        return self.keypoints.shape[0]

    @property
    def embedding(self) -> Embedding:
        if self._embedding is None or len(self._embedding) != len(self):
            self._embedding = embed(self.keypoints, self.rotate)
        return self._embedding

    @classmethod
    def build(cls, keypoints, ids=None, image_ids=None, boxes=None, scores=None, files=None, *, rotate=False,
              method="auto") -> PoseIndex:
        """An index of ``keypoints`` (N, K, 3). ids default to 0..N-1, image_ids to 0, boxes to the box of each
        pose's present joints, scores to the mean score of its present joints, files to none (a list of N file
        paths or None each). method: "exact", "ivf" or "auto" (exact below :data:`AUTO_EXACT_BELOW` poses)."""
        if method not in METHODS:
            raise InputError("method", f"must be one of {list(METHODS)}, got {method!r}")
        index = cls(np.zeros((0, NUM_KEYPOINTS, 3)), np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, 4)),
                    np.zeros(0), [], np.zeros(0, np.int64), bool(rotate), "exact")
        index.add(keypoints, ids, image_ids, boxes, scores, files)
        if method == "ivf" and len(index) == 0:
            raise InputError("keypoints", "holds no pose: an approximate (ivf) index needs at least one")
        if method == "ivf" or (method == "auto" and len(index) >= AUTO_EXACT_BELOW):
            index.method = "ivf"
            index._train_ann()
        return index

    def add(self, keypoints, ids=None, image_ids=None, boxes=None, scores=None, files=None) -> None:
        """Append poses (see :meth:`build`); ids default to the numbers after the largest id held. Checks
        everything before changing anything: on an error the index is as it was."""
        kp = check_poses(keypoints, "keypoints", finite=False)
        n = kp.shape[0]
        kp = _absent_as_zeros(kp)
        have = present(kp)
        emb = embed(kp, self.rotate)
        if ids is None:
            start = int(self.ids.max()) + 1 if len(self.ids) else 0
            ids = np.arange(start, start + n, dtype=np.int64)
        ids = np.asarray(ids, dtype=np.int64).reshape(n)
        dup = np.flatnonzero(np.isin(ids, self.ids) | _repeated(ids))
        if dup.size:
            raise InputError(f"poses[{int(dup[0])}].id", f"pose id {int(ids[dup[0]])} is already in the index")
        image_ids = np.zeros(n, np.int64) if image_ids is None else np.asarray(image_ids, np.int64).reshape(n)
        if boxes is None:
            boxes = _keypoint_boxes(kp, have)
        boxes = np.asarray(boxes, dtype=np.float64).reshape(n, 4)
        if scores is None:
            scores = np.where(have, kp[..., 2], 0).sum(-1) / np.maximum(have.sum(-1), 1)
        scores = np.asarray(scores, dtype=np.float64).reshape(n)
        for name, values in (("boxes", boxes), ("scores", scores)):
            bad = np.flatnonzero(~np.isfinite(values.reshape(n, -1)).all(-1))
            if bad.size:
                raise InputError(f"poses[{int(bad[0])}].{name[:-1]}", "must be finite")
        file_list = list(self.files)
        where = {f: i for i, f in enumerate(file_list)}
        file_index = np.full(n, -1, np.int64)
        for i, f in enumerate(files if files is not None else [None] * n):
            if f is not None:
                f = str(f)
                file_index[i] = where.setdefault(f, len(file_list))
                if file_index[i] == len(file_list):
                    file_list.append(f)
        if self._ann is not None:
            self._ann.add(_ann_vectors(emb, self.template))
        if self._embedding is None and len(self) == 0:
            self._embedding = emb
        elif self._embedding is not None:
            self._embedding = Embedding.concatenate([self._embedding, emb])
        self.keypoints = np.concatenate([self.keypoints, kp])
        self.ids = np.concatenate([self.ids, ids])
        self.image_ids = np.concatenate([self.image_ids, image_ids])
        self.boxes = np.concatenate([self.boxes, boxes])
        self.scores = np.concatenate([self.scores, scores])
        self.files, self.file_index = file_list, np.concatenate([self.file_index, file_index])

    def _train_ann(self) -> None:
        faiss = _faiss()
        e = self.embedding
        have = (e.weight > 0)[..., None]
        self.template = ((e.xy * have).sum(0) / np.maximum(have.sum(0), 1)).astype(np.float32)
        vectors = _ann_vectors(e, self.template)
        nlist = max(1, min(int(math.sqrt(len(self))), len(self) // 39))
        quantizer = faiss.IndexFlatL2(vectors.shape[1])
        ann = faiss.IndexIVFFlat(quantizer, vectors.shape[1], nlist)
        ann.cp.seed = 0
        ann.cp.max_points_per_centroid = 64  # k-means on a sample of 64 poses a list: seconds at 10^6 poses
        ann.train(vectors)
        ann.add(vectors)
        self._ann = ann

    def file_of(self, row: int) -> str | None:
        i = int(self.file_index[row])
        return self.files[i] if i >= 0 else None

    def search(self, queries, k: int = 10, *, mirror_too: bool = False, exact: bool | None = None) -> Matches:
        """The k nearest poses of each query (Q, K, 3) in pixels (see :class:`Matches`). ``mirror_too``: the
        query's mirror image counts as the query. ``exact``: rank every pose (default: as the index's method)."""
        q = check_poses(queries, "query", finite=False)
        if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
            raise InputError("k", f"must be a positive integer, got {k!r}")
        if k > len(self):
            raise InputError("k", f"{k} is more than the {len(self)} poses in the index")
        qe = embed(q, self.rotate)
        empty = ~(qe.weight > 0).any(-1)
        if empty.any():
            raise InputError(f"query[{int(np.argmax(empty))}].keypoints", "has no present joint (score > 0)")
        qm = embed(mirror(q), self.rotate) if mirror_too else None
        exact = self.method == "exact" if exact is None else exact
        rows = np.zeros((len(q), k), np.int64)
        dist = np.zeros((len(q), k), np.float32)
        flip = np.zeros((len(q), k), bool)
        cand = None if exact or self._approximate_k(k) is None else self._candidates(qe, qm, k)
        for i in range(len(q)):
            if cand is not None and len(cand[i]) < k:  # fewer candidates than asked for: rank every pose
                cand[i] = np.arange(len(self))
            pool = self.embedding if cand is None else self.embedding[cand[i]]
            d = distances_to(qe[i], pool)
            m = np.zeros(len(d), bool)
            if qm is not None:
                dm = distances_to(qm[i], pool)
                m = dm < d
                d = np.where(m, dm, d)
            best = _smallest(d, k)
            rows[i] = best if cand is None else cand[i][best]
            dist[i], flip[i] = d[best], m[best]
        return Matches(rows, dist, flip)

    def _approximate_k(self, k: int) -> int | None:
        """The candidates an approximate search of k asks the approximate index for, or None where that is a
        large part of the index (an exact search then costs no more)."""
        m = max(300, self.candidates * k)
        return None if m >= len(self) // 2 else m

    def _candidates(self, qe: Embedding, qm: Embedding | None, k: int) -> list[np.ndarray]:
        """Per query, the rows the approximate index proposes (those of the mirror image too), unique."""
        if self._ann is None:
            self._train_ann()
        m = self._approximate_k(k)
        self._ann.nprobe = min(self.nprobe, self._ann.nlist)
        found = [self._ann.search(_ann_vectors(e, self.template), m)[1] for e in (qe, qm) if e is not None]
        rows = np.concatenate(found, axis=1)
        return [np.unique(r[r >= 0]) for r in rows]

    # Files.

    def save(self, path: str | Path) -> None:
        """Write the index to ``path`` atomically (the approximate index with it, so loading needs no training)."""
        arrays = {"format": np.array(FORMAT_NAME), "version": np.array(VERSION, np.int64),
                  "keypoints": self.keypoints, "ids": self.ids, "image_ids": self.image_ids, "boxes": self.boxes,
                  "scores": self.scores, "files": np.array(self.files, dtype=np.str_).reshape(-1),
                  "file_index": self.file_index, "rotate": np.array(self.rotate),
                  "method": np.array(self.method), "nprobe": np.array(self.nprobe, np.int64),
                  "candidates": np.array(self.candidates, np.int64)}
        if self.method == "ivf":
            if self._ann is None:
                self._train_ann()
            arrays["ann"] = _faiss().serialize_index(self._ann)
            arrays["template"] = self.template
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, **arrays)

    @classmethod
    def load(cls, path: str | Path, field_: str = "--index") -> PoseIndex:
        """Read an index file; an :class:`InputError` naming ``field_`` for a missing, corrupt or foreign file,
        or one of another version."""
        source = str(path)
        try:
            data = Path(path).read_bytes()
        except FileNotFoundError:
            raise InputError(field_, "file not found", source) from None
        except OSError as e:
            raise InputError(field_, f"cannot read: {e.strerror or e}", source) from None
        try:
            arrays = _read_npz(data)
        except _Corrupt as e:
            raise InputError(f"{field_}: {e.field}", e.problem, source) from None
        except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError, zlib.error) as e:
            raise InputError(field_, f"not a posefix pose index, or a corrupt one ({type(e).__name__}: {e})",
                             source) from None
        if str(arrays.get("format", "")) != FORMAT_NAME:
            raise InputError(field_, "not a posefix pose index (no format name)", source)
        version = arrays.get("version")
        if version is None or version.shape != () or version.dtype.kind not in "iu" or int(version) != VERSION:
            raise InputError(field_, f"pose index version {version}; this posefix reads version {VERSION} "
                             "(build the index again with posefix index build)", source)
        try:
            index = cls._from_arrays(arrays)
        except _Corrupt as e:
            raise InputError(f"{field_}: {e.field}", e.problem, source) from None
        except (KeyError, ValueError, TypeError, RuntimeError, MemoryError, OverflowError) as e:
            raise InputError(field_, f"a corrupt pose index ({type(e).__name__}: {e})", source) from None
        return index

    @classmethod
    def _from_arrays(cls, a: dict) -> PoseIndex:
        """The index the arrays of a file describe, every array checked (shape, type, values) before use; a
        :class:`_Corrupt` names the first array that is wrong."""
        need = ("keypoints", "ids", "image_ids", "boxes", "scores", "files", "file_index", "rotate", "method",
                "nprobe", "candidates")
        for name in need:
            if name not in a:
                raise _Corrupt(name, "is missing")
        kinds = {"keypoints": "f", "ids": "iu", "image_ids": "iu", "boxes": "f", "scores": "f", "file_index": "iu",
                 "files": "U", "rotate": "b", "method": "U", "nprobe": "iu", "candidates": "iu", "template": "f",
                 "ann": "u"}
        for name, kind in kinds.items():
            if name in a and a[name].dtype.kind not in kind:
                raise _Corrupt(name, f"has the wrong type {a[name].dtype}")
        kp = np.asarray(a["keypoints"], np.float64)
        if kp.ndim == 3 and kp.shape[1:] == (NUM_KEYPOINTS, 3):
            kp = _absent_as_zeros(kp)
        if kp.ndim != 3:
            raise _Corrupt("keypoints", f"has shape {kp.shape}, expected (N, {NUM_KEYPOINTS}, 3)")
        n = kp.shape[0]
        shapes = {"keypoints": (n, NUM_KEYPOINTS, 3), "ids": (n,), "image_ids": (n,), "boxes": (n, 4),
                  "scores": (n,), "file_index": (n,), "rotate": (), "method": (), "nprobe": (), "candidates": ()}
        for name, shape in shapes.items():
            if a[name].shape != shape:
                raise _Corrupt(name, f"has shape {a[name].shape}, expected {shape}")
        for name in ("boxes", "scores"):
            bad = np.argwhere(~np.isfinite(a[name]))
            if len(bad):
                raise _Corrupt(f"{name}[{', '.join(map(str, bad[0]))}]",
                               f"must be finite, got {a[name][tuple(bad[0])]}")
        ids = np.asarray(a["ids"], np.int64)
        if a["ids"].dtype.kind == "u" and n and int(a["ids"].max()) > np.iinfo(np.int64).max:
            raise _Corrupt("ids", "out of the int64 range")
        if n and _repeated(ids).any():
            raise _Corrupt(f"ids[{int(np.argmax(_repeated(ids)))}]", "repeats an earlier pose id")
        files = [str(f) for f in a["files"].reshape(-1)]
        fi = np.asarray(a["file_index"], np.int64)
        if n and (fi.min() < -1 or fi.max() >= len(files)):
            raise _Corrupt("file_index", f"must lie in [-1, {len(files) - 1}]")
        method = str(a["method"])
        if method not in ("exact", "ivf"):
            raise _Corrupt("method", f"must be exact or ivf, got {method!r}")
        nprobe, candidates = int(a["nprobe"]), int(a["candidates"])
        if not 1 <= nprobe <= MAX_NPROBE:
            raise _Corrupt("nprobe", f"must lie in [1, {MAX_NPROBE}], got {nprobe}")
        if not 1 <= candidates <= MAX_CANDIDATES:
            raise _Corrupt("candidates", f"must lie in [1, {MAX_CANDIDATES}], got {candidates}")
        index = cls(kp, ids, np.asarray(a["image_ids"], np.int64), np.asarray(a["boxes"], np.float64),
                    np.asarray(a["scores"], np.float64), files, fi, bool(a["rotate"]), method, nprobe, candidates)
        if method == "ivf":
            for name in ("ann", "template"):
                if name not in a:
                    raise _Corrupt(name, "is missing (an approximate index)")
            template = a["template"]
            if template.shape not in ((NUM_KEYPOINTS, 2), (2 * NUM_KEYPOINTS,)) or not np.isfinite(template).all():
                raise _Corrupt("template", f"must be {NUM_KEYPOINTS} finite (x, y), got shape {template.shape}")
            index._ann = _checked_ann(np.asarray(a["ann"], np.uint8), n)
            index.template = np.asarray(template, np.float32).reshape(NUM_KEYPOINTS, 2)
        return index


class _Corrupt(Exception):
    """An array of an index file that is wrong: its name (``field``) and what is wrong (``problem``)."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field}: {problem}")
        self.field, self.problem = field, problem


MAX_MEMBER_BYTES = 1 << 36  # no array of an index file may declare more


def _read_npz(data: bytes) -> dict:
    """The arrays of an ``.npz`` held in ``data``, each member's header read and its declared size checked
    against the member's own stored size before anything is allocated. Members must be stored uncompressed
    (as :meth:`PoseIndex.save` writes them), so that no member can inflate beyond the file."""
    out = {}
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        for info in z.infolist():
            name = info.filename.removesuffix(".npy")
            if info.compress_type != zipfile.ZIP_STORED:
                raise _Corrupt(name, "is compressed; posefix writes pose indexes uncompressed (nothing may inflate)")
            if info.file_size > len(data):
                raise _Corrupt(name, f"declares {info.file_size} bytes, more than the file holds")
            with z.open(info) as f:
                version = np.lib.format.read_magic(f)
                if version == (1, 0):
                    shape, fortran, dtype = np.lib.format.read_array_header_1_0(f, max_header_size=10_000)
                elif version == (2, 0):
                    shape, fortran, dtype = np.lib.format.read_array_header_2_0(f, max_header_size=10_000)
                else:
                    raise _Corrupt(name, f"has the .npy version {version}, not 1.0 or 2.0")
                if dtype.hasobject or dtype.fields is not None:
                    raise _Corrupt(name, f"is of type {dtype}, not a plain number or text array")
                count = math.prod(shape)
                declared = count * dtype.itemsize
                if declared > MAX_MEMBER_BYTES or declared != info.file_size - f.tell():
                    raise _Corrupt(name, f"declares shape {shape} ({declared} bytes) in a member of "
                                   f"{info.file_size - f.tell()} bytes")
                raw = f.read(declared)
                if len(raw) != declared:
                    raise _Corrupt(name, "is truncated")
                array = np.frombuffer(raw, dtype=dtype, count=count)
                out[name] = array.reshape(shape[::-1]).T if fortran else array.reshape(shape)
    return out


def _checked_ann(blob: np.ndarray, n: int):
    """The approximate index serialised in ``blob``, checked: an inverted-file index of flat float vectors of
    2K numbers over an L2 quantizer, holding each of the n poses (ids 0..n-1) exactly once, every number finite."""
    faiss = _faiss()
    try:
        ann = faiss.deserialize_index(blob)
    except Exception as e:  # noqa: BLE001 (faiss raises RuntimeError, or others for some damaged blobs)
        raise _Corrupt("ann", f"not a readable approximate index ({type(e).__name__})") from None
    d = 2 * NUM_KEYPOINTS
    if not isinstance(ann, faiss.IndexIVFFlat) or ann.d != d or ann.ntotal != n or ann.metric_type != faiss.METRIC_L2:
        raise _Corrupt("ann", f"must be an IVF-flat L2 index of {n} vectors of {d} numbers")
    quantizer = faiss.downcast_index(ann.quantizer)
    if not isinstance(quantizer, faiss.IndexFlatL2) or quantizer.d != d or quantizer.ntotal != ann.nlist \
            or not 1 <= ann.nlist <= max(n, 1):
        raise _Corrupt("ann", "its quantizer must be a flat L2 index of one centroid per list")
    if not np.isfinite(quantizer.reconstruct_n(0, quantizer.ntotal)).all():
        raise _Corrupt("ann", "its centroids must be finite")
    seen = np.zeros(n, np.int64)
    lists = ann.invlists
    if lists.code_size != 4 * d:
        raise _Corrupt("ann", "its vectors must be float32")
    for i in range(ann.nlist):
        size = lists.list_size(i)
        if size == 0:
            continue
        ids = faiss.rev_swig_ptr(lists.get_ids(i), size).copy()
        codes = faiss.rev_swig_ptr(lists.get_codes(i), size * lists.code_size).view(np.float32)
        if ((ids < 0) | (ids >= n)).any():
            raise _Corrupt("ann", f"list {i} holds a pose id outside [0, {n - 1}]")
        if not np.isfinite(codes).all():
            raise _Corrupt("ann", f"list {i} holds a non-finite number")
        np.add.at(seen, ids, 1)
    if (seen != 1).any():
        raise _Corrupt("ann", f"pose {int(np.argmax(seen != 1))} is held {int(seen[np.argmax(seen != 1)])} times")
    return ann


def _ann_vectors(e: Embedding, template: np.ndarray) -> np.ndarray:
    """What the approximate index compares: each joint's deviation from ``template`` (K, 2) times the square root
    of its confidence (0 for an absent joint), (N, 2K) float32."""
    dev = np.where((e.weight > 0)[..., None], e.xy - template, 0) * np.sqrt(e.weight)[..., None]
    return np.ascontiguousarray(dev.reshape(len(e), -1), dtype=np.float32)


def _absent_as_zeros(kp: np.ndarray) -> np.ndarray:
    """Poses (N, K, 3) with every joint that holds a non-finite number (an absent joint, or one no search can
    use) as (0, 0, 0), so that the index holds and answers finite numbers only."""
    return np.where(np.isfinite(kp).all(-1, keepdims=True), kp, 0.0)


def _repeated(ids: np.ndarray) -> np.ndarray:
    """(N,) bool: the id appeared earlier in ``ids``."""
    _, first = np.unique(ids, return_index=True)
    out = np.ones(len(ids), bool)
    out[first] = False
    return out


def _keypoint_boxes(kp: np.ndarray, have: np.ndarray) -> np.ndarray:
    """The xywh box of each pose's present joints (zeros for a pose without)."""
    x = np.where(have, kp[..., 0], np.nan)
    y = np.where(have, kp[..., 1], np.nan)
    out = np.zeros((kp.shape[0], 4))
    ok = have.any(-1)
    if ok.any():
        x0, y0 = np.nanmin(x[ok], -1), np.nanmin(y[ok], -1)
        out[ok] = np.stack([x0, y0, np.nanmax(x[ok], -1) - x0, np.nanmax(y[ok], -1) - y0], -1)
    return out
