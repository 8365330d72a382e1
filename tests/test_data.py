"""Loaders on the data the tests carry (or the staged files), counts against the full staged files,
clear errors, and the hub row mappers on hand-built rows."""

import json
import logging
import pytest

from jaxmath.data import datasets
from tests.conftest import DATA_DIR

COUNTS = {"math500": 500, "gsm8k": 1319, "gsm8k_train": 7473, "aime24": 30, "aime25": 30, "olympiadbench": 572,
          "olympiadbench_all": 675}


@pytest.mark.parametrize("name", sorted(COUNTS))
def test_benchmark_rows(name):
    examples = datasets.load(name, DATA_DIR)
    assert examples and len({ex.id for ex in examples}) == len(examples)
    assert all(ex.answer.strip() and ex.problem for ex in examples)
    assert all(ex.meta["source"] == name for ex in examples)


@pytest.mark.parametrize("name, count", sorted(COUNTS.items()))
def test_benchmark_counts(name, count, full_data_dir):
    assert len(datasets.load(name, full_data_dir)) == count


def test_math_train_raw_and_dropped_counts(full_data_dir):
    raw_all = datasets.load_math_train(full_data_dir, empty_answers="keep")
    raw_hard = datasets.load_math_train(full_data_dir, hard_only=True, empty_answers="keep")
    assert (len(raw_all), len(raw_hard)) == (7500, 3994)  # the study's counts are the raw file counts
    usable_all = datasets.load("math_train", full_data_dir)
    usable_hard = datasets.load("math_train_hard", full_data_dir)
    assert (len(usable_all), len(usable_hard)) == (7498, 3992)


def test_math_train_drops_the_two_empty_answers(caplog):
    raw_all = datasets.load_math_train(DATA_DIR, empty_answers="keep")
    raw_hard = datasets.load_math_train(DATA_DIR, hard_only=True, empty_answers="keep")
    with caplog.at_level(logging.WARNING):
        usable_all = datasets.load("math_train", DATA_DIR)
        usable_hard = datasets.load("math_train_hard", DATA_DIR)
    assert (len(raw_all) - len(usable_all), len(raw_hard) - len(usable_hard)) == (2, 2)
    assert "train/number_theory/7115.json" in caplog.text and "train/number_theory/7117.json" in caplog.text
    assert {ex.meta["level"] for ex in usable_hard} == {4, 5}


def test_limit_and_fields():
    examples = datasets.load("gsm8k", DATA_DIR, limit=3)
    assert [ex.id for ex in examples] == ["gsm8k_test_00000", "gsm8k_test_00001", "gsm8k_test_00002"]
    assert examples[0].answer == "18" and "#### 18" in examples[0].meta["solution"]
    first = datasets.load("math500", DATA_DIR, limit=1)[0]
    assert first.id == "test/precalculus/807.json" and first.meta["level"] == 2


def test_missing_file_error_says_how_to_get_data(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"math500\.jsonl not found.*python -m jaxmath\.data\.datasets"):
        datasets.load("math500", tmp_path)


def test_unknown_name():
    with pytest.raises(ValueError, match="unknown data set 'math5000'"):
        datasets.load("math5000", DATA_DIR)


