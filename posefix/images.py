"""Images: finding the files, checking PNG and JPEG bytes before decoding, and decoding them with Pillow
(a request's raw pixels by :func:`raw_to_tensor`) into (3, H, W) uint8 RGB tensors; a JPEG at 1/2, 1/4 or 1/8
of its size by DCT scaling where a caller needs no more (:func:`decode_encoded`'s ``reduce``)."""
from __future__ import annotations

import io
import math
import struct
import warnings
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch

from .errors import InputError
from .formats import image_under

if TYPE_CHECKING:
    from ._proto import pb2


DEFAULT_MAX_IMAGE_PIXELS = 64 << 20  # height × width of an image file read offline (192 MiB as RGB)
max_image_pixels = DEFAULT_MAX_IMAGE_PIXELS  # the limit in force (the commands' --max-image-pixels sets it)


def decode(path: str | Path) -> torch.Tensor:
    """Decode an image file to (3, H, W) uint8 RGB (see :func:`decode_encoded`); a missing or corrupt
    file, or one whose header declares more than :data:`max_image_pixels` pixels (checked before
    decoding), is an InputError naming it."""
    return decode_reduced(path, 1)[0]


class Reduced(NamedTuple):
    """A decoded image and the reduction r it was decoded at (:func:`decode_reduced`): its pixel i is centred
    on ``r · i + (r - 1) / 2`` of the full image."""

    image: torch.Tensor
    reduction: int


def decode_reduced(path: str | Path, reduce: int) -> Reduced:
    """:func:`decode` at 1/``reduce`` of the image's size where it is a JPEG of at least ``reduce`` pixels on a
    side (``decode_encoded``'s DCT scaling), else at full size, with the reduction it was decoded at (1, or
    ``reduce``). The size limit applies to the full image."""
    path = Path(path)
    if not path.is_file():
        raise InputError("image", "file not found", str(path))
    try:
        data = path.read_bytes()
    except OSError as e:
        raise InputError("image", f"cannot read: {e.strerror or e}", str(path)) from None
    try:
        check_pixels(data, max_image_pixels, "image")
        return decode_bytes_reduced(data, "image", reduce)
    except InputError as e:
        raise InputError("image", e.problem, str(path)) from None


def decode_bytes_reduced(data: bytes, field: str, reduce: int) -> Reduced:
    """:func:`decode_encoded` of ``data`` at 1/``reduce`` where it can be, with the reduction applied."""
    image = decode_encoded(data, field, reduce)
    if reduce == 1 or image_kind(data) != "JPEG":
        return Reduced(image, 1)
    return Reduced(image, decoded_scale(encoded_size(data, field), image))


def check_pixels(data: bytes, limit: int, field: str = "image") -> None:
    """Refuse an image file whose header declares more than ``limit`` pixels (height × width), before it is
    decoded: a small compressed file can declare a huge image. JPEG and PNG by :func:`encoded_size`, GIF by
    its logical screen, WebP by its VP8/VP8L/VP8X header; other bytes are left to the decoder to refuse."""
    kind = image_kind(data)
    if kind in ("JPEG", "PNG"):
        try:
            height, width = encoded_size(data, field)
        except InputError as e:
            raise InputError(field, f"cannot decode: {e.problem}") from None
    elif kind == "GIF" and len(data) >= 10:
        width, height = struct.unpack("<HH", data[6:10])
    elif kind == "WebP":
        height, width = _webp_size(data)
    else:
        return
    if height * width > limit:
        raise InputError(field, f"{height}×{width} pixels exceed the limit of {limit} pixels "
                         "(--max-image-pixels raises it)")


def _webp_size(data: bytes) -> tuple[int, int]:
    """(height, width) from a WebP file's first chunk; (0, 0) where it cannot be read (the decoder decides)."""
    chunk = data[12:16]
    if chunk == b"VP8X" and len(data) >= 30:
        return 1 + int.from_bytes(data[27:30], "little"), 1 + int.from_bytes(data[24:27], "little")
    if chunk == b"VP8L" and len(data) >= 25:
        bits = int.from_bytes(data[21:25], "little")
        return 1 + ((bits >> 14) & 0x3FFF), 1 + (bits & 0x3FFF)
    if chunk == b"VP8 " and len(data) >= 30:
        width, height = struct.unpack("<HH", data[26:30])
        return height & 0x3FFF, width & 0x3FFF
    return 0, 0


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_DEPTHS = {0: (1, 2, 4, 8, 16), 2: (8, 16), 3: (1, 2, 4, 8), 4: (8, 16), 6: (8, 16)}  # by colour type
_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))
_INFLATE_STEP = 1 << 18  # bytes of image data decompressed at a time while checking a PNG


