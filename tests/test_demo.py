"""The demo: its task, tokenizer and imperfect teacher (exact, fast), and the command's contract at a
tiny size (both arms, the results schema, the plots, and a rerun that reuses the finished work)."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from jaxmath.data import demo_task
from jaxmath.reward import extract_boxed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLUMN = re.compile(r"(\d)\+(\d)(\+1)?=(\d+)")


def _columns(solution: str) -> list[tuple[int, int, bool, int]]:
    """(digit, digit, carry added, written sum) per column of a worked solution, ones first."""
    return [(int(a), int(b), bool(c), int(s)) for a, b, c, s in COLUMN.findall(solution)]


def test_worked_solution_with_every_carry_is_right():
    rng = np.random.default_rng(0)
    for digits in (1, 2, 3, 4):
        for a, b in rng.integers(10 ** (digits - 1), 10 ** digits, size=(200, 2)):
            text = demo_task.worked_solution(int(a), int(b))
            assert re.fullmatch(r"(\d\+\d(\+1)?=\d+ )+\\boxed\{\d+\}", text), text
            assert extract_boxed(text) == str(a + b)
            assert len(_columns(text)) == digits
    assert demo_task.worked_solution(347, 685) == "7+5=12 4+8+1=13 3+6+1=10 \\boxed{1032}"
    # dropping the carry into the tens: the later columns follow the sums as written
    assert demo_task.worked_solution(347, 685, [True, False, True]) == "7+5=12 4+8=12 3+6+1=10 \\boxed{1022}"


def test_teacher_drops_carries_at_the_stated_rates_and_always_boxes():
    train, _ = demo_task.AdditionTask(digits=3, seed=0).split(num_eval=0, num_train=6000)
    met = {"plain": 0, "chained": 0}
    dropped = {"plain": 0, "chained": 0}
    for e in train:
        text = demo_task.teacher_solution(e, drop_carry=0.1, drop_chained_carry=0.7, seed=0)
        assert text.endswith("}") and "\\boxed{" in text
        columns = _columns(text)
        carry = False
        for a, b, added, written in columns:
            assert written == a + b + added  # the teacher adds correctly; it only forgets carries
            if carry:
                kind = "chained" if a + b >= 9 else "plain"
                met[kind] += 1
                dropped[kind] += not added
            else:
                assert not added
            carry = written >= 10
        if e.meta["carries"] == 0:
            assert extract_boxed(text) == e.answer
    for kind, rate in (("plain", 0.1), ("chained", 0.7)):
        n = met[kind]
        assert n > 1000
        # a binomial proportion within 4 standard deviations of the stated rate
        assert abs(dropped[kind] / n - rate) < 4 * np.sqrt(rate * (1 - rate) / n), (kind, dropped[kind], n)
    # the same problem gets the same trace in every process; another seed draws other traces
    e = train[0]
    assert demo_task.teacher_solution(e, 0.1, 0.7, seed=0) == demo_task.teacher_solution(e, 0.1, 0.7, seed=0)
    assert {demo_task.teacher_solution(x, 0.5, 0.5, seed=0) for x in train[:50]} != \
        {demo_task.teacher_solution(x, 0.5, 0.5, seed=1) for x in train[:50]}


def test_split_is_disjoint_seeded_and_counts_carries():
    task = demo_task.AdditionTask(digits=2, seed=3)
    train, held = task.split(num_eval=100, num_train=500)
    assert len(train) == 500 and len(held) == 100
    assert not {e.id for e in train} & {e.id for e in held}
    assert [e.id for e in held] == [e.id for e in task.split(num_eval=100, num_train=500)[1]]
    assert [e.id for e in held] != [e.id for e in demo_task.AdditionTask(digits=2, seed=4).split(100, 500)[1]]
    example = demo_task._example(95, 17)  # 5+7=12 carries into 9+1, which overflows again
    assert example.meta == {"a": 95, "b": 17, "carries": 1, "chained_carries": 1}
    assert demo_task._example(15, 17).meta["chained_carries"] == 0  # the carry lands in 1+1
    assert all(10 <= e.meta["a"] <= 99 and e.answer == str(e.meta["a"] + e.meta["b"]) for e in train)
    with pytest.raises(ValueError, match="fewer than"):
        demo_task.AdditionTask(digits=1).split(num_eval=50, num_train=50)


def test_tokenizer_round_trip_with_the_boxed_token():
    tokenizer = demo_task.CharTokenizer()
    text = demo_task.worked_solution(47, 85)
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert len(ids) == len(text) - len("\\boxed{") + 1
    assert max(ids) < tokenizer.vocab_size and demo_task.EOS not in ids
    with pytest.raises(ValueError, match="alphabet"):
        tokenizer.encode("12?")


def test_format_blind_grading_ignores_the_box():
    assert demo_task.format_blind_correct("7+5=12 4+8+1=13 \\boxed{132}", "132")
    assert demo_task.format_blind_correct("7+5=12 4+8+1=13 132", "132")
    assert not demo_task.format_blind_correct("7+5=12 4+8+1=13", "132")
    assert not demo_task.format_blind_correct("\\boxed{}", "132")


def _lines(path) -> list[dict]:
    return [json.loads(line) for line in open(path) if line.strip()]


@pytest.mark.slow  # the demo command twice, ~1.5 min
def test_demo_command_contract_and_rerun(tmp_path):
    """The README's first command at a tiny size: both arms, every figure in [0, 1], the plots, and
    a second run of the same command that reuses the finished work instead of training again.
    About 3 minutes on the shared 2-core machine (load average 8), 90 s of it CPU time; most of it
    is compilation, which the tiny sizes do not shorten."""
    command = [sys.executable, "-m", "jaxmath.main", "--config=configs/demo.py", "--config.steps=3",
               "--config.demo.num_eval=40", "--config.demo.num_train=400", "--config.demo.hidden_size=32",
               "--config.demo.intermediate_size=64", "--config.demo.num_layers=1", "--config.demo.head_dim=8",
               "--config.demo.sft_batch_size=16", "--config.demo.sft_eval_every=10", "--config.rl.eval_every=2",
               "--config.rl.prompts_per_step=4", f"--workdir={tmp_path}"]
    out = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.load(open(tmp_path / "demo_results.json"))
    assert set(results) >= {"arms", "n_eval", "seconds", "teacher", "curve", "branch_step", "budget_steps"}
    assert results["n_eval"] == 40 and results["seconds"] > 0
    prefix, budget = results["branch_step"], results["budget_steps"]
    assert budget == prefix + 3
    for arm in ("sft", "sft_grpo"):
        figures = results["arms"][arm]
        for key in ("boxed_accuracy", "format_blind_accuracy", "ci95", "unboxed_rate"):
            assert 0.0 <= figures[key] <= 1.0, (arm, key, figures[key])
        p = figures["format_blind_accuracy"]
        assert figures["ci95"] == pytest.approx(1.96 * np.sqrt(p * (1 - p) / 40))
    assert results["arms"]["sft"]["steps"] == {"sft": budget}
    assert results["arms"]["sft_grpo"]["steps"] == {"sft": prefix, "grpo": 3}
    assert 0.0 < results["teacher"]["train_accuracy"] < 1.0
    # both arms' curves start from the same point and end at the same budget
    curves = results["curve"]
    assert curves["sft"][0]["step"] == 0 and curves["sft"][-1]["step"] == budget
    assert [r["step"] for r in curves["sft_grpo"]] == [prefix + 2, budget]
    grpo_rows, sft_rows = _lines(tmp_path / "grpo" / "metrics.jsonl"), _lines(tmp_path / "sft" / "metrics.jsonl")
    assert [r["step"] for r in grpo_rows] == [1, 2, 3] and "eval_format_blind_accuracy" in grpo_rows[1]
    assert [r["step"] for r in sft_rows] == list(range(1, budget + 1))
    for name in ("demo_accuracy.png", "demo_unboxed.png"):
        assert (tmp_path / "plots" / name).stat().st_size > 10_000
    assert "SFT only" in out.stdout and "format-blind" in out.stdout
    assert "A SMOKE RUN (3 GRPO steps of the 100" in out.stdout  # its figures are not results
    last = out.stderr.strip().splitlines()[-1]  # short, pointing at the whole summary
    assert "] done: SFT then GRPO minus SFT only" in last and "run_summary.json" in last and len(last) < 400, last

    evaluations = (tmp_path / "held_out.jsonl").read_text()
    again = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (tmp_path / "held_out.jsonl").read_text() == evaluations  # nothing evaluated twice
    assert _lines(tmp_path / "grpo" / "metrics.jsonl") == grpo_rows  # nor trained twice
    assert _lines(tmp_path / "sft" / "metrics.jsonl") == sft_rows
    rerun = json.load(open(tmp_path / "demo_results.json"))
    assert rerun["arms"] == results["arms"]


def test_a_workdir_refuses_a_run_with_other_settings(tmp_path):
    from jaxmath import demo
    from jaxmath.config import ConfigError

    plan = {"seed": 0, "demo.drop_chained_carry": 0.7, "rl.steps": 100}
    demo._check_plan(tmp_path / "demo_plan.json", plan)
    demo._check_plan(tmp_path / "demo_plan.json", dict(plan))  # the same settings resume
    with pytest.raises(ConfigError, match=r"demo.drop_chained_carry: 0.7 -> 0.6.*fresh --workdir"):
        demo._check_plan(tmp_path / "demo_plan.json", {**plan, "demo.drop_chained_carry": 0.6})


def test_plots_have_labelled_axes_and_a_fixed_percent_axis():
    from matplotlib.figure import Figure

    from jaxmath import metrics

    fig = metrics.series_figure({"SFT only, format-blind": ([0, 10], [50.0, 52.0]),
                                 "SFT then GRPO, format-blind": ([10, 20], [52.0, 90.0]),
                                 "SFT only, boxed reward": ([0, 10], [50.0, 52.0])},
                                xlabel="optimizer steps", ylabel="accuracy (%)", ylim=(0, 100), vline=(10, "GRPO"))
    ax = fig.axes[0]
    assert (ax.get_xlabel(), ax.get_ylabel(), ax.get_ylim()) == ("optimizer steps", "accuracy (%)", (0.0, 100.0))
    lines = ax.get_lines()
    # an arm's two gradings share a colour; the second is dashed
    assert lines[0].get_color() == lines[2].get_color() != lines[1].get_color()
    assert lines[2].get_linestyle() == "--"
    # the GRPO metric plots label both axes too
    ax = Figure().add_subplot()
    metrics._draw(ax, np.arange(3.0), np.ones(3), "reward_mean")
    assert ax.get_xlabel() == "optimizer step" and ax.get_ylabel() == "reward_mean"


@pytest.mark.slow  # the whole demo at seed 0: about 2 min alone on 2 cores (docs/DEMO.md), several under load
def test_demo_headline_grpo_beats_sft_seed0(tmp_path):
    """The README's headline, on the README's command (configs/demo.py, seed 0): after the same number of
    optimizer steps, the GRPO arm's held-out greedy accuracy, graded format-blind (the last number), beats
    the SFT arm's by at least 10 points, and their 95% intervals do not overlap. The printed figure is
    +24.2 points; the margin allows for another processor's float rounding (docs/DEMO.md)."""
    command = [sys.executable, "-m", "jaxmath.main", "--config=configs/demo.py", "--config.seed=0",
               f"--workdir={tmp_path}"]
    out = subprocess.run(command, capture_output=True, text=True, timeout=1800, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.load(open(tmp_path / "demo_results.json"))
    sft, grpo = results["arms"]["sft"], results["arms"]["sft_grpo"]
    assert results["n_eval"] == 400 and sft["steps"] == {"sft": 400} and grpo["steps"] == {"sft": 300, "grpo": 100}
    gain = grpo["format_blind_accuracy"] - sft["format_blind_accuracy"]
    assert gain >= 0.10, f"GRPO {grpo['format_blind_accuracy']:.3f} vs SFT {sft['format_blind_accuracy']:.3f}"
    assert results["format_blind_gain"] == pytest.approx(gain)
    # the intervals apart, from the arms' own figures, and as the run reports it
    assert sft["format_blind_accuracy"] + sft["ci95"] < grpo["format_blind_accuracy"] - grpo["ci95"]
    assert results["intervals_overlap"] is False
    assert "the 95% intervals do not overlap" in out.stdout
