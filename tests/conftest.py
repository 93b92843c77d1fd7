"""One local Spark session with Delta for the whole suite; each test module gets its own home.

Markers (pytest.ini): every test is `fast` unless it uses Spark (`spark`) or is marked `e2e` or
`slow`; `make test-fast` runs `-m fast`.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Under pytest-xdist each worker's own torch work (training, in-process scoring) gets its share of the cores:
# two workers of two OpenMP threads each on two cores spin against each other. Set before torch loads.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 1)
if _WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _WORKERS)))
sys.path.insert(0, str(Path(__file__).resolve().parent))

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
AMAZON = SHARED / "data" / "amazon_reviews_longlamp" / "train.jsonl"


def pytest_collection_modifyitems(config, items):
    for item in items:
        marks = {m.name for m in item.iter_markers()}
        if "spark" in getattr(item, "fixturenames", ()) and "spark" not in marks:
            item.add_marker(pytest.mark.spark)
            marks.add("spark")
        if not marks & {"spark", "e2e", "slow"}:
            item.add_marker(pytest.mark.fast)


def pytest_terminal_summary(terminalreporter):
    """`faults: N survived, M failed` after a run that included the fault suite (tests/test_faults.py).
    A conftest hook, so that under pytest-xdist the controller, which sees every worker's reports, prints it."""
    def faults(outcome):
        return [r for r in terminalreporter.stats.get(outcome, []) if "faults" in getattr(r, "keywords", {})]

    survived = [r for r in faults("passed") if r.when == "call"]
    failed = faults("failed") + faults("error")
    if survived or failed:
        terminalreporter.write_line(f"faults: {len(survived)} survived, {len(failed)} failed")


@pytest.fixture(scope="session")
def session_home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("restpg-home")


@pytest.fixture(scope="session")
def settings(session_home):
    from restpg.config import load_settings

    # 3g, not the profile's 6g: two xdist workers' JVMs, the fault suite's killed `restpg` JVMs and their Python
    # workers share 24 GB; a heap allowed 6g grows toward it before a full collection
    return load_settings("local", ["spark.driver_memory=3g"], home=str(session_home))


@pytest.fixture(scope="session")
def spark(settings):
    from restpg.runtime import get_spark

    session = get_spark(settings)
    yield session
    session.stop()


@pytest.fixture
def fresh_settings(tmp_path):
    """Settings on a home of its own (tables of other tests invisible), same Spark session."""
    from restpg.config import load_settings

    return load_settings("local", home=str(tmp_path / "home"))


@pytest.fixture(scope="session")
def amazon_path() -> Path:
    if not AMAZON.exists():
        pytest.skip(f"shared Amazon sample not found at {AMAZON} (../shared is absent)")
    return AMAZON


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """A randomly initialised 2-layer Llama with a real tokenizer, built once for the suite."""
    from helpers import make_tiny_lm

    return make_tiny_lm(tmp_path_factory.mktemp("tiny-lm"))


@pytest.fixture(scope="session")
def tiny(tiny_dir) -> str:
    return str(tiny_dir)


@pytest.fixture(scope="session")
def lm(tiny, settings):
    from restpg import models

    return models.load_causal_lm(tiny, settings)
