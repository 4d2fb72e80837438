"""The evaluation configs: defaults, and overrides from the command line."""

import pathlib

import pytest
from absl import flags
from ml_collections import config_flags

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = ("common", "circuits", "ham10000", "inaturalist", "demo")


def _parse(args):
    """Parses `--config=...` style args into a config, as launch/ scripts do."""
    values = flags.FlagValues()
    argv = ["prog", *args]
    # Override flags are defined from the argv seen at definition time.
    config_flags.DEFINE_config_file(
        "config", None, "config", flag_values=values, sys_argv=argv
    )
    values(argv)
    return values.config


@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_loads_from_its_file(name):
    config = _parse([f"--config={REPO / 'configs' / f'{name}.py'}"])
    assert config.k == 10
    assert config.dedup_threshold == 0.94
    assert config.on_error == "skip"
    assert config.grid.tau_i2t == (0.01, 0.1, 1.0, 10.0, 100.0)
    assert config.grid.alpha == (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


@pytest.mark.parametrize(
    "name, template",
    [
        ("circuits", "A circuit diagram of a {}."),
        ("ham10000", "A skin lesion of a {}."),
        ("inaturalist", "A photo of a {}."),
    ],
)
def test_dataset_configs_use_the_papers_templates(name, template):
    config = _parse([f"--config={REPO / 'configs' / f'{name}.py'}"])
    assert config.dataset.templates == (template,)
    assert config.dataset.name == name


def test_scalars_tuples_and_nested_fields_are_overridable():
    config = _parse(
        [
            f"--config={REPO / 'configs' / 'ham10000.py'}",
            "--config.k=5",
            "--config.sweep=False",
            "--config.alpha=0.3",
            "--config.tau_t2t=0.1",
            "--config.grid.beta=(0.2,0.4)",
            "--config.dataset.templates=('a {}','an image of {}')",
            "--config.model.checkpoint=/ckpt/model.npz",
            "--config.dataset.root=/data/ham",
            "--config.weighting=similarity",
        ]
    )
    assert config.k == 5
    assert config.sweep is False
    assert config.alpha == 0.3
    assert config.tau_t2t == 0.1
    assert config.grid.beta == (0.2, 0.4)
    assert config.dataset.templates == ("a {}", "an image of {}")
    assert config.model.checkpoint == "/ckpt/model.npz"
    assert config.dataset.root == "/data/ham"
    assert config.weighting == "similarity"


def test_unknown_field_is_rejected():
    with pytest.raises(Exception, match="kk"):
        _parse([f"--config={REPO / 'configs' / 'common.py'}", "--config.kk=3"])


def test_demo_workdir_moves_every_demo_path():
    config = _parse(
        [f"--config={REPO / 'configs' / 'demo.py'}", "--config.demo.workdir=/tmp/d"]
    )
    assert config.model.checkpoint == "/tmp/d/siglip_tiny_random.npz"
    assert config.model.tokenizer == "/tmp/d/tokenizer.model"
    assert config.database_dir == "/tmp/d/database"
    assert config.dataset.root == "/tmp/d/dataset"
    assert config.cache_dir == "/tmp/d/cache"
    assert config.output_dir == "/tmp/d/runs"
    assert "RANDOM" in config.notice


@pytest.mark.parametrize(
    "name, classes, common",
    [("inaturalist", 100, "ebony spleenwort"), ("ham10000", 7, None)],
)
def test_dataset_configs_read_the_reference_class_lists(
    benchmarks_dir, name, classes, common
):
    from core_jax import pipeline

    config = _parse(
        [
            f"--config={REPO / 'configs' / f'{name}.py'}",
            f"--config.dataset.root={benchmarks_dir / name}",
        ]
    )
    found, train, test = pipeline.load_dataset(config)
    assert len(found.names) == classes
    assert (found.common[1] if found.common else None) == common
    # Only the CSVs are here, not the images: every listed image is a
    # counted, named skip rather than an error.
    assert train.paths == [] and test.paths == []
    assert len(train.missing) > 0 and "does not exist" in train.missing[0][1]
