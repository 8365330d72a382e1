"""A newcomer's first hour: the download command that exists, install steps in the order they are typed,
the quickstart's test command (which CI runs) with its time and the fast subset beside it, every key
described in full by `--keys`, a smoke run that says its figures are not results, and a short last line."""

import glob
import json
import os
import re
import subprocess
import sys

import pytest

from jaxmath import cli, demo, validate
from jaxmath.config import ConfigError, MODES, describe_keys, key_docs, load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(p for p in glob.glob(os.path.join(REPO, "configs", "*.py")) if "get_config" in open(p).read())


def _read(path: str) -> str:
    with open(os.path.join(REPO, path), encoding="utf-8") as f:
        return f.read()


def test_no_message_or_doc_names_the_retired_download_command():
    """huggingface_hub's current releases ship `hf download`; `huggingface-cli` is gone from them."""
    files = [p for pattern in ("jaxmath/**/*.py", "configs/*.py", "launch/*", "convert/*.py", "*.md", "docs/*.md")
             for p in glob.glob(os.path.join(REPO, pattern), recursive=True) if os.path.isfile(p)]
    retired = "huggingface" + "-cli"
    assert len(files) > 50
    assert not [os.path.relpath(p, REPO) for p in files if retired in open(p, encoding="utf-8").read()]


def test_a_missing_model_names_the_download_command_that_exists(tmp_path):
    cfg = load_config(os.path.join(REPO, "configs", "grpo_v2.py"))
    cfg.model.path = str(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="hf download Qwen/Qwen3-4B-Instruct-2507 --local-dir DIR"):
        validate.validate(cfg)
    cfg.model.path = ""
    with pytest.raises(ConfigError, match="`hf download Qwen/Qwen3-4B-Instruct-2507 --local-dir DIR`"):
        validate.validate(cfg)


def test_readme_install_steps_come_in_the_order_they_are_typed():
    readme = _read("README.md")
    quickstart = readme[readme.index("## Quickstart"):readme.index("What the demo prints")]
    lines = [line for block in re.findall(r"```bash\n(.*?)```", quickstart, re.S) for line in block.splitlines()]
    torch_line = next(i for i, line in enumerate(lines) if line.startswith("pip install torch=="))
    install = lines.index("pip install -e '.[test]'")
    demo_line = next(i for i, line in enumerate(lines) if line.startswith("python -m jaxmath.main"))
    assert torch_line < install < demo_line
    assert "download.pytorch.org/whl/cpu" in lines[torch_line]


def test_the_quickstart_test_command_is_the_whole_suite_with_its_time_and_the_fast_subset_beside_it():
    """CI runs the first README line that starts with `python -m pytest` (.ci/run); it must stay the whole
    suite, exactly runnable, with its time on the line and the fast subset on the next."""
    lines = _read("README.md").splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("python -m pytest"))
    command, _, comment = lines[first].partition("  #")
    # two pytest-xdist workers, each taking whole modules (their module fixtures are built once)
    assert command == "python -m pytest -q -n 2 --dist loadscope tests"
    assert re.search(r"whole suite: \d+ min \d+ s", comment)
    fast, _, fast_comment = lines[first + 1].partition("  #")
    assert fast == 'python -m pytest -q -n 2 --dist loadscope -m "not slow" tests'
    assert re.search(r"\d+ min \d+ s", fast_comment)
    ran = subprocess.run(["bash", "-c", f"eval 'echo {lines[first]}'"], capture_output=True, text=True)
    assert ran.stdout.strip() == command  # the comment does not reach pytest


def _balanced(text: str) -> bool:
    depth = 0
    for char in text:
        depth += {"(": 1, ")": -1}.get(char, 0)
        if depth < 0:
            return False
    return depth == 0 and text.count("`") % 2 == 0 and text.count('"') % 2 == 0


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_every_key_has_its_whole_description(path):
    """Every key of `--keys` has a meaning, read whole from its dataclass's docstring (a description cut
    mid-sentence leaves a parenthesis or a quote open)."""
    rows = describe_keys(load_config(path))
    assert not [key for key, _, meaning in rows if not meaning]
    assert not [(key, meaning) for key, _, meaning in rows if not _balanced(meaning)]


def test_init_checkpoint_is_described_to_the_end_of_its_sentence():
    from jaxmath.config import InitConfig

    assert key_docs(InitConfig)["checkpoint"].endswith("empty starts from model.path")


