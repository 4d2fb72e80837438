"""Preprocessing against big_vision's own operation, `tf.image.resize`."""

import pathlib

import numpy as np
import pytest

from core_jax import images

SKIMAGE_DATA = pathlib.Path(pytest.importorskip("skimage").__file__).parent / "data"


@pytest.fixture(scope="module")
def tf():
    tensorflow = pytest.importorskip("tensorflow")
    tensorflow.config.set_visible_devices([], "GPU")
    return tensorflow


@pytest.mark.parametrize("size", [224, 384, 600])
def test_preprocess_matches_big_vision_resize_and_value_range(tf, size):
    pixels = images.load(SKIMAGE_DATA / "rocket.jpg")  # 427 x 640
    resized = tf.image.resize(pixels, (size, size), method="bilinear")
    expected = resized.numpy() / 127.5 - 1.0  # big_vision's value_range(-1, 1)

    got = images.preprocess([pixels], size)[0]

    # Both float32; TensorFlow computes the source coordinates in float32,
    # here in float64: differences stay under 1/100 of a grey level.
    np.testing.assert_allclose(got, expected, atol=1e-4)
