"""`mmstack.vision.image_io`: every PIL mode and input kind to RGB, policies, and safe failures."""
from __future__ import annotations

import io
import struct
import time
import warnings
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile, features

from mmstack.vision.image_io import NATIVE, OFFICIAL, ImageError, ImagePolicy, load_image, load_images

BG = np.array(NATIVE.background)


def px(im: Image.Image) -> np.ndarray:
    return np.asarray(im).astype(int)


def rgb_noise(w=6, h=4, seed=0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def png_header(width: int, height: int) -> bytes:
    """A PNG whose IHDR declares width x height but which carries only a few bytes of pixel data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def encoded(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


# ---- modes -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["RGB", "L", "1", "P", "CMYK", "YCbCr"])
@pytest.mark.parametrize("policy", [OFFICIAL, NATIVE], ids=["official", "native"])
def test_opaque_modes_match_pil_convert(mode, policy):
    im = rgb_noise().convert(mode)
    out = load_image(im, policy)
    assert out.mode == "RGB" and out.size == im.size
    assert np.array_equal(px(out), px(im.convert("RGB")))


def test_rgba_official_drops_alpha_native_composites_onto_background():
    a = np.array([[[200, 10, 50, 128], [200, 10, 50, 0], [200, 10, 50, 255]]], dtype=np.uint8)
    im = Image.fromarray(a)  # RGBA
    assert np.array_equal(px(load_image(im, OFFICIAL)), px(im.convert("RGB")))
    native = px(load_image(im))
    expected = a[0, 0, :3].astype(float) * 128 / 255 + BG * (1 - 128 / 255)
    assert np.abs(native[0, 0] - expected).max() <= 1
    assert np.array_equal(native[0, 1], BG)  # fully transparent -> background
    assert np.array_equal(native[0, 2], [200, 10, 50])  # opaque -> unchanged


def test_custom_background_override():
    im = Image.new("RGBA", (2, 2), (0, 0, 0, 0))
    assert np.array_equal(px(load_image(im, background=(10, 20, 30)))[0, 0], [10, 20, 30])


def test_la_gray_alpha():
    im = Image.fromarray(np.array([[[90, 0], [90, 255]]], dtype=np.uint8), mode="LA")
    assert np.array_equal(px(load_image(im, OFFICIAL))[0], [[90] * 3, [90] * 3])
    assert np.array_equal(px(load_image(im))[0], [BG, [90] * 3])


def test_palette_with_trns_transparency_from_png():
    im = Image.new("P", (2, 1))
    im.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    im.putpixel((1, 0), 1)
    src = encoded(im, "PNG", transparency=0)  # palette index 0 (red) transparent, written as tRNS
    assert "transparency" in Image.open(io.BytesIO(src)).info
    assert np.array_equal(px(load_image(src, OFFICIAL))[0], [[255, 0, 0], [0, 255, 0]])
    assert np.array_equal(px(load_image(src))[0], [BG, [0, 255, 0]])


def test_pa_mode_composites_alpha():
    im = Image.new("PA", (2, 1))
    im.putpalette([0, 0, 255] * 256)
    im.putpixel((0, 0), (0, 0))
    im.putpixel((1, 0), (0, 255))
    assert np.array_equal(px(load_image(im))[0], [BG, [0, 0, 255]])
    assert np.array_equal(px(load_image(im, OFFICIAL))[0], [[0, 0, 255]] * 2)


def test_cmyk_pure_inks():
    im = Image.new("CMYK", (2, 1))
    im.putpixel((0, 0), (0, 0, 0, 0))
    im.putpixel((1, 0), (255, 0, 0, 0))
    assert np.array_equal(px(load_image(im))[0], [[255, 255, 255], [0, 255, 255]])


def test_one_bit_is_black_and_white():
    im = Image.fromarray(np.array([[True, False]])).convert("1")
    assert np.array_equal(px(load_image(im))[0], [[255] * 3, [0] * 3])


def test_sixteen_bit_png_native_keeps_the_high_byte_official_matches_convert_rgb():
    im = Image.fromarray(np.array([[0, 256, 40000, 65535]], dtype=np.uint16))
    src = encoded(im, "PNG")
    assert Image.open(io.BytesIO(src)).mode == "I;16"
    assert np.array_equal(px(load_image(src, NATIVE))[0, :, 0], [0, 1, 40000 >> 8, 255])
    # the official loaders call convert("RGB"), which clips: reproduce that exactly
    want = np.asarray(Image.open(io.BytesIO(src)).convert("RGB"))
    assert np.array_equal(px(load_image(src, OFFICIAL)), want)


def test_int32_mode_i_scales_only_beyond_eight_bits():
    small = Image.fromarray(np.array([[0, 7, 255]], dtype=np.int32))
    wide = Image.fromarray(np.array([[-5, 512, 70000]], dtype=np.int32))
    assert small.mode == wide.mode == "I"
    assert np.array_equal(px(load_image(small))[0, :, 1], [0, 7, 255])
    assert np.array_equal(px(load_image(wide))[0, :, 1], [0, 2, 255])


def test_float_mode_f_unit_range_and_byte_range():
    unit = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    wide = Image.fromarray(np.array([[-3.0, 100.4, 300.0]], dtype=np.float32))
    assert np.array_equal(px(load_image(unit))[0, :, 2], [0, 128, 255])
    assert np.array_equal(px(load_image(wide))[0, :, 2], [0, 100, 255])


def animated(fmt: str) -> bytes:
    frames = [Image.new("RGB", (4, 4), c) for c in [(255, 0, 0), (0, 0, 255), (0, 255, 0)]]
    extra = {"lossless": True} if fmt == "WEBP" else {}
    return encoded(frames[0], fmt, save_all=True, append_images=frames[1:], duration=50, **extra)


@pytest.mark.parametrize("fmt", ["GIF", "PNG", "WEBP"])
def test_animated_images_give_the_first_frame(fmt):
    if fmt == "WEBP" and not features.check("webp"):
        pytest.skip("Pillow built without WebP")
    src = animated(fmt)
    assert getattr(Image.open(io.BytesIO(src)), "n_frames", 1) == 3
    assert np.array_equal(px(load_image(src))[2, 2], [255, 0, 0])


def test_exif_orientation_native_transposes_official_does_not(tmp_path):
    a = np.zeros((8, 16, 3), dtype=np.uint8)
    a[:, :8] = (255, 0, 0)  # left half red, right half blue
    a[:, 8:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: display rotated 90 degrees clockwise
    path = tmp_path / "rotated.jpg"
    Image.fromarray(a).save(path, "JPEG", exif=exif, quality=95)
    assert load_image(path, OFFICIAL).size == (16, 8)
    native = load_image(path)
    assert native.size == (8, 16)
    top, bottom = px(native)[2, 4], px(native)[13, 4]  # the left half is now on top
    assert top[0] > 200 and top[2] < 60 and bottom[2] > 200 and bottom[0] < 60
    assert load_image(path, OFFICIAL, exif_transpose=True).size == (8, 16)


# ---- input kinds -------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(3, 5), (3, 5, 1), (3, 5, 3)])
def test_uint8_arrays_of_every_layout(shape):
    a = np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8)
    out = px(load_image(a))
    assert out.shape == (3, 5, 3)
    assert np.array_equal(out, np.broadcast_to(a.reshape(3, 5, -1), (3, 5, 3)))


def test_rgba_array_follows_the_policy():
    a = np.array([[[9, 8, 7, 0]]], dtype=np.uint8)
    assert np.array_equal(px(load_image(a, OFFICIAL))[0, 0], [9, 8, 7])
    assert np.array_equal(px(load_image(a))[0, 0], BG)


def test_array_dtypes_are_scaled_to_eight_bits():
    assert px(load_image(np.array([[0, 256, 65535]], dtype=np.uint16)))[0, :, 0].tolist() == [0, 1, 255]
    assert px(load_image(np.array([[True, False]])))[0, :, 0].tolist() == [255, 0]
    assert px(load_image(np.array([[0.0, 0.5, 1.0, 2.0, -1.0]])))[0, :, 0].tolist() == [0, 128, 255, 255, 0]
    assert px(load_image(np.array([[3, 200]], dtype=np.int64)))[0, :, 0].tolist() == [3, 200]


@pytest.mark.parametrize("bad", [np.zeros((2, 2, 2), np.uint8), np.zeros(4, np.uint8), np.zeros((2, 2), np.int64) + 300,
                                 np.zeros((2, 2), complex), np.zeros((0, 3), np.uint8)])
def test_bad_arrays_are_rejected_by_shape_or_dtype(bad):
    with pytest.raises(ImageError, match=r"<array shape"):
        load_image(bad)


def test_torch_tensors_chw_and_hwc():
    chw = torch.rand(3, 4, 5)
    expected = np.rint(chw.permute(1, 2, 0).numpy() * 255)
    assert np.array_equal(px(load_image(chw)), expected)
    assert np.array_equal(px(load_image(chw.permute(1, 2, 0).to(torch.bfloat16))).shape, (4, 5, 3))


def test_paths_bytes_and_file_objects_agree(tmp_path):
    im = rgb_noise()
    path = tmp_path / "x.png"
    im.save(path)
    data = path.read_bytes()

    class Stream(io.RawIOBase):  # readable, not seekable
        def __init__(self):
            self.inner = io.BytesIO(data)

        def readable(self):
            return True

        def readinto(self, b):
            return self.inner.readinto(b)

    for src in [path, str(path), data, bytearray(data), io.BytesIO(data), Stream(), open(path, "rb")]:
        assert np.array_equal(px(load_image(src)), px(im)), type(src)
    assert [i.size for i in load_images([path, data], OFFICIAL)] == [im.size] * 2


def test_result_is_a_new_image():
    im = rgb_noise()
    out = load_image(im)
    out.putpixel((0, 0), (1, 2, 3))
    assert out is not im and im.getpixel((0, 0)) != (1, 2, 3)


# ---- failures ----------------------------------------------------------------------------------------

def test_huge_header_is_rejected_before_decoding():
    src = png_header(100_000, 100_000)  # 3e10 bytes if decoded
    start = time.perf_counter()
    with pytest.raises(ImageError, match=r"<bytes \d+>.*pixel limit.*max_pixels=64000000"):
        load_image(src)
    with pytest.raises(ImageError, match="pixel limit"):  # PIL's own guard still holds when ours is raised
        load_image(src, max_pixels=10**12)
    assert time.perf_counter() - start < 1.0


def test_pixel_limit_is_ours_and_no_pil_warning_escapes():
    before = (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a DecompressionBombWarning would fail here
        with pytest.raises(ImageError, match=r"10000x10000 = 100000000 pixels exceeds the pixel limit max_pixels="):
            load_image(png_header(10_000, 10_000))
    with pytest.raises(ImageError, match="6x4 = 24 pixels exceeds the pixel limit max_pixels=20"):
        load_image(encoded(rgb_noise(), "PNG"), max_pixels=20)
    with pytest.raises(ImageError, match=r"<PIL image>: .*max_pixels=20"):
        load_image(rgb_noise(), ImagePolicy(composite_alpha=True, exif_transpose=True, max_pixels=20))
    with pytest.raises(ImageError, match=r"<array shape \(4, 6, 3\)>: .*max_pixels=20"):
        load_image(np.asarray(rgb_noise()), max_pixels=20)
    assert (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES) == before


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_files_name_the_path(tmp_path, fmt):
    data = encoded(rgb_noise(64, 64), fmt)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match=rf"{path.name}: truncated"):
        load_image(path)


def test_corrupt_png_data_is_an_image_error(tmp_path):
    data = bytearray(encoded(rgb_noise(64, 64), "PNG"))
    start = data.index(b"IDAT") + 20
    data[start:start + 40] = b"\xff" * 40
    with pytest.raises(ImageError, match=r"<bytes \d+>: (cannot decode|truncated)"):
        load_image(bytes(data))


def test_random_bytes_text_files_missing_paths_and_directories(tmp_path):
    with pytest.raises(ImageError, match=r"<bytes 1000>: cannot decode: not a recognised image format"):
        load_image(np.random.default_rng(0).bytes(1000))
    text = tmp_path / "notes.txt"
    text.write_text("not an image\n")
    with pytest.raises(ImageError, match=r"notes\.txt: cannot decode"):
        load_image(str(text))
    with pytest.raises(ImageError, match=r"missing\.png: no such file"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(ImageError, match="not a regular file"):
        load_image(tmp_path)
    with pytest.raises(ImageError, match=r"<bytes 0>: cannot decode"):
        load_image(b"")


def test_byte_limit_and_unsupported_inputs():
    with pytest.raises(ImageError, match=r"<bytes 100>: 100 bytes exceeds the byte limit max_bytes=10"):
        load_image(bytes(100), max_bytes=10)
    with pytest.raises(ImageError, match=r"<BytesIO>: 100 bytes exceeds the byte limit max_bytes=10"):
        load_image(io.BytesIO(bytes(100)), max_bytes=10)
    with pytest.raises(ImageError, match=r"<int>: unsupported"):
        load_image(42)
    with pytest.raises(TypeError):
        load_image(b"", not_a_field=1)
    with pytest.raises(ValueError):
        ImagePolicy(composite_alpha=True, exif_transpose=True, background=(0, 0, 300))