def test_keys_prints_one_line_per_key_with_its_meaning():
    out = subprocess.run([sys.executable, "-m", "jaxmath.main", "--config=configs/grpo_v2.py", "--keys"],
                         capture_output=True, text=True, cwd=REPO, env={**os.environ, "XLA_FLAGS": ""}, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = describe_keys(load_config(os.path.join(REPO, "configs", "grpo_v2.py")))
    lines = out.stdout.splitlines()
    assert len(lines) == len(rows) == len(set(key for key, _, _ in rows))
    for line, (key, _, meaning) in zip(lines, rows):
        assert line.startswith(f"{key} = ") and line.endswith(f"    # {meaning}"), line


def test_every_mode_section_is_walked():
    """describe_keys covers every section of every mode (the descriptions test above reaches them all)."""
    covered = {section.name for path in CONFIGS for section in MODES[load_config(path).mode]}
    assert covered == {section.name for sections in MODES.values() for section in sections}


def _demo_results(smoke: str) -> dict:
    arm = {"format_blind_accuracy": 0.0, "ci95": 0.0, "boxed_accuracy": 0.0, "boxed_ci95": 0.0, "unboxed_rate": 1.0,
           "format_blind_by_chained_carries": {"0": 0.0}}
    return {"arms": {"sft": {**arm, "steps": {"sft": 23}}, "sft_grpo": {**arm, "steps": {"sft": 20, "grpo": 3}}},
            "n_eval": 40, "held_out_by_chained_carries": {"0": 40}, "teacher": {"train_accuracy": 0.77,
            "held_out_accuracy": 0.78}, "branch": {"format_blind_accuracy": 0.0, "boxed_accuracy": 0.0},
            "format_blind_gain": -0.005, "intervals_overlap": True, "branch_step": 20, "seconds": 60.0,
            "cpu_seconds": 50.0, "smoke": smoke, "curve": {"sft": [{"step": s, "acc": 0.1} for s in range(400)]}}


def test_a_smoke_demo_says_its_figures_are_not_results():
    cfg = demo.DemoConfig()
    assert cfg.smoke_reason(100) == "" and "3 GRPO steps of the 100" in cfg.smoke_reason(3)
    table = demo.results_table(_demo_results(cfg.smoke_reason(3)))
    assert "A SMOKE RUN (3 GRPO steps of the 100 the demo's figures are for)" in table
    assert "they are not results" in table.splitlines()[1]  # above the table
    assert "SMOKE" not in demo.results_table(_demo_results(""))


def test_the_last_line_is_short_and_the_whole_summary_is_in_the_workdir(tmp_path):
    cfg = load_config(os.path.join(REPO, "configs", "demo.py"))
    cfg.steps = 3
    result = _demo_results(demo.DemoConfig().smoke_reason(3))
    assert len(json.dumps(result)) > 2000  # what the old `done: {...}` line printed
    line = cli.finish(cfg, str(tmp_path), result)
    assert len(line) < 300 and "\n" not in line
    assert line.startswith("done: SFT then GRPO minus SFT only: -0.5 points format-blind; a smoke run (3 GRPO")
    assert "its figures are not results" in line and line.endswith(str(tmp_path / cli.SUMMARY_FILE))
    assert json.loads((tmp_path / cli.SUMMARY_FILE).read_text()) == result
    cfg.steps = 100
    full = cli.finish(cfg, str(tmp_path), _demo_results(""))
    assert "smoke" not in full


def test_an_evaluation_on_a_few_problems_or_a_random_model_is_called_a_smoke_run(tmp_path):
    cfg = load_config(os.path.join(REPO, "configs", "eval.py"))
    result = {"math500": {"accuracy": 0.25, "n": 8}, "meta": {"huge": "x" * 5000}}
    cfg.model.path, cfg.eval.limit = "/models/qwen", 8
    line = cli.finish(cfg, str(tmp_path), result)
    assert line.startswith("done: math500 25.0%; a smoke run (the first 8 problems of each benchmark)")
    cfg.eval.limit = 0
    assert "smoke" not in cli.finish(cfg, str(tmp_path), result)
    cfg.model.path, cfg.model.preset = "", "tiny"
    assert "a smoke run (a randomly initialised tiny model)" in cli.finish(cfg, str(tmp_path), result)
