"""The launchers: the sweep's commands (--dry_run, --print_only) and its collector, fed with
results.json files that this test fabricates (test fixtures, not results of any run)."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

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


def test_print_only_chains_sbatch_jobs_by_their_dependencies(tmp_path):
    out = _sweep(f"--root={tmp_path}", "--configs=configs/grpo_v1.py,configs/grpo_v3.py,configs/grpo_v2.py",
                 "--print_only", "--sbatch_arg=--partition=gpu")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert [line.split("=", 1)[0] for line in lines] == ["job_grpo_v1", "job_grpo_v2", "job_grpo_v3"]
    jobs = [shlex.split(line.split("=", 1)[1][2:-1]) for line in lines]  # job_x=$(sbatch ...)
    assert [j[0] for j in jobs] == ["sbatch"] * 3 and all("--parsable" in j and "--partition=gpu" in j for j in jobs)
    assert "--job-name=jaxmath-grpo_v3" in jobs[2] and "--dependency=afterok:${job_grpo_v2}" in lines[2]
    assert "--dependency" not in lines[0] + lines[1]
    wrap = next(a for a in jobs[2] if a.startswith("--wrap="))
    assert f"--config.init.checkpoint={tmp_path / 'grpo_v2'}" in wrap and " && " in wrap


def test_sweep_runs_each_job_after_the_jobs_whose_outputs_it_reads(tmp_path):
    """The whole default sweep (Tables 12 and 3) with a fake job runner that makes each command's
    outputs: every job finds its inputs under the sweep root when it starts; v3 continues v2,
    sft_then_rl starts from Config A's export (not the sweep's base model), local_lora is exported at
    its best step; a failed job skips the jobs that need it."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("sweep", ROOT / "launch" / "sweep.py")
    sweep = importlib.util.module_from_spec(spec)
    sys.modules["sweep"] = sweep  # dataclasses look their module up while the file runs
    spec.loader.exec_module(sweep)
    ran: list[list[str]] = []

    def fake(cmd: list[str], fail: str = "") -> int:
        flags = dict(a[2:].split("=", 1) for a in cmd if a.startswith("--") and "=" in a)
        for key in ("config.init.checkpoint", "config.model.path"):
            if key in flags and flags[key].startswith(str(tmp_path)):
                must = Path(flags[key]) / ("checkpoints" if key == "config.init.checkpoint" else "config.json")
                assert must.exists(), (cmd, must)  # the input is there when the job starts
        ran.append(cmd)
        if cmd[2] == "jaxmath.main" and not flags["workdir"].endswith("eval"):
            if fail and flags["workdir"].endswith(fail):
                return 1
            (Path(flags["workdir"]) / "checkpoints" / "1").mkdir(parents=True)
            if "sft_sweep" in flags["config"]:  # SFT exports itself
                (Path(flags["workdir"]) / "export").mkdir()
                (Path(flags["workdir"]) / "export" / "config.json").write_text("{}")
        elif cmd[2] == "jaxmath.convert.jax_to_hf":
            Path(flags["out"]).mkdir()
            (Path(flags["out"]) / "config.json").write_text("{}")
        return 0

    base = ["--set=--config.model.path=/models/base", "--grpo_set=--config.data.dir=/data",
            "--sft_set=--config.data.dir=/traces"]
    assert sweep.main([f"--root={tmp_path}", *base], runner=fake) == 1  # no eval results: the table is empty
    trains = [c for c in ran if c[2] == "jaxmath.main" and "--config=configs/eval.py" not in c]
    order = [sweep.run_name(c[3].split("=", 1)[1]) for c in trains]
    assert order.index("grpo_v2") < order.index("grpo_v3") and order.index("sft_sweep_a") < order.index("sft_then_rl")
    assert len(order) == 12
    by_name = dict(zip(order, trains))
    assert f"--config.init.checkpoint={tmp_path / 'grpo_v2'}" in by_name["grpo_v3"]
    assert f"--config.model.path={tmp_path / 'sft_sweep_a' / 'export'}" in by_name["sft_then_rl"]
    assert "--config.model.path=/models/base" not in by_name["sft_then_rl"]
    assert "--config.data.dir=/traces" in by_name["sft_sweep_a"] and "--config.data.dir=/data" in by_name["grpo_v1"]
    exports = {Path(c[3].split("=", 1)[1]).parent.name: c for c in ran if c[2] == "jaxmath.convert.jax_to_hf"}
    assert "--best" in exports["local_lora"] and "--best" not in exports["grpo_v2"]
    evals = [c for c in ran if "--config=configs/eval.py" in c]
    assert len(evals) == 12 and all("--config.data.dir=/data" in c for c in evals)

    # grpo_v2 fails: grpo_v3 (which needs it) is skipped, the rest still run.
    ran.clear()
    other = tmp_path / "again"
    assert sweep.main([f"--root={other}", "--configs=configs/grpo_v2.py,configs/grpo_v3.py,configs/grpo_v1.py",
                       *base], runner=lambda cmd: fake(cmd, fail="grpo_v2")) == 1
    started = [Path(dict(a[2:].split("=", 1) for a in c if a.startswith("--workdir=")).get("workdir", "")).name
               for c in ran if c[2] == "jaxmath.main"]
    assert "grpo_v3" not in started and "grpo_v1" in started


