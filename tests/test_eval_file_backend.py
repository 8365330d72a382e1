"""The evaluator end to end: the file backend on MATH-500, sampled-mode voting, the engine path with a
test-double engine, results.json / results.md / completions JSONL, report merging and the config."""

import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pytest

from jaxmath.data import datasets
from jaxmath.eval import report
from jaxmath.eval.run import EvalConfig, evaluate
from jaxmath.reward.extract import extract_boxed
from jaxmath.rollout.types import FINISH_LENGTH, FINISH_STOP, Rollout

from tests.conftest import DATA_DIR as SHARED, TOKENIZER_DIR


def _write_completions(path, rows):
    path.write_text("".join(json.dumps({"id": i, "completions": c}) + "\n" for i, c in rows))
    return str(path)


def _replace_last_box(solution, new_content):
    start = solution.rfind("\\boxed")
    old = extract_boxed(solution)
    head, tail = solution[:start], solution[start:]
    return head + tail.replace("{" + old + "}", "{" + new_content + "}", 1)


@pytest.fixture(scope="module")
def math500():
    return datasets.load("math500", SHARED)


@pytest.fixture(scope="module")
def reference_run(math500, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reference")
    path = _write_completions(tmp / "ref.jsonl", [(ex.id, [ex.meta["solution"]]) for ex in math500])
    cfg = EvalConfig(benchmarks="math500", backend="file", completions=path, data_dir=str(SHARED), progress=False)
    return evaluate(None, None, cfg, tmp / "work", {"model": "reference solutions"}), tmp / "work"


def test_reference_solutions_score_100_percent(reference_run):
    results, workdir = reference_run
    entry = results["math500"]
    records = [json.loads(line) for line in (workdir / "eval" / "completions_math500.jsonl").open()]
    # all 500, including test/number_theory/459.json, whose solution ends with two boxes joined by
    # "or" (\\boxed{15\\frac{39}{40}}, or \\boxed{\\frac{639}{40}}), both equal to the gold
    assert [r["id"] for r in records if r["correct"] != [True]] == []
    assert entry["accuracy"] == 1.0
    assert (entry["n"], entry["parse_failures"]) == (len(records), 0)
    assert entry["maj@k"] == {"1": entry["accuracy"]} and entry["pass@k"] == {"1": entry["accuracy"]}


def test_reference_final_answers_score_exactly_100_percent(math500, tmp_path):
    rows = [(ex.id, ["The final answer is $\\boxed{" + ex.answer + "}$."]) for ex in math500]
    cfg = EvalConfig(benchmarks="math500", backend="file", completions=_write_completions(tmp_path / "a.jsonl", rows),
                     data_dir=str(SHARED), progress=False)
    entry = evaluate(None, None, cfg, tmp_path, {"model": "answers"})["math500"]
    assert (entry["n"], entry["accuracy"], entry["ci95"], entry["parse_failures"]) == (len(math500), 1.0, 0.0, 0)


def test_reference_run_files(reference_run):
    results, workdir = reference_run
    on_disk = json.loads((workdir / "eval" / "results.json").read_text())
    assert on_disk["math500"] == results["math500"]
    assert on_disk["meta"]["model"] == "reference solutions" and on_disk["meta"]["engine"] == "file"
    assert {"versions", "date", "eval_config"} <= set(on_disk["meta"])
    records = [json.loads(line) for line in (workdir / "eval" / "completions_math500.jsonl").open()]
    assert len(records) == results["math500"]["n"] and records[0]["extracted"] == [records[0]["gold"]]
    assert records[0]["correct"] == [True] and records[0]["majority_correct"] is True
    accuracy, ci = 100 * results["math500"]["accuracy"], 100 * results["math500"]["ci95"]
    assert f"| reference solutions | {accuracy:.1f} ± {ci:.1f} |" in (workdir / "eval" / "results.md").read_text()


def test_wrong_numbers_score_0_percent(math500, tmp_path):
    rows = [(ex.id, [_replace_last_box(ex.meta["solution"], "-987654321")]) for ex in math500]
    cfg = EvalConfig(benchmarks="math500", backend="file", completions=_write_completions(tmp_path / "w.jsonl", rows),
                     data_dir=str(SHARED), progress=False)
    results = evaluate(None, None, cfg, tmp_path, {"model": "wrong"})
    assert (results["math500"]["n"], results["math500"]["accuracy"], results["math500"]["parse_failures"]) == (len(math500), 0.0, 0)


def test_limit_and_missing_or_foreign_ids(math500, tmp_path):
    rows = [(ex.id, ["\\boxed{" + ex.answer + "}"]) for ex in math500[:5]]
    path = _write_completions(tmp_path / "five.jsonl", rows)
    cfg = EvalConfig(benchmarks="math500", backend="file", completions=path, data_dir=str(SHARED), limit=5,
                     progress=False)
    assert evaluate(None, None, cfg, tmp_path, {})["math500"]["n"] == 5
    with pytest.raises(ValueError, match=f"no completions for {len(math500) - 5} problems"):
        evaluate(None, None, dataclasses.replace(cfg, limit=0), tmp_path, {})
    foreign = _write_completions(tmp_path / "foreign.jsonl", rows + [("gsm8k_test_00000", ["\\boxed{18}"])])
    with pytest.raises(ValueError, match="'gsm8k_test_00000', which is not in the benchmark"):
        evaluate(None, None, dataclasses.replace(cfg, completions=foreign), tmp_path, {})


def test_sampled_mode_votes_equivalent_answers_together(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "math500.jsonl").write_text(
        json.dumps({"id": "half", "problem": "p1", "answer": "\\frac{1}{2}"}) + "\n"
        + json.dumps({"id": "three", "problem": "p2", "answer": "3"}) + "\n")
    rows = [
        # 1/2 written three ways outvotes the two 7s only if the spellings are grouped.
        ("half", ["\\boxed{7}", "\\boxed{\\frac12}", "\\boxed{7}", "\\boxed{0.5}", "\\boxed{1/2}"]),
        # 4 and 3 tie at two votes; 4 appears first and wins; one sample has no box.
        ("three", ["\\boxed{4}", "no answer here", "\\boxed{3}", "\\boxed{4}", "\\boxed{3}"]),
    ]
    cfg = EvalConfig(benchmarks="math500", backend="file", completions=_write_completions(tmp_path / "s.jsonl", rows),
                     data_dir=str(data), progress=False)
    entry = evaluate(None, None, cfg, tmp_path / "work", {"model": "toy"})["math500"]
    assert entry["num_samples"] == 5 and entry["parse_failures"] == 1
    assert entry["accuracy"] == pytest.approx((3 / 5 + 2 / 5) / 2)
    assert entry["maj@k"]["5"] == pytest.approx(0.5)
    assert set(entry["maj@k"]) == set(entry["pass@k"]) == {"1", "2", "4", "5"}
    assert entry["pass@k"]["5"] == 1.0
    assert entry["pass@k"]["1"] == pytest.approx(entry["accuracy"])
    records = [json.loads(line) for line in (tmp_path / "work" / "eval" / "completions_math500.jsonl").open()]
    assert records[0]["majority_answer"] == "\\frac12" and records[0]["majority_correct"] is True
    assert records[1]["majority_answer"] == "4" and records[1]["extracted"][1] is None
    assert "maj@4 | maj@5 | pass@2" in (tmp_path / "work" / "eval" / "results.md").read_text()


class FixedTokensTestDouble:
    """Test double for a RolloutEngine: every sample of every prompt is the same fixed token ids.

    It records the prompts and sampling params it was given so the test can check what the
    evaluator sends; it models nothing (a real engine comes from jaxmath.rollout).
    """

    def __init__(self, completion_ids, finish_reason):
        self.completion_ids = list(completion_ids)
        self.finish_reason = finish_reason
        self.calls = []

    def generate(self, prompts, params):
        self.calls.append(([list(p) for p in prompts], params))
        rows = len(prompts) * params.num_samples
        width = params.max_new_tokens
        ids = np.zeros((rows, width), np.int32)
        mask = np.zeros((rows, width), bool)
        length = min(len(self.completion_ids), width)
        ids[:, :length] = self.completion_ids[:length]
        mask[:, :length] = True
        return Rollout(prompt_ids=[list(p) for p in prompts], completion_ids=ids,
                       logprobs=np.zeros((rows, width), np.float32), completion_mask=mask,
                       finish_reason=np.full((rows,), self.finish_reason, np.int8),
                       prompt_index=np.repeat(np.arange(len(prompts), dtype=np.int32), params.num_samples))


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))


