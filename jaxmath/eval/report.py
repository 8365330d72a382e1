"""Markdown tables from results.json files, laid out like the study's Table 4 and Table 11.

Table 4: one row per model or run, one column per benchmark, cells "accuracy ± ci95" in percent, the
best cell of a column in bold. Table 11: one row per benchmark, greedy accuracy then maj@k and pass@k
columns of a sampled run. `merge_results` builds Table 4 from several runs (for sweep launchers).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Sequence

DISPLAY_NAMES = {
    "math500": "MATH-500",
    "aime24": "AIME 2024",
    "aime25": "AIME 2025",
    "gsm8k": "GSM8K",
    "olympiadbench": "OlympiadBench",
    "olympiadbench_all": "OlympiadBench (675)",
}
TABLE4_ORDER = ("math500", "aime24", "aime25", "gsm8k", "olympiadbench", "olympiadbench_all")


def _pct(value: float) -> str:
    return f"{100 * value:.1f}"


def _benchmarks_of(results: Mapping[str, Mapping]) -> list[str]:
    present = {name for name in results if name != "meta"}
    return [name for name in TABLE4_ORDER if name in present] + sorted(present - set(TABLE4_ORDER))


def accuracy_table(runs: Mapping[str, Mapping], benchmarks: Sequence[str] | None = None) -> str:
    """Table 4: runs maps a row name to a results dict ({benchmark: {"accuracy", "ci95", ...}, ...}).

    Benchmarks default to every one any run has, in the study's column order; a run without a
    benchmark shows "—". With more than one run the best accuracy of each column is bold.
    """
    if benchmarks is None:
        benchmarks = _benchmarks_of({name: None for results in runs.values() for name in results})
    best = {}
    for benchmark in benchmarks:
        values = [results[benchmark]["accuracy"] for results in runs.values() if benchmark in results]
        best[benchmark] = max(values) if values and len(runs) > 1 else None
    lines = ["| Model | " + " | ".join(DISPLAY_NAMES.get(b, b) for b in benchmarks) + " |",
             "|---|" + "---|" * len(benchmarks)]
    for name, results in runs.items():
        cells = []
        for benchmark in benchmarks:
            if benchmark not in results:
                cells.append("—")
                continue
            entry = results[benchmark]
            cell = f"{_pct(entry['accuracy'])} ± {_pct(entry['ci95'])}"
            cells.append(f"**{cell}**" if entry["accuracy"] == best[benchmark] else cell)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def voting_table(results: Mapping[str, Mapping], greedy: Mapping[str, Mapping] | None = None) -> str:
    """Table 11: one row per benchmark of a sampled run; maj@k and pass@k for k above 1.

    greedy: an optional greedy run's results for the "Greedy" column; without it the column is the
    sampled run's mean per-sample accuracy ("Mean@1").
    """
    benchmarks = _benchmarks_of(results)
    ks = sorted({int(k) for b in benchmarks for k in results[b]["maj@k"] if int(k) > 1})
    first = "Greedy" if greedy is not None else "Mean@1"
    lines = [f"| Benchmark | {first} | " + " | ".join([f"maj@{k}" for k in ks] + [f"pass@{k}" for k in ks]) + " |",
             "|---|---|" + "---|" * (2 * len(ks))]
    for benchmark in benchmarks:
        entry = results[benchmark]
        if greedy is not None:
            head = _pct(greedy[benchmark]["accuracy"]) if benchmark in greedy else "—"
        else:
            head = _pct(entry["accuracy"])
        cells = [_pct(entry[key][str(k)]) if str(k) in entry[key] else "—"
                 for key in ("maj@k", "pass@k") for k in ks]
        lines.append(f"| {DISPLAY_NAMES.get(benchmark, benchmark)} | {head} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run_name(results: Mapping, default: str = "model") -> str:
    """The row name of a run: meta["name"], else meta["model"], else `default`."""
    meta = results.get("meta") or {}
    return str(meta.get("name") or meta.get("model") or default)


def single_run_markdown(results: Mapping) -> str:
    """The results.md written by `jaxmath.eval.run.evaluate`: Table 4 row, Table 11 if sampled, counts."""
    benchmarks = _benchmarks_of(results)
    meta = results.get("meta") or {}
    parts = [f"# Evaluation: {run_name(results)}\n",
             f"engine {meta.get('engine', '?')}, date {meta.get('date', '?')}\n",
             accuracy_table({run_name(results): results}, benchmarks)]
    if any(results[b].get("num_samples", 1) > 1 for b in benchmarks):
        parts.append(voting_table(results))
    counts = [f"- {DISPLAY_NAMES.get(b, b)}: n={results[b]['n']}, samples per problem "
              f"{results[b].get('num_samples', 1)}, parse failures {results[b]['parse_failures']}"
              + (f", truncated {results[b]['truncated']}" if "truncated" in results[b] else "")
              for b in benchmarks]
    return "\n".join(parts) + "\n" + "\n".join(counts) + "\n"


def load_results(path: str | Path) -> dict:
    """Reads a results.json, given the file, its eval/ folder or the run's workdir."""
    path = Path(path)
    for candidate in (path, path / "results.json", path / "eval" / "results.json"):
        if candidate.is_file():
            return json.loads(candidate.read_text())
    raise FileNotFoundError(f"no results.json at {path} (nor in {path}/eval/); run the evaluation first")


def merge_results(paths: Sequence[str | Path], names: Sequence[str] | None = None) -> str:
    """Table 4 over several runs, one row each, named by `names` or each run's meta (model)."""
    if names is not None and len(names) != len(paths):
        raise ValueError(f"got {len(names)} names for {len(paths)} results")
    runs: dict[str, dict] = {}
    for i, path in enumerate(paths):
        results = load_results(path)
        name = names[i] if names is not None else run_name(results, default=Path(path).name)
        if name in runs:
            name = f"{name} ({i})"
        runs[name] = results
    return accuracy_table(runs)
