"""Ablation sweep: run the study's configurations as separate jobs, evaluate each, and collect one
table (the study's Table 4 layout) and one chart.

    python launch/sweep.py --root=runs/sweep --set=--config.model.path=/models/Qwen3-4B-Instruct-2507 \
        --grpo_set=--config.data.dir=data --sft_set=--config.data.dir=runs/distill \
        [--configs=configs/grpo_v1.py,configs/grpo_v2.py] [--dry_run | --print_only | --collect_only]

Each configuration is a job with its own workdir `<root>/<name>` (name: the config file's stem, plus
the `:arg` of a variant, e.g. sft_sweep_v2) and three commands run in order: train
(`jaxmath.main`), export to an HF folder (SFT runs export themselves; GRPO runs go through
`jaxmath.convert.jax_to_hf --merge_lora`, at the best evaluated step when the config keeps best
checkpoints, `rl.keep_best`: local_lora's step 50 in the study), and evaluate (`configs/eval.py` on
that folder, into `<root>/<name>/eval`).

SFT v3 reads OpenR1-Math-220k's `openr1.jsonl`, which the data builder writes beside the problems
(`python -m jaxmath.data.datasets --out data`), not beside the teacher traces: its job first makes
`<root>/sft_sweep_v3/data` with links to `traces.jsonl` (from the SFT rows' data.dir) and
`openr1.jsonl` (from the GRPO rows' data.dir, `data` by default) and trains from there.

A job that reads another run's output (`init.checkpoint`: grpo_v3 continues runs/grpo_v2;
`model.path`: sft_then_rl starts from runs/sft_a/export, Config A's export) depends on the job whose
config writes that workdir, reads it from under `<root>` instead, and runs after it (`plan_jobs`);
its own input wins over a `--set` of the same key (the sweep's base model must not replace
sft_then_rl's). A job whose input no job of the sweep writes is an error naming the config to add.

Locally the jobs run one after another in that order (a failed job skips the jobs that need it);
`--dry_run` prints the commands without running them; `--print_only` prints a shell script of
`sbatch` jobs chained by `--dependency=afterok`. `--collect_only` skips straight to the table:
`<root>/results.md` (jaxmath.eval.report.merge_results over every `<root>/*/eval/results.json`) and
`<root>/accuracy.png`. A configuration whose results are missing is listed under the table, not
silently dropped. `--sft_set` / `--grpo_set` apply to one kind of training job only (SFT rows read
traces from their data.dir, GRPO rows the problems); the eval jobs take `--config.data.dir` from
`--eval_set`, else from `--grpo_set`, else from `--set`.
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
# Table 12 (the SFT sweep) first: Config A's export is sft_then_rl's starting point. Then Table 3.
TABLE12 = [f"configs/sft_sweep.py:{row}" for row in ("v1", "v2", "v3", "v4", "a", "b")]
TABLE3 = ["configs/grpo_v1.py", "configs/grpo_v2.py", "configs/grpo_v3.py", "configs/local_full.py",
          "configs/local_lora.py", "configs/sft_then_rl.py"]
BENCHMARKS = "math500,aime24,aime25,gsm8k,olympiadbench"
# Config keys through which a run reads another run's output.
INPUT_KEYS = ("init.checkpoint", "model.path")
# Files an SFT row reads from its data.dir that configs/distill.py does not write there: OpenR1-Math-220k
# (SFT v3) comes with the problems (`python -m jaxmath.data.datasets --out DIR`, the GRPO rows' data.dir).
WITH_THE_PROBLEMS = ("openr1.jsonl",)
PROBLEMS_DIR = "data"  # the GRPO rows' data.dir unless --grpo_set / --set says otherwise


def run_name(config: str) -> str:
    """configs/grpo_v2.py -> grpo_v2; configs/sft_sweep.py:v2 -> sft_sweep_v2."""
    path, _, arg = config.partition(":")
    return Path(path).stem + (f"_{arg}" if arg else "")


@dataclasses.dataclass(frozen=True)
class Job:
    """One configuration of the sweep: its commands, the jobs it needs, the paths it reads."""

    name: str
    config: str
    mode: str
    needs: tuple[str, ...]
    reads: tuple[str, ...]
    commands: tuple[tuple[str, ...], ...]


def _load(config: str):
    from jaxmath.config import load_config

    path, _, arg = config.partition(":")
    return load_config(str(ROOT / path) + (f":{arg}" if arg else ""))


def _key(cfg, dotted: str) -> str:
    section, _, field = dotted.partition(".")
    return str(cfg[section][field]) if section in cfg and field in cfg[section] else ""


def plan_jobs(configs: list[str], root: Path, overrides: list[str], eval_overrides: list[str], *,
              sft_overrides: list[str] = (), grpo_overrides: list[str] = (), python: str = sys.executable
              ) -> list[Job]:
    """The sweep's jobs in an order where each runs after the jobs whose outputs it reads.

    A config's default workdir (`workdir`, e.g. runs/grpo_v2) names what it writes; a config whose
    init.checkpoint or model.path lies under another job's default workdir reads that job's output,
    which in the sweep lives under <root>/<that job's name>."""
    loaded = {c: _load(c) for c in configs}
    writers: dict[str, str] = {}
    for c in configs:
        writers.setdefault(str(loaded[c].get("workdir", "")).rstrip("/"), run_name(c))
    writers.pop("", None)
    jobs = {}
    for c in configs:
        cfg, name = loaded[c], run_name(c)
        needs, inputs = [], []
        for key in INPUT_KEYS:
            value = _key(cfg, key)
            source = next(((d, w) for d, w in writers.items()
                           if w != name and (value == d or value.startswith(d + "/"))), None)
            if source is not None:
                needs.append(source[1])
                inputs.append((key, str(root / source[1]) + value[len(source[0]):]))
            elif value.startswith("runs/"):
                raise SystemExit(f"{c} reads {key}={value}, which no job of this sweep writes; add the config whose "
                                 f"workdir is {'/'.join(value.split('/')[:2])} to --configs (e.g. "
                                 "configs/sft_sweep.py:a for runs/sft_a)")
        jobs[name] = _job(c, cfg, root, needs, inputs, overrides, eval_overrides, sft_overrides, grpo_overrides, python)
    return _in_dependency_order(jobs, [run_name(c) for c in configs])