def test_engine_path_with_a_test_double(tokenizer, tmp_path):
    completion = tokenizer("So the total is $\\boxed{18}$.<|im_end|>", add_special_tokens=False)["input_ids"]
    engine = FixedTokensTestDouble(completion, FINISH_STOP)
    cfg = EvalConfig(benchmarks="gsm8k,aime24", backend="jax", data_dir=str(SHARED), limit=3, num_samples=2,
                     temperature=0.7, max_new_tokens=64, batch_size=2, few_shot=1, progress=False, seed=5)
    results = evaluate(engine, tokenizer, cfg, tmp_path, {"model": "double"})
    # gsm8k answers of the first three problems are 18, 3 and 70000: one of three is right.
    assert results["gsm8k"]["accuracy"] == pytest.approx(1 / 3)
    assert results["gsm8k"]["maj@k"] == {"1": pytest.approx(1 / 3), "2": pytest.approx(1 / 3)}
    assert results["aime24"]["accuracy"] == 0.0 and results["gsm8k"]["truncated"] == 0
    # 3 prompts in batches of 2 -> 2 calls per benchmark; seeds offset by the batch start.
    prompts_seen, params = engine.calls[0]
    assert [len(call[0]) for call in engine.calls] == [2, 1, 2, 1]
    assert [call[1].seed for call in engine.calls] == [5, 7, 5, 7]
    assert (params.num_samples, params.temperature, params.max_new_tokens) == (2, 0.7, 64)
    assert params.stop_token_ids == (151645, 151643)
    first_prompt = tokenizer.decode(prompts_seen[0])
    gsm8k = datasets.load("gsm8k", SHARED, limit=1)[0]
    assert gsm8k.problem in first_prompt and "Find the distance between the points" in first_prompt
    assert first_prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    record = json.loads((tmp_path / "eval" / "completions_gsm8k.jsonl").open().readline())
    assert record["completions"] == ["So the total is $\\boxed{18}$."] * 2 and record["finish_reasons"] == [0, 0]


