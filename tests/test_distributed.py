"""Multi-host: two local processes joined by `jax.distributed.initialize` (CPU, localhost coordinator)
train a tiny model, each feeding its own half of every batch, and write one orbax checkpoint that a
single process restores and finds equal to the same steps run on one device."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from jaxmath.distributed import ProcessPlan, plan_from_env

ROOT = Path(__file__).resolve().parents[1]

# Shared by the workers and the checker: the model, the optimizer and the global batches.
COMMON = textwrap.dedent("""
    import json, os, sys
    import numpy as np
    STEPS, ROWS, SEQ = 3, 8, 16

    def setup():
        import jax, jax.numpy as jnp
        from jaxmath import optim, sft
        from jaxmath.model import init_model, preset
        cfg = preset("tiny", vocab_size=128, dtype=jnp.float32, param_dtype=jnp.float32)
        opt = optim.make_optimizer(optim.OptimizerConfig(learning_rate=1e-2, eps=1e-3))
        rng = np.random.default_rng(0)
        docs = [sft.TokenizedExample(list(map(int, rng.integers(1, 128, n))), [False] * 2 + [True] * (n - 2))
                for n in rng.integers(5, SEQ + 1, STEPS * ROWS)]
        batches = [sft.stack_micro(sft.pack_examples(docs[i * ROWS:(i + 1) * ROWS], SEQ, [[j] for j in range(ROWS)]), 1)
                   for i in range(STEPS)]  # each [1, ROWS, SEQ]
        return cfg, opt, batches
""")

WORKER = COMMON + textwrap.dedent("""
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    from jaxmath.distributed import initialize_from_env
    plan = initialize_from_env()
    import jax
    from jaxmath import sft
    from jaxmath.checkpoint import CheckpointManager, TrainState
    from jaxmath.model import init_model, sharding
    assert plan.kind == "explicit" and jax.process_count() == 2, (plan, jax.process_count())
    assert jax.device_count() == 4 and jax.local_device_count() == 2
    cfg, opt, batches = setup()
    mesh = sharding.make_mesh(fsdp=-1)  # all 4 devices of both processes
    model = init_model(cfg, seed=0, mesh=mesh)
    graphdef, trainable, frozen = sft.split_trainable(model)
    trainable = sharding.shard_state(trainable, mesh)
    opt_state = sharding.init_optimizer_state(opt, trainable, mesh)
    step = sft.make_sft_step(graphdef, opt, chunk_size=8, remat=False)
    me, half = jax.process_index(), ROWS // 2
    losses = []
    with sharding.use_mesh(mesh):
        for batch in batches:
            # This process loads only its own rows; the global batch is assembled across processes.
            local = {k: v[:, me * half:(me + 1) * half] for k, v in batch.items()}
            global_batch = sharding.shard_batch(local, mesh, batch_dim=1, process_local=True)
            assert global_batch["input_ids"].shape == (1, ROWS, SEQ)
            assert not global_batch["input_ids"].is_fully_addressable
            trainable, opt_state, metrics = step(trainable, frozen, opt_state, global_batch)
            losses.append(float(metrics["loss"]))
    manager = CheckpointManager(sys.argv[1])
    manager.save(STEPS, TrainState(trainable, opt_state, STEPS, {"index": STEPS * ROWS}, jax.random.key(0), {}))
    manager.close()
    print("LOSSES", json.dumps(losses))
