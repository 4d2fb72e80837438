"""The three benchmark CSV layouts load as they are."""

import collections
import csv
import io
import logging
import os

import numpy as np
import pytest
from PIL import Image

from core_jax import datasets

BENCHMARKS = ("circuits", "ham10000", "inaturalist")


def _png_bytes():
    buffer = io.BytesIO()
    Image.new("RGB", (2, 2), (10, 20, 30)).save(buffer, "PNG")
    return buffer.getvalue()


def _read(path):
    with open(path, newline="", encoding="utf-8") as file:
        return list(csv.DictReader(file))


def _on_disk_name(listed):
    """The name the release's images have: HAM10000 train lists no extension."""
    return listed if os.path.splitext(listed)[1] else listed + ".jpg"


@pytest.fixture(scope="module")
def images_dir(benchmarks_dir, tmp_path_factory):
    """Tiny images under every name the three benchmarks list."""
    folder = tmp_path_factory.mktemp("benchmark_images")
    data = _png_bytes()
    for benchmark in BENCHMARKS:
        for split in ("train", "test"):
            for row in _read(benchmarks_dir / benchmark / f"{split}.csv"):
                path = folder / benchmark / _on_disk_name(row["filename"])
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
    return folder


@pytest.mark.parametrize("benchmark", BENCHMARKS)
@pytest.mark.parametrize("split_name", ["train", "test"])
def test_benchmark_split_counts_match_csv(
    benchmarks_dir, images_dir, benchmark, split_name
):
    root = benchmarks_dir / benchmark
    rows = _read(root / f"{split_name}.csv")
    classes = _read(root / "class_mapping.csv")
    per_class = collections.Counter(int(row["class_id"]) for row in rows)
    expected_counts = [per_class.get(i, 0) for i in range(len(classes))]

    split = datasets.from_csv(root, split_name, images_dir=images_dir / benchmark)

    assert len(split) == len(rows)
    assert split.labels.dtype == np.int32
    np.testing.assert_array_equal(split.class_counts, expected_counts)
    np.testing.assert_array_equal(split.labels, [int(r["class_id"]) for r in rows])
    by_id = {int(c["id"]): c["name"] for c in classes}
    assert split.class_names == [by_id[i] for i in range(len(classes))]
    for path, row in zip(split.paths, rows, strict=True):
        assert path == str(images_dir / benchmark / _on_disk_name(row["filename"]))
    assert split.skipped == []


def test_circuits_ids_come_from_id_column(benchmarks_dir, images_dir):
    split = datasets.from_csv(
        benchmarks_dir / "circuits", "test", images_dir=images_dir / "circuits"
    )
    rows = _read(benchmarks_dir / "circuits" / "test.csv")
    assert split.ids == [row["id"] for row in rows]
    assert split.common_names is None


def test_ham10000_ids_are_listed_names(benchmarks_dir, images_dir):
    split = datasets.from_csv(
        benchmarks_dir / "ham10000", "train", images_dir=images_dir / "ham10000"
    )
    rows = _read(benchmarks_dir / "ham10000" / "train.csv")
    assert split.ids == [row["filename"] for row in rows]
    assert all(path.endswith(".jpg") for path in split.paths)


def test_inaturalist_has_common_names(benchmarks_dir, images_dir):
    root = benchmarks_dir / "inaturalist"
    split = datasets.from_csv(root, "test", images_dir=images_dir / "inaturalist")
    common = {int(c["id"]): c["name"] for c in _read(root / "class_mapping_common.csv")}
    assert split.common_names == [common[i] for i in range(100)]
    assert split.ids == [row["id"] for row in _read(root / "test.csv")]


def test_class_without_test_image_is_counted_and_warned(
    benchmarks_dir, images_dir, caplog
):
    root = benchmarks_dir / "circuits"
    listed = {int(row["class_id"]) for row in _read(root / "test.csv")}
    absent = sorted(set(range(len(_read(root / "class_mapping.csv")))) - listed)
    assert absent, "the circuits test split lacks some classes"

    with caplog.at_level(logging.WARNING):
        split = datasets.from_csv(root, "test", images_dir=images_dir / "circuits")

    np.testing.assert_array_equal(np.flatnonzero(split.class_counts == 0), absent)
    assert "no image in this split" in caplog.text


def test_load_classes_alone(benchmarks_dir):
    names, common = datasets.load_classes(benchmarks_dir / "ham10000")
    assert len(names) == 7 and common is None
    assert names[1] == "basal cell carcinoma"
