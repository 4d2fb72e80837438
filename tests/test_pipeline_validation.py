"""Bad config values and inputs are refused up front with the field named."""

import ml_collections
import pytest

from configs import common
from core_jax import pipeline


def _config(**overrides):
    config = common.get_config()
    for name, value in overrides.items():
        target = config
        *parents, leaf = name.split(".")
        for parent in parents:
            target = target[parent]
        target[leaf] = value
    return config


def test_the_defaults_pass():
    pipeline.validate_config(common.get_config())


@pytest.mark.parametrize(
    "field, value",
    [
        ("tau_t2t", 0.0),
        ("tau_t2t", -1.0),
        ("tau_i2t", float("nan")),
        ("tau_i2t", float("inf")),
        ("alpha", 1.5),
        ("beta", -0.1),
        ("weighting", "cosine"),
        ("on_error", "ignore"),
        ("dedup_threshold", 0.0),
        ("dedup_threshold", 1.2),
        ("k", 0),
        ("image_batch_size", 0),
        ("text_batch_size", -3),
        ("image_chunk_size", 0),
        ("image_workers", 0),
        ("qualitative_samples", -1),
        ("dataset.limit", -5),
    ],
)
def test_a_bad_value_names_the_field_and_the_value(field, value):
    with pytest.raises(pipeline.PipelineError) as error:
        pipeline.validate_config(_config(**{field: value}))
    message = str(error.value)
    assert f"--config.{field}=" in message
    assert repr(value) in message
    assert "expected" in message
    # The internal argument name of the dataset reader never leaks out.
    assert "on_missing" not in message


@pytest.mark.parametrize(
    "name, values, bad",
    [
        ("tau_t2t", (0.01, 0.0), "0.0"),
        ("tau_i2t", (1.0, -1.0), "-1.0"),
        ("alpha", (0.5, 2.0), "2.0"),
        ("beta", (), "()"),
    ],
)
def test_a_bad_grid_value_is_named(name, values, bad):
    config = _config()
    config.grid[name] = values
    with pytest.raises(pipeline.PipelineError) as error:
        pipeline.validate_config(config)
    assert f"--config.grid.{name}=" in str(error.value)
    assert bad in str(error.value)


def test_evaluate_validates_before_reading_any_file(tmp_path):
    # Every path points nowhere: only the up-front check can answer.
    config = _config(tau_t2t=0.0, cache_dir=str(tmp_path / "cache"))
    config.output_dir = str(tmp_path / "runs")
    with pytest.raises(pipeline.PipelineError, match=r"--config\.tau_t2t=0\.0"):
        pipeline.evaluate(config)
    assert not (tmp_path / "runs").exists()
    assert not (tmp_path / "cache").exists()


def test_classify_validates_before_reading_any_file(tmp_path):
    config = _config(weighting="cosine")
    with pytest.raises(pipeline.PipelineError, match=r"--config\.weighting='cosine'"):
        pipeline.classify(config, tmp_path / "none", tmp_path / "none.txt")


def test_an_unset_dataset_root_says_so():
    config = _config()
    assert config.dataset.root == ""
    with pytest.raises(pipeline.PipelineError) as error:
        pipeline.load_dataset(config)
    assert "--config.dataset.root is not set" in str(error.value)
    assert "'.'" not in str(error.value)


def test_a_non_integer_count_is_refused():
    # A config built without type safety can hold a float where a count goes.
    config = ml_collections.ConfigDict(common.get_config().to_dict(), type_safe=False)
    config.k = 2.5
    with pytest.raises(pipeline.PipelineError, match=r"--config\.k=2\.5"):
        pipeline.validate_config(config)


def _tiny_dataset(root):
    from PIL import Image

    (root / "images").mkdir(parents=True)
    Image.new("RGB", (8, 8), (10, 20, 30)).save(root / "images" / "a.png")
    (root / "class_mapping.csv").write_text("id,name\n0,cat\n")
    (root / "train.csv").write_text("filename,class_id\nimages/a.png,0\n")
    (root / "test.csv").write_text(
        "filename,class_id\nimages/a.png,0\nimages/gone.png,0\n"
    )


def test_skipped_images_have_one_format_with_the_csv_line(tmp_path):
    import numpy as np

    _tiny_dataset(tmp_path)
    config = _config(**{"dataset.root": str(tmp_path)})
    _, _, test = pipeline.load_dataset(config)
    assert test.paths == [str(tmp_path / "images" / "a.png")]
    embedded = pipeline.Embedded(
        embeddings=np.zeros((0, 4), np.float32),
        kept=np.zeros(0, np.int64),
        skipped=[(test.paths[0], "cannot decode")],
        keys=[],
    )
    entries = pipeline.skipped_entries(test, embedded)
    assert entries[0]["path"] == str(tmp_path / "images" / "gone.png")
    assert entries[0]["line"] == 3
    assert entries[1] == {"path": test.paths[0], "reason": "cannot decode"}
    assert all(set(e) <= {"path", "reason", "line"} for e in entries)


def test_a_missing_image_with_on_error_raise_names_the_config_field(tmp_path):
    _tiny_dataset(tmp_path)
    config = _config(on_error="raise", **{"dataset.root": str(tmp_path)})
    with pytest.raises(ValueError) as error:
        pipeline.load_dataset(config)
    assert "gone.png" in str(error.value)
    assert "--config.on_error=skip" in str(error.value)
    assert "on_missing" not in str(error.value)


@pytest.mark.parametrize("suffix", [".txt", ".csv"])
def test_a_class_list_that_is_not_utf8_names_file_line_and_byte(tmp_path, suffix):
    path = tmp_path / f"classes{suffix}"
    header = b"name\n" if suffix == ".csv" else b""
    path.write_bytes(header + b"cat\nd\xe9j\xe0 vu\n")
    with pytest.raises(pipeline.PipelineError) as error:
        pipeline.read_class_list(path)
    message = str(error.value)
    assert str(path) in message
    assert f"line {3 if suffix == '.csv' else 2}" in message
    assert "0xe9" in message


def test_hyperparameters_taken_from_a_results_file_are_checked_too(tmp_path):
    results = tmp_path / "results.json"
    results.write_text(
        '{"hyperparameters": {"alpha": 0.5, "beta": 0.5, "tau_i2t": 1.0, '
        '"tau_t2t": 0.0}}'
    )
    classes = tmp_path / "classes.txt"
    classes.write_text("cat\ndog\n")
    with pytest.raises(pipeline.PipelineError) as error:
        pipeline.classify(_config(), tmp_path, classes, results_from=results)
    assert str(results) in str(error.value)
    assert "--config.tau_t2t=0.0" in str(error.value)
