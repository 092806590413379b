"""Image files and bytes (posefix.images): decoding, sizes from headers, checks, raw pixels."""
import numpy as np
import pytest
import torch

from posefix import SAMPLE_DIR
from posefix._proto import pb2
from posefix.errors import InputError
from posefix.images import check_png, decode, decode_encoded, decoded_scale, encoded_size, image_kind, raw_to_tensor
from posefix.viz import write_png

JPEGS = sorted((SAMPLE_DIR / "images").glob("*.jpg"))


@pytest.mark.parametrize("path", JPEGS[:4], ids=lambda p: p.name)
def test_header_sizes_equal_the_decoded_images(path):
    data = path.read_bytes()
    image = decode(path)
    assert image.dtype == torch.uint8 and image.shape[0] == 3
    assert encoded_size(data) == (image.shape[1], image.shape[2])  # (height, width)
    assert torch.equal(decode_encoded(data), image)
    assert image_kind(data) == "JPEG"


def test_png_bytes_are_checked_sized_and_decoded(tmp_path):
    pixels = (torch.rand(3, 37, 53, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    path = tmp_path / "x.png"
    write_png(pixels, path)
    data = path.read_bytes()
    assert image_kind(data) == "PNG" and encoded_size(data) == (37, 53)
    check_png(data)
    assert torch.equal(decode_encoded(data), pixels)
    with pytest.raises(InputError, match="image.encoded"):
        check_png(data[: len(data) // 2])  # cut short
    with pytest.raises(InputError, match="image.encoded"):
        encoded_size(b"not an image at all")


@pytest.mark.parametrize("channels", [1, 3, 4])
def test_raw_pixels_become_rgb_as_a_plain_loop_gives(channels):
    rng = np.random.default_rng(channels)
    hwc = rng.integers(0, 256, (5, 7, channels), dtype=np.uint8)
    got = raw_to_tensor(pb2.RawImage(pixels=hwc.tobytes(), height=5, width=7, channels=channels))
    want = np.zeros((3, 5, 7), dtype=np.uint8)
    for y in range(5):
        for x in range(7):
            for c in range(3):
                want[c, y, x] = hwc[y, x, 0 if channels == 1 else c]
    assert got.shape == (3, 5, 7) and np.array_equal(got.numpy(), want)


def test_a_damaged_png_is_refused_not_crashing_the_process(tmp_path):
    """libpng errors inside torchvision's decoder kill the process; the image is checked first."""
    import subprocess
    import sys

    from posefix.viz import write_png

    good = tmp_path / "good.png"
    write_png((torch.rand(3, 60, 80) * 255).to(torch.uint8), good)
    data = good.read_bytes()
    idat = data.index(b"IDAT")
    damaged = tmp_path / "damaged.png"
    damaged.write_bytes(data[:idat + 4] + bytes(b ^ 0x5A for b in data[idat + 4:idat + 200]) + data[idat + 200:])
    code = ("import sys; from posefix.images import decode; from posefix.errors import InputError\n"
            f"decode({str(good)!r})\n"
            f"try:\n    decode({str(damaged)!r})\nexcept InputError as e:\n    print(e); sys.exit(3)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 3 and "damaged.png: image:" in r.stdout, (r.returncode, r.stdout, r.stderr[-500:])


@pytest.mark.parametrize("reduce", [2, 4, 8])
def test_jpeg_decoded_at_a_reduced_size_is_the_full_image_averaged(reduce):
    """DCT-scaled decoding against a plain reference: the full decode averaged over reduce × reduce blocks (the
    last partial block over what it holds); within a few grey levels on average, and the scale read back."""
    for path in JPEGS[:2]:
        data = path.read_bytes()
        full = decode_encoded(data)
        small = decode_encoded(data, reduce=reduce)
        h, w = full.shape[1:]
        assert small.shape == (3, -(-h // reduce), -(-w // reduce)) and small.dtype == torch.uint8
        reference = torch.nn.functional.avg_pool2d(full[None].float(), reduce, ceil_mode=True)[0]
        assert (small.float() - reference).abs().mean() < 3.0
        assert decoded_scale((h, w), small) == reduce and decoded_scale((h, w), full) == 1


def test_reduce_leaves_other_formats_whole_and_is_checked(tmp_path):
    pixels = (torch.rand(3, 21, 30, generator=torch.Generator().manual_seed(1)) * 255).to(torch.uint8)
    write_png(pixels, tmp_path / "x.png")
    assert torch.equal(decode_encoded((tmp_path / "x.png").read_bytes(), reduce=4), pixels)
    with pytest.raises(InputError, match="reduce: must be one of"):
        decode_encoded(JPEGS[0].read_bytes(), reduce=3)
    with pytest.raises(ValueError, match="no reduction"):
        decoded_scale((100, 100), pixels)


def test_grey_16_bit_png_keeps_the_high_byte(tmp_path):
    """A 16-bit grey PNG (written by Pillow) decodes to each sample's high byte in all three channels."""
    from PIL import Image

    values = np.random.default_rng(2).integers(0, 65536, (9, 13), dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "g16.png")
    data = (tmp_path / "g16.png").read_bytes()
    assert data[24] == 16  # bit depth in IHDR
    image = decode_encoded(data)
    expected = torch.from_numpy((values >> 8).astype(np.uint8))
    assert all(torch.equal(image[c], expected) for c in range(3))
