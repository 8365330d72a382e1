"""The launchers: the sweep's commands (--dry_run, --print_only) and its collector, fed with
results.json files that this test fabricates (test fixtures, not results of any run)."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SWEEP = [sys.executable, str(ROOT / "launch" / "sweep.py")]


def _sweep(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*SWEEP, *args], capture_output=True, text=True, cwd=ROOT, timeout=120)


def _fixture_results(path: Path, name: str, accuracies: dict[str, float]) -> None:
    """A results.json in the schema jaxmath.eval.run writes, with made-up numbers."""
    path.mkdir(parents=True)
    results = {"meta": {"name": name, "fixture": True}}
    for benchmark, p in accuracies.items():
        n = {"math500": 500, "aime24": 30}[benchmark]
        results[benchmark] = {"accuracy": p, "ci95": 1.96 * (p * (1 - p) / n) ** 0.5, "n": n, "parse_failures": 0}
    (path / "results.json").write_text(json.dumps(results))


def test_collect_builds_table4_and_chart_and_lists_missing_runs(tmp_path):
    _fixture_results(tmp_path / "grpo_v1" / "eval", "grpo_v1", {"math500": 0.852, "aime24": 0.300})
    _fixture_results(tmp_path / "grpo_v2" / "eval", "grpo_v2", {"math500": 0.902, "aime24": 0.433})
    out = _sweep(f"--root={tmp_path}", "--configs=configs/grpo_v1.py,configs/grpo_v2.py,configs/grpo_v3.py",
                 "--collect_only")
    assert out.returncode == 1, out.stderr  # grpo_v3 has no results yet
    assert "grpo_v3" in out.stderr
    table = (tmp_path / "results.md").read_text()
    lines = table.splitlines()
    assert lines[0] == "| Model | MATH-500 | AIME 2024 |"
    assert lines[2].startswith("| grpo_v1 | 85.2 ± 3.1 | 30.0 ± 16.4 |")
    assert lines[3].startswith("| grpo_v2 | **90.2 ± 2.6** | **43.3 ± 17.7** |")
    assert "missing: grpo_v3" in table
    png = (tmp_path / "accuracy.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_dry_run_gives_each_config_its_own_workdir_and_runs_nothing(tmp_path):
    out = _sweep(f"--root={tmp_path}", "--configs=configs/grpo_v2.py,configs/sft_sweep.py:v2", "--dry_run",
                 "--set=--config.model.path=/models/base", "--set=--config.data.dir=/data")
    assert out.returncode == 0, out.stderr
    cmds = [shlex.split(line[2:]) for line in out.stdout.splitlines() if line.startswith("+ ")]
    # grpo: train, export (LoRA merged), eval; sft: train (exports itself), eval
    assert [c[2] for c in cmds] == ["jaxmath.main", "jaxmath.convert.jax_to_hf", "jaxmath.main", "jaxmath.main",
                                    "jaxmath.main"]
    assert f"--workdir={tmp_path / 'grpo_v2'}" in cmds[0] and "--config.model.path=/models/base" in cmds[0]
    assert f"--out={tmp_path / 'grpo_v2' / 'export'}" in cmds[1] and "--merge_lora" in cmds[1]
    assert f"--config.model.path={tmp_path / 'grpo_v2' / 'export'}" in cmds[2]
    assert f"--workdir={tmp_path / 'grpo_v2' / 'eval'}" in cmds[2] and "--config.data.dir=/data" in cmds[2]
    assert "--config=configs/sft_sweep.py:v2" in cmds[3] and f"--workdir={tmp_path / 'sft_sweep_v2'}" in cmds[3]
    assert not any(tmp_path.iterdir())  # nothing ran


def test_print_only_prints_one_sbatch_job_per_config(tmp_path):
    out = _sweep(f"--root={tmp_path}", "--configs=configs/grpo_v1.py,configs/local_lora.py", "--print_only",
                 "--sbatch_arg=--partition=gpu")
    assert out.returncode == 0, out.stderr
    jobs = [shlex.split(line) for line in out.stdout.strip().splitlines()]
    assert [j[0] for j in jobs] == ["sbatch", "sbatch"]
    assert "--job-name=jaxmath-grpo_v1" in jobs[0] and "--job-name=jaxmath-local_lora" in jobs[1]
    assert "--partition=gpu" in jobs[0]
    wrap = next(a for a in jobs[1] if a.startswith("--wrap="))
    assert f"--workdir={tmp_path / 'local_lora'}" in wrap and " && " in wrap


def test_unknown_config_and_shell_launchers_fail_clearly(tmp_path):
    out = _sweep(f"--root={tmp_path}", "--configs=configs/nope.py", "--dry_run")
    assert out.returncode != 0 and "configs/nope.py not found" in out.stderr
    for script in ("single_gpu.sh", "multi_gpu.sh"):
        res = subprocess.run(["bash", str(ROOT / "launch" / script)], capture_output=True, text=True)
        assert res.returncode == 2 and "usage" in res.stderr
    # The multi-GPU launcher passes the mesh from the environment to main (PYTHON=echo prints it).
    res = subprocess.run(["bash", str(ROOT / "launch" / "multi_gpu.sh"), "configs/grpo_v2.py", "--workdir=w"],
                         capture_output=True, text=True, env={**os.environ, "PYTHON": "echo", "FSDP": "4", "TP": "2"})
    assert res.stdout.split() == ["-m", "jaxmath.main", "--config=configs/grpo_v2.py", "--config.mesh.data=1",
                                  "--config.mesh.fsdp=4", "--config.mesh.tp=2", "--workdir=w"]


def test_gpu_checks_commands_parse_with_their_benchmarks():
    """Every command of launch/gpu_checks.sh is accepted by its benchmark's own argument parser, so the
    script a GPU session runs cannot drift from the benchmarks' flags."""
    import importlib

    out = subprocess.run(["bash", str(ROOT / "launch" / "gpu_checks.sh")], capture_output=True, text=True,
                         cwd=ROOT, timeout=60, env={**os.environ, "PRINT_ONLY": "1"})
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == [
        "rollout", "rollout_full", "grpo", "sft_full", "sft_lora", "sync_full", "sync_lora"]
    for line in lines:
        bench, *flags = shlex.split(line.split(":", 1)[1])
        args = importlib.import_module(f"jaxmath.bench.{bench}")._parse(flags)
        assert args.preset == "qwen3-4b"
    unknown = subprocess.run(["bash", str(ROOT / "launch" / "gpu_checks.sh"), "nope"], capture_output=True,
                             text=True, cwd=ROOT, timeout=60)
    assert unknown.returncode == 2 and "known: versions rollout" in unknown.stderr
