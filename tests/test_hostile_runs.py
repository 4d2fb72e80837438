"""Runs of launch/evaluate.py that are killed, repeated or given bad input."""

import json
import os
import pathlib
import signal
import subprocess
import time

import pytest
from test_end_to_end import build_world, evaluate_command

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory, real_captions):
    return build_world(tmp_path_factory.mktemp("hostile"), real_captions)


def _command(world, cache: str, run_name: str, *extra: str) -> list[str]:
    root = world["root"]
    return evaluate_command(
        world,
        cache,
        run_name,
        # Compiled programs are shared, so only the first run compiles.
        f"--config.compilation_cache_dir={root / 'xla'}",
        # Many small chunks, so the kill lands between finished chunks.
        "--config.image_chunk_size=8",
        "--config.image_batch_size=8",
        *extra,
    )


def _finished(folder: pathlib.Path) -> int:
    return len(list(folder.glob("*/COMPLETE"))) if folder.exists() else 0


def _without_run_details(results: dict) -> dict:
    """What must not depend on how the run got there."""
    return {
        key: results[key]
        for key in ("test", "train", "hyperparameters", "per_class", "sweep")
    }


# Three runs of the job in fresh processes: about 40 s of CPU time on two
# cores. Part of the default run: losing no finished work is a core promise.
def test_sigkill_then_resume_reuses_finished_stages_and_matches(world):
    reference = subprocess.run(
        _command(world, "cache_reference", "reference"),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert reference.returncode == 0, reference.stderr[-3000:]

    victim = subprocess.Popen(
        _command(world, "cache_victim", "victim"),
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    chunks = world["root"] / "cache_victim" / "image_embeddings"
    deadline = time.monotonic() + 600
    try:
        while _finished(chunks) < 2 and victim.poll() is None:
            assert time.monotonic() < deadline, "the run never finished a chunk"
            time.sleep(0.02)
    finally:
        victim.send_signal(signal.SIGKILL)
        victim.wait()
    killed_after = _finished(chunks)
    runs = world["root"] / "runs"
    assert victim.returncode == -signal.SIGKILL
    assert not (runs / "victim" / "results.json").exists(), "the kill came too late"

    refused = subprocess.run(
        _command(world, "cache_victim", "victim"),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert refused.returncode == 1
    assert "--config.resume=True" in refused.stderr
    assert "Traceback" not in refused.stderr

    resumed = subprocess.run(
        _command(world, "cache_victim", "victim", "--config.resume=True"),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    first = json.loads((runs / "reference" / "results.json").read_text())
    second = json.loads((runs / "victim" / "results.json").read_text())
    assert second["cache"]["image_embeddings"]["reused"] >= killed_after >= 2
    assert (
        second["cache"]["image_embeddings"]["reused"]
        + second["cache"]["image_embeddings"]["computed"]
        == first["cache"]["image_embeddings"]["computed"]
    )
    assert _without_run_details(second) == _without_run_details(first)
    assert (runs / "victim" / "predictions.csv").read_bytes() == (
        runs / "reference" / "predictions.csv"
    ).read_bytes()


def test_missing_checkpoint_is_one_clear_line(world):
    command = _command(world, "cache_reference", "missing")
    command = [
        c if not c.startswith("--config.model.checkpoint=") else c + ".gone"
        for c in command
    ]
    result = subprocess.run(
        command, cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 1
    assert "--config.model.checkpoint" in result.stderr
    assert "siglip.npz.gone" in result.stderr
    assert "Traceback" not in result.stderr


def test_unknown_config_field_is_refused(world):
    result = subprocess.run(
        _command(world, "cache_reference", "typo", "--config.alpah=0.3"),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ),
    )
    assert result.returncode != 0
    assert "alpah" in result.stderr