def test_a_job_whose_input_no_job_writes_is_refused(tmp_path):
    out = _sweep(f"--root={tmp_path}", "--configs=configs/grpo_v3.py", "--dry_run")
    assert out.returncode != 0 and "init.checkpoint=runs/grpo_v2" in out.stderr and "--configs" in out.stderr


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


def test_gpu_checks_commands_parse_with_their_benchmarks(tmp_path):
    """Every command of launch/gpu_checks.sh is accepted by its benchmark's own argument parser, so the
    script a GPU session runs cannot drift from the benchmarks' flags."""
    import importlib

    out = subprocess.run(["bash", str(ROOT / "launch" / "gpu_checks.sh")], capture_output=True, text=True,
                         cwd=ROOT, timeout=60, env={**os.environ, "PRINT_ONLY": "1"})
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == [
        "grpo_v2_train", "local_full_train", "decode", "decode_varying", "sft", "roofline_grpo_v2",
        "roofline_local_full", "sync_full", "sync_lora"]
    from jaxmath.bench import memory

    for line in lines:
        bench, *flags = shlex.split(line.split(":", 1)[1])
        if bench in ("programs", "roofline"):  # the config flags of `memory`, plus --repeats
            fv = memory._flags([f for f in flags if not f.startswith("--repeats")])
            assert fv.preset == "qwen3-4b-instruct-2507" and fv.config.mode in ("grpo", "sft")
        elif bench == "rollout":
            parsed = importlib.import_module("jaxmath.bench.rollout")._parse(flags)
            assert parsed.preset == "qwen3-4b-instruct-2507" and parsed.batch == 64 and parsed.stop_fraction > 0
        else:
            assert importlib.import_module(f"jaxmath.bench.{bench}")._parse(flags).preset == "qwen3-4b"
    unknown = subprocess.run(["bash", str(ROOT / "launch" / "gpu_checks.sh"), "nope"], capture_output=True,
                             text=True, cwd=ROOT, timeout=60, env={**os.environ, "OUT": str(tmp_path)})
    assert unknown.returncode == 2 and "known: versions grpo_v2_train" in unknown.stderr


def test_export_best_picks_the_step_with_the_best_eval_accuracy(tmp_path):
    """`jax_to_hf --best` (the sweep's export of local_lora) resolves a run's checkpoints to the step
    whose saved eval_accuracy is highest, not the newest; a run without that metric is refused."""
    import jax
    import jax.numpy as jnp
    import pytest

    from jaxmath.checkpoint import CheckpointManager, TrainState
    from jaxmath.convert.common import ConvertError
    from jaxmath.convert.jax_to_hf import best_step_dir

    def state(step):
        return TrainState({"w": jnp.ones((2,)) * step}, (), step, {"index": step}, jax.random.key(0), {})

    with CheckpointManager(tmp_path / "checkpoints", keep_last=5, best_metric="eval_accuracy") as manager:
        for step, accuracy in ((10, 0.80), (20, 0.87), (30, 0.86)):
            manager.save(step, state(step), metrics={"eval_accuracy": accuracy}, force=True)
    assert best_step_dir(str(tmp_path / "checkpoints")) == str(tmp_path / "checkpoints" / "20")
    with CheckpointManager(tmp_path / "plain" / "checkpoints") as manager:
        manager.save(5, state(5), metrics={"loss": 1.0}, force=True)
    with pytest.raises(ConvertError, match="rl.keep_best"):
        best_step_dir(str(tmp_path / "plain" / "checkpoints"))


@pytest.mark.slow  # ~2-3 minutes on 2 cores: every check compiled and run at tiny shapes
@pytest.mark.aot
@pytest.mark.skipif(not __import__("jaxmath.aot.targets", fromlist=["x"]).plugin_installed(),
                    reason="the roofline checks compile for an H100: JAX's CUDA plugin (the aot extra)")