JPEG_HEADER_SCAN_BYTES = 4 << 20  # a JPEG's frame header must start within these first bytes...
JPEG_HEADER_SEGMENTS = 1024  # ...and these first segments


def encoded_size(data: bytes, field: str = "image.encoded") -> tuple[int, int]:
    """(height, width) in pixels from a PNG or JPEG file's header, without decoding it; an InputError
    naming ``field`` if the bytes are neither format or the header is cut short. A JPEG's segments are
    read only within its first :data:`JPEG_HEADER_SCAN_BYTES` and :data:`JPEG_HEADER_SEGMENTS` (its
    frame header follows a few segments of at most 64 KiB each: metadata, tables, thumbnails)."""
    if data[:8] == PNG_SIGNATURE:
        if len(data) < 24 or data[12:16] != b"IHDR":
            raise InputError(field, "a PNG without its IHDR header (truncated or corrupt)")
        width, height = struct.unpack(">II", data[16:24])
        return height, width
    if data[:2] == b"\xff\xd8":
        i = 2
        end = min(len(data), JPEG_HEADER_SCAN_BYTES)
        segments = 0
        while i + 4 <= end:
            if data[i] != 0xFF:
                break
            segments += 1
            if segments > JPEG_HEADER_SEGMENTS:
                raise InputError(field, f"a JPEG without a frame header in its first {JPEG_HEADER_SEGMENTS} segments")
            marker = data[i + 1]
            if marker == 0xFF:  # fill bytes: skipped in one step, by numpy (without the GIL)
                run = np.frombuffer(data, dtype=np.uint8, count=end - i - 1, offset=i + 1) != 0xFF
                k = int(run.argmax())
                i = (i + 1 + k if run[k] else end) - 1
                continue
            if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
                i += 2
                continue
            if marker in (0xD9, 0xDA):  # end of image / start of scan before any frame header
                break
            if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # a start-of-frame segment
                if i + 9 > len(data):
                    break
                height, width = struct.unpack(">HH", data[i + 5:i + 9])
                return height, width
            i += 2 + struct.unpack(">H", data[i + 2:i + 4])[0]
        if i + 4 > end and end < len(data):
            raise InputError(field, f"a JPEG without a frame header in its first {JPEG_HEADER_SCAN_BYTES >> 20} MiB")
        raise InputError(field, "a JPEG without a readable frame header (truncated or corrupt)")
    raise InputError(field, "not a JPEG or PNG image")


