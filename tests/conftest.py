"""Test setup: the CPU as jax's platform with 8 fake devices (set before jax is imported) and the shared
data location."""

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
