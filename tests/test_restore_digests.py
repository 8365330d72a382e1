"""Every file the project restores proves its data: the demo's branch weights (the SFT prefix the GRPO arm
starts from) and converted checkpoints carry the digests written when they were saved, and a flipped byte
is refused on restore, in one line, instead of being trained on or exported. (Run checkpoints: see
tests/test_checkpoint.py and tests/test_faults.py.)"""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

from jaxmath import checkpoint, demo
from jaxmath.checkpoint import DamagedCheckpointError
from jaxmath.data import demo_task
from jaxmath.model import init_model

REPO = Path(__file__).resolve().parents[1]


def _flip_a_byte_of_the_data(directory: Path) -> None:
    data = max((p for p in directory.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    flipped = bytearray(data.read_bytes())
    flipped[len(flipped) // 2] ^= 0x10
    data.write_bytes(bytes(flipped))


def _demo_model(seed: int):
    # The demo's own model at a size whose embedding fills a data file of its own (the flip lands in data).
    cfg = demo.DemoConfig(hidden_size=256, intermediate_size=256, num_layers=1, num_heads=4, num_kv_heads=2,
                          head_dim=64)
    return init_model(demo.model_config(cfg, demo_task.CharTokenizer().vocab_size), seed=seed)


@pytest.mark.slow  # 8-17 s: out of the fast subset's 10 minutes (the whole suite runs it)
def test_a_flipped_byte_in_the_demo_branch_weights_is_refused(tmp_path):
    branch = tmp_path / "branch"
    trained = _demo_model(seed=1)
    checkpoint.save_pytree(branch, nnx.state(trained))  # as run_demo saves the SFT prefix
    fresh = _demo_model(seed=2)
    demo.restore_branch(branch, fresh)
    for a, b in zip(jax_leaves(fresh), jax_leaves(trained)):
        np.testing.assert_array_equal(a, b)
    _flip_a_byte_of_the_data(branch)
    with pytest.raises(DamagedCheckpointError) as info:
        demo.restore_branch(branch, _demo_model(seed=2))
    assert f"checkpoint {branch} is damaged: array pytree/" in str(info.value)
    assert "differs from its saved checksum" in str(info.value) and "\n" not in str(info.value)


def jax_leaves(model):
    import jax

    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model))]


def test_a_flipped_byte_in_a_converted_checkpoint_is_refused(tmp_path):
    """`jaxmath.convert.hf_to_jax` output with one flipped byte: `jax_to_hf` stops with one error line naming
    the damaged array and writes no weights."""
    from jaxmath.convert import common
    from tests.hf_models import make_hf_model

    src, ckpt, out = tmp_path / "hf", tmp_path / "ckpt", tmp_path / "out"
    make_hf_model(str(src), tie=False, seed=1)
    common.hf_to_orbax(str(src), str(ckpt))
    assert (ckpt / common.PARAMS_DIR / checkpoint.PYTREE_DIGESTS_FILE).is_file()
    _flip_a_byte_of_the_data(ckpt / common.PARAMS_DIR)
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", "jaxmath.convert.jax_to_hf", f"--ckpt={ckpt}", f"--out={out}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert f"checkpoint {ckpt / common.PARAMS_DIR} is damaged: array pytree/" in errors[0]
    assert "differs from its saved checksum" in errors[0]
    assert not (out / "model.safetensors").exists()


def test_a_converted_checkpoint_without_digests_needs_the_flag(tmp_path):
    """One written before digests existed: `jax_to_hf` refuses it in one line naming --allow_unverified, and
    exports it with the flag."""
    from jaxmath.convert import common
    from tests.hf_models import make_hf_model

    src, ckpt, out = tmp_path / "hf", tmp_path / "ckpt", tmp_path / "out"
    make_hf_model(str(src), tie=False, seed=1)
    common.hf_to_orbax(str(src), str(ckpt))
    (ckpt / common.PARAMS_DIR / checkpoint.PYTREE_DIGESTS_FILE).unlink()
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
    command = [sys.executable, "-m", "jaxmath.convert.jax_to_hf", f"--ckpt={ckpt}", f"--out={out}"]
    refused = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error: ")]
    assert refused.returncode == 1 and len(errors) == 1, refused.stderr[-3000:]
    assert "cannot be verified" in errors[0] and "--allow_unverified" in errors[0]
    assert not (out / "model.safetensors").exists()
    accepted = subprocess.run(command + ["--allow_unverified"], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=300)
    assert accepted.returncode == 0, accepted.stderr[-3000:]
    assert (out / "model.safetensors").exists() and "restoring it unverified" in accepted.stderr


def test_a_changed_held_out_evaluation_is_evaluated_again_not_reused(tmp_path, caplog):
    """The demo reuses the evaluations in held_out.jsonl on a rerun (they make its reported figures): each
    line carries its record's digest, and a line that does not match it, or has none, is not reused."""
    path = tmp_path / "held_out.jsonl"
    calls = []

    def compute(accuracy):
        def run():
            calls.append(accuracy)
            return {"format_blind_accuracy": accuracy}
        return run

    log = demo.HeldOutLog(path)
    assert log.get("sft", 10, compute(0.25))["format_blind_accuracy"] == 0.25
    log.get("sft_grpo", 10, compute(0.5))
    assert demo.HeldOutLog(path).get("sft", 10, compute(0.0))["format_blind_accuracy"] == 0.25  # reused intact
    assert calls == [0.25, 0.5]
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0].replace("0.25", "0.95"), lines[1].split(', "sha256"')[0] + "}"]) + "\n")
    with caplog.at_level("WARNING"):
        again = demo.HeldOutLog(path)
    assert again.get("sft", 10, compute(0.25))["format_blind_accuracy"] == 0.25  # not the edited 0.95
    again.get("sft_grpo", 10, compute(0.5))  # no digest: evaluated again
    assert calls == [0.25, 0.5, 0.25, 0.5]
    assert sum("does not match its digest" in r.getMessage() for r in caplog.records) == 2
