"""Every key of every shipped config, set on the command line to a value of the wrong type and to one out of
its range, ends in one line naming the key, or passes: never a traceback, never a check left for later.

The walk goes through `cli.settings_error`, the same parsing (absl, `--config.KEY=VALUE`) and checks
(`jaxmath.validate.check`) a run makes before any work, in this process (`--check` prints the same line); one
subprocess confirms that line is what the user sees, with exit code 2.

What counts as out of range, by the key's default value: a number below the key's rule in
`jaxmath.config.RULES` (every numeric key has one, else NaN), a name that is none of the allowed ones
for a string key (only the free-text keys in FREE_TEXT may take any string).
"""

import functools
import glob
import math
import os
import subprocess
import sys

import pytest

from jaxmath import cli, validate
from jaxmath.config import Range, describe_keys, load_config, rule

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE_DATA = os.path.join(REPO, "tests", "fixtures", "data")
CONFIGS = sorted(os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "configs", "*.py"))
                 if "get_config" in open(p).read())
# What makes each mode's shipped config pass on this machine, so that the walk reaches every check: the
# fixture data, a model folder that exists, an endpoint for distillation.
BASE = (f"--config.data.dir={FIXTURE_DATA}", f"--config.model.path={FIXTURE_DATA}",
        f"--config.init.checkpoint={FIXTURE_DATA}", "--config.distill.endpoint=http://localhost:1/v1")
# Keys that take any text (paths, names, prompts, URLs): a stray value there is the user's to choose.
FREE_TEXT = {"workdir", "data.dir", "model.path", "init.checkpoint", "prompt.system", "eval.system_prompt",
             "eval.completions", "distill.api_key_env", "distill.model", "distill.output", "distill.system_prompt",
             "distill.endpoint", "sft.train_files", "vllm.served_model_name", "vllm.shm_dir", "vllm.url",
             "sft.train_sources"}  # the `source` names of the trace file's rows, known once it is read
BAD_NAME = "no-such-value"


@pytest.fixture(autouse=True)
def _vllm_installed(monkeypatch):
    """The study configs roll out on vLLM: the walk checks their vllm settings as if it were installed
    (that it is not is a check of its own, tests/test_cli.py)."""
    monkeypatch.setattr(validate, "require_vllm", lambda cfg: None)


def _argv(config: str, *overrides: str) -> list[str]:
    return ["jaxmath.main", f"--config={config}", *_base(config), *overrides]


@functools.lru_cache(maxsize=None)
def _base(config: str) -> tuple[str, ...]:
    keys = {key for key, _, _ in describe_keys(load_config(os.path.join(REPO, config)))}
    return tuple(arg for arg in BASE if arg[len("--config."):].split("=")[0] in keys)


def _cases(config: str):
    """(key, kind, value, must_refuse) for every key of the config's `--keys` output."""
    cfg = load_config(os.path.join(REPO, config))
    for key, value, _ in describe_keys(cfg):
        if key == "mode":
            continue
        key_rule = rule(key, cfg.mode)
        if isinstance(value, bool):
            yield key, "wrong type", "maybe", True
        elif isinstance(value, (int, float)):
            yield key, "wrong type", "abc", True
            if isinstance(key_rule, Range):
                low = key_rule.low if key_rule.low is not None else 0
                below = math.floor(low) - 1 if isinstance(value, int) else (low - 1.0 if low >= 1e-200 else -1.0)
                yield key, "out of range", str(below), True
            else:
                yield key, "out of range", "nan" if isinstance(value, float) else str(-2 ** 40), True
            if isinstance(value, float):
                yield key, "not finite", "inf", True
        else:  # a string (a placeholder or a comma-separated list included)
            yield key, "wrong type", "3", False
            yield key, "out of range", BAD_NAME, key not in FREE_TEXT


def test_every_numeric_key_has_a_rule():
    """A number with no rule would pass any value through to the run; each has its range in RULES."""
    missing = set()
    for config in CONFIGS:
        for key, value, _ in describe_keys(load_config(os.path.join(REPO, config))):
            if isinstance(value, (int, float)) and not isinstance(value, bool) and rule(key, "") is None:
                missing.add(key)
    assert not missing, sorted(missing)


@pytest.mark.parametrize("config", CONFIGS)
def test_every_key_refuses_bad_values_in_one_line(config):
    assert cli.settings_error(_argv(config)) is None  # the config as shipped (on the fixtures) passes
    problems = []
    for key, kind, value, must_refuse in _cases(config):
        line = cli.settings_error(_argv(config, f"--config.{key}={value}"))
        if line is None:
            if must_refuse:
                problems.append(f"{key}={value} ({kind}) passed")
            continue
        if "\n" in line or not line.startswith("error: "):
            problems.append(f"{key}={value} ({kind}): not one line: {line!r}")
        elif key not in line and key.rsplit(".", 1)[-1] not in line:
            problems.append(f"{key}={value} ({kind}): the line does not name the key: {line}")
    assert not problems, "\n".join(problems)


def test_the_line_is_what_the_command_prints_with_exit_2(tmp_path):
    argv = _argv("configs/grpo_v1.py", "--config.rl.adv_scale=zscore", "--config.rollout.engine=jax")
    line = cli.settings_error(argv)
    assert line and "rl.adv_scale='zscore'" in line
    out = subprocess.run([sys.executable, "-m", "jaxmath.main", *argv[1:], f"--workdir={tmp_path}", "--check"],
                         capture_output=True, text=True, cwd=REPO, env={**os.environ, "XLA_FLAGS": ""}, timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert [x for x in out.stderr.splitlines() if x.startswith("error:")] == [line + "  (--debug shows the traceback)"]
    assert not os.listdir(tmp_path)
    passing = subprocess.run([sys.executable, "-m", "jaxmath.main", *_argv("configs/demo.py")[1:], "--check"],
                             capture_output=True, text=True, cwd=REPO, env={**os.environ, "XLA_FLAGS": ""}, timeout=120)
    assert passing.returncode == 0 and "every setting passes" in passing.stdout, passing.stderr[-2000:]
