"""Pipeline pieces that need no model: stage cache, run directories, inputs."""

import json
import os
import pathlib
import time

import ml_collections
import numpy as np
import pytest

from configs import common
from core_jax import pipeline


def test_prototype_texts_are_class_then_name_then_template():
    texts = pipeline.prototype_texts(
        ["Felis catus", "Canis lupus"], ["cat", "wolf"], ["a {}", "photo of {}"]
    )
    assert texts == [
        "a Felis catus",
        "photo of Felis catus",
        "a cat",
        "photo of cat",
        "a Canis lupus",
        "photo of Canis lupus",
        "a wolf",
        "photo of wolf",
    ]


def test_prototypes_average_templates_then_names_renormalising_each_time():
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(2 * 2 * 3, 5))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    got = pipeline.average_prototypes(emb, 2, 2, 3)

    # Written out for class 1: templates of each name, then the two names.
    rows = emb.reshape(2, 2, 3, 5)[1]
    scientific = rows[0].sum(0) / np.linalg.norm(rows[0].sum(0))
    common = rows[1].sum(0) / np.linalg.norm(rows[1].sum(0))
    want = (scientific + common) / np.linalg.norm(scientific + common)
    np.testing.assert_allclose(got[1], want, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-6)


def test_retrieval_prompt_puts_the_common_name_in_brackets():
    prompts = pipeline.retrieval_prompts(["Felis catus"], ["cat"], "A photo of a {}.")
    assert prompts == ["A photo of a Felis catus (cat)."]
    assert pipeline.retrieval_prompts(["cat"], None, "{}") == ["cat"]


def test_stage_cache_computes_once_then_reuses(tmp_path):
    cache = pipeline.StageCache(tmp_path)
    calls = []

    def compute():
        calls.append(1)
        return {"x": np.arange(3.0)}, {"note": "hi"}

    first = cache.get("stage", {"a": 1}, compute)
    second = pipeline.StageCache(tmp_path).get("stage", {"a": 1}, compute)
    assert len(calls) == 1
    np.testing.assert_array_equal(second.arrays["x"], [0.0, 1.0, 2.0])
    assert second.meta == {"note": "hi"}
    assert first.key == second.key
    cache.get("stage", {"a": 2}, compute)
    assert len(calls) == 2
    assert cache.stats() == {"stage": {"computed": 2, "reused": 0}}


def test_unfinished_entries_are_ignored_and_recomputed(tmp_path):
    cache = pipeline.StageCache(tmp_path)
    key = cache.key("stage", {"a": 1})
    # What a process killed mid-write leaves: a temporary folder, and (had the
    # rename raced) a folder without its completion marker.
    (tmp_path / "stage" / f".tmp-{key}-dead").mkdir(parents=True)
    (tmp_path / "stage" / key).mkdir()
    (tmp_path / "stage" / key / "arrays.npz").write_bytes(b"trunc")
    assert cache.load("stage", key) is None
    entry = cache.get("stage", {"a": 1}, lambda: ({"x": np.ones(2)}, {}))
    np.testing.assert_array_equal(entry.arrays["x"], [1.0, 1.0])
    assert cache.computed["stage"] == 1


def test_day_old_temporary_entries_are_cleared_and_fresh_ones_kept(tmp_path):
    cache = pipeline.StageCache(tmp_path)
    old = tmp_path / "stage" / ".tmp-old"
    fresh = tmp_path / "stage" / ".tmp-fresh"
    old.mkdir(parents=True)
    fresh.mkdir()
    two_days_ago = time.time() - 2 * 24 * 3600
    os.utime(old, (two_days_ago, two_days_ago))
    cache.get("stage", {"a": 1}, lambda: ({"x": np.ones(1)}, {}))
    assert not old.exists()
    assert fresh.exists()


def test_a_failing_computation_leaves_nothing_behind(tmp_path):
    cache = pipeline.StageCache(tmp_path)

    def compute():
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        cache.get("stage", {"a": 1}, compute)
    assert not (tmp_path / "stage").exists() or not any((tmp_path / "stage").iterdir())


def test_fingerprint_follows_content_and_is_remembered(tmp_path):
    file = tmp_path / "model.npz"
    file.write_bytes(b"one")
    memo = tmp_path / "memo"
    first = pipeline.fingerprint_path(file, memo)
    assert pipeline.fingerprint_path(file, memo) == first
    assert len(list(memo.iterdir())) == 1
    time.sleep(0.01)
    file.write_bytes(b"two")
    assert pipeline.fingerprint_path(file, memo) != first
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    assert pipeline.fingerprint_path(folder) != pipeline.fingerprint_path(file)


def test_image_file_fingerprint_sees_a_touched_file(tmp_path):
    image = tmp_path / "a.jpg"
    image.write_bytes(b"x")
    before = pipeline.fingerprint_files([str(image), str(tmp_path / "gone.jpg")])
    os.utime(image, ns=(1, 1))
    assert pipeline.fingerprint_files([str(image), str(tmp_path / "gone.jpg")]) != (
        before
    )


def _config(tmp_path, **fields):
    config = common.get_config()
    config.output_dir = str(tmp_path / "runs")
    config.dataset.name = "toy"
    for name, value in fields.items():
        config[name] = value
    return config


def test_unnamed_runs_never_share_a_directory(tmp_path):
    config = _config(tmp_path)
    first = pipeline.prepare_run_dir(config)
    second = pipeline.prepare_run_dir(config)
    assert first != second
    assert first.name.startswith("toy-")
    assert json.loads((first / "config.json").read_text())["dataset"]["name"] == "toy"


