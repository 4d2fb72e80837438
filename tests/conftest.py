"""Test set-up shared by every test module.

Eight CPU devices are simulated for the whole session, so sharded code runs
on a real multi-device mesh; single-device code is unaffected (it runs on the
first device). The flag must be set before JAX is first imported.
"""

import os
import pathlib

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
CAPTIONS_FILE = SHARED_DATA / "captions" / "cc3m_validation_captions.txt"
BENCHMARKS_DIR = SHARED_DATA / "benchmarks"


def pytest_addoption(parser):
    parser.addoption(
        "--runslow", action="store_true", default=False, help="run slow tests"
    )


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip_slow = pytest.mark.skip(reason="slow test: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip_slow)


@pytest.fixture(scope="session")
def real_captions() -> list[str]:
    """The 15,833 real CC3M validation captions, or a skip when absent."""
    if not CAPTIONS_FILE.exists():
        pytest.skip(f"{CAPTIONS_FILE} not found")
    return CAPTIONS_FILE.read_text(encoding="utf-8").splitlines()


@pytest.fixture(scope="session")
def benchmarks_dir() -> pathlib.Path:
    """The reference release's benchmark CSV folders, or a skip when absent."""
    if not BENCHMARKS_DIR.exists():
        pytest.skip(f"{BENCHMARKS_DIR} not found")
    return BENCHMARKS_DIR
