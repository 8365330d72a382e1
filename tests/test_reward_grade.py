"""Grader tests: a table of forms, peers' suite (shared dev cases), dataset golds, extraction."""

import json
from pathlib import Path

import pytest

from jaxmath.reward import equivalent, extract_answer, extract_boxed, grade

from tests.conftest import DATA_DIR as DATA

CASES = Path(__file__).resolve().parent / "grader_cases"

# (pred, gold, expected): one or more rows per form the issue lists.
TABLE = [
    # integers with separators, decimals
    ("7,425,000", "7425000", True), ("1\\,000", "1000", True), ("14{,}916", "14916", True),
    ("11,\\!111", "11111", True), ("1000.0", "1000", True), (".5", "0.5", True), ("0.50", "\\frac12", True),
    ("1001", "1000", False), ("32, 349", "32349", False),
    # a decimal rounded to k >= 2 places stands for the value; truncated, it does not
    ("0.667", "\\frac23", True), ("0.666", "\\frac23", False),
    ("125.664", "40\\pi", True), ("125.663", "40\\pi", False),
    # fractions and mixed numbers
    ("\\frac{1}{2}", "1/2", True), ("\\dfrac{3}{4}", "0.75", True), ("\\tfrac{2}{4}", "\\frac12", True),
    ("-\\frac{10}{9}", "-10/9", True), ("2\\frac{1}{2}", "\\frac{5}{2}", True), ("\\frac{1}{3}", "\\frac{2}{3}", False),
    # percentages, scientific notation
    ("28\\%", "28", True), ("28 percent", "28\\%", True), ("1.5\\times10^{3}", "1500", True), ("2e3", "2000", True),
    # roots, pi, degrees, text and units, dollar signs, spacing
    ("\\sqrt{117}", "3\\sqrt{13}", True), ("\\sqrt3", "\\sqrt{3}", True), ("\\frac{9}{4}\\pi", "\\frac{9\\pi}{4}", True),
    ("2\\pi", "\\pi", False), ("90^\\circ", "90", True), ("90^{\\circ}", "90", True),
    ("125\\text{ miles}", "125", True), ("15\\mbox{ cm}^2", "15", True), ("\\$18", "18", True),
    ("\\text{Evelyn}", "Evelyn", True), ("\\text{(C)}", "C", True), ("\\text{B}", "C", False),
    ("\\left( \\frac{1}{3} \\right)", "1/3", True), ("1\\!000", "1000", True),
    # tuples, intervals, sets, unordered lists
    ("(1, 4.5)", "(1,\\frac{9}{2})", True), ("(2, 1)", "(1, 2)", False), ("[0,1)", "[0,1)", True),
    ("(0,1)", "[0,1)", False), ("[-1, -\\tfrac12) \\cup (0, 1)", "[-1,-\\frac{1}{2})\\cup(0,1)", True),
    ("\\{3, 1, 2\\}", "\\{1,2,3\\}", True), ("2, 1", "1, 2", True), ("1, 2", "1, 2, 3", False),
    ("x \\in [-2,7]", "[-2, 7]", True), ("(0,1)", "0<x<1", True),
    # matrices
    ("\\begin{pmatrix}1 & 2\\\\3 & 4\\end{pmatrix}", "\\begin{bmatrix}1&2\\\\3&4\\end{bmatrix}", True),
    ("\\begin{pmatrix}1 & 2\\\\3 & 5\\end{pmatrix}", "\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}", False),
    # equations against values, relations
    ("x=3", "3", True), ("k = \\frac{1}{3}", "1/3", True), ("3", "x=3", True), ("11a+c", "7 = 11a+c", False),
    ("y=-\\frac{1}{2}x+\\frac{3}{4}", "2x+4y-3=0", True), ("-x > -1", "x < 1", True), ("x > -1", "x < 1", False),
    # symbolic expressions
    ("\\frac{x}{7}+\\frac{2}{7}", "\\frac{x+2}{7}", True), ("\\sec^2 y", "\\tan^2 y + 1", True),
    ("x^2+2x+1", "(x+1)^2", True), ("x^2+1", "(x+1)^2", False),
    # plus-minus, multiple answers
    ("1 \\pm \\sqrt{19}", "1+\\sqrt{19}, 1-\\sqrt{19}", True), ("\\pm 2021", "2021", False),
    ("-2, 1", "1 \\text{ and } -2", True),
    # completions
    ("so the answer is $\\boxed{\\frac{14}{3}}$.", "\\frac{14}{3}", True),
    ("\\boxed{1} and \\boxed{2}", "\\{1,2\\}", True),
    ("Final Answer: The final answer is $28 \\%$. I hope it is correct.", "28", True),
]


