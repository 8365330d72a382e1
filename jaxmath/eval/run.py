"""Benchmark evaluation: prompts -> any RolloutEngine (or a completions file) -> grading -> metrics.

`evaluate(engine, tokenizer, cfg, workdir, meta)` is the entry point `jaxmath.main` calls for
`mode='eval'`. It takes an already-built engine, so the `jax` and `vllm` backends differ only in the
engine main.py constructs; the `file` backend grades completions someone else generated and needs
neither engine nor tokenizer.

Completions are graded by the training reward's function (`jaxmath.reward.grade_completions`), so a
completion gets the same answer and verdict here as in training and distillation. Answers are taken
from the last `\\boxed{}` only (the study requires boxed answers on every benchmark); `answer_fallback` opts a benchmark into one of `jaxmath.reward.extract_answer`'s
fallbacks, e.g. "gsm8k=gsm8k".

Writes under `<workdir>/eval/`: results.json, results.md (Table 4 / Table 11 layout) and
completions_<benchmark>.jsonl (every completion with its extracted answer and verdict).
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.metadata
import json
import logging
import platform
from pathlib import Path
from typing import Any, Sequence

from tqdm import tqdm

from jaxmath.data import datasets, prompts
from jaxmath.eval import metrics, report

log = logging.getLogger(__name__)

BACKENDS = ("jax", "vllm", "file")
FALLBACKS = ("gsm8k", "answer_is")


def _split_csv(value: str | Sequence) -> tuple[str, ...]:
    if isinstance(value, str):
        return tuple(part.strip() for part in value.split(",") if part.strip())
    return tuple(str(part) for part in value)


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """What to evaluate and how. The fields other than `data_dir` (which `jaxmath.sections` takes from
    `data.dir`) are the keys of a config's `eval` section.

    data_dir:          the folder with the benchmarks' JSONL files
    benchmarks:        comma-separated names or a tuple; see jaxmath.data.datasets.BENCHMARKS
    backend:           "vllm" (configs/eval.py, as the design card says) | "jax" (the in-process sampler,
                       nothing more to install): an engine is passed in | "file" (grade `completions`).
                       In a GRPO run the periodic evaluation runs on rollout.engine's engine.
    completions:       JSONL of {"id": ..., "completions": [str, ...]} rows for one benchmark (file backend)
    limit:             > 0 evaluates only the first `limit` problems of each benchmark (smoke runs)
    temperature:       0.01 as in the study (near greedy), 0 for argmax, 0.7 for majority voting
    top_p:             nucleus sampling: sample from the smallest set of tokens whose probability
                       reaches top_p (1: all tokens)
    max_new_tokens:    each completion's length budget
    max_prompt_tokens: the longest prompt (few-shot prefix and chat template included) a problem may have
    seed:              the sampling seed
    num_samples:       completions per problem; 1 is greedy mode, > 1 adds maj@k and pass@k
    maj_k:             k values for maj@k and pass@k (comma-separated); empty: 1, 2, 4, ..., num_samples
    answer_fallback:   "benchmark=fallback,..." with fallback in FALLBACKS; empty means boxed answers only
    few_shot:          number of worked examples in the prompt prefix (0 to 4)
    system_prompt:     a system turn before each problem; empty: none
    enable_thinking:   the hybrid Qwen3 chat template's thinking switch (off: the Instruct-2507 models
                       answer without a <think> block)
    timeout:           seconds one answer's grading may take before it counts as wrong
    workers:           grading processes (0: grade in this process)
    batch_size:        prompts per engine call (the progress bar advances per call)
    progress:          show progress bars while generating and voting
    """

    data_dir: str
    benchmarks: str | tuple[str, ...] = "math500,aime24,aime25,gsm8k,olympiadbench"
    backend: str = "jax"
    completions: str = ""
    limit: int = 0
    temperature: float = 0.01
    num_samples: int = 1
    top_p: float = 1.0
    max_new_tokens: int = 4096
    max_prompt_tokens: int = 2048
    seed: int = 0
    few_shot: int = 4
    system_prompt: str = ""
    enable_thinking: bool = False
    maj_k: str | tuple[int, ...] = ""
    answer_fallback: str = ""
    timeout: float = 1.0
    workers: int = 0
    batch_size: int = 64
    progress: bool = True

    def __post_init__(self):
        # Normalized once so ConfigDict strings ("math500,aime24") and tuples behave the same.
        object.__setattr__(self, "benchmarks", _split_csv(self.benchmarks))
        try:
            object.__setattr__(self, "maj_k", tuple(int(k) for k in _split_csv(self.maj_k)))
        except ValueError as e:
            raise ValueError(f"eval.maj_k must be comma-separated integers, got {self.maj_k!r}") from e
        unknown = [b for b in self.benchmarks if b not in datasets.BENCHMARKS]
        if not self.benchmarks or unknown:
            raise ValueError(f"eval.benchmarks has unknown names {unknown}; choose from {datasets.BENCHMARKS}")
        if self.backend not in BACKENDS:
            raise ValueError(f"eval.backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.backend == "file" and (not self.completions or len(self.benchmarks) != 1):
            raise ValueError("the file backend grades one benchmark: set eval.benchmarks to a single name and "
                             "eval.completions to a JSONL of {\"id\": ..., \"completions\": [...]} rows")
        if self.num_samples < 1 or self.temperature < 0 or self.limit < 0:
            raise ValueError("need num_samples >= 1, temperature >= 0 and limit >= 0")
        if any(k < 1 for k in self.maj_k):
            raise ValueError(f"eval.maj_k values must be >= 1, got {self.maj_k}")
        self.fallbacks()  # validates answer_fallback early

    def fallbacks(self) -> dict[str, str]:
        """benchmark -> extraction fallback parsed from `answer_fallback`."""
        out = {}
        for item in _split_csv(self.answer_fallback):
            benchmark, _, fallback = item.partition("=")
            if benchmark not in datasets.BENCHMARKS or fallback not in FALLBACKS:
                raise ValueError(f"eval.answer_fallback item {item!r} must be <benchmark>=<fallback> with "
                                 f"fallback in {FALLBACKS}, e.g. 'gsm8k=gsm8k'")
            out[benchmark] = fallback
        return out


def read_completions(path: str | Path, examples: Sequence[datasets.Example],
                     known_ids: set[str] | None = None) -> list[list[str]]:
    """Completions from a JSONL file, ordered like `examples`: [num_examples][num_samples] str.

    Every example must have a row and every row the same number of completions. Rows for other ids
    of the benchmark (`known_ids`, e.g. those past eval.limit) are ignored; an id outside it is an
    error, as it usually means the file is for another benchmark.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"completions file {path} not found (eval.completions)")
    by_id: dict[str, list[str]] = {}
    with path.open(encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            row = json.loads(line)
            texts = row.get("completions")
            if "id" not in row or not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
                raise datasets.DataError(f"{path}:{line_number} must be {{\"id\": ..., \"completions\": [str, ...]}}")
            if known_ids is not None and str(row["id"]) not in known_ids:
                raise datasets.DataError(f"{path}:{line_number} has id {row['id']!r}, which is not in the benchmark; "
                                 "check eval.benchmarks matches the completions file")
            by_id[str(row["id"])] = texts
    return _align(by_id, examples, path)


def _align(by_id: dict[str, list[str]], examples: Sequence[datasets.Example], path: Path) -> list[list[str]]:
    wanted = [ex.id for ex in examples]
    missing = [i for i in wanted if i not in by_id]
    if missing:
        raise datasets.DataError(f"{path} has no completions for {len(missing)} problems, e.g. {missing[:3]}; "
                         "is it for this benchmark (eval.benchmarks) and did generation finish?")
    sizes = {len(by_id[i]) for i in wanted}
    if len(sizes) != 1 or 0 in sizes:
        raise datasets.DataError(f"{path}: every row needs the same, non-zero number of completions; found {sorted(sizes)}")
    return [by_id[i] for i in wanted]


def generate_completions(engine: Any, tokenizer: Any, examples: Sequence[datasets.Example],
                         cfg: EvalConfig) -> tuple[list[list[str]], list[list[int]]]:
    """Samples cfg.num_samples completions per example with `engine` (a RolloutEngine).

    Returns (texts, finish_reasons), both [num_examples][num_samples]. Each engine call gets
    seed + index of its first prompt, so batches draw different random streams.
    """
    from jaxmath.rollout.types import SamplingParams  # pylint: disable=import-outside-toplevel

    prompt_ids = prompts.encode_prompts(examples, tokenizer, cfg.max_prompt_tokens, few_shot=cfg.few_shot,
                                        system=cfg.system_prompt or None, enable_thinking=cfg.enable_thinking)
    texts: list[list[str]] = [[] for _ in examples]
    finish: list[list[int]] = [[] for _ in examples]
    starts = range(0, len(prompt_ids), cfg.batch_size)
    for start in tqdm(starts, desc="generate", unit="batch", disable=not cfg.progress):
        batch = prompt_ids[start:start + cfg.batch_size]
        params = SamplingParams(max_new_tokens=cfg.max_new_tokens, num_samples=cfg.num_samples,
                                temperature=cfg.temperature, top_p=cfg.top_p, seed=cfg.seed + start,
                                stop_token_ids=prompts.stop_token_ids(tokenizer))
        rollout = engine.generate(batch, params)
        if rollout.num_rows != len(batch) * cfg.num_samples:
            raise RuntimeError(f"engine returned {rollout.num_rows} rows for {len(batch)} prompts x "
                               f"{cfg.num_samples} samples; it must follow the RolloutEngine contract")
        for row, tokens in enumerate(rollout.completion_token_lists()):
            index = start + int(rollout.prompt_index[row])
            texts[index].append(tokenizer.decode(tokens, skip_special_tokens=True))
            finish[index].append(int(rollout.finish_reason[row]))
    return texts, finish


def score(examples: Sequence[datasets.Example], completions: Sequence[Sequence[str]], cfg: EvalConfig,
          fallback: str | None = None, ks: Sequence[int] = ()) -> tuple[dict, list[dict]]:
    """Grades completions against the gold answers.

    completions: [num_examples][num_samples] str
    Returns (summary, records): the metrics dict of `metrics.summarize` plus "parse_failures" (samples
    without an extractable answer), and one record per example for the raw JSONL.
    """
    from jaxmath import reward  # pylint: disable=import-outside-toplevel

    # The training reward's and distillation's grader (`grade_completions`), so a completion gets the
    # same verdict and the same extracted answer here as in training.
    flat = reward.grade_completions([text for row in completions for text in row],
                                    [ex.answer for ex, row in zip(examples, completions) for _ in row],
                                    fallback=fallback, workers=cfg.workers, timeout=cfg.timeout)
    graded, start = [], 0
    for row in completions:
        graded.append(flat[start:start + len(row)])
        start += len(row)
    extracted = [[item.answer for item in row] for row in graded]
    correct = [[item.correct for item in row] for row in graded]

    def equivalent(a: str, b: str) -> bool:
        return reward.equivalent(a, b, timeout=cfg.timeout)

    num_samples = len(completions[0]) if completions else 1
    if num_samples == 1:  # nothing to vote on: the single answer is the majority
        labels = [[None if answer is None else 0 for answer in row] for row in extracted]
    else:
        labels = [metrics.group_answers(row, equivalent)
                  for row in tqdm(extracted, desc="vote", unit="problem", disable=not cfg.progress)]
    summary = metrics.summarize(correct, labels, ks or metrics.default_ks(num_samples))
    summary["parse_failures"] = sum(answer is None for row in extracted for answer in row)
    records = []
    for ex, texts, answers, verdict, label in zip(examples, completions, extracted, correct, labels):
        winner = metrics.majority_index(label)
        records.append({"id": ex.id, "gold": ex.answer, "completions": list(texts), "extracted": answers,
                        "correct": verdict, "majority_answer": None if winner is None else answers[winner],
                        "majority_correct": winner is not None and verdict[winner]})
    return summary, records


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for package in ("jaxmath", "jax", "flax", "transformers", "vllm", "sympy", "math-verify"):
        try:
            out[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def evaluate(engine: Any, tokenizer: Any, cfg: EvalConfig, workdir: str | Path, meta: dict) -> dict:
    """Runs every benchmark in cfg and writes results under `<workdir>/eval/`.

    engine, tokenizer: a RolloutEngine and the model's HF tokenizer; both None for the file backend.
    meta:              recorded in results.json (model, config, ...); engine, versions and date are
                       filled in when missing.
    Returns the results dict: {benchmark: {"n", "accuracy", "ci95", "maj@k", "pass@k",
    "parse_failures", ...}, "meta": {...}}.
    """
    if cfg.backend != "file" and (engine is None or tokenizer is None):
        raise ValueError(f"backend {cfg.backend!r} needs an engine and a tokenizer; use backend 'file' to grade "
                         "existing completions")
    from jaxmath.distributed import is_writer

    out_dir = Path(workdir) / "eval"
    writes = is_writer()  # every process of a job generates and scores the same; process 0 writes
    if writes:
        out_dir.mkdir(parents=True, exist_ok=True)
    else:  # and shows the progress
        cfg = dataclasses.replace(cfg, progress=False)
    meta = {"engine": cfg.backend, "versions": _versions(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "eval_config": dataclasses.asdict(cfg), **meta}
    results: dict[str, Any] = {}
    fallbacks = cfg.fallbacks()
    for benchmark in cfg.benchmarks:
        all_examples = datasets.load(benchmark, cfg.data_dir)
        examples = all_examples[:cfg.limit] if cfg.limit > 0 else all_examples
        finish = None
        if cfg.backend == "file":
            completions = read_completions(cfg.completions, examples, {ex.id for ex in all_examples})
        else:
            completions, finish = generate_completions(engine, tokenizer, examples, cfg)
        summary, records = score(examples, completions, cfg, fallbacks.get(benchmark), cfg.maj_k)
        if finish is not None:
            summary["truncated"] = sum(reason != 0 for row in finish for reason in row)
            for record, reasons in zip(records, finish):
                record["finish_reasons"] = reasons
        results[benchmark] = summary
        if not writes:
            continue
        with (out_dir / f"completions_{benchmark}.jsonl").open("w", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
        log.info("%s: accuracy %.1f%% +- %.1f (n=%d, %d parse failures)", benchmark, 100 * summary["accuracy"],
                 100 * summary["ci95"], summary["n"], summary["parse_failures"])
    results["meta"] = meta
    if not writes:
        return results
    (out_dir / "results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False, default=str) + "\n")
    (out_dir / "results.md").write_text(report.single_run_markdown(results))
    return results
