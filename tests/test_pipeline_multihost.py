"""Two processes share one evaluation, as hosts of a pod slice would."""

import csv
import json
import os
import pathlib
import socket
import subprocess

import pytest
from test_end_to_end import build_world, evaluate_command

REPO = pathlib.Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        return probe.getsockname()[1]


def _command(world, run_name: str, cache: str, *extra: str) -> list[str]:
    return evaluate_command(
        world, cache, run_name, "--config.image_chunk_size=40", *extra
    )


def _predictions(path: pathlib.Path) -> list[tuple[str, str, str]]:
    with open(path, newline="") as handle:
        return [
            (r["path"], r["core_pred_id"], r["zero_shot_pred_id"])
            for r in csv.DictReader(handle)
        ]


# Three runs of the job in fresh processes; minutes of wall time on two busy
# cores.
@pytest.mark.slow
def test_two_processes_give_the_single_process_results(tmp_path, real_captions):
    world = build_world(tmp_path, real_captions)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    single = subprocess.run(
        _command(world, "single", "cache_single"),
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert single.returncode == 0, single.stderr[-3000:]

    port = _free_port()
    processes = [
        subprocess.Popen(
            _command(
                world,
                "multi",
                "cache_multi",
                "--config.distributed=True",
                f"--config.coordinator_address=localhost:{port}",
                "--config.num_processes=2",
                f"--config.process_id={rank}",
            ),
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(2)
    ]
    outputs = [p.communicate(timeout=900) for p in processes]
    for process, (_, stderr) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, stderr[-3000:]

    runs = world["root"] / "runs"
    first = json.loads((runs / "single" / "results.json").read_text())
    second = json.loads((runs / "multi" / "results.json").read_text())
    assert second["devices"]["processes"] == 2
    # Each process embedded only its own chunks (40 images each).
    assert (
        second["cache"]["image_embeddings"]["computed"]
        < (first["cache"]["image_embeddings"]["computed"])
    )
    assert second["hyperparameters"] == first["hyperparameters"]
    for split in ("train", "test"):
        for method in ("zero_shot", "core"):
            assert second[split][method] == pytest.approx(first[split][method])
        assert [s["path"] for s in second["skipped_images"][split]] == [
            s["path"] for s in first["skipped_images"][split]
        ]
    assert _predictions(runs / "multi" / "predictions.csv") == _predictions(
        runs / "single" / "predictions.csv"
    )
