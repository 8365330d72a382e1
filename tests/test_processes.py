"""`python -m jaxmath.main` as many processes joined by jax.distributed gives what one process gives.

Each mode runs as two processes of two CPU devices each and as one process of four devices
(XLA_FLAGS=--xla_force_host_platform_device_count), on a mesh over all of them: the metrics agree
within 1e-4 relative (metrics that are float rounding by definition, the trainer-engine logprob
mismatch of an on-policy step, ~1e-7, within 1e-6 absolute), the final checkpoints hold the same
arrays, only process 0 writes, and the two-process run's checkpoint resumes in one process. An error
in one process ends the other with that error in one line.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import FIXTURE_DATA_DIR, TRACES_FILE
from tests.test_user_paths import _gold_seven_data, _trainable
from tests.tiny_qwen import write_tiny_qwen3

REPO = Path(__file__).resolve().parents[1]
RTOL, ATOL = 1e-4, 1e-6
UNTIMED = ("time", "seconds", "per_s", "sha256", "wall")  # keys whose values are clocks, not results


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _env(devices: int, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAXMATH_", "SLURM_", "JAX_"))}
    env.update(PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu", JAXMATH_NO_PROGRESS="1", TOKENIZERS_PARALLELISM="false",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", **extra)
    return env


def start(args: list[str], processes: int, devices: int, **extra: str) -> list[subprocess.Popen]:
    """`python -m jaxmath.main ARGS` as `processes` processes of `devices` CPU devices each."""
    port = _free_port()
    procs = []
    for i in range(processes):
        joined = dict(JAXMATH_COORDINATOR=f"localhost:{port}", JAXMATH_NUM_PROCESSES=str(processes),
                      JAXMATH_PROCESS_ID=str(i)) if processes > 1 else {}
        procs.append(subprocess.Popen([sys.executable, "-m", "jaxmath.main", *args], cwd=REPO, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      env=_env(devices, **joined, **extra)))
    return procs


def finish(procs: list[subprocess.Popen], timeout: float = 900) -> list[tuple[int, str, str]]:
    outs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            outs.append((p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return outs


def run_ok(args: list[str], processes: int, devices: int) -> list[tuple[int, str, str]]:
    outs = finish(start(args, processes, devices))
    for code, _, err in outs:
        assert code == 0, err[-3000:]
    return outs


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def assert_same_figures(a, b, where: str = "") -> None:
    """Every number of `a` and `b` (nested dicts and lists) within RTOL relative or ATOL absolute;
    clock readings skipped."""
    if isinstance(a, dict):
        assert set(a) == set(b), (where, sorted(set(a) ^ set(b)))
        for k in a:
            if not any(word in k for word in UNTIMED):
                assert_same_figures(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_figures(x, y, f"{where}[{i}]")
    elif isinstance(a, (int, float)) and not isinstance(a, bool):
        assert abs(a - b) <= RTOL * max(abs(a), abs(b)) + ATOL, (where, a, b)
    else:
        assert a == b, (where, a, b)


def assert_same_arrays(a: dict, b: dict) -> None:
    import numpy as np

    assert set(a) == set(b)
    for path in a:
        np.testing.assert_allclose(a[path], b[path], rtol=RTOL, atol=ATOL, err_msg=path)


def assert_only_process_0_writes(outs) -> None:
    """Process 0 logs the run; process 1 logs no INFO line (absl's `I<date>` prefix)."""
    assert any(line.startswith("I") for line in outs[0][2].splitlines())
    assert not [line for line in outs[1][2].splitlines() if line.startswith("I1") or line.startswith("I0")]


# The demo at its smallest: SFT prefix 2 steps, 1 GRPO step, 16 held-out problems.
DEMO = ["--config=configs/demo.py", "--config.steps=1", "--config.mesh.fsdp=-1", "--config.demo.num_train=64",
        "--config.demo.num_eval=16", "--config.demo.sft_steps=100", "--config.demo.min_sft_steps=2",
        "--config.demo.sft_eval_every=2", "--config.demo.sft_batch_size=8", "--config.rl.eval_every=1",
        "--config.rl.prompts_per_step=2", "--config.rl.num_generations=4", "--config.checkpoint_every=1"]


@pytest.mark.slow
def test_demo_two_processes_as_one(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    run_ok(DEMO + [f"--workdir={one}"], 1, 4)
    outs = run_ok(DEMO + [f"--workdir={two}"], 2, 2)
    assert_only_process_0_writes(outs)
    for name in ("sft/metrics.jsonl", "grpo/metrics.jsonl", "held_out.jsonl"):
        assert_same_figures(_records(one / name), _records(two / name), name)
    results = json.loads((two / "demo_results.json").read_text())
    assert_same_figures(json.loads((one / "demo_results.json").read_text()), results)
    assert_same_arrays(_trainable(one / "grpo"), _trainable(two / "grpo"))
    assert_same_arrays(_trainable(one / "sft"), _trainable(two / "sft"))
    # The same command in one process of one device restores the two processes' checkpoints.
    (code, out, err), = finish(start(DEMO + [f"--workdir={two}"], 1, 1))
    assert code == 0, err[-3000:]
    assert "resumed from" in err and "grpo/checkpoints at step 1" in err
    assert_same_figures(results, json.loads((two / "demo_results.json").read_text()))


GRPO_V2 = ["--config=configs/grpo_v2.py", "--config.rollout.engine=jax", "--config.mesh.fsdp=-1",
           "--config.rl.prompts_per_step=1"]


@pytest.mark.slow
@pytest.mark.long
def test_grpo_v2_step_two_processes_as_one(tmp_path):
    model = write_tiny_qwen3(tmp_path / "model", answers_boxed=True)
    common = GRPO_V2 + [f"--config.model.path={model}", f"--config.data.dir={_gold_seven_data(tmp_path)}"]
    one, two = tmp_path / "one", tmp_path / "two"
    run_ok(common + ["--config.steps=1", f"--workdir={one}"], 1, 4)
    outs = run_ok(common + ["--config.steps=1", f"--workdir={two}"], 2, 2)
    assert_only_process_0_writes(outs)
    first = _records(two / "metrics.jsonl")
    assert len(first) == 1 and first[0]["grad_norm"] > 0
    assert_same_figures(_records(one / "metrics.jsonl"), first)
    assert_same_arrays(_trainable(one), _trainable(two))
    # One process continues the two processes' run for a second step.
    (code, _, err), = finish(start(common + ["--config.steps=2", f"--workdir={two}"], 1, 1))
    assert code == 0, err[-3000:]
    assert "at step 1" in err
    both = _records(two / "metrics.jsonl")
    assert [r["step"] for r in both] == [1, 2] and both[1]["grad_norm"] > 0
    assert_same_figures(first[0], both[0])


@pytest.mark.slow
@pytest.mark.long
def test_sft_two_processes_as_one(tmp_path):
    """Config B's SFT (LoRA) for one small step, then its export (LoRA merged, HF safetensors)."""
    import numpy as np
    from safetensors.numpy import load_file

    model = write_tiny_qwen3(tmp_path / "model", answers_briefly=True)
    data = tmp_path / "distill"
    data.mkdir()
    shutil.copyfile(TRACES_FILE, data / "traces.jsonl")
    args = ["--config=configs/sft_config_b.py", f"--config.model.path={model}", f"--config.data.dir={data}",
            "--config.steps=1", "--config.sft.batch_size=8", "--config.sft.micro_batch_size=4",
            "--config.sft.max_seq_len=256", "--config.sft.chunk_size=128"]
    one, two = tmp_path / "one", tmp_path / "two"
    run_ok(args + [f"--workdir={one}"], 1, 4)
    outs = run_ok(args + [f"--workdir={two}"], 2, 2)
    assert_only_process_0_writes(outs)
    assert_same_figures(_records(one / "metrics.jsonl"), _records(two / "metrics.jsonl"))
    assert_same_arrays(_trainable(one), _trainable(two))
    a, b = (load_file(str(w / "export" / "model.safetensors")) for w in (one, two))
    assert set(a) == set(b) and a
    for name in a:
        np.testing.assert_allclose(np.asarray(a[name], np.float32), np.asarray(b[name], np.float32), rtol=RTOL,
                                   atol=ATOL, err_msg=name)


@pytest.mark.slow
@pytest.mark.long
def test_eval_two_processes_as_one(tmp_path):
    model = write_tiny_qwen3(tmp_path / "model", answers_briefly=True)
    args = ["--config=configs/eval.py", "--config.eval.backend=jax", f"--config.model.path={model}",
            f"--config.data.dir={FIXTURE_DATA_DIR}", "--config.eval.benchmarks=math500", "--config.eval.limit=2",
            "--config.eval.temperature=0.7", "--config.eval.num_samples=4", "--config.mesh.fsdp=-1"]
    one, two = tmp_path / "one", tmp_path / "two"
    run_ok(args + [f"--workdir={one}"], 1, 4)
    outs = run_ok(args + [f"--workdir={two}"], 2, 2)
    assert_only_process_0_writes(outs)
    a, b = (json.loads((w / "eval" / "results.json").read_text()) for w in (one, two))
    assert a["math500"]["n"] == 2
    assert_same_figures(a["math500"], b["math500"])
    assert (_records(one / "eval" / "completions_math500.jsonl") ==
            _records(two / "eval" / "completions_math500.jsonl"))


@pytest.mark.slow  # two processes join a job: ~10-15 s
def test_a_mesh_that_leaves_a_process_out_is_refused(tmp_path):
    """The demo's own mesh is one device: in a job of two processes the other could not take part."""
    args = [a for a in DEMO if a != "--config.mesh.fsdp=-1"] + ["--config.mesh.fsdp=1", f"--workdir={tmp_path}"]
    for code, _, err in finish(start(args, 2, 1), timeout=120):
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert code == 2 and errors, err[-2000:]  # its own line (or the other's, whichever came first)
        assert all("takes 1 of the 2 devices of this job's 2 processes" in e for e in errors), errors
        assert "Traceback" not in err


@pytest.mark.slow  # two processes join a job: ~10-15 s
def test_an_error_in_process_0_ends_process_1(tmp_path):
    """Process 0 alone checks the workdir (a config.json that is not a config): process 1, waiting for
    it, ends with the same one line and exit code."""
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "config.json").write_text("[]")
    began = time.monotonic()
    outs = finish(start(DEMO + [f"--workdir={workdir}"], 2, 1), timeout=120)
    assert time.monotonic() - began < 90
    (code0, _, err0), (code1, _, err1) = outs
    line = "holds a run with other settings (config.json: not a config)"
    assert code0 == code1 == 2, (err0[-2000:], err1[-2000:])
    assert [l for l in err0.splitlines() if l.startswith("error:")] == [l for l in err0.splitlines() if line in l]
    (last,) = [l for l in err1.splitlines() if "error:" in l]
    assert line in last and "in process 0 of 2" in last
    assert "Traceback" not in err1


def _srun_env(task: int, tasks: int, port: int) -> dict[str, str]:
    """What `srun --ntasks=N` on this one node gives task `task` (the variables jax's SlurmCluster and
    jaxmath.distributed read), the coordinator port fixed as launch/slurm.sbatch lets one fix it."""
    host = socket.gethostname()
    return {"SLURM_JOB_ID": "4242", "SLURM_STEP_ID": "0", "SLURM_NTASKS": str(tasks), "SLURM_PROCID": str(task),
            "SLURM_LOCALID": str(task), "SLURM_NODEID": "0", "SLURM_NNODES": "1", "SLURM_STEP_NUM_NODES": "1",
            "SLURM_JOB_NODELIST": host, "SLURM_STEP_NODELIST": host, "JAXMATH_COORDINATOR_PORT": str(port)}


@pytest.mark.slow
def test_slurm_tasks_join_and_train_and_a_killed_one_ends_the_other(tmp_path):
    """Two processes with srun's environment join through jax's own SLURM detection and train (SFT
    steps of the demo are written); killing one ends the other within 60 s, in one line."""
    workdir, port = tmp_path / "run", _free_port()
    args = [a for a in DEMO if not a.startswith("--config.demo.min_sft_steps")]
    args += ["--config.demo.min_sft_steps=500", f"--workdir={workdir}"]  # runs long enough to be killed
    logs = [tmp_path / f"task{i}.err" for i in range(2)]
    procs = [subprocess.Popen([sys.executable, "-m", "jaxmath.main", *args], cwd=REPO, stdout=subprocess.DEVNULL,
                              stderr=open(logs[i], "w"), env=_env(1, **_srun_env(i, 2, port))) for i in range(2)]
    try:
        metrics = workdir / "sft" / "metrics.jsonl"
        deadline = time.monotonic() + 600
        while not (metrics.is_file() and len(_records(metrics)) >= 2) and time.monotonic() < deadline:
            assert all(p.poll() is None for p in procs), [log.read_text()[-2000:] for log in logs]
            time.sleep(1)
        assert len(_records(metrics)) >= 2, logs[0].read_text()[-2000:]
        assert "jax.distributed: process 0 of 2 (slurm), 1 local of 2 devices" in logs[0].read_text()
        procs[1].kill()
        killed = time.monotonic()
        procs[0].wait(timeout=90)
        assert time.monotonic() - killed < 60
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    err = logs[0].read_text()
    assert procs[0].returncode == 2 and "Traceback" not in err, err[-3000:]
    (line,) = [l for l in err.splitlines() if l.startswith("error:")]
    assert "process 1 of 2 stopped" in line, line