def test_truncation_is_counted_and_prompt_budget_enforced(tokenizer, tmp_path):
    engine = FixedTokensTestDouble(tokenizer("no box yet", add_special_tokens=False)["input_ids"], FINISH_LENGTH)
    cfg = EvalConfig(benchmarks="aime25", data_dir=str(SHARED), limit=2, max_new_tokens=8, progress=False)
    entry = evaluate(engine, tokenizer, cfg, tmp_path, {})["aime25"]
    assert (entry["truncated"], entry["parse_failures"], entry["accuracy"]) == (2, 2, 0.0)
    with pytest.raises(ValueError, match="prompt of example aime2025_I_01 has .* over the budget of 50"):
        evaluate(engine, tokenizer, dataclasses.replace(cfg, max_prompt_tokens=50), tmp_path, {})


def test_eval_config_validation():
    with pytest.raises(ValueError, match="unknown names \\['math5000'\\]"):
        EvalConfig(data_dir="data", benchmarks="math5000")
    with pytest.raises(ValueError, match="file backend grades one benchmark"):
        EvalConfig(data_dir="data", benchmarks="math500,gsm8k", backend="file", completions="x.jsonl")
    with pytest.raises(ValueError, match="'gsm8k=lastnumber' must be <benchmark>=<fallback>"):
        EvalConfig(data_dir="data", answer_fallback="gsm8k=lastnumber")
    cfg = EvalConfig(data_dir="data", benchmarks=("gsm8k",), maj_k="1,16", answer_fallback="gsm8k=gsm8k")
    assert (cfg.benchmarks, cfg.maj_k, cfg.fallbacks()) == (("gsm8k",), (1, 16), {"gsm8k": "gsm8k"})
    with pytest.raises(ValueError, match="needs an engine and a tokenizer"):
        evaluate(None, None, EvalConfig(data_dir="data"), "/tmp/unused", {})


def test_config_file_builds_eval_config():
    from jaxmath.config import load_config

    config = load_config(str(Path(__file__).resolve().parents[1] / "configs" / "eval.py"))
    assert config.mode == "eval" and config.data.dir == "data"
    cfg = EvalConfig(data_dir=config.data.dir, **config.eval)
    assert set(config.eval) | {"data_dir"} == {f.name for f in dataclasses.fields(EvalConfig)}
    assert cfg.benchmarks == ("math500", "aime24", "aime25", "gsm8k", "olympiadbench")
    assert (cfg.temperature, cfg.num_samples, cfg.few_shot) == (0.01, 1, 4)
    with pytest.raises(AttributeError):
        config.eval.not_a_key = 1  # locked: an unknown override fails


def test_merge_results_table(reference_run, tmp_path):
    _, reference_workdir = reference_run
    other = {"math500": {"n": 500, "accuracy": 0.794, "ci95": 0.0354, "maj@k": {}, "pass@k": {}, "parse_failures": 0},
             "aime24": {"n": 30, "accuracy": 0.2, "ci95": 0.143, "maj@k": {}, "pass@k": {}, "parse_failures": 0},
             "meta": {"model": "baseline"}}
    (tmp_path / "results.json").write_text(json.dumps(other))
    table = report.merge_results([tmp_path, reference_workdir])
    lines = table.strip().splitlines()
    assert lines[0] == "| Model | MATH-500 | AIME 2024 |"
    assert lines[2] == "| baseline | 79.4 ± 3.5 | **20.0 ± 14.3** |"
    assert re.fullmatch(r"\| reference solutions \| \*\*(100\.0 ± 0\.0|99\.8 ± 0\.4)\*\* \| — \|", lines[3])
    with pytest.raises(FileNotFoundError, match="run the evaluation first"):
        report.load_results(tmp_path / "nowhere")


def test_voting_table_layout():
    sampled = {"aime24": {"n": 30, "num_samples": 64, "accuracy": 0.4, "ci95": 0.1,
                          "maj@k": {"1": 0.4, "16": 0.567, "64": 0.533}, "pass@k": {"1": 0.4, "16": 0.667, "64": 0.667},
                          "parse_failures": 0}}
    greedy = {"aime24": {"accuracy": 0.433}}
    lines = report.voting_table(sampled, greedy).strip().splitlines()
    assert lines[0] == "| Benchmark | Greedy | maj@16 | maj@64 | pass@16 | pass@64 |"
    assert lines[2] == "| AIME 2024 | 43.3 | 56.7 | 53.3 | 66.7 | 66.7 |"
    assert re.match(r"\| Benchmark \| Mean@1 \|", report.voting_table(sampled))