@pytest.mark.parametrize("pred,gold,expected", TABLE)
def test_table(pred, gold, expected):
    assert grade(pred, gold) is expected


def test_extract_boxed():
    assert extract_boxed("a \\boxed{\\frac{1}{2}} b \\boxed{3}") == "3"
    assert extract_boxed("so \\boxed{\\frac{a}{b^{2}}}.") == "\\frac{a}{b^{2}}"
    assert extract_boxed("\\fbox{7}") == "7"
    assert extract_boxed("answer \\boxed 5.") == "5"
    assert extract_boxed("no box here") is None
    assert extract_boxed("truncated \\boxed{12") == "12"
    # a box whose whole content is a box holds the inner content; boxes inside an expression stay
    assert extract_boxed("\\boxed{\\boxed{5}}") == "5"
    assert extract_boxed("\\boxed{ \\fbox{x^2} }") == "x^2"
    assert extract_boxed("\\boxed{\\boxed{1}+\\boxed{2}}") == "\\boxed{1}+\\boxed{2}"


def test_nested_box_is_decided_without_the_symbolic_worker():
    # was False on a cold process at timeout 1: "\\boxed{5}" vs "5" went to the symbolic worker
    assert grade("\\boxed{\\boxed{5}}", "5", timeout=0.05)


def test_extract_answer_fallbacks():
    gsm = "She makes 9 * 2 = $<<9*2=18>>18 every day.\n#### 18"
    assert extract_answer(gsm) is None
    assert extract_answer(gsm, fallback="gsm8k") == "18"
    assert extract_answer("It costs 1,200 dollars in total.", fallback="gsm8k") == "1200"
    assert extract_answer("So the answer is $\\frac{1}{2}$.", fallback="answer_is") == "\\frac{1}{2}"
    assert extract_answer("The answer is 42. Done", fallback="answer_is") == "42"
    assert extract_answer("\\boxed{3} and #### 4", fallback="gsm8k") == "3"
    with pytest.raises(ValueError):
        extract_answer("x", fallback="unknown")


def test_untrusted_text_is_never_evaluated(tmp_path, monkeypatch):
    # A relative marker: the payloads hold no digits of their own, so a grader that reads the last
    # number of an unboxed text cannot match "0" (os.system's return) from the temporary path's name.
    monkeypatch.chdir(tmp_path)
    marker = "pwned"
    payloads = [
        f"\\boxed{{__import__('os').system('touch {marker}')}}",
        f"__import__('os').system('touch {marker}')",
        f"\\boxed{{x = exec(\"open('{marker}','w')\")}}",
    ]
    for payload in payloads:
        assert grade(payload, "0") is False
        equivalent(payload, payload)
    assert not (tmp_path / marker).exists()


def _cases(name: str) -> list[dict]:
    with open(CASES / name) as handle:
        return [json.loads(line) for line in handle]


