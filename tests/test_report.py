"""Report writers: JSON, CSV, heatmap and the qualitative page."""

import csv
import json
import math

import numpy as np
import pytest
from PIL import Image

from core_jax import report


def test_json_holds_numpy_values_as_plain_numbers(tmp_path):
    path = report.write_json(
        tmp_path / "r.json",
        {"acc": np.float32(0.5), "n": np.int64(3), "grid": np.arange(3)},
    )
    assert json.loads(path.read_text()) == {"acc": 0.5, "n": 3, "grid": [0, 1, 2]}


def test_json_refuses_nan_rather_than_writing_invalid_json(tmp_path):
    with pytest.raises(ValueError):
        report.write_json(tmp_path / "r.json", {"acc": math.nan})
    assert not (tmp_path / "r.json").exists()


def test_atomic_write_leaves_no_temporary_files(tmp_path):
    report.write_text(tmp_path / "a.txt", "one")
    report.write_text(tmp_path / "a.txt", "two")
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]
    assert (tmp_path / "a.txt").read_text() == "two"


def test_top_k_breaks_ties_by_lower_class_index():
    ids, values = report.top_k(np.array([[1.0, 3.0, 3.0, 0.0]]), 3)
    np.testing.assert_array_equal(ids, [[1, 2, 0]])
    np.testing.assert_array_equal(values, [[3.0, 3.0, 1.0]])


def test_prediction_rows_name_both_methods_top_classes(tmp_path):
    zero_shot = np.array([[0.9, 0.1, 0.0], [0.2, 0.3, 0.5]])
    core = np.array([[0.1, 0.8, 0.0], [0.6, 0.3, 0.5]])
    rows = list(
        report.prediction_rows(
            ["a.jpg", "b.jpg"], [1, 2], ["cat", "dog", "fox"], zero_shot, core
        )
    )
    assert rows[0]["label"] == "dog"
    assert rows[0]["zero_shot_pred"] == "cat"
    assert rows[0]["core_pred"] == "dog"
    assert rows[1]["zero_shot_top5_ids"] == "2 1 0"
    assert rows[1]["core_top5_ids"] == "0 2 1"
    assert rows[1]["core_top5_scores"] == "0.6 0.5 0.3"

    report.write_csv(tmp_path / "p.csv", rows)
    with open(tmp_path / "p.csv", newline="") as handle:
        read = list(csv.DictReader(handle))
    assert read[1]["core_pred"] == "cat"
    assert read[0]["path"] == "a.jpg"


def test_heatmap_is_a_png(tmp_path):
    accuracy = np.linspace(0, 1, 12).reshape(3, 4)
    path = report.write_heatmap(
        tmp_path / "h.png",
        accuracy,
        [0.1, 0.2, 0.3],
        [0.1, 0.2, 0.3, 0.4],
        title="t",
        best=(0.3, 0.4),
    )
    with Image.open(path) as picture:
        assert picture.format == "PNG"
        assert picture.size[0] > 100 and picture.size[1] > 100


def test_heatmap_refuses_a_grid_of_the_wrong_shape(tmp_path):
    with pytest.raises(ValueError, match=r"\(3, 4\)"):
        report.write_heatmap(
            tmp_path / "h.png", np.zeros((3, 3)), [1, 2, 3], [1, 2, 3, 4], title=""
        )


def test_qualitative_page_escapes_captions_and_embeds_thumbnails():
    sample = report.QualitativeSample(
        path="x/<cat>.jpg",
        image=np.zeros((300, 200, 3), np.uint8),
        label="cat",
        zero_shot=[("dog", 0.5), ("cat", 0.4)],
        core=[("cat", 0.6), ("dog", 0.3)],
        captions=[("<script>alert(1)</script> a cat", 0.75), ("a dog", 0.25)],
    )
    page = report.qualitative_html([sample], title="T", notes=["random weights"])
    assert "<script>alert" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt; a cat" in page
    assert "data:image/png;base64," in page
    assert "random weights" in page
    assert "0.750" in page
    # zero-shot is wrong (dog), CoRE right (cat).
    assert "zero-shot <span class='miss'>wrong</span>" in page
    assert "CoRE <span class='hit'>right</span>" in page


def test_thumbnail_keeps_the_aspect_ratio():
    data = report.thumbnail_png(np.zeros((400, 200, 3), np.uint8), size=100)
    import io

    with Image.open(io.BytesIO(data)) as picture:
        assert picture.size == (50, 100)


def test_package_versions_name_jax_and_numpy():
    versions = report.package_versions()
    assert versions["jax"] and versions["numpy"] and versions["python"]
