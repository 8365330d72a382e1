"""Test setup: 8 fake CPU devices (set before jax is imported) and the shared data location."""

import os
import pathlib

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAXMATH_NO_PROGRESS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

SHARED = pathlib.Path(__file__).resolve().parents[2] / "shared"
DATA_DIR = SHARED / "data"
TOKENIZER_DIR = DATA_DIR / "qwen_tokenizer"


@pytest.fixture(scope="session")
def shared_dir() -> pathlib.Path:
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} (the shared data folder beside the repository) is not present")
    return SHARED


@pytest.fixture(scope="session")
def data_dir(shared_dir) -> pathlib.Path:
    return DATA_DIR


@pytest.fixture(scope="session")
def tokenizer_dir(shared_dir) -> pathlib.Path:
    return TOKENIZER_DIR
