"""The entry point's contract with a user who gets something wrong: a clear message, a failing exit."""

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _main(*args):
    env = {**os.environ, "XLA_FLAGS": ""}
    return subprocess.run([sys.executable, "-m", "jaxmath.main", *args], capture_output=True, text=True, cwd=REPO,
                          env=env, timeout=300)


@pytest.mark.parametrize("override,message", [
    ("--config.model.path=/nonexistent/model", "download Qwen3-4B-Instruct-2507 in HF format"),
    ("--config.loss.loss_agg=mean_of_everything", "loss_agg must be one of"),
])
def test_bad_input_fails_with_a_message(tmp_path, override, message):
    out = _main("--config=configs/grpo_v2.py", override, "--config.model.path=/nonexistent/model"
                if "model.path" not in override else "--config.seed=0", f"--workdir={tmp_path}")
    assert out.returncode != 0
    assert message in out.stderr and "Traceback" not in out.stderr[-2000:]


def test_unknown_config_key_is_an_error(tmp_path):
    out = _main("--config=configs/grpo_v2.py", "--config.rl.num_generation=8", f"--workdir={tmp_path}")
    assert out.returncode != 0 and "num_generation" in out.stderr