def _data_dir(groups, default: str) -> str:
    """The last --config.data.dir= of the override groups (later groups win), else `default`."""
    found = [o.split("=", 1)[1] for group in groups for o in group if o.startswith("--config.data.dir=")]
    return found[-1] if found else default


def _absolute(path: str) -> str:
    """`path` as the jobs resolve it (they run in the repository root)."""
    return str(path if Path(path).is_absolute() else ROOT / path)


def _sft_data_links(cfg, workdir: Path, overrides, sft_overrides, grpo_overrides) -> tuple[list, str, tuple]:
    """For an SFT row that reads a file the distillation does not write (WITH_THE_PROBLEMS): the
    commands that make <workdir>/data with links to each of its train files where they are (traces
    from the SFT rows' data.dir, OpenR1 from the problems' folder), that folder, and the files linked.
    Nothing for the other rows."""
    files = [f for f in str(cfg.sft.train_files).split(",") if f]
    if not any(f in WITH_THE_PROBLEMS for f in files):
        return [], "", ()
    traces = _data_dir([overrides, sft_overrides], str(cfg.data.dir))
    problems = _data_dir([overrides, grpo_overrides], PROBLEMS_DIR)
    folder = workdir / "data"
    sources = tuple(str(Path(_absolute(problems if f in WITH_THE_PROBLEMS else traces)) / f) for f in files)
    cmds = [("mkdir", "-p", str(folder))] + [("ln", "-sfn", src, str(folder / f)) for f, src in zip(files, sources)]
    return cmds, str(folder), sources


