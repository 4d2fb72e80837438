"""Image files that are broken, odd or malicious, each made by the test."""

import io
import pathlib
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from core_jax import images

SKIMAGE_DATA = pathlib.Path(pytest.importorskip("skimage").__file__).parent / "data"


def _png_declaring(width, height):
    """A valid-looking PNG header for a huge image, with almost no data."""

    def chunk(kind, data):
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    pixels = zlib.compress(b"\x00" * 64)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", pixels)
        + chunk(b"IEND", b"")
    )


def _png(width, height, colour_type, rows):
    """A PNG written byte by byte, for layouts Pillow cannot write."""

    def chunk(kind, data):
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0)
    raw = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in rows)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def _raises_naming(path, *match):
    with pytest.raises(images.ImageError) as caught:
        images.load(path)
    message = str(caught.value)
    assert str(path) in message
    for word in match:
        assert word in message
    assert isinstance(caught.value, ValueError)
    return message


def test_missing_path(tmp_path):
    _raises_naming(tmp_path / "absent.jpg", "cannot read")


def test_directory(tmp_path):
    _raises_naming(tmp_path, "directory")


def test_zero_byte_file(tmp_path):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    _raises_naming(path, "empty")


def test_not_an_image(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("these are not pixels\n" * 20)
    _raises_naming(path, "not an image")


def test_postscript_is_never_interpreted(tmp_path):
    path = tmp_path / "drawing.eps"
    path.write_text("%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n")
    _raises_naming(path, "not an image")


def test_truncated_jpeg(tmp_path):
    buffer = io.BytesIO()
    Image.open(SKIMAGE_DATA / "astronaut.png").convert("RGB").save(buffer, "JPEG")
    path = tmp_path / "cut.jpg"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    _raises_naming(path, "truncated")


def test_decompression_bomb_is_refused_before_decoding(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_declaring(100_000, 100_000))
    assert path.stat().st_size < 200
    limit_before = Image.MAX_IMAGE_PIXELS

    _raises_naming(path, "bomb")

    assert Image.MAX_IMAGE_PIXELS == limit_before


def test_image_over_the_per_call_limit_is_refused_and_limit_is_per_call(tmp_path):
    path = tmp_path / "large.png"
    path.write_bytes(_png_declaring(20_000, 5_000))  # 1e8 pixels: PIL only warns.
    with pytest.warns(Image.DecompressionBombWarning):
        _raises_naming(path, "100000000 pixels", "limit")

    real = SKIMAGE_DATA / "astronaut.png"
    with pytest.raises(images.ImageError, match="astronaut.png"):
        images.load(real, max_pixels=100 * 100)
    assert images.load(real).shape == (512, 512, 3)


def test_cmyk_jpeg_keeps_its_colours(tmp_path):
    path = tmp_path / "cmyk.jpg"
    cmyk = Image.new("CMYK", (32, 16))
    cmyk.paste((0, 255, 255, 0), (0, 0, 16, 16))  # red
    cmyk.paste((255, 0, 0, 0), (16, 0, 32, 16))  # cyan
    cmyk.save(path, "JPEG", quality=95)

    got = images.load(path).astype(int)

    # JPEG chroma errors stay within a few levels at quality 95.
    np.testing.assert_allclose(got[8, 4], [255, 0, 0], atol=6)
    np.testing.assert_allclose(got[8, 28], [0, 255, 255], atol=6)


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path):
    path = tmp_path / "deep.png"
    values = np.array([[0, 257, 1000, 32896, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(path)
    assert Image.open(path).mode.startswith("I")

    got = images.load(path)

    # round(v * 255 / 65535): 1000 -> 4 (clipping would give 255).
    np.testing.assert_array_equal(got[0, :, 0], [0, 1, 4, 128, 255])
    np.testing.assert_array_equal(got[..., 0], got[..., 2])


def test_sixteen_bit_rgb_png_is_scaled_not_clipped(tmp_path):
    path = tmp_path / "deep_rgb.png"
    values = np.array([[[0, 1000, 65535], [32896, 257, 128]]], dtype=np.uint16)
    path.write_bytes(_png(2, 1, 2, values))

    got = images.load(path)

    # Pillow keeps the high byte, floor(v / 256), within one level of
    # round(v * 255 / 65535); clipping would turn 1000 into 255.
    np.testing.assert_array_equal(got, [[[0, 3, 255], [128, 1, 0]]])


def test_float_tiff_is_read_as_unit_range(tmp_path):
    path = tmp_path / "float.tif"
    Image.fromarray(np.array([[0.0, 0.5, 1.0, 2.0]], np.float32)).save(path)
    np.testing.assert_array_equal(images.load(path)[0, :, 1], [0, 128, 255, 255])


def test_unreadable_file(tmp_path):
    path = tmp_path / "locked.png"
    Image.new("RGB", (2, 2)).save(path)
    path.chmod(0)
    try:
        with open(path, "rb"):
            pytest.skip("running with permission to read any file")
    except PermissionError:
        pass
    _raises_naming(path, "cannot read")


def test_corrupt_png_data(tmp_path):
    path = tmp_path / "corrupt.png"
    data = bytearray(_png(8, 8, 2, np.zeros((8, 8, 3), np.uint16)))
    data[45:52] = b"\xff" * 7  # inside the compressed pixel data (from byte 41)
    path.write_bytes(bytes(data))
    _raises_naming(path)


def test_palette_png_with_transparency_on_white(tmp_path):
    path = tmp_path / "palette.png"
    image = Image.new("P", (4, 2))
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * (254 * 3))
    image.putdata([0, 0, 1, 1, 0, 0, 1, 1])
    image.save(path, transparency=0)

    got = images.load(path)

    np.testing.assert_array_equal(got[0, 0], [255, 255, 255])
    np.testing.assert_array_equal(got[0, 2], [255, 0, 0])


def test_half_transparent_rgba_blends_with_white(tmp_path):
    path = tmp_path / "rgba.png"
    Image.new("RGBA", (3, 3), (255, 0, 0, 128)).save(path)
    # 255 * (1 - 128/255) = 127 for green and blue.
    np.testing.assert_allclose(images.load(path)[1, 1], [255, 127, 127], atol=1)


def test_transparent_grey_alpha_is_white(tmp_path):
    path = tmp_path / "la.png"
    Image.new("LA", (2, 2), (0, 0)).save(path)
    np.testing.assert_array_equal(images.load(path), np.full((2, 2, 3), 255))


def test_animated_gif_first_frame(tmp_path):
    path = tmp_path / "anim.gif"
    frames = [Image.new("RGB", (8, 8), colour) for colour in ("red", "lime", "blue")]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50)
    np.testing.assert_array_equal(images.load(path)[4, 4], [255, 0, 0])


def test_multipage_tiff_first_page(tmp_path):
    path = tmp_path / "pages.tif"
    pages = [Image.new("RGB", (6, 4), "red"), Image.new("RGB", (9, 9), "blue")]
    pages[0].save(path, save_all=True, append_images=pages[1:])
    got = images.load(path)
    assert got.shape == (4, 6, 3)
    np.testing.assert_array_equal(got[0, 0], [255, 0, 0])


def test_exif_rotated_jpeg_is_upright(tmp_path):
    path = tmp_path / "rotated.jpg"
    stored = Image.new("RGB", (40, 20), "blue")
    stored.paste((255, 0, 0), (0, 0, 20, 20))  # left half red as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # display after rotating 90 degrees clockwise
    stored.save(path, "JPEG", exif=exif, quality=95)

    got = images.load(path).astype(int)

    # The stored left side is the displayed top.
    assert got.shape == (40, 20, 3)
    np.testing.assert_allclose(got[5, 10], [255, 0, 0], atol=8)
    np.testing.assert_allclose(got[35, 10], [0, 0, 255], atol=8)


def test_grey_jpeg_becomes_rgb(tmp_path):
    path = tmp_path / "grey.jpg"
    Image.new("L", (5, 7), 90).save(path)
    got = images.load(path)
    assert got.shape == (7, 5, 3)
    assert (got[..., 0] == got[..., 1]).all() and (got[..., 1] == got[..., 2]).all()


def test_one_pixel_image(tmp_path):
    path = tmp_path / "dot.png"
    Image.new("RGB", (1, 1), (1, 2, 3)).save(path)
    np.testing.assert_array_equal(images.load(path), [[[1, 2, 3]]])


def test_very_wide_image(tmp_path):
    path = tmp_path / "strip.png"
    Image.new("RGB", (10_000, 10), (0, 255, 0)).save(path)
    got = images.load(path)
    assert got.shape == (10, 10_000, 3)
    batch, kept, skipped = images.load_batch([path], 16)
    assert batch.shape == (1, 16, 16, 3) and skipped == []
    np.testing.assert_array_equal(batch[0, :, :, 1], 1.0)


def test_load_batch_skips_and_counts_bad_files(tmp_path):
    good = SKIMAGE_DATA / "chelsea.png"
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    missing = tmp_path / "missing.png"
    paths = [good, empty, good, missing]

    batch, kept, skipped = images.load_batch(paths, 24, workers=3)

    assert batch.shape == (2, 24, 24, 3) and batch.dtype == np.float32
    np.testing.assert_array_equal(kept, [0, 2])
    assert [path for path, _ in skipped] == [str(empty), str(missing)]
    assert "empty" in skipped[0][1] and "missing.png" in skipped[1][1]
    expected = images.preprocess([images.load(good)], 24)[0]
    np.testing.assert_array_equal(batch[0], expected)
    np.testing.assert_array_equal(batch[1], expected)


def test_load_batch_raise_names_first_bad_file(tmp_path):
    bad = tmp_path / "bad.gif"
    bad.write_text("GIF? no")
    with pytest.raises(images.ImageError, match="bad.gif"):
        images.load_batch([SKIMAGE_DATA / "coffee.png", bad], 8, on_error="raise")


def test_load_batch_all_bad_gives_empty_batch(tmp_path):
    path = tmp_path / "x.png"
    path.write_bytes(b"\x89PNG\r\n")
    batch, kept, skipped = images.load_batch([path], 8)
    assert batch.shape == (0, 8, 8, 3) and kept.shape == (0,) and len(skipped) == 1


def test_load_batch_refuses_unknown_policy():
    with pytest.raises(ValueError, match="on_error"):
        images.load_batch([], 8, on_error="ignore")
