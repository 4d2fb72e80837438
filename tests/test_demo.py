"""The built-in demo: its inputs, and the whole run as users start it."""

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from core_jax import datasets, demo

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_dataset_is_in_the_reference_layout_and_reproducible(tmp_path):
    demo.write_dataset(tmp_path / "a", train_per_class=2, test_per_class=3, size=64)
    demo.write_dataset(tmp_path / "b", train_per_class=2, test_per_class=3, size=64)
    train = datasets.from_csv(tmp_path / "a", "train")
    test = datasets.from_csv(tmp_path / "a", "test")
    assert len(train) == 2 * 12 and len(test) == 3 * 12
    assert train.class_names[3] == "cat"
    assert train.common_names[3] == "domestic cat"
    np.testing.assert_array_equal(np.bincount(test.labels), [3] * 12)
    for name in ("train.csv", "images/05/004.jpg"):
        assert (tmp_path / "a" / name).read_bytes() == (
            tmp_path / "b" / name
        ).read_bytes()


def test_views_are_distinct_crops_of_the_right_size():
    image = np.arange(60 * 80 * 3, dtype=np.uint8).reshape(60, 80, 3)
    views = demo.augmented_views(image, 4, np.random.default_rng(0), 32)
    assert all(v.shape == (32, 32, 3) and v.dtype == np.uint8 for v in views)
    assert len({v.tobytes() for v in views}) == 4


def test_caption_corpus_covers_every_class_and_has_generic_captions():
    corpus = demo.captions()
    assert 300 <= len(corpus) <= 600
    assert len(set(corpus)) == len(corpus)
    for name in ("astronaut", "coffee", "moon", "motorcycle", "galax"):
        assert sum(name in caption for caption in corpus) >= 8
    assert "a map of the world" in corpus


def test_random_checkpoint_loads_with_the_tokenizers_vocabulary(tmp_path):
    from core_jax.models import siglip

    vocab = demo.write_model_files(
        demo.captions(),
        tmp_path / "tok.model",
        tmp_path / "model.npz",
        variant="Tiny/16",
        image_size=32,
        vocab_size=400,
        seed=0,
    )
    model, params = siglip.load(tmp_path / "model.npz", "Tiny/16")
    assert model.vocab_size == vocab <= 400
    assert model.image_size == 32
    scale = params["txt"]["Encoder_0"]["encoderblock_0"]["LayerNorm_0"]["scale"]
    np.testing.assert_array_equal(np.asarray(scale), 1.0)
    assert float(np.asarray(params["b"])[0]) == -10.0


def _run_demo(workdir: pathlib.Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "launch.evaluate",
            "--config=configs/demo.py",
            f"--config.demo.workdir={workdir}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=1200,
    )


@pytest.fixture(scope="module")
def demo_runs(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("demo") / "demo_workdir"
    first = _run_demo(workdir)
    assert first.returncode == 0, first.stderr[-4000:]
    second = _run_demo(workdir)
    assert second.returncode == 0, second.stderr[-4000:]
    return workdir, first, second


def test_demo_runs_and_says_its_weights_are_random(demo_runs):
    workdir, first, _ = demo_runs
    run_dir = sorted((workdir / "runs").iterdir())[0]
    results = json.loads((run_dir / "results.json").read_text())
    assert "RANDOM WEIGHTS" in results["notice"]
    assert "RANDOM WEIGHTS" in first.stderr
    assert "RANDOM" in (workdir / "README.txt").read_text()
    assert "RANDOM WEIGHTS" in (run_dir / "qualitative.html").read_text()
    assert results["dataset"]["classes"] == 12
    assert results["dataset"]["test_images"] == 96
    for method in ("zero_shot", "core"):
        for metric in ("acc1", "acc5", "balanced_acc1"):
            assert 0.0 <= results["test"][method][metric] <= 1.0
    assert (run_dir / "heatmap_train_acc1.png").stat().st_size > 1000
    assert len((run_dir / "predictions.csv").read_text().splitlines()) == 97


def test_second_demo_run_reuses_everything_in_a_new_directory(demo_runs):
    workdir, _, _ = demo_runs
    run_dirs = sorted((workdir / "runs").iterdir())
    assert len(run_dirs) == 2
    first, second = (json.loads((d / "results.json").read_text()) for d in run_dirs)
    assert all(stage["computed"] == 0 for stage in second["cache"].values())
    assert second["test"] == first["test"]
    assert second["hyperparameters"] == first["hyperparameters"]
