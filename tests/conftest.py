"""Test setup: the CPU as jax's platform with 8 fake devices (set before jax is imported) and where
tests find data.

Every test runs on what the repository carries: the Qwen tokenizer files and a few rows of every data
file under tests/fixtures/data. The staged data folder beside the repository (../shared/data, the
full files) is used where present, and only `full_data_dir` needs it: the full-count checks, which skip
without it with FULL_DATA_SKIP as the reason. JAXMATH_NO_SHARED=1 makes the suite behave as on a clone
without ../shared (tests/test_user_paths.py checks that nothing else skips then)."""

import os
import pathlib

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# With JAX's CUDA plugin installed (the aot extra) and no GPU, jax would try CUDA first and print its
# failure; the suite runs on the CPU. The second variable lets the plugin describe a GPU it does not
# have, which the `aot` tests compile for (jaxmath.aot.targets).
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
os.environ.setdefault("JAXMATH_NO_PROGRESS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures"
FIXTURE_DATA_DIR = FIXTURES / "data"
TOKENIZER_DIR = FIXTURE_DATA_DIR / "qwen_tokenizer"
TRACES_FILE = FIXTURES / "traces.jsonl"
SHARED_DATA_DIR = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"
FULL_DATA_SKIP = "full-count check: needs the staged data folder ../shared/data"


def full_data_present() -> bool:
    return SHARED_DATA_DIR.is_dir() and os.environ.get("JAXMATH_NO_SHARED", "") in ("", "0")


DATA_DIR = SHARED_DATA_DIR if full_data_present() else FIXTURE_DATA_DIR


@pytest.fixture(scope="session")
def data_dir() -> pathlib.Path:
    """The staged data folder when present, else the fixtures (a few rows of every file)."""
    return DATA_DIR


@pytest.fixture(scope="session")
def full_data_dir() -> pathlib.Path:
    """The full staged files, for count checks only; skips (FULL_DATA_SKIP) where they are absent."""
    if not full_data_present():
        pytest.skip(FULL_DATA_SKIP)
    return SHARED_DATA_DIR


@pytest.fixture(scope="session")
def tokenizer_dir() -> pathlib.Path:
    return TOKENIZER_DIR


# Tests marked `long` repeat a path another test already covers at other settings, or plan a case past
# the issues' done-when; together they would take CI past its 50-minute budget on 2 cores, so they run
# only with JAXMATH_LONG_TESTS=1 (DEVELOPERS.md lists them).
LONG_TESTS = os.environ.get("JAXMATH_LONG_TESTS", "") not in ("", "0")


def pytest_collection_modifyitems(config, items):
    if LONG_TESTS:
        return
    skip = pytest.mark.skip(reason="a `long` test, outside CI's time budget: set JAXMATH_LONG_TESTS=1 to run it")
    for item in items:
        if "long" in item.keywords:
            item.add_marker(skip)
