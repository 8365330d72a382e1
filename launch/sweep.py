"""Ablation sweep: run the study's configurations as separate jobs, evaluate each, and collect one
table (the study's Table 4 layout) and one chart.

    python launch/sweep.py --root=runs/sweep --set=--config.model.path=/models/Qwen3-4B-Instruct-2507 \
        --set=--config.data.dir=data [--configs=configs/grpo_v1.py,configs/grpo_v2.py] [--print_only]

Each configuration gets its own workdir `<root>/<name>` (name: the config file's stem, plus the
`:arg` of a variant, e.g. sft_sweep_v2) and three steps run in order: train (`jaxmath.main`), export
to an HF folder (SFT runs export themselves; GRPO runs go through `jaxmath.convert.jax_to_hf --merge_lora`),
and evaluate (`configs/eval.py` on that folder, into `<root>/<name>/eval`). Locally the jobs run one
after another; `--print_only` prints one `sbatch` command per configuration instead, and
`--dry_run` prints the local commands without running them. `--collect_only` skips straight to
the table: `<root>/results.md` (jaxmath.eval.report.merge_results over every
`<root>/*/eval/results.json`) and `<root>/accuracy.png`. A configuration whose results are missing
is listed under the table, not silently dropped.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Table 3 (GRPO) and Table 12 (the SFT sweep) of the study.
TABLE3 = ["configs/grpo_v1.py", "configs/grpo_v2.py", "configs/grpo_v3.py", "configs/local_full.py",
          "configs/local_lora.py", "configs/sft_then_rl.py"]
TABLE12 = [f"configs/sft_sweep.py:{row}" for row in ("v1", "v2", "v3", "v4", "a", "b")]
BENCHMARKS = "math500,aime24,aime25,gsm8k,olympiadbench"


def run_name(config: str) -> str:
    """configs/grpo_v2.py -> grpo_v2; configs/sft_sweep.py:v2 -> sft_sweep_v2."""
    path, _, arg = config.partition(":")
    return Path(path).stem + (f"_{arg}" if arg else "")


def _mode(config: str) -> str:
    return "sft" if Path(config.partition(":")[0]).stem.startswith("sft_") and "then_rl" not in config else "grpo"


def job_commands(config: str, root: Path, overrides: list[str], eval_overrides: list[str],
                 python: str = sys.executable) -> list[list[str]]:
    """The train, export and eval commands of one configuration, in order."""
    workdir = root / run_name(config)
    export = workdir / "export"
    cmds = [[python, "-m", "jaxmath.main", f"--config={config}", f"--workdir={workdir}", *overrides]]
    if _mode(config) == "grpo":
        cmds.append([python, "-m", "jaxmath.convert.jax_to_hf", f"--ckpt={workdir / 'checkpoints'}", f"--out={export}",
                     "--merge_lora"])
    data_dir = [o for o in overrides if o.startswith("--config.data.dir=")]
    cmds.append([python, "-m", "jaxmath.main", "--config=configs/eval.py", f"--config.model.path={export}",
                 f"--workdir={workdir / 'eval'}", f"--config.eval.benchmarks={BENCHMARKS}", *data_dir,
                 *eval_overrides])
    return cmds


def sbatch_command(config: str, root: Path, cmds: list[list[str]], sbatch_args: list[str]) -> str:
    """One single-GPU SLURM job running the configuration's commands in order."""
    name = run_name(config)
    script = " && ".join(shlex.join(c) for c in cmds)
    return shlex.join(["sbatch", f"--job-name=jaxmath-{name}", "--nodes=1", "--gpus-per-node=1",
                       f"--output={root / name / 'slurm-%j.out'}", *sbatch_args, f"--wrap=cd {ROOT} && {script}"])


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
    p.add_argument("--configs", default=",".join(TABLE3 + TABLE12),
                   help="comma list of config files (file.py or file.py:variant); default Table 3 + Table 12")
    p.add_argument("--set", action="append", default=[], dest="overrides",
                   help="an override for every training job, e.g. --set=--config.model.path=/models/X (repeat)")
    p.add_argument("--eval_set", action="append", default=[], help="an override for every eval job (repeat)")
    p.add_argument("--sbatch_arg", action="append", default=[], help="extra sbatch flag for --print_only (repeat)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--print_only", action="store_true", help="print one sbatch command per configuration")
    mode.add_argument("--dry_run", action="store_true", help="print the local commands, run nothing")
    mode.add_argument("--collect_only", action="store_true", help="only collect results into the table and chart")
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
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
        failed = []
        for config in configs:
            cmds = job_commands(config, root, args.overrides, args.eval_set)
            if args.print_only:
                print(sbatch_command(config, root, cmds, args.sbatch_arg))
                continue
            for cmd in cmds:
                print("+ " + shlex.join(cmd), flush=True)
                if args.dry_run:
                    continue
                if subprocess.run(cmd, cwd=ROOT).returncode != 0:
                    failed.append(run_name(config))
                    break  # this configuration stops; the sweep goes on with the next
        if args.print_only or args.dry_run:
            return 0
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
