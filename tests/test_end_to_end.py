"""The evaluation job end to end, checked against NumPy formulas.

A small world is made here: 300 synthetic images of six classes (one of
them unreadable), a SentencePiece model trained on real CC3M captions, a
Tiny SigLIP with random weights, and a caption database of 1,500 real
captions. `pipeline.evaluate` runs on it once; the tests read the cached
stage arrays back and recompute what results.json and predictions.csv
should say with the method's formulas written out in NumPy.
"""

import csv
import json
import pathlib
import sys

import numpy as np
import pytest
from PIL import Image

from configs import common
from core_jax import demo, pipeline

CLASSES = ("dog", "beach", "car", "flower", "city street", "birthday cake")
TRAIN_PER_CLASS = 6
TEST_PER_CLASS = 44
IMAGE_SIZE = 32
CAPTIONS = 1500
GRID = {
    "alpha": (0.3, 0.9),
    "beta": (0.2, 0.8),
    "tau_i2t": (0.1, 10.0),
    "tau_t2t": (0.01, 1.0),
}


def write_images(root: pathlib.Path, seed: int = 0) -> None:
    """Six classes of noisy coloured patterns in the reference CSV layout."""
    rng = np.random.default_rng(seed)
    colours = rng.uniform(40, 215, size=(len(CLASSES), 3))
    rows = {"train": [], "test": []}
    for label, colour in enumerate(colours):
        folder = root / "images" / str(label)
        folder.mkdir(parents=True)
        for i in range(TRAIN_PER_CLASS + TEST_PER_CLASS):
            pixels = colour + rng.normal(0, 40, size=(IMAGE_SIZE, IMAGE_SIZE, 3))
            stripe = rng.integers(0, IMAGE_SIZE - 8)
            pixels[stripe : stripe + 8, :, label % 3] = 255
            name = f"images/{label}/{i:03d}.png"
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(root / name)
            rows["train" if i < TRAIN_PER_CLASS else "test"].append((name, label))
    # An unreadable file in the test split: a counted, listed skip.
    (root / "images" / "0" / "broken.png").write_bytes(b"not a png at all")
    rows["test"].append(("images/0/broken.png", 0))
    for split, entries in rows.items():
        lines = ["filename,class_id"] + [f"{n},{c}" for n, c in entries]
        (root / f"{split}.csv").write_text("\n".join(lines) + "\n")
    lines = ["id,name"] + [f"{i},{name}" for i, name in enumerate(CLASSES)]
    (root / "class_mapping.csv").write_text("\n".join(lines) + "\n")


def build_world(root: pathlib.Path, captions: list[str]) -> dict:
    """Writes images, tokenizer, checkpoint and database; returns their paths."""
    write_images(root / "dataset")
    corpus = captions[:CAPTIONS]
    (root / "captions.txt").write_text("\n".join(corpus) + "\n")
    demo.write_model_files(
        corpus,
        root / "tokenizer.model",
        root / "siglip.npz",
        variant="Tiny/16",
        image_size=IMAGE_SIZE,
        vocab_size=800,
        seed=1,
    )
    demo.build_caption_database(
        root / "siglip.npz",
        root / "tokenizer.model",
        root / "captions.txt",
        root / "database",
        shard_size=1000,
    )
    return {
        "root": root,
        "checkpoint": root / "siglip.npz",
        "tokenizer": root / "tokenizer.model",
        "database": root / "database",
        "dataset": root / "dataset",
    }


def world_config(world: dict, **overrides):
    """The evaluation config for a world built by `build_world`."""
    config = common.get_config()
    config.model.checkpoint = str(world["checkpoint"])
    config.model.tokenizer = str(world["tokenizer"])
    config.database_dir = str(world["database"])
    config.dataset.root = str(world["dataset"])
    config.dataset.name = "synthetic"
    config.dataset.templates = ("A photo of a {}.",)
    config.cache_dir = str(world["root"] / "cache")
    # In-process runs leave JAX's global compilation cache setting alone.
    config.compilation_cache_dir = "none"
    config.output_dir = str(world["root"] / "runs")
    config.k = 5
    config.image_chunk_size = 64
    config.image_batch_size = 32
    config.image_workers = 2
    config.qualitative_samples = 4
    for name, values in GRID.items():
        config.grid[name] = values
    for name, value in overrides.items():
        target = config
        *parents, leaf = name.split(".")
        for parent in parents:
            target = target[parent]
        target[leaf] = value
    return config