@pytest.mark.parametrize("name,floor", [("mathverify_suite.jsonl", 0.98), ("mined_dev.jsonl", 0.97)])
def test_case_files_accuracy(name, floor):
    """math-verify's suite (copied from ../shared, Apache-2.0) and the cases mined from other projects
    (tests/grader_cases/README.md), all development data. The held-out file is scored by the benchmark
    only (docs/GRADER.md), so that nothing here tunes the grader to it."""
    from jaxmath.reward import warmup

    cases = _cases(name)
    # At the reward's own bound (correctness_rewards grades with timeout=1.0), not a laxer one, with the
    # symbolic worker started first, as a training run's first reward batch starts it for the rest.
    warmup(1)
    wrong = [case["id"] for case in cases if grade(case["pred"], case["gold"], timeout=1.0) != case["expected"]]
    accuracy = 1 - len(wrong) / len(cases)
    assert accuracy >= floor, f"{name}: accuracy {accuracy:.3f}; wrong ids: {wrong}"


def test_case_files_carry_provenance():
    for name in ("mathverify_suite.jsonl", "mined_dev.jsonl"):
        for case in _cases(name):
            assert case["source"] and isinstance(case["expected"], bool), (name, case["id"])
    mined = _cases("mined_dev.jsonl")
    assert len(mined) == 522 and all(case["licence"] for case in mined)
    # The quarter once held out was read (rules and docs were written from it): it is development data now.
    assert sum(case.get("was", "").startswith("mined_heldout.jsonl #") for case in mined) == 131


def _jsonl(name: str) -> list[dict]:
    with open(DATA / name) as handle:
        return [json.loads(line) for line in handle]


# Neighbouring rows whose different golds are the same answer (read by hand): `5` and `x=5`.
_SAME_ANSWER_AS_NEXT = {"test/algebra/1837.json"}


def test_math500_golds_and_reference_solutions():
    """Every reference solution is graded correct against its own gold, and wrong against the next
    problem's gold (a different answer): a grader that said "equal" too readily would fail the second."""
    rows = _jsonl("math500.jsonl")
    assert rows
    not_graded = [row["id"] for row in rows if not grade(row["solution"], row["answer"])]
    assert not_graded == []
    pairs = [(row, rows[(i + 1) % len(rows)]) for i, row in enumerate(rows)]
    pairs = [(row, other) for row, other in pairs if row["id"] not in _SAME_ANSWER_AS_NEXT
             and row["answer"].replace(" ", "") != other["answer"].replace(" ", "")]
    assert len(pairs) >= len(rows) - 40
    graded_equal = [row["id"] for row, other in pairs if grade(row["solution"], other["answer"])]
    assert graded_equal == []


def test_olympiadbench_golds_boxed_against_their_own_and_the_next():
    """Each numerical gold, boxed, matches itself written as the dataset writes it (`$...$`, lists, units),
    and the next row's gold (a different answer) does not match it."""
    rows = _jsonl("olympiadbench_numerical.jsonl")
    failed = [row["id"] for row in rows if not grade(f"\\boxed{{{row['answer']}}}", row["answer"])]
    assert failed == []
    pairs = [(row, rows[(i + 1) % len(rows)]) for i, row in enumerate(rows)]
    pairs = [(row, other) for row, other in pairs if row["answer"].replace(" ", "") != other["answer"].replace(" ", "")]
    assert len(pairs) >= len(rows) - 60
    graded_equal = [row["id"] for row, other in pairs if grade(f"\\boxed{{{other['answer']}}}", row["answer"])]
    assert graded_equal == []


def test_gsm8k_and_aime_integers():
    rows = _jsonl("gsm8k_test.jsonl")[:200] + _jsonl("aime2024.jsonl")
    assert all(grade(f"The answer is \\boxed{{{row['answer']}}}.", row["answer"]) for row in rows)
    assert not any(grade(f"\\boxed{{{int(float(row['answer'])) + 1}}}", row["answer"]) for row in rows)


