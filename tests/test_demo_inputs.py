"""The demo's work directory is rebuilt when one of its files is gone."""

import pathlib

from configs import demo as demo_config
from core_jax import demo


def _config(workdir: pathlib.Path):
    config = demo_config.get_config()
    config.demo.workdir = str(workdir)
    # The smallest inputs that still build: this test is about the files.
    config.demo.train_per_class = 1
    config.demo.test_per_class = 1
    config.demo.image_size = 32
    return config


def test_a_deleted_input_file_is_written_again(tmp_path):
    config = _config(tmp_path / "work")
    demo.prepare(config)
    assert demo.missing_inputs(config) == []
    tokenizer = pathlib.Path(config.model.tokenizer)
    original = tokenizer.read_bytes()
    tokenizer.unlink()
    assert demo.missing_inputs(config) == [str(tokenizer)]

    demo.prepare(config)
    assert demo.missing_inputs(config) == []
    # Rebuilt from the same seed and corpus, the tokenizer is the same.
    assert tokenizer.read_bytes() == original