@pytest.fixture(scope="module")
def world(tmp_path_factory, real_captions):
    return build_world(tmp_path_factory.mktemp("world"), real_captions)


@pytest.fixture(scope="module")
def run(world):
    return pipeline.evaluate(world_config(world, run_name="first"))


def _stage(world, stage, key):
    with np.load(
        world["root"] / "cache" / stage / key / "arrays.npz", allow_pickle=False
    ) as stored:
        return {name: stored[name] for name in stored.files}


def _normalize(x):
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _enrich(base, neighbours, sims, mask, mix, tau):
    """normalize((1 - mix) base + mix normalize(sum_j softmax(s / tau)_j t_j))."""
    base = base.astype(np.float64)
    scaled = np.where(mask, sims.astype(np.float64) / tau, -np.inf)
    weights = np.exp(scaled - scaled.max(axis=-1, keepdims=True))
    weights = np.where(mask, weights, 0.0)
    weights /= weights.sum(axis=-1, keepdims=True)
    retrieved = _normalize(np.einsum("nk,nkd->nd", weights, neighbours))
    mixed = _normalize((1 - mix) * base + mix * retrieved)
    return np.where(mask.any(axis=-1, keepdims=True) & (mix > 0), mixed, base)


def _cached_arrays(world, results, split):
    keys = results["stage_keys"]
    prototypes = _stage(world, "class_prototypes", keys["class_prototypes"])
    classes = _stage(world, "class_neighbours", keys["class_neighbours"])
    chunks = [
        _stage(world, "image_embeddings", key)
        for key in keys[f"image_embeddings_{split}"]
    ]
    images = _stage(
        world, f"image_neighbours_{split}", keys[f"image_neighbours_{split}"]
    )
    z = np.concatenate([c["embeddings"] for c in chunks])
    return prototypes["prototypes"], classes, z, images


def _numpy_logits(world, results, split, alpha, beta, tau_i2t, tau_t2t):
    w, classes, z, images = _cached_arrays(world, results, split)
    w_plus = _enrich(
        w, classes["embeddings"], classes["sims"], classes["mask"], alpha, tau_t2t
    )
    z_plus = _enrich(
        z, images["embeddings"], images["sims"], images["mask"], beta, tau_i2t
    )
    return z_plus @ w_plus.T, z.astype(np.float64) @ w.astype(np.float64).T


def _labels(world, split):
    rows = (world["dataset"] / f"{split}.csv").read_text().splitlines()[1:]
    return {
        str(world["dataset"] / name): int(label)
        for name, label in (row.split(",") for row in rows)
    }


def test_run_writes_every_output(run):
    names = {p.name for p in run.run_dir.iterdir()}
    assert {
        "config.json",
        "results.json",
        "predictions.csv",
        "heatmap_train_acc1.png",
        "qualitative.html",
    } <= names
    results = json.loads((run.run_dir / "results.json").read_text())
    assert results["dataset"]["classes"] == 6
    # The unreadable image is listed but not evaluated.
    assert results["dataset"]["test_images"] == 6 * TEST_PER_CLASS
    assert results["dataset"]["test_images_listed"] == 6 * TEST_PER_CLASS + 1
    assert results["dataset"]["test_skipped"] == 1
    assert results["dataset"]["train_images"] == 6 * TRAIN_PER_CLASS
    assert results["versions"]["jax"]
    assert results["config"]["k"] == 5
    assert "image_embeddings_test" in results["timings_s"]
    assert len(results["per_class"]) == 6