def test_gpu_checks_smoke_runs_every_check_on_the_cpu(tmp_path):
    """`launch/gpu_checks.sh --smoke`: the script the next lent GPU runs, at tiny shapes on the CPU, so it
    cannot rot: every check exits 0 and the summary is one JSON object holding each check's result."""
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    env.pop("XLA_FLAGS", None)
    done = subprocess.run(["bash", str(ROOT / "launch" / "gpu_checks.sh"), "--smoke"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["smoke"] and set(summary["checks"]) == {
        "versions", "grpo_v2_train", "local_full_train", "decode", "decode_varying", "sft", "roofline_grpo_v2",
        "roofline_local_full", "sync_full", "sync_lora"}
    assert all(c["rc"] == 0 and c["result"] for c in summary["checks"].values()), summary
    train = summary["checks"]["grpo_v2_train"]["result"]["phases"]["train/step"]
    assert train["measured_s"] > 0 and train["modeled_s"] > 0 and train["planned_peak_bytes"] > 0
    assert 0 < train["measured_mfu"] and 0 < train["modeled_mfu"] < 1
    decode = summary["checks"]["decode"]["result"]["phases"]["rollout/decode"]
    assert decode["tokens"] == 16 * 32 and decode["tokens_per_s"] > 0 and decode["bandwidth_fraction"] > 0
    assert summary["checks"]["roofline_grpo_v2"]["result"]["train_modeled_mfu"] > 0
    varying = summary["checks"]["decode_varying"]["result"]
    assert varying["batch"] == 8 and varying["tokens_per_s"] > 0 and 0 < varying["slot_occupancy"] <= 1
    assert varying["roofline_fraction"] > 0


def test_a_dry_run_of_the_whole_sweep_finds_every_input_file(tmp_path):
    """The default sweep (Tables 12 and 3) run with a runner that performs its link commands and,
    for each jaxmath.main command, checks that every data file the command's config reads exists
    before making the command's outputs. The folders hold what their builders write: the problems and
    openr1.jsonl (`python -m jaxmath.data.datasets --out DIR`) in one, the teacher traces
    (configs/distill.py) in the other. SFT v3 reads openr1.jsonl, which only the problems' folder has."""
    import importlib.util

    from jaxmath.config import load_config
    from jaxmath.data.datasets import FILES, OPENR1_FILE

    spec = importlib.util.spec_from_file_location("sweep", ROOT / "launch" / "sweep.py")
    sweep = importlib.util.module_from_spec(spec)
    sys.modules["sweep"] = sweep
    spec.loader.exec_module(sweep)
    problems, traces, root = tmp_path / "data", tmp_path / "distill", tmp_path / "sweep"
    problems.mkdir()
    traces.mkdir()
    for name in [*FILES.values(), OPENR1_FILE]:
        (problems / name).write_text("{}\n")
    (traces / "traces.jsonl").write_text("{}\n")
    checked: dict[str, list[str]] = {}

    def runner(cmd: list[str]) -> int:
        if cmd[0] in ("mkdir", "ln"):
            return subprocess.run(cmd).returncode
        flags = dict(a[2:].split("=", 1) for a in cmd if a.startswith("--") and "=" in a)
        if cmd[2] == "jaxmath.convert.jax_to_hf":
            Path(flags["out"]).mkdir()
            (Path(flags["out"]) / "config.json").write_text("{}")
            return 0
        cfg = load_config(str(ROOT / flags["config"].split(":")[0]) + (
            ":" + flags["config"].split(":")[1] if ":" in flags["config"] else ""))
        value = lambda key: flags.get("config." + key, str(cfg[key.split(".")[0]][key.split(".")[1]]))
        data_dir = Path(value("data.dir"))
        if cfg.mode == "sft":
            files = [data_dir / f for f in value("sft.train_files").split(",")]
        elif cfg.mode == "eval":
            files = [data_dir / FILES[b] for b in value("eval.benchmarks").split(",")]
        else:
            files = [data_dir / FILES[value("data.train")]]
        missing = [str(f) for f in files if not f.is_file()]
        assert not missing, (flags["config"], missing)
        checked[flags["workdir"]] = [str(f) for f in files]
        workdir = Path(flags["workdir"])
        if cfg.mode != "eval":
            (workdir / "checkpoints" / "1").mkdir(parents=True)
            if cfg.mode == "sft":
                (workdir / "export").mkdir()
                (workdir / "export" / "config.json").write_text("{}")
        return 0

    args = [f"--root={root}", "--set=--config.model.path=/models/base", f"--grpo_set=--config.data.dir={problems}",
            f"--sft_set=--config.data.dir={traces}"]
    assert sweep.main(args, runner=runner) == 1  # every job ran; there are no eval results to collect
    assert len(checked) == 24  # 12 trainings and their 12 evaluations, every input found
    v3 = checked[str(root / "sft_sweep_v3")]
    assert [os.path.realpath(f) for f in v3] == [str(traces / "traces.jsonl"), str(problems / OPENR1_FILE)]