def _job(config, cfg, root, needs, inputs, overrides, eval_overrides, sft_overrides, grpo_overrides, python) -> Job:
    name, mode = run_name(config), cfg.mode
    workdir = root / name
    export = workdir / "export"
    own = [f"--config.{key}={path}" for key, path in inputs]
    links, linked_dir, linked = ([], "", ()) if mode != "sft" else _sft_data_links(
        cfg, workdir, overrides, sft_overrides, grpo_overrides)
    if linked_dir:
        own.append(f"--config.data.dir={linked_dir}")
    mine = {o.split("=", 1)[0] for o in own}
    general = [o for o in [*overrides, *(sft_overrides if mode == "sft" else grpo_overrides)]
               if o.split("=", 1)[0] not in mine]
    cmds = [*links, (python, "-m", "jaxmath.main", f"--config={config}", f"--workdir={workdir}", *general, *own)]
    if mode != "sft":
        best = int(cfg.rl.keep_best) > 0
        cmds.append((python, "-m", "jaxmath.convert.jax_to_hf", f"--ckpt={workdir / 'checkpoints'}",
                     *(["--best"] if best else []), f"--out={export}", "--merge_lora"))
    data_dir = next(([o] for group in (eval_overrides, grpo_overrides, overrides) for o in reversed(group)
                     if o.startswith("--config.data.dir=")), [])
    eval_rest = [o for o in eval_overrides if not o.startswith("--config.data.dir=")]
    cmds.append((python, "-m", "jaxmath.main", "--config=configs/eval.py", f"--config.model.path={export}",
                 f"--workdir={workdir / 'eval'}", f"--config.eval.benchmarks={BENCHMARKS}", *data_dir, *eval_rest))
    reads = tuple(str(Path(path) / "checkpoints") if key == "init.checkpoint" else path for key, path in inputs
                  if key in INPUT_KEYS) + linked
    return Job(name, config, mode, tuple(dict.fromkeys(needs)), reads, tuple(cmds))


def _in_dependency_order(jobs: dict[str, Job], order: list[str]) -> list[Job]:
    """Jobs in the given order, except that each comes after the jobs it needs (stable)."""
    done, out = set(), []

    def visit(name: str, path: tuple[str, ...]) -> None:
        if name in done:
            return
        if name in path:
            raise SystemExit(f"the sweep's jobs need each other in a cycle: {' -> '.join(path + (name,))}")
        for need in jobs[name].needs:
            visit(need, path + (name,))
        done.add(name)
        out.append(jobs[name])

    for name in order:
        visit(name, ())
    return out


def sbatch_script(jobs: list[Job], root: Path, sbatch_args: list[str]) -> str:
    """A shell script submitting one single-GPU SLURM job per configuration, each held until the jobs
    it needs have succeeded (`--dependency=afterok`)."""
    lines = []
    for job in jobs:
        script = " && ".join(shlex.join(c) for c in job.commands)
        after = ":".join(f"${{{_var(n)}}}" for n in job.needs)
        flags = ["--parsable", f"--job-name=jaxmath-{job.name}", "--nodes=1", "--gpus-per-node=1",
                 f"--output={root / job.name / 'slurm-%j.out'}", *sbatch_args, f"--wrap=cd {ROOT} && {script}"]
        dependency = f" --dependency=afterok:{after}" if after else ""
        lines.append(f"{_var(job.name)}=$(sbatch{dependency} {shlex.join(flags)})")
    return "\n".join(lines)


def _var(name: str) -> str:
    return "job_" + "".join(ch if ch.isalnum() else "_" for ch in name)


def run_jobs(jobs: list[Job], runner: Callable[[list[str]], int], echo: bool = True) -> list[str]:
    """Runs each job's commands in order with `runner` (cmd -> exit status); a failed command ends its
    job, and jobs that need a failed or skipped job are skipped. Returns the names that did not finish."""
    failed: list[str] = []
    for job in jobs:
        blocked = [n for n in job.needs if n in failed]
        if blocked:
            print(f"skipping {job.name}: it needs {', '.join(blocked)}, which did not finish", file=sys.stderr)
            failed.append(job.name)
            continue
        for cmd in job.commands:
            if echo:
                print("+ " + shlex.join(cmd), flush=True)
            if runner(list(cmd)) != 0:
                failed.append(job.name)
                break
    return failed


def _subprocess_runner(cmd: list[str]) -> int:
    return subprocess.run(cmd, cwd=ROOT).returncode


