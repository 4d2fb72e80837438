"""A database build killed with SIGKILL and started again ends with the same
bytes as an uninterrupted build.

The build runs as `launch/build_database.py` in a subprocess, with the real
tiny SigLIP saved as a big_vision .npz and a SentencePiece model trained on
the real captions; it is killed once a few shards are finished (while later
shards are being embedded and written), then run again to completion.
"""

import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from configs import database as database_config
from core_jax import checkpoints, database, tokenizers
from core_jax.models import siglip
from launch import build_database

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, real_captions):
    root = tmp_path_factory.mktemp("resume")
    model = siglip.SigLIP.from_variant("Tiny/16", image_size=32)
    checkpoints.save_npz(siglip.init_random(model, seed=0), root / "tiny.npz")
    tokenizer = tokenizers.train_sentencepiece(real_captions[:4000], root / "spm", 1000)
    corpus = root / "captions.txt"
    corpus.write_text("\n".join(real_captions[:3000]) + "\n", encoding="utf-8")
    return root, corpus, tokenizer


def _overrides(root, corpus, tokenizer, directory):
    return {
        "corpus": str(corpus),
        "format": "text",
        "database_dir": str(directory),
        "model.checkpoint": str(root / "tiny.npz"),
        "model.tokenizer": str(tokenizer),
        "shard_size": 200,
        "encode_batch": 100,
        "text_batch_size": 64,
        "progress": False,
    }


def _command(overrides):
    return [
        sys.executable,
        "-m",
        "launch.build_database",
        "--config=configs/database.py",
        *(f"--config.{key}={value}" for key, value in overrides.items()),
    ]


def _tree(directory):
    return {
        str(p.relative_to(directory)): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


# Two build subprocesses, about a minute on 2 cores; part of the default run
# because resuming to identical files is a core promise of the builder.
def test_sigkilled_build_resumes_to_identical_files(setup):
    root, corpus, tokenizer = setup
    killed = root / "killed"
    overrides = _overrides(root, corpus, tokenizer, killed)
    process = subprocess.Popen(
        _command(overrides),
        cwd=REPO,
        env=os.environ.copy(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 300
    while len(list(killed.glob("shards/*.done.json"))) < 3:
        assert process.poll() is None, process.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "the build made no progress"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    process.stderr.close()
    assert not (killed / "manifest.json").exists()
    with pytest.raises(database.IncompleteError):
        database.open(killed)

    finished = subprocess.run(
        _command(overrides), cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert finished.returncode == 0, finished.stderr[-2000:]

    # The same build, never interrupted, in this process.
    reference = root / "reference"
    config = database_config.get_config("")
    for key, value in _overrides(root, corpus, tokenizer, reference).items():
        node = config
        *parents, leaf = key.split(".")
        for parent in parents:
            node = node[parent]
        node[leaf] = value
    build_database.build_from_config(config)
    assert _tree(killed) == _tree(reference)
    assert database.open(killed, verify="full").count == 3000
