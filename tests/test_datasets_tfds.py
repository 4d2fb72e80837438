"""TFDS splits, on a tiny dataset built here from a generator (no network)."""

import os

import numpy as np
import pytest
from PIL import Image

from core_jax import datasets, images

COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}
LABELS = [0, 2, 1, 1, 0, 2, 2]


@pytest.fixture(scope="module")
def tiny_tfds(tmp_path_factory):
    tfds = pytest.importorskip("tensorflow_datasets")
    import tensorflow as tf

    tf.config.set_visible_devices([], "GPU")
    names = list(COLOURS)

    class CoreJaxTinyColours(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                features=tfds.features.FeaturesDict(
                    {
                        "image": tfds.features.Image(encoding_format="png"),
                        "label": tfds.features.ClassLabel(names=names),
                    }
                ),
            )

        def _split_generators(self, dl_manager):
            return {"test": self._generate_examples()}

        def _generate_examples(self):
            for index, label in enumerate(LABELS):
                pixels = np.zeros((4 + index, 3, 3), np.uint8)
                pixels[...] = COLOURS[names[label]]
                yield index, {"image": pixels, "label": label}

    data_dir = tmp_path_factory.mktemp("tfds")
    CoreJaxTinyColours(data_dir=str(data_dir)).download_and_prepare()
    return "core_jax_tiny_colours", data_dir


def test_tfds_split_has_labels_names_and_image_files(tiny_tfds, tmp_path):
    name, data_dir = tiny_tfds
    split = datasets.from_tfds(name, "test", data_dir=data_dir, extract_dir=tmp_path)

    assert split.class_names == ["red", "green", "blue"]
    assert sorted(split.labels.tolist()) == sorted(LABELS)
    np.testing.assert_array_equal(split.class_counts, [2, 2, 3])
    assert len(split.paths) == len(LABELS)
    for path, label in zip(split.paths, split.labels, strict=True):
        assert os.path.dirname(path) == str(tmp_path) and path.endswith(".png")
        pixels = images.load(path)
        np.testing.assert_array_equal(pixels[0, 0], COLOURS[split.class_names[label]])


def test_tfds_files_are_written_once(tiny_tfds, tmp_path):
    name, data_dir = tiny_tfds
    first = datasets.from_tfds(name, "test", data_dir=data_dir, extract_dir=tmp_path)
    stamps = {path: os.stat(path).st_mtime_ns for path in first.paths}
    second = datasets.from_tfds(name, "test", data_dir=data_dir, extract_dir=tmp_path)
    assert second.paths == first.paths
    assert {path: os.stat(path).st_mtime_ns for path in second.paths} == stamps


def test_tfds_unknown_feature_is_named(tiny_tfds, tmp_path):
    name, data_dir = tiny_tfds
    with pytest.raises(datasets.DatasetError, match="'species'"):
        datasets.from_tfds(name, "test", data_dir=data_dir, label_key="species")


def test_tfds_unprepared_dataset_is_refused_without_download(tiny_tfds, tmp_path):
    name, _ = tiny_tfds
    with pytest.raises(datasets.DatasetError, match="not prepared"):
        datasets.from_tfds(name, "test", data_dir=tmp_path / "empty")


def test_tfds_default_extract_dir_is_under_data_dir(tiny_tfds):
    name, data_dir = tiny_tfds
    split = datasets.from_tfds(name, "test", data_dir=data_dir)
    assert split.paths[0].startswith(str(data_dir / "core_jax_images"))
    # TFDS stores examples in its own order; the set of images is what counts.
    sizes = {Image.open(path).size for path in split.paths}
    assert sizes == {(3, 4 + index) for index in range(len(LABELS))}