def collect(root: Path, names: list[str]) -> tuple[str, list[str]]:
    """(markdown table, missing names): Table 4 over the runs that have eval/results.json, and a chart
    of MATH-500 (or the first benchmark) accuracy with 95% intervals at <root>/accuracy.png."""
    from jaxmath.eval.report import load_results, merge_results

    have = [n for n in names if (root / n / "eval" / "results.json").is_file()]
    missing = [n for n in names if n not in have]
    if not have:
        return "", missing
    table = merge_results([root / n for n in have], names=have)
    _chart([(n, load_results(root / n)) for n in have], root / "accuracy.png")
    return table, missing


def _chart(runs: list[tuple[str, dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from jaxmath.eval.report import DISPLAY_NAMES, TABLE4_ORDER

    present = {b for _, r in runs for b in r if b != "meta"}
    benchmarks = [b for b in TABLE4_ORDER if b in present] + sorted(present - set(TABLE4_ORDER))
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(runs) * len(benchmarks) / 2), 4))
    width = 0.8 / max(len(runs), 1)
    for i, (name, results) in enumerate(runs):
        xs = [j + i * width for j, b in enumerate(benchmarks) if b in results]
        ys = [100 * results[b]["accuracy"] for b in benchmarks if b in results]
        err = [100 * results[b]["ci95"] for b in benchmarks if b in results]
        ax.bar(xs, ys, width, yerr=err, capsize=2, label=name)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(benchmarks))])
    ax.set_xticklabels([DISPLAY_NAMES.get(b, b) for b in benchmarks])
    ax.set_ylabel("accuracy % (greedy, 95% CI)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", required=True, help="one workdir per configuration is made under it")
    p.add_argument("--configs", default=",".join(TABLE12 + TABLE3),
                   help="comma list of config files (file.py or file.py:variant); default Table 12 + Table 3")
    p.add_argument("--set", action="append", default=[], dest="overrides",
                   help="an override for every training job, e.g. --set=--config.model.path=/models/X (repeat)")
    p.add_argument("--sft_set", action="append", default=[], help="an override for SFT training jobs (repeat)")
    p.add_argument("--grpo_set", action="append", default=[], help="an override for GRPO training jobs (repeat)")
    p.add_argument("--eval_set", action="append", default=[], help="an override for every eval job (repeat)")
    p.add_argument("--sbatch_arg", action="append", default=[], help="extra sbatch flag for --print_only (repeat)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--print_only", action="store_true", help="print a script of chained sbatch jobs")
    mode.add_argument("--dry_run", action="store_true", help="print the local commands in order, run nothing")
    mode.add_argument("--collect_only", action="store_true", help="only collect results into the table and chart")
    return p.parse_args(argv)


def main(argv: list[str], runner: Callable[[list[str]], int] = _subprocess_runner) -> int:
    """The sweep; `runner` runs one command and returns its exit status (tests pass a fake)."""
    args = _parse(argv)
    root = Path(args.root)
    configs = [c for c in args.configs.split(",") if c]
    names = [run_name(c) for c in configs]
    if len(set(names)) != len(names):
        raise SystemExit(f"two configurations share a workdir name: {names}; list each once")
    for config in configs:
        if not (ROOT / config.partition(":")[0]).is_file():
            raise SystemExit(f"config {config} not found under {ROOT}; pass paths like configs/grpo_v2.py")
    if not args.collect_only:
        jobs = plan_jobs(configs, root, args.overrides, args.eval_set, sft_overrides=args.sft_set,
                         grpo_overrides=args.grpo_set)
        if args.print_only:
            print(sbatch_script(jobs, root, args.sbatch_arg))
            return 0
        if args.dry_run:
            run_jobs(jobs, lambda cmd: 0)
            return 0
        failed = run_jobs(jobs, runner)
        if failed:
            print(f"failed: {', '.join(failed)} (see their workdirs under {root})", file=sys.stderr)
    table, missing = collect(root, names)
    if table:
        (root / "results.md").write_text(table + ("\nmissing: " + ", ".join(missing) + "\n" if missing else ""))
        print(table)
        print(f"wrote {root / 'results.md'} and {root / 'accuracy.png'}")
    if missing:
        print(f"no eval/results.json yet for: {', '.join(missing)}", file=sys.stderr)
    return 0 if table and not missing else 1


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main(sys.argv[1:]))
