"""Image decoding conventions and SigLIP preprocessing, on real images."""

import pathlib

import numpy as np
import pytest
from PIL import Image

from core_jax import images

SKIMAGE_DATA = pathlib.Path(pytest.importorskip("skimage").__file__).parent / "data"


def skimage_file(name):
    path = SKIMAGE_DATA / name
    if not path.exists():
        pytest.skip(f"{path} not in this scikit-image wheel")
    return path


def test_real_rgb_png_decodes_to_its_pixels():
    path = skimage_file("astronaut.png")
    got = images.load(path)
    assert got.dtype == np.uint8 and got.shape == (512, 512, 3)
    with Image.open(path) as reference:
        np.testing.assert_array_equal(got, np.asarray(reference.convert("RGB")))


def test_real_jpeg_decodes():
    got = images.load(skimage_file("rocket.jpg"))
    assert got.dtype == np.uint8 and got.shape == (427, 640, 3)


def test_real_grey_png_becomes_three_equal_channels():
    path = skimage_file("camera.png")
    got = images.load(path)
    assert got.shape == (512, 512, 3)
    with Image.open(path) as reference:
        grey = np.asarray(reference)
    for channel in range(3):
        np.testing.assert_array_equal(got[..., channel], grey)


def test_real_multipage_tiff_gives_first_page():
    path = skimage_file("multipage.tif")
    with Image.open(path) as reference:
        assert reference.n_frames == 2
        first = np.asarray(reference.convert("RGB"))
        reference.seek(1)
        second = np.asarray(reference.convert("RGB"))
    assert not np.array_equal(first, second)
    np.testing.assert_array_equal(images.load(path), first)


def test_real_tiff_pillow_cannot_read_is_an_image_error_naming_it():
    # This RGB TIFF's layout is one Pillow does not decode.
    path = skimage_file("multipage_rgb.tif")
    with pytest.raises(images.ImageError, match="multipage_rgb.tif"):
        images.load(path)


def test_real_animated_gif_gives_first_frame():
    path = skimage_file("no_time_for_that_tiny.gif")
    with Image.open(path) as reference:
        assert reference.n_frames > 1
        first = np.asarray(reference.convert("RGB"))
    np.testing.assert_array_equal(images.load(path), first)


def test_same_size_preprocess_is_value_range_only():
    pixels = images.load(skimage_file("astronaut.png"))
    got = images.preprocess([pixels], 512)
    expected = pixels.astype(np.float64) / 127.5 - 1.0
    assert got.dtype == np.float32 and got.shape == (1, 512, 512, 3)
    np.testing.assert_allclose(got[0], expected, atol=1e-6)


def _bilinear_reference(image, size):
    """Half-pixel-centre bilinear resize with clamped edges, one pixel at a time."""
    height, width, channels = image.shape
    out = np.zeros((size, size, channels))
    for i in range(size):
        y = min(max((i + 0.5) * height / size - 0.5, 0.0), height - 1)
        y0 = int(np.floor(y))
        y1 = min(y0 + 1, height - 1)
        for j in range(size):
            x = min(max((j + 0.5) * width / size - 0.5, 0.0), width - 1)
            x0 = int(np.floor(x))
            x1 = min(x0 + 1, width - 1)
            dy, dx = y - y0, x - x0
            out[i, j] = (
                image[y0, x0] * (1 - dy) * (1 - dx)
                + image[y0, x1] * (1 - dy) * dx
                + image[y1, x0] * dy * (1 - dx)
                + image[y1, x1] * dy * dx
            )
    return out / 127.5 - 1.0


@pytest.mark.parametrize("size", [1, 4, 11, 23])
def test_preprocess_matches_bilinear_formula(size):
    image = np.random.default_rng(size).integers(0, 256, (13, 7, 3), dtype=np.uint8)
    got = images.preprocess([image], size)[0]
    # float32 arithmetic against a float64 formula: a few ulps of 1.0.
    np.testing.assert_allclose(got, _bilinear_reference(image, size), atol=1e-5)


def test_preprocess_matches_torch_bilinear_on_real_image():
    torch = pytest.importorskip("torch")
    pixels = images.load(skimage_file("rocket.jpg"))
    tensor = torch.from_numpy(pixels.astype(np.float32)).permute(2, 0, 1)[None]
    resized = torch.nn.functional.interpolate(
        tensor, size=(384, 384), mode="bilinear", align_corners=False
    )
    expected = resized[0].permute(1, 2, 0).numpy() / 127.5 - 1.0
    got = images.preprocess([pixels], 384)[0]
    # torch computes the source coordinates in float32, here in float64: the
    # weights differ in the 6th digit, under 1/100 of a grey level (1/127.5).
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_antialiased_preprocess_matches_torch_antialias():
    torch = pytest.importorskip("torch")
    pixels = images.load(skimage_file("rocket.jpg"))
    tensor = torch.from_numpy(pixels.astype(np.float32)).permute(2, 0, 1)[None]
    resized = torch.nn.functional.interpolate(
        tensor, size=(96, 96), mode="bilinear", align_corners=False, antialias=True
    )
    expected = resized[0].permute(1, 2, 0).numpy() / 127.5 - 1.0
    got = images.preprocess([pixels], 96, antialias=True)[0]
    # torch's antialiased bilinear reimplements Pillow's filter; float32 sums
    # over ~14 taps per axis differ by well under 1/1000 of a grey level.
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_preprocess_batch_of_different_sizes_stays_in_range():
    batch = [
        np.zeros((1, 1, 3), np.uint8),
        np.full((10, 10000, 3), 255, np.uint8),
        images.load(skimage_file("chelsea.png")),
    ]
    got = images.preprocess(batch, 32)
    assert got.shape == (3, 32, 32, 3) and got.dtype == np.float32
    np.testing.assert_array_equal(got[0], -1.0)
    np.testing.assert_array_equal(got[1], 1.0)
    assert got.min() >= -1.0 and got.max() <= 1.0


def test_preprocess_refuses_non_uint8():
    with pytest.raises(ValueError, match=r"images\[0\]"):
        images.preprocess([np.zeros((4, 4, 3), np.float32)], 4)