""")

CHECKER = COMMON + textwrap.dedent("""
    import jax
    from jaxmath import sft
    from jaxmath.checkpoint import CheckpointManager, TrainState
    from jaxmath.model import init_model, sharding
    assert jax.process_count() == 1
    cfg, opt, batches = setup()
    model = init_model(cfg, seed=0)
    graphdef, trainable, frozen = sft.split_trainable(model)
    opt_state = sharding.init_optimizer_state(opt, trainable)
    target = TrainState(trainable, opt_state, 0, {}, jax.random.key(0), {})
    restored = CheckpointManager(sys.argv[1]).restore(target=target)
    step = sft.make_sft_step(graphdef, opt, chunk_size=8, remat=False)
    losses = []
    for batch in batches:
        trainable, opt_state, metrics = step(trainable, frozen, opt_state, batch)
        losses.append(float(metrics["loss"]))
    worst = max(float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in
                zip(jax.tree.leaves(restored.params), jax.tree.leaves(trainable)))
    moments = max(float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in
                  zip(jax.tree.leaves(restored.opt_state), jax.tree.leaves(opt_state)))
    print("RESULT", json.dumps({"step": restored.step, "cursor": restored.data_cursor, "losses": losses,
                                "param_diff": worst, "opt_diff": moments}))
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_train_and_one_restores(tmp_path):
    ckpt = tmp_path / "ckpt"
    port = _free_port()
    base = {k: v for k, v in os.environ.items() if not k.startswith(("JAXMATH_", "SLURM_"))}
    base.update(JAX_PLATFORMS="cpu", JAXMATH_COORDINATOR=f"localhost:{port}", JAXMATH_NUM_PROCESSES="2")
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(ckpt)], cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env={**base, "JAXMATH_PROCESS_ID": str(i)}) for i in range(2)]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=600))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0 and "LOSSES" in out, err[-4000:]
    worker_losses = [json.loads(out.split("LOSSES", 1)[1]) for out, _ in outs]
    assert worker_losses[0] == worker_losses[1]  # both processes see the same global loss

    env = {k: v for k, v in base.items() if not k.startswith("JAXMATH_")}
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
    out = subprocess.run([sys.executable, "-c", CHECKER, str(ckpt)], cwd=ROOT, text=True, capture_output=True,
                         env=env, timeout=600)
    assert out.returncode == 0 and "RESULT" in out.stdout, out.stderr[-4000:]
    result = json.loads(out.stdout.split("RESULT", 1)[1])
    assert result["step"] == 3 and result["cursor"] == {"index": 24}
    for a, b in zip(worker_losses[0], result["losses"]):
        assert abs(a - b) <= 1e-5 * abs(b), (worker_losses[0], result["losses"])
    assert result["param_diff"] < 1e-5 and result["opt_diff"] < 1e-5, result


def test_plan_from_env_explicit_slurm_and_single():
    assert plan_from_env({}) == ProcessPlan("single")
    explicit = plan_from_env({"JAXMATH_COORDINATOR": "10.0.0.1:1234", "JAXMATH_NUM_PROCESSES": "4",
                              "JAXMATH_PROCESS_ID": "3", "JAXMATH_LOCAL_DEVICE_IDS": "0,1"})
    assert explicit == ProcessPlan("explicit", "10.0.0.1:1234", 4, 3, (0, 1))
    slurm = plan_from_env({"SLURM_NTASKS": "16", "SLURM_PROCID": "5", "SLURM_JOB_NODELIST": "gpu[01-02]",
                           "SLURM_STEP_NODELIST": "gpu[01-02]"})
    assert (slurm.kind, slurm.num_processes, slurm.process_id) == ("slurm", 16, 5)
    # A batch script's own shell (no srun step) is one process, not one of 16 waiting for the rest.
    assert plan_from_env({"SLURM_NTASKS": "16", "SLURM_PROCID": "0", "SLURM_JOB_NODELIST": "gpu[01-02]"}).kind == \
        "single"
    # One SLURM task (sbatch without srun, or a one-GPU job) is a single process.
    assert plan_from_env({"SLURM_NTASKS": "1", "SLURM_PROCID": "0"}).kind == "single"
    with pytest.raises(ValueError, match="JAXMATH_PROCESS_ID"):
        plan_from_env({"JAXMATH_COORDINATOR": "h:1", "JAXMATH_NUM_PROCESSES": "2"})
    with pytest.raises(ValueError, match="must be in"):
        plan_from_env({"JAXMATH_COORDINATOR": "h:1", "JAXMATH_NUM_PROCESSES": "2", "JAXMATH_PROCESS_ID": "2"})