def test_unreadable_image_is_listed_and_left_out(run, world):
    results = json.loads((run.run_dir / "results.json").read_text())
    skipped = results["skipped_images"]["test"]
    assert [s["path"] for s in skipped] == [
        str(world["dataset"] / "images" / "0" / "broken.png")
    ]
    assert "broken.png" in skipped[0]["reason"]
    with open(run.run_dir / "predictions.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 6 * TEST_PER_CLASS
    assert not any(r["path"].endswith("broken.png") for r in rows)


def test_chosen_hyperparameters_are_the_first_best_train_point(run, world):
    results = json.loads((run.run_dir / "results.json").read_text())
    labels = _labels(world, "train")
    w, classes, z, images = _cached_arrays(world, results, "train")
    truth = np.array(list(labels.values()))
    best, best_point = -1, None
    for alpha in GRID["alpha"]:
        for beta in GRID["beta"]:
            for tau_i2t in GRID["tau_i2t"]:
                for tau_t2t in GRID["tau_t2t"]:
                    logits, _ = _numpy_logits(
                        world, results, "train", alpha, beta, tau_i2t, tau_t2t
                    )
                    correct = int((logits.argmax(1) == truth).sum())
                    if correct > best:
                        best, best_point = correct, (alpha, beta, tau_i2t, tau_t2t)
    chosen = results["hyperparameters"]
    assert (
        chosen["alpha"],
        chosen["beta"],
        chosen["tau_i2t"],
        chosen["tau_t2t"],
    ) == best_point
    assert results["sweep"]["best_train_acc1"] == pytest.approx(best / len(truth))


def test_test_metrics_and_predictions_match_numpy(run, world):
    results = json.loads((run.run_dir / "results.json").read_text())
    chosen = results["hyperparameters"]
    core, zero_shot = _numpy_logits(
        world,
        results,
        "test",
        chosen["alpha"],
        chosen["beta"],
        chosen["tau_i2t"],
        chosen["tau_t2t"],
    )
    labels = _labels(world, "test")
    with open(run.run_dir / "predictions.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    truth = np.array([labels[r["path"]] for r in rows])

    # float32 on device vs float64 here: scores agree to ~1e-6; ties in the
    # top-1 are not expected with random continuous embeddings.
    scores = np.array([[float(s) for s in r["core_top5_scores"].split()] for r in rows])
    top5 = np.argsort(-core, axis=1, kind="stable")[:, :5]
    np.testing.assert_array_equal(
        [[int(c) for c in r["core_top5_ids"].split()] for r in rows], top5
    )
    np.testing.assert_allclose(
        scores, np.take_along_axis(core, top5, 1), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_array_equal(
        [int(r["zero_shot_pred_id"]) for r in rows], zero_shot.argmax(1)
    )

    core_acc1 = (core.argmax(1) == truth).mean()
    core_acc5 = (top5 == truth[:, None]).any(1).mean()
    zero_shot_acc1 = (zero_shot.argmax(1) == truth).mean()
    per_class = [(core.argmax(1) == truth)[truth == c].mean() for c in range(6)]
    assert results["test"]["core"]["acc1"] == pytest.approx(core_acc1, abs=1e-6)
    assert results["test"]["core"]["acc5"] == pytest.approx(core_acc5, abs=1e-6)
    assert results["test"]["zero_shot"]["acc1"] == pytest.approx(
        zero_shot_acc1, abs=1e-6
    )
    assert results["test"]["core"]["balanced_acc1"] == pytest.approx(
        np.mean(per_class), abs=1e-6
    )
    assert [c["core_acc1"] for c in results["per_class"]] == pytest.approx(per_class)


def test_a_changed_template_recomputes_the_class_side_only(run, world):
    again = pipeline.evaluate(
        world_config(world, **{"dataset.templates": ("An image of a {}.",)})
    )
    stats = again.cache
    assert stats["class_prototypes"] == {"computed": 1, "reused": 0}
    assert stats["image_embeddings"]["computed"] == 0
    assert stats["image_embeddings"]["reused"] == len(
        run.results["stage_keys"]["image_embeddings_train"]
    ) + len(run.results["stage_keys"]["image_embeddings_test"])
    assert stats["image_neighbours_train"] == {"computed": 0, "reused": 1}
    assert stats["image_neighbours_test"] == {"computed": 0, "reused": 1}
    assert again.run_dir != run.run_dir


def test_sweep_off_uses_the_given_hyperparameters(run, world):
    again = pipeline.evaluate(
        world_config(world, sweep=False, alpha=0.4, beta=0.6, tau_i2t=1.0)
    )
    chosen = again.results["hyperparameters"]
    assert (chosen["alpha"], chosen["beta"], chosen["tau_i2t"]) == (0.4, 0.6, 1.0)
    assert chosen["source"] == "config"
    assert "sweep" not in again.cache
    assert not (again.run_dir / "heatmap_train_acc1.png").exists()
    core, _ = _numpy_logits(world, again.results, "test", 0.4, 0.6, 1.0, 0.01)
    labels = _labels(world, "test")
    with open(again.run_dir / "predictions.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    truth = np.array([labels[r["path"]] for r in rows])
    assert again.results["test"]["core"]["acc1"] == pytest.approx(
        (core.argmax(1) == truth).mean(), abs=1e-6
    )


def test_an_existing_named_run_is_not_overwritten(run, world):
    before = (run.run_dir / "results.json").read_bytes()
    with pytest.raises(pipeline.RunDirectoryExistsError):
        pipeline.evaluate(world_config(world, run_name="first"))
    assert (run.run_dir / "results.json").read_bytes() == before


def test_classify_lists_top5_and_captions(run, world, tmp_path):
    folder = tmp_path / "unlabelled"
    folder.mkdir()
    sources = sorted((world["dataset"] / "images" / "2").glob("0[1-4]*.png"))
    for source in sources:
        (folder / source.name).write_bytes(source.read_bytes())
    classes = tmp_path / "classes.txt"
    classes.write_text("template: A photo of a {}.\n" + "\n".join(CLASSES) + "\n")

    output = pipeline.classify(
        world_config(world),
        folder,
        classes,
        results_from=run.run_dir / "results.json",
        output_dir=tmp_path / "out",
    )
    written = json.loads((output / "classifications.json").read_text())
    chosen = run.results["hyperparameters"]
    assert written["hyperparameters"]["alpha"] == chosen["alpha"]
    assert len(written["images"]) == len(sources)

    # The same images were embedded for the test split: their CoRE logits
    # there are the expected scores here.
    core, _ = _numpy_logits(
        world,
        run.results,
        "test",
        chosen["alpha"],
        chosen["beta"],
        chosen["tau_i2t"],
        chosen["tau_t2t"],
    )
    with open(run.run_dir / "predictions.csv", newline="") as handle:
        order = [r["path"] for r in csv.DictReader(handle)]
    for record, source in zip(written["images"], sources, strict=True):
        row = core[order.index(str(source))]
        expected = [CLASSES[c] for c in np.argsort(-row, kind="stable")[:5]]
        assert [entry["class"] for entry in record["top5"]] == expected
        assert len(record["captions"]) >= 1
        assert sum(c["weight"] for c in record["captions"]) == pytest.approx(1.0)
    with open(output / "classifications.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["class_1"] for r in rows] == [
        r["top5"][0]["class"] for r in written["images"]
    ]


def evaluate_command(world: dict, cache: str, run_name: str, *extra: str) -> list:
    """A `launch.evaluate` command line over `world`, as a user would type it.

    Small grids and k keep the subprocess runs short; `extra` flags come last
    and so override the ones here.
    """
    root = world["root"]
    return [
        sys.executable,
        "-m",
        "launch.evaluate",
        "--config=configs/common.py",
        f"--config.model.checkpoint={world['checkpoint']}",
        f"--config.model.tokenizer={world['tokenizer']}",
        f"--config.database_dir={world['database']}",
        f"--config.dataset.root={world['dataset']}",
        "--config.dataset.name=synthetic",
        f"--config.cache_dir={root / cache}",
        f"--config.output_dir={root / 'runs'}",
        f"--config.run_name={run_name}",
        "--config.k=5",
        "--config.grid.alpha=(0.3,0.9)",
        "--config.grid.beta=(0.2,0.8)",
        "--config.grid.tau_i2t=(0.1,10.0)",
        "--config.grid.tau_t2t=(0.01,1.0)",
        *extra,
    ]


# ---------------------------------------------------------------------------
# Broken models and mismatched files


def _poisoned_checkpoint(world, tmp_path, tower: str) -> pathlib.Path:
    """The world's checkpoint with one of `tower`'s kernels set to NaN."""
    with np.load(world["checkpoint"], allow_pickle=False) as stored:
        arrays = {name: stored[name] for name in stored.files}
    name = next(n for n in sorted(arrays) if tower in n and n.endswith("kernel"))
    arrays[name] = np.full_like(arrays[name], np.nan)
    path = tmp_path / f"nan_{tower}.npz"
    np.savez(path, **arrays)
    return path


def test_nan_image_weights_stop_at_the_first_image(world, tmp_path):
    config = world_config(
        world,
        cache_dir=str(tmp_path / "cache"),
        **{"model.checkpoint": str(_poisoned_checkpoint(world, tmp_path, "img"))},
    )
    _, train, _ = pipeline.load_dataset(config)
    split = pipeline.Split("train", train.paths[:3], train.labels[:3])
    resources = pipeline.Resources(config, tmp_path / "cache")
    cache = pipeline.StageCache(tmp_path / "cache")
    with pytest.raises(pipeline.NonFiniteError) as error:
        pipeline.image_embeddings_stage(config, split, resources, cache)
    assert "image embeddings" in str(error.value)
    assert train.paths[0] in str(error.value)
    # Nothing non-finite was cached for a later run to trust.
    assert not list((tmp_path / "cache").glob("image_embeddings/*/COMPLETE"))


def test_nan_text_weights_stop_at_the_first_class(world, tmp_path):
    config = world_config(
        world,
        cache_dir=str(tmp_path / "cache"),
        **{"model.checkpoint": str(_poisoned_checkpoint(world, tmp_path, "txt"))},
    )
    classes, _, _ = pipeline.load_dataset(config)
    resources = pipeline.Resources(config, tmp_path / "cache")
    cache = pipeline.StageCache(tmp_path / "cache")
    with pytest.raises(pipeline.NonFiniteError) as error:
        pipeline.class_prototypes_stage(config, classes, resources, cache)
    assert "class prototypes" in str(error.value)
    assert f"class {CLASSES[0]}" in str(error.value)


def test_a_tokenizer_larger_than_the_model_vocabulary_is_refused(world, tmp_path):
    from core_jax import tokenizers

    pieces = tokenizers.SiglipTokenizer(world["tokenizer"]).vocab_size
    small = demo.write_checkpoint(
        tmp_path / "small_vocab.npz",
        variant="Tiny/16",
        image_size=IMAGE_SIZE,
        vocab_size=pieces // 2,
        seed=1,
    )
    config = world_config(world, **{"model.checkpoint": str(small)})
    resources = pipeline.Resources(config, tmp_path / "cache")
    with pytest.raises(pipeline.PipelineError) as error:
        resources.tokenizer  # noqa: B018
    message = str(error.value)
    assert str(world["tokenizer"]) in message and str(small) in message
    assert str(pieces) in message and str(pieces // 2) in message


def test_a_database_from_another_model_stops_the_run_first(run, world, tmp_path):
    from core_jax import database, tokenizers

    pieces = tokenizers.SiglipTokenizer(world["tokenizer"]).vocab_size
    other = demo.write_checkpoint(
        tmp_path / "other.npz",
        variant="Tiny/16",
        image_size=IMAGE_SIZE,
        vocab_size=pieces,
        seed=7,
    )
    config = world_config(
        world,
        run_name="other_model",
        cache_dir=str(tmp_path / "cache"),
        **{"model.checkpoint": str(other)},
    )
    with pytest.raises(database.EncoderMismatchError) as error:
        pipeline.evaluate(config)
    assert "--config.database_dir=" in str(error.value)
    assert str(other) in str(error.value)
    # Stopped before any stage ran and before the run directory was made.
    assert not (world["root"] / "runs" / "other_model").exists()
    assert not (tmp_path / "cache" / "class_prototypes").exists()


def test_a_failing_page_costs_the_page_not_the_results(run, world, monkeypatch):
    from core_jax import report

    def fail(*args, **kwargs):
        raise RuntimeError("no space left for the page")

    monkeypatch.setattr(report, "write_qualitative_page", fail)
    again = pipeline.evaluate(world_config(world, run_name="page_fails"))
    written = json.loads((again.run_dir / "results.json").read_text())
    assert "no space left for the page" in written["report_errors"]["qualitative"]
    assert "qualitative" not in written["outputs"]
    assert written["outputs"]["heatmap"] == "heatmap_train_acc1.png"
    assert written["test"] == run.results["test"]
    assert (again.run_dir / "predictions.csv").read_bytes() == (
        run.run_dir / "predictions.csv"
    ).read_bytes()
    assert not (again.run_dir / "qualitative.html").exists()