def _png_rows(width: int, height: int, depth: int, colour: int, interlace: int) -> list[tuple[int, int]]:
    """The rows of a PNG's decompressed image data: (bytes per row, filter byte included; row count) per
    pass (one pass, or Adam7's seven less the empty ones)."""
    bits = depth * _PNG_CHANNELS[colour]
    passes = _ADAM7 if interlace else ((0, 0, 1, 1),)
    rows = []
    for x0, y0, dx, dy in passes:
        w, h = -(-(width - x0) // dx), -(-(height - y0) // dy)
        if w > 0 and h > 0:
            rows.append((1 + -(-w * bits // 8), h))
    return rows


def check_png(data: bytes, field: str = "image.encoded") -> None:
    """Check a PNG file through its image data before libpng decodes it; an InputError naming ``field``
    if it is corrupt.

    torchvision's PNG decoder (0.29 included) crashes the whole process (SIGSEGV) when libpng reports
    an error while reading the image rows (a corrupt or short compressed stream, an IDAT CRC error, a
    bad row filter), so the server checks those itself first: IHDR first and valid; every chunk up
    to the end of the IDAT run whole, named with letters and, if critical, with a correct CRC; no
    unknown critical chunk; the IDATs one run holding one complete zlib stream (checksum included)
    with exactly the rows IHDR declares, each with filter type 0-4. Decompression is bounded by that
    size. Chunks after the IDAT run are not read by the decoder and not checked here."""
    def corrupt(problem: str) -> InputError:
        return InputError(field, f"a corrupt PNG: {problem}")

    if data[:8] != PNG_SIGNATURE:
        raise corrupt("no PNG signature")
    view = memoryview(data)
    pos, header, idats = 8, None, []
    while True:
        if idats and (data[pos + 4:pos + 8] != b"IDAT" or pos + 8 > len(data)):
            break  # the end of the IDAT run
        if pos + 8 > len(data):
            raise corrupt("it ends before its image data (truncated)")
        length, kind = struct.unpack(">I4s", view[pos:pos + 8])
        if length > 0x7FFFFFFF or not kind.isalpha():
            raise corrupt(f"a malformed chunk header at byte {pos}")
        end = pos + 12 + length
        if end > len(data):
            raise corrupt(f"chunk {kind.decode()} at byte {pos} is cut short (truncated)")
        body = view[pos + 8:end - 4]
        critical = kind[:1].isupper()
        if critical and zlib.crc32(view[pos + 4:end - 4]) != struct.unpack(">I", view[end - 4:end])[0]:
            raise corrupt(f"chunk {kind.decode()} at byte {pos} fails its CRC")
        if header is None and kind != b"IHDR":
            raise corrupt("the first chunk is not IHDR")
        if kind == b"IHDR":
            if header is not None or length != 13:
                raise corrupt("a second or malformed IHDR chunk")
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idats.append(body)
        elif critical and kind not in (b"PLTE", b"IEND"):
            raise corrupt(f"unknown critical chunk {kind.decode()}")
        elif kind == b"IEND":
            raise corrupt("no IDAT chunk (no image data)")
        pos = end
    width, height, depth, colour, compression, filtering, interlace = header
    if not (0 < width <= 0x7FFFFFFF and 0 < height <= 0x7FFFFFFF) or colour not in _PNG_DEPTHS \
            or depth not in _PNG_DEPTHS[colour] or compression or filtering or interlace > 1:
        raise corrupt(f"invalid IHDR values {header}")
    rows = _png_rows(width, height, depth, colour, interlace)
    expected = sum(n * h for n, h in rows)
    starts = []  # (first byte of the pass's rows, bytes per row, end of the pass) in the decompressed data
    offset = 0
    for n, h in rows:
        starts.append((offset, n, offset + n * h))
        offset += n * h
    inflate = zlib.decompressobj()
    produced = 0

    def check(out: bytes) -> None:
        nonlocal produced
        lo, hi = produced, produced + len(out)
        if hi > expected:
            raise corrupt(f"more image data than its {width}×{height} pixels hold")
        block = np.frombuffer(out, dtype=np.uint8)
        for first, n, stop in starts:
            if stop <= lo or first >= hi:
                continue
            rows_at = np.arange(first + -(-max(lo - first, 0) // n) * n, min(hi, stop), n)  # row starts in [lo, hi)
            if len(rows_at) and (block[rows_at - lo] > 4).any():
                raise corrupt("a row with an unknown filter type")
        produced = hi

    try:
        for body in idats:
            pending = body
            while pending and not inflate.eof:
                check(inflate.decompress(pending, _INFLATE_STEP))
                pending = inflate.unconsumed_tail
        while not inflate.eof:  # output still held back by the step limit
            out = inflate.decompress(b"", _INFLATE_STEP)
            if not out:
                break
            check(out)
    except zlib.error as e:
        raise corrupt(f"its image data do not decompress ({e})") from None
    if not inflate.eof or produced < expected:
        raise corrupt(f"its image data hold {produced} of the {expected} bytes of its {width}×{height} pixels"
                      " (truncated)")


JPEG_REDUCTIONS = (1, 2, 4, 8)  # the DCT scalings libjpeg decodes at (Pillow's Image.draft)


def decode_encoded(data: bytes, field: str = "image.encoded", reduce: int = 1) -> torch.Tensor:
    """A JPEG, PNG, GIF or WebP file's bytes → (3, H, W) uint8 RGB (grey, palette, RGBA, CMYK and 16-bit
    converted; the EXIF orientation is not applied, as in :func:`posefix.images.decode`). A PNG is checked by
    :func:`check_png` first. Other bytes, and a file that does not decode, are an InputError naming ``field``
    and the kind of file, never quoting its bytes.

    reduce: 1, 2, 4 or 8. A JPEG is then decoded at 1/reduce of its size, ceil(H / reduce) × ceil(W / reduce),
    by the decoder's DCT scaling (each output pixel the mean of a reduce × reduce block, its centre at
    ``reduce · i + (reduce - 1) / 2`` in the full image's pixels), at a fraction of the full decode's time; any
    other format, and a JPEG under ``reduce`` pixels on a side, is decoded at full size (see
    :func:`decoded_scale`)."""
    from PIL import Image

    kind = image_kind(data)
    if kind is None:
        raise InputError(field, "not a JPEG, PNG, GIF or WebP image")
    if reduce not in JPEG_REDUCTIONS:
        raise InputError("reduce", f"must be one of {list(JPEG_REDUCTIONS)}, got {reduce!r}")
    if kind == "PNG":
        check_png(data, field)
    try:
        with warnings.catch_warnings():
            # Pillow's warning on a large image: posefix's own size limits apply before decoding.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            picture = Image.open(io.BytesIO(data), formats=[kind.upper()])
            if reduce > 1 and kind == "JPEG":
                width, height = picture.size
                # Pillow takes the largest scale whose size is at least the one asked for: floor(size / reduce)
                # selects 1/reduce, which gives ceil(size / reduce).
                picture.draft("RGB", (max(width // reduce, 1), max(height // reduce, 1)))
            picture.load()
            if picture.mode.startswith("I"):  # 16-bit grey ("I;16", "I;16B", "I"): keep the high byte
                grey = (np.asarray(picture).astype(np.int64) >> 8).clip(0, 255).astype(np.uint8)
                pixels = np.repeat(grey[:, :, None], 3, axis=2)
            else:
                pixels = np.asarray(picture if picture.mode == "RGB" else picture.convert("RGB"))
    except Image.DecompressionBombError:
        raise InputError(field, f"a {kind} with more pixels than the decoder allows") from None
    except (OSError, ValueError, SyntaxError, EOFError):  # Pillow's message may quote the file's bytes: not repeated
        raise InputError(field, f"cannot decode: a corrupt, truncated or unsupported {kind}") from None
    chw = np.ascontiguousarray(pixels.transpose(2, 0, 1))  # one copy, to (3, H, W)
    # where the transpose is already contiguous (H or W of 1) no copy was made: Pillow's array is read-only
    return torch.from_numpy(chw if chw.flags.writeable else chw.copy())


def decoded_scale(full_size: tuple[int, int], image: torch.Tensor) -> int:
    """The reduction an image of ``full_size`` (H, W) was decoded at (1 when at full size), from its shape."""
    h, w = full_size
    for r in JPEG_REDUCTIONS:
        if tuple(image.shape[1:]) == (math.ceil(h / r), math.ceil(w / r)):
            return r
    raise ValueError(f"an image of {tuple(image.shape[1:])} is no reduction of {full_size}")


def raw_to_tensor(raw: pb2.RawImage) -> torch.Tensor:
    """A RawImage message (validated: height × width × channels bytes, 1, 3 or 4 channels) → (3, H, W) uint8
    RGB (grey repeated, alpha dropped)."""
    hwc = np.frombuffer(raw.pixels, dtype=np.uint8).reshape(raw.height, raw.width, raw.channels)
    rgb = np.repeat(hwc, 3, axis=2) if raw.channels == 1 else hwc[..., :3]
    return torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1)))


def image_kind(data: bytes) -> str | None:
    """"JPEG", "PNG", "GIF" or "WebP" by the file's signature, else None."""
    if data[:8] == PNG_SIGNATURE:
        return "PNG"
    if data[:2] == b"\xff\xd8":
        return "JPEG"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    return None


def coco_image_path(images_dir: str | Path, image: dict, allow_outside: bool = False) -> Path:
    """Path of a COCO ``images`` entry: its ``file_name`` under the directory, else COCO's %012d.jpg (see
    :func:`posefix.formats.image_under`)."""
    name = image.get("file_name") or f"{int(image['id']):012d}.jpg"
    return image_under(images_dir, name, allow_outside)


def is_uri(path) -> bool:
    """Whether ``path`` is a URI (``s3://bucket/key``, ``file:///dir/x.jpg``) rather than a file path."""
    return isinstance(path, str) and "://" in path