def test_a_named_run_directory_is_refused_when_it_exists(tmp_path):
    config = _config(tmp_path, run_name="mine")
    run_dir = pipeline.prepare_run_dir(config)
    (run_dir / "results.json").write_text("{}")
    with pytest.raises(pipeline.RunDirectoryExistsError, match="mine"):
        pipeline.prepare_run_dir(config)
    assert (run_dir / "results.json").read_text() == "{}"


def test_resume_needs_the_same_config(tmp_path):
    config = _config(tmp_path, run_name="mine")
    pipeline.prepare_run_dir(config)
    config.resume = True
    assert pipeline.prepare_run_dir(config).name == "mine"
    config.k = 3
    with pytest.raises(pipeline.RunDirectoryExistsError, match="differs"):
        pipeline.prepare_run_dir(config)


def test_a_refused_resume_names_the_fields_and_values(tmp_path):
    config = _config(tmp_path, run_name="mine")
    pipeline.prepare_run_dir(config)
    config.resume = True
    config.k = 3
    config.dataset.templates = ("a {}",)
    with pytest.raises(pipeline.RunDirectoryExistsError) as error:
        pipeline.prepare_run_dir(config)
    message = str(error.value)
    assert "2 field(s)" in message
    assert "k: 10 -> 3" in message
    assert "dataset.templates: ['A photo of a {}.'] -> ['a {}']" in message


def test_settings_that_cannot_change_results_do_not_block_a_resume(tmp_path):
    config = _config(tmp_path, run_name="mine")
    pipeline.prepare_run_dir(config)
    config.resume = True
    config.compilation_cache_dir = str(tmp_path / "xla")
    config.cache_dir = str(tmp_path / "elsewhere")
    config.image_workers = 1
    config.qualitative_samples = 0
    assert pipeline.prepare_run_dir(config).name == "mine"


def test_overwrite_removes_the_old_outputs(tmp_path):
    config = _config(tmp_path, run_name="mine")
    run_dir = pipeline.prepare_run_dir(config)
    (run_dir / "results.json").write_text("{}")
    (run_dir / "notes.txt").write_text("mine")
    config.overwrite = True
    pipeline.prepare_run_dir(config)
    assert not (run_dir / "results.json").exists()
    assert (run_dir / "notes.txt").read_text() == "mine"


def test_text_class_list_with_common_names_and_template(tmp_path):
    path = tmp_path / "classes.txt"
    path.write_text(
        "# ferns\ntemplate: A photo of a {}.\nAsplenium platyneuron ; ebony "
        "spleenwort\n\nPteris vittata ; ladder brake\n"
    )
    listed = pipeline.read_class_list(path)
    assert listed.classes.names == ["Asplenium platyneuron", "Pteris vittata"]
    assert listed.classes.common == ["ebony spleenwort", "ladder brake"]
    assert listed.templates == ["A photo of a {}."]


def test_csv_class_list(tmp_path):
    path = tmp_path / "classes.csv"
    path.write_text("id,name\n0,melanoma\n1,nevus\n")
    listed = pipeline.read_class_list(path)
    assert listed.classes.names == ["melanoma", "nevus"]
    assert listed.classes.common is None


@pytest.mark.parametrize(
    "text, message",
    [
        ("a\na\n", "listed twice"),
        ("a ; x\nb\n", "common name"),
        ("template: no slot\na\n", "line 1"),
        ("# nothing\n", "no classes"),
    ],
)
def test_bad_class_lists_name_the_problem(tmp_path, text, message):
    path = tmp_path / "classes.txt"
    path.write_text(text)
    with pytest.raises(pipeline.PipelineError, match=message):
        pipeline.read_class_list(path)


def test_hyperparameters_come_from_a_results_file(tmp_path):
    path = tmp_path / "results.json"
    path.write_text(
        json.dumps(
            {
                "hyperparameters": {
                    "alpha": 0.2,
                    "beta": 0.4,
                    "tau_i2t": 1,
                    "tau_t2t": 0.01,
                    "weighting": "similarity",
                }
            }
        )
    )
    assert pipeline.hyperparameters_from_results(path) == {
        "alpha": 0.2,
        "beta": 0.4,
        "tau_i2t": 1.0,
        "tau_t2t": 0.01,
        "weighting": "similarity",
    }
    path.write_text("{}")
    with pytest.raises(pipeline.PipelineError, match="hyperparameters"):
        pipeline.hyperparameters_from_results(path)


def test_limit_takes_a_seeded_subset_in_order():
    split = pipeline.Split("train", [f"{i}.jpg" for i in range(10)], np.arange(10))
    small = pipeline._limit(split, 4, seed=0)
    assert len(small.paths) == 4
    assert small.paths == sorted(small.paths, key=lambda p: int(p.split(".")[0]))
    assert [int(p.split(".")[0]) for p in small.paths] == small.labels.tolist()
    assert pipeline._limit(split, 4, seed=0).paths == small.paths


def test_missing_checkpoint_names_the_flag(tmp_path):
    config = _config(tmp_path)
    config.model.checkpoint = str(tmp_path / "nope.npz")
    with pytest.raises(pipeline.PipelineError, match="--config.model.checkpoint"):
        pipeline.Resources(config, pathlib.Path(tmp_path))


def test_config_is_a_config_dict():
    assert isinstance(common.get_config(), ml_collections.ConfigDict)