def _write(tmp_path, rows, name="aime2024.jsonl"):
    (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_row_without_answer_is_an_error(tmp_path):
    _write(tmp_path, [{"id": "a", "problem": "1+1", "answer": "2"}, {"id": "b", "problem": "2+2"}])
    with pytest.raises(ValueError, match=r"aime2024\.jsonl:2 \(id b\) has no string 'answer'"):
        datasets.load("aime24", tmp_path)


def test_empty_answer_in_a_benchmark_is_an_error(tmp_path):
    _write(tmp_path, [{"id": "a", "problem": "1+1", "answer": " "}])
    with pytest.raises(ValueError, match=r"id a\) has an empty answer"):
        datasets.load("aime24", tmp_path)


def test_duplicate_id_is_an_error(tmp_path):
    _write(tmp_path, [{"id": "a", "problem": "p", "answer": "1"}, {"id": "a", "problem": "q", "answer": "2"}])
    with pytest.raises(ValueError, match="duplicate id a"):
        datasets.load("aime24", tmp_path)


def test_write_then_read_round_trip(tmp_path):
    examples = datasets.load("aime25", DATA_DIR)
    assert datasets.write_jsonl(examples, tmp_path / "aime2025.jsonl") == len(examples)
    assert datasets.load("aime25", tmp_path) == examples


def test_the_reward_extractor_reads_every_math500_answer_from_its_solution():
    """The one \\boxed{} extractor (jaxmath.reward.extract, which the hub MATH loader uses for answers)
    gives the stored answer of every MATH-500 problem from its reference solution."""
    from jaxmath.reward.extract import extract_boxed

    examples = datasets.load("math500", DATA_DIR)
    assert all(extract_boxed(ex.meta["solution"]) == ex.answer for ex in examples)


# Hub mappers on rows built by hand in each dataset's published schema.

def test_map_math500_row():
    row = {"problem": "P", "solution": "so \\boxed{3}", "answer": "3", "subject": "Algebra", "level": 4,
           "unique_id": "test/algebra/1.json"}
    ex = datasets.map_math500_row(row, 0)
    assert (ex.id, ex.answer, ex.meta["level"], ex.meta["subject"]) == ("test/algebra/1.json", "3", 4, "Algebra")


def test_map_hendrycks_math_row():
    row = {"problem": "P", "level": "Level 5", "type": "Number Theory",
           "solution": "first \\boxed{1}, finally $\\boxed{\\frac{7}{2}}$"}
    ex = datasets.map_hendrycks_math_row(row, 12, subject="number_theory", split="train")
    assert (ex.id, ex.answer, ex.meta["level"]) == ("train/number_theory/12", "\\frac{7}{2}", 5)
    unknown_level = datasets.map_hendrycks_math_row({**row, "level": "Level ?"}, 0, subject="geometry", split="train")
    assert unknown_level.meta["level"] is None


def test_map_gsm8k_row():
    row = {"question": "Q?", "answer": "3 * 500 = <<3*500=1500>>1500\n#### 1,500"}
    ex = datasets.map_gsm8k_row(row, 7, split="test")
    assert (ex.id, ex.problem, ex.answer, ex.meta["source"]) == ("gsm8k_test_00007", "Q?", "1500", "gsm8k")
    with pytest.raises(ValueError, match="no '#### <answer>' line"):
        datasets.map_gsm8k_row({"question": "Q", "answer": "no final line"}, 0, split="train")


def test_map_aime_rows():
    row24 = {"id": 60, "problem": "P", "solution": "S", "answer": "025", "year": "2024",
             "url": "https://artofproblemsolving.com/wiki/index.php/2024_AIME_II_Problems/Problem_4"}
    ex = datasets.map_aime2024_row(row24, 0)
    assert (ex.id, ex.answer, ex.meta["answer_raw"]) == ("aime2024_II_04", "25", "025")
    ex25 = datasets.map_aime2025_row({"problem_idx": 16, "problem": "P", "answer": 468}, 15)
    assert (ex25.id, ex25.answer, ex25.meta["problem_number"]) == ("aime2025_II_01", "468", 1)


def test_map_olympiadbench_row():
    row = {"id": 1606, "question": "Q", "final_answer": ["$\\frac{25}{2}$"], "answer_type": "Numerical",
           "subfield": "Algebra", "is_multiple_answer": False, "unit": None, "error": None, "solution": ["S"]}
    ex = datasets.map_olympiadbench_row(row, 0)
    assert (ex.id, ex.answer, ex.meta["answer_type"]) == ("olympiadbench_1606", "$\\frac{25}{2}$", "Numerical")
    with pytest.raises(ValueError, match="empty final_answer"):
        datasets.map_olympiadbench_row({**row, "final_answer": []}, 0)


def test_map_openr1_row_keeps_verified_short_traces():
    row = {"uuid": "u1", "problem": "P", "answer": "4", "problem_type": "Algebra", "question_type": "math-word",
           "source": "olympiads", "generations": ["short ok", "wrong", "a much longer correct trace"],
           "correctness_math_verify": [True, False, True]}
    assert datasets.map_openr1_row(row, 0).meta["traces"] == ["short ok", "a much longer correct trace"]
    assert datasets.map_openr1_row(row, 0, max_trace_chars=10).meta["traces"] == ["short ok"]


# Rows in OpenR1-Math-220k's schema (open-r1/OpenR1-Math-220k README: problem, solution, answer,
# problem_type, question_type, source, uuid, is_reasoning_complete, generations,
# correctness_math_verify, correctness_llama, finish_reasons, correctness_count, messages).
OPENR1_FIXTURE = [
    {"problem": "Find $x$ if $2x = 8$.", "solution": "x = 4", "answer": "4", "problem_type": "Algebra",
     "question_type": "math-word-problem", "source": "olympiads", "uuid": "a1", "is_reasoning_complete": [True, True],
     "generations": ["<think>2x=8</think> So \\boxed{4}.", "x = 5, \\boxed{5}"],
     "correctness_math_verify": [True, False], "correctness_llama": None, "finish_reasons": None,
     "correctness_count": 1, "messages": []},
    {"problem": "Compute $1+1$.", "solution": "2", "answer": "2", "problem_type": "Algebra",
     "question_type": "math-word-problem", "source": "amc_aime", "uuid": "b2", "is_reasoning_complete": [True],
     "generations": ["\\boxed{3}"], "correctness_math_verify": [False], "correctness_llama": None,
     "finish_reasons": None, "correctness_count": 0, "messages": []},
    {"problem": "What is $3^2$?", "solution": "9", "answer": "9", "problem_type": "Number Theory",
     "question_type": "math-word-problem", "source": "cn_contest", "uuid": "c3", "is_reasoning_complete": [True, True],
     "generations": ["\\boxed{9}", "Squaring, \\boxed{9}."], "correctness_math_verify": [True, True],
     "correctness_llama": None, "finish_reasons": None, "correctness_count": 2, "messages": []},
]


def test_download_all_writes_the_openr1_file(tmp_path, monkeypatch):
    """`python -m jaxmath.data.datasets --out data` writes openr1.jsonl (what the SFT sweep's v3 reads):
    one row per problem with a verified trace, `traces` holding only the verified ones. The hub is
    replaced by the fixture (OpenR1 rows) and empty sets for the other files."""
    asked = []

    def hub(path, name, split):
        asked.append((path, name, split))
        return OPENR1_FIXTURE if path == "open-r1/OpenR1-Math-220k" else []

    monkeypatch.setattr(datasets, "_hub_rows", hub)
    written = datasets.download_all(tmp_path)
    assert written[datasets.OPENR1_FILE] == 2 and ("open-r1/OpenR1-Math-220k", "default", "train") in asked
    rows = [json.loads(line) for line in (tmp_path / datasets.OPENR1_FILE).read_text().splitlines()]
    assert [(r["id"], r["problem"], r["traces"]) for r in rows] == [
        ("a1", "Find $x$ if $2x = 8$.", ["<think>2x=8</think> So \\boxed{4}."]),
        ("c3", "What is $3^2$?", ["\\boxed{9}", "Squaring, \\boxed{9}."])]
    assert [r["data_source"] for r in rows] == ["olympiads", "cn_contest"]
    assert datasets.OPENR1_FILE not in datasets.download_all(tmp_path / "no_openr1", openr1=False)


def test_hub_loader_without_datasets_package_says_what_to_install(monkeypatch):
    import builtins
    real_import = builtins.__import__

    def no_datasets(name, *args, **kwargs):
        if name == "datasets":
            raise ImportError("No module named 'datasets'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    with pytest.raises(ImportError, match="pip install datasets"):
        datasets.hub_math500()