def test_reward_evaluation_and_distillation_give_the_same_verdicts():
    """One grading function (`grade_completion` / `grade_completions`) behind the training reward,
    evaluation's scoring and distillation's filter: on the development cases and on answers whose
    boxes are adjacent, nested or unboxed, the three paths agree on the answer read and the verdict."""
    from jaxmath import distill
    from jaxmath.data.datasets import Example
    from jaxmath.eval.run import EvalConfig, score
    from jaxmath.reward import correctness_rewards, grade_completion, warmup

    warmup(1)  # a cold symbolic worker would make the first path's slow cases time out, not differ
    crafted = [("\\boxed{1}, \\boxed{2}", "1, 2"), ("\\boxed{1}\\boxed{2}", "2"), ("so \\boxed{\\frac{1}{2}}", "0.5"),
               ("\\boxed{x = 3}", "3"), ("The answer is 7.", "7"), ("\\boxed{\\boxed{5}}", "5"),
               ("first \\boxed{4} then \\boxed{6}", "4"), ("\\boxed{}", "0"), ("\\fbox{12}", "12")]
    cases = [(c["pred"], c["gold"]) for c in _cases("mined_dev.jsonl")[:150]] + crafted
    texts, golds = [t for t, _ in cases], [g for _, g in cases]

    rewards, reward_answers = correctness_rewards(texts, golds, timeout=5.0)
    examples = [Example(id=str(i), problem="", answer=g) for i, g in enumerate(golds)]
    _, records = score(examples, [[t] for t in texts], EvalConfig(data_dir="unused", timeout=5.0, progress=False))
    cfg = distill.DistillConfig(endpoint="http://teacher:8000/v1", grade_timeout=5.0)
    rows = [distill._grade(cfg, {"id": str(i), "trace": t, "answer": g}) for i, (t, g) in enumerate(cases)]

    reference = [grade_completion(t, g, timeout=5.0) for t, g in cases]
    assert [r.correct for r in reference] == [bool(r) for r in rewards] == [rec["correct"][0] for rec in records] \
        == [row["correct"] for row in rows]
    assert [r.answer for r in reference] == reward_answers == [rec["extracted"][0] for rec in records] \
        == [row["extracted"] for row in rows]


def test_bench_grader_reports_precision_and_recall(tmp_path, capsys):
    """`python -m jaxmath.bench grader`: precision and recall of "equivalent" beside accuracy, for both
    graders, from a case file where each verdict is certain (3 = 3, 4 != 3) and the labels are set to
    give one of each outcome: a true and a false "equal", a true and a false "not equal"."""
    from jaxmath.bench import grader as bench

    rows = [("3", "3", True), ("4", "3", True), ("4", "3", False), ("3", "3", False), ("5", "5", True)]
    path = tmp_path / "cases.jsonl"
    path.write_text("".join(json.dumps({"id": i, "pred": p, "gold": g, "expected": e}) + "\n"
                            for i, (p, g, e) in enumerate(rows)))
    result = bench.main(["--cases", str(path)])
    assert (result["true_equal"], result["false_equal"], result["true_not_equal"], result["false_not_equal"]) \
        == (2, 1, 1, 1)
    assert result["precision"] == pytest.approx(2 / 3, abs=1e-4) and result["recall"] == pytest.approx(2 / 3, abs=1e-4)
    assert result["accuracy"] == pytest.approx(0.6) and result["equivalent"] == 3
    printed = capsys.readouterr().out
    assert "precision 66.67%" in printed and "recall 66.67%" in printed
    # math-verify's side, called as its documentation says: LaTeX inside $...$ unless delimited or boxed
    assert bench.math_verify_text("\\frac{1}{2}") == "$\\frac{1}{2}$"
    assert bench.math_verify_text("so \\boxed{4}.") == "so \\boxed{4}."
    assert bench.math_verify_text("$x$ and \\(y\\)") == "$x$ and \\(y\\)"
    pytest.importorskip("math_verify")
    assert (result["math_verify_precision"], result["math_verify_recall"]) == (result["precision"], result["recall"])
    assert "math-verify" in printed and "verify(parse(gold), parse(pred))" in printed
