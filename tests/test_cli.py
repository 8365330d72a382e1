"""The command line a person uses: settings checked before any work, one line (exit 2) for what they can
fix, --help and --keys, a workdir that remembers its run, Ctrl-C, and a log that reads.

Fast tests check settings in-process (`validate.validate`, `workdir_lib.prepare_workdir`) and run `jaxmath.main` in a
subprocess only where the exit path itself is the contract (about 10 processes that stop before any
model work: ~80 s on 2 loaded cores). The slow tests interrupt a real demo run and train GRPO 3 steps.
"""

import glob
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from jaxmath import cli, runs, validate
from jaxmath import workdir as workdir_lib
from jaxmath.config import ConfigError, check_settings, load_config, resume_conflicts

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = sorted(p for p in glob.glob(os.path.join(REPO, "configs", "*.py")) if "get_config" in open(p).read())


def _cli(*args, env=None, timeout=120):
    env = {**os.environ, "XLA_FLAGS": "", "PYTHONPATH": REPO, **(env or {})}
    return subprocess.run([sys.executable, "-m", "jaxmath.main", *args], capture_output=True, text=True, cwd=REPO,
                          env=env, timeout=timeout)


def _one_line_error(out, *needles):
    """Exit 2, exactly one `error:` line holding every needle, and no traceback."""
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert out.returncode == 2, out.stderr[-3000:]
    assert len(errors) == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def _config(name: str, **overrides):
    cfg = load_config(os.path.join(REPO, "configs", f"{name}.py"))
    for key, value in overrides.items():
        *sections, leaf = key.split(".")
        node = cfg
        for section in sections:
            node = node[section]
        node[leaf] = value
    return cfg


# --- settings checked before any work (issue 19.3) -----------------------------------------------


@pytest.mark.parametrize("name,key,value,message", [
    ("demo", "steps", 0, "steps=0 is out of range: it must be >= 1"),
    ("demo", "steps", -5, "steps=-5"),
    ("demo", "checkpoint_every", -1, "checkpoint_every=-1"),
    ("demo", "demo.drop_carry", 1.5, "demo.drop_carry=1.5"),
    ("demo", "demo.num_heads", 0, "demo.num_heads=0"),
    ("grpo_v2", "rl.num_generations", 1, "rl.num_generations=1"),
    ("grpo_v2", "rl.warn_zero_std", 2.0, "rl.warn_zero_std=2.0"),
    ("grpo_v2", "model.attention_impl", "flash", "model.attention_impl='flash' is not one of"),
    ("grpo_v2", "rollout.engine", "tpu", "rollout.engine='tpu' is not one of"),
    ("grpo_v2", "optimizer.b2", 1.5, "optimizer.b2=1.5"),
    ("grpo_v2", "vllm.gpu_memory_utilization", 1.2, "vllm.gpu_memory_utilization=1.2"),
    ("grpo_v2", "loss.loss_agg", "mean_of_everything", "loss_agg must be one of"),
    ("grpo_v2", "loss.micro_batch_rows", 24, "loss.micro_batch_rows=24 does not divide the step's 128 rows"),
    ("eval", "eval.backend", "tpu", "eval.backend must be one of"),
    ("eval", "eval.num_samples", 0, "eval.num_samples=0"),
    ("sft_config_a", "sft.batch_size", 0, "sft.batch_size=0"),
    ("sft_config_a", "steps", -1, "steps=-1 is out of range: it must be >= 0 (0 runs sft.epochs passes)"),
    ("distill", "distill.concurrency", 0, "distill.concurrency=0"),
])
def test_a_bad_setting_is_refused_naming_its_key(name, key, value, message):
    with pytest.raises(ConfigError) as caught:
        validate.validate(_config(name, **{key: value}))
    assert message in str(caught.value)


def test_checkpoint_every_zero_is_accepted():
    validate.validate(_config("demo", checkpoint_every=0))  # "at the end only" (rl.loop, sft.loop)


@pytest.mark.parametrize("path", SHIPPED, ids=os.path.basename)
def test_every_shipped_config_passes_the_rules(path):
    check_settings(load_config(path))


def test_model_path_missing_or_a_file(tmp_path):
    with pytest.raises(ConfigError, match="model.path /nonexistent/model does not exist; download"):
        validate.validate(_config("grpo_v2", **{"model.path": "/nonexistent/model"}))
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"")
    with pytest.raises(ConfigError, match="is a file"):
        validate.validate(_config("grpo_v2", **{"model.path": str(weights)}))


# --- one line for what the user can fix (19.4, 14.5) -----------------------------------------------


def test_unknown_key_names_the_nearest(tmp_path):
    out = _cli("--config=configs/demo.py", "--config.stepz=3", f"--workdir={tmp_path}")
    _one_line_error(out, "'stepz'", "--config.steps")


def test_bad_value_type_names_the_key(tmp_path):
    _one_line_error(_cli("--config=configs/demo.py", "--config.steps=abc", f"--workdir={tmp_path}"), "config.steps")


def test_missing_config_file_names_it_and_the_nearest(tmp_path):
    _one_line_error(_cli("--config=configs/dmo.py", f"--workdir={tmp_path}"), "configs/dmo.py", "configs/demo.py")


def test_bad_setting_end_to_end_and_debug_shows_the_traceback(tmp_path):
    args = ("--config=configs/demo.py", "--config.steps=-5", f"--workdir={tmp_path}")
    _one_line_error(_cli(*args), "steps=-5")
    assert not os.listdir(tmp_path)  # refused before anything was written
    debug = _cli(*args, "--debug")
    assert debug.returncode == 2 and "Traceback" in debug.stderr and "error: steps=-5" in debug.stderr


def test_help_lists_the_configs_and_how_to_see_keys():
    out = _cli("--help")
    assert out.returncode == 0
    assert "configs/demo.py" in out.stdout and "does reinforcement learning beat imitation" in out.stdout
    assert "configs/grpo_v2.py" in out.stdout and "--keys" in out.stdout


def test_keys_prints_values_and_meaning():
    out = _cli("--config=configs/demo.py", "--keys")
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert "steps = 100    # optimizer steps" in "\n".join(lines)
    assert any(line.startswith("demo.drop_carry = 0.1    # the teacher's chance of forgetting a carry")
               for line in lines)
    assert any(line.startswith("resume = true") for line in lines)


_DRIVER = textwrap.dedent("""
    import os, sys
    from absl import logging
    import jaxmath.main as m
    import jaxmath.runs as runs

    def fake(cfg, workdir):
        import jax
        jax.devices()  # probes the backends as a real run does
        os.makedirs(os.path.join(workdir, "grpo", "checkpoints", "7"))
        logging.info("step 7 | loss 0.1")
        raise {error}

    import tqdm
    write = tqdm.tqdm.write
    tqdm.tqdm.write = classmethod(lambda cls, text, **kw: write("[above the bar] " + text, **kw))
    runs.MODES["demo"] = fake
    sys.argv = ["jaxmath.main", "--config=configs/demo.py", "--workdir=" + sys.argv[1]]
    m.run()
""")


def _driver(tmp_path, error: str):
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}  # jax probes every platform, as for a user
    env.update(XLA_FLAGS="", PYTHONPATH=REPO)
    return subprocess.run([sys.executable, "-c", _DRIVER.format(error=error), str(tmp_path / "w")],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=120)


def test_ctrl_c_says_where_the_last_checkpoint_is_and_no_probe_noise(tmp_path):
    out = _driver(tmp_path, "KeyboardInterrupt")
    assert out.returncode == 130, out.stderr[-2000:]
    assert "interrupted: the last checkpoint is " + str(tmp_path / "w" / "grpo" / "checkpoints" / "7") in out.stderr
    assert "run the same command to resume" in out.stderr and "Traceback" not in out.stderr
    assert "Unable to initialize backend" not in out.stderr and "'tpu'" not in out.stderr
    assert out.stderr.count("step 7 | loss 0.1") == 1  # the log line, once, written above any progress bar
    assert [line for line in out.stderr.splitlines() if "step 7 |" in line][0].startswith("[above the bar] I")


def test_a_bug_still_shows_its_traceback(tmp_path):
    out = _driver(tmp_path, "RuntimeError('a bug in jaxmath')")
    assert out.returncode == 1 and "Traceback" in out.stderr and "RuntimeError: a bug in jaxmath" in out.stderr


# --- a workdir remembers its run (14.4) ------------------------------------------------------------


def test_fewer_steps_in_the_demos_workdir_is_refused(tmp_path):
    """The issue's case: a 60-step demo, then --config.steps=3 in the same workdir."""
    (tmp_path / "config.json").write_text(_config("demo", steps=60).to_json_best_effort(indent=2))
    out = _cli("--config=configs/demo.py", "--config.steps=3", f"--workdir={tmp_path}")
    _one_line_error(out, "steps: 60 -> 3 (fewer steps)", "--config.resume=false")


def test_resume_allows_only_its_differences(tmp_path):
    workdir = str(tmp_path / "run")
    workdir_lib.prepare_workdir(_config("grpo_v2", steps=60), workdir)
    (tmp_path / "run" / "checkpoints").mkdir()
    allowed = _config("grpo_v2", steps=80, **{"eval.limit": 5, "rl.plot_every": 3})
    workdir_lib.prepare_workdir(allowed, workdir)  # more steps, another eval limit, plotting: resumes
    assert json.loads((tmp_path / "run" / "config.json").read_text())["steps"] == 80
    with pytest.raises(ConfigError, match=r"optimizer.learning_rate: 4e-05 -> 0.001; seed: 0 -> 3"):
        workdir_lib.prepare_workdir(_config("grpo_v2", steps=80, seed=3, **{"optimizer.learning_rate": 1e-3}), workdir)
    assert resume_conflicts({"steps": 80}, {"steps": 79}) == ["steps: 80 -> 79 (fewer steps)"]


def test_resume_false_moves_the_old_run_aside(tmp_path):
    workdir = str(tmp_path / "run")
    workdir_lib.prepare_workdir(_config("grpo_v2"), workdir)
    (tmp_path / "run" / "checkpoints").mkdir()
    workdir_lib.prepare_workdir(_config("grpo_v2", seed=3, resume=False), workdir)
    (aside,) = glob.glob(workdir + ".old-*")
    assert os.path.isdir(os.path.join(aside, "checkpoints"))  # kept, never deleted
    assert os.listdir(workdir) == ["config.json"]
    assert json.loads((tmp_path / "run" / "config.json").read_text())["seed"] == 3


def test_garbage_config_json_is_one_line(tmp_path):
    (tmp_path / "config.json").write_text("{garbage")
    with pytest.raises(ConfigError, match="config.json is unreadable.*resume=false"):
        workdir_lib.prepare_workdir(_config("demo"), str(tmp_path))


# --- a real run, interrupted ----------------------------------------------------------------------


@pytest.mark.slow
def test_sigint_during_the_demo_keeps_whole_checkpoints_and_logs_each_step_once(tmp_path):
    """~2-4 min on 2 cores: the demo's SFT prefix, GRPO with a checkpoint a step, SIGINT after step 2."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    env.update(XLA_FLAGS="", PYTHONPATH=REPO)
    proc = subprocess.Popen([sys.executable, "-m", "jaxmath.main", "--config=configs/demo.py", "--config.steps=6",
                             "--config.checkpoint_every=1", f"--workdir={tmp_path}"], cwd=REPO, env=env,
                            stderr=subprocess.PIPE, text=True)
    lines, deadline, in_grpo = [], time.time() + 600, False
    for line in proc.stderr:
        lines.append(line)
        in_grpo = in_grpo or "demo: GRPO" in line
        if in_grpo and "] step 2 |" in line:
            proc.send_signal(signal.SIGINT)
            break
        assert time.time() < deadline, "".join(lines[-20:])
    rest = proc.stderr.read()
    proc.wait(timeout=120)
    stderr = "".join(lines) + rest
    assert proc.returncode == 130, stderr[-3000:]
    assert "interrupted: the last checkpoint is " + str(tmp_path / "grpo" / "checkpoints") in stderr
    assert "Traceback" not in stderr and "Unable to initialize backend" not in stderr
    grpo_log = stderr[stderr.index("demo: GRPO"):]
    assert grpo_log.count("] step 1 |") == 1 and grpo_log.count("] step 2 |") == 1
    saved = sorted(int(p) for p in os.listdir(tmp_path / "grpo" / "checkpoints") if p.isdigit())
    assert saved and saved[-1] >= 1 and not glob.glob(str(tmp_path / "**" / "*tmp*"), recursive=True)


def test_a_mesh_larger_than_the_devices_is_a_setting():
    with pytest.raises(ConfigError, match="needs 64 devices.*--config.mesh"):
        runs.build_mesh(_config("demo", **{"mesh.data": 64}))


def test_machine_errors_say_what_to_do():
    import errno

    full = cli.error_message(OSError(errno.ENOSPC, "No space left on device", "/w/checkpoints/3"))
    assert "/w/checkpoints/3" in full and "free space" in full and "resumes" in full
    assert "read-only" in cli.error_message(OSError(errno.EROFS, "Read-only file system", "/w"))


def test_a_later_distillation_pass_may_ask_other_problems():
    saved = _config("distill").to_dict()
    assert resume_conflicts(saved, {**saved, "distill": {**saved["distill"], "sources": "gsm8k_train",
                                                         "limit": 20}}) == []
    assert resume_conflicts(saved, {**saved, "distill": {**saved["distill"], "model": "other"}}) != []


@pytest.mark.slow
def test_grpo_logs_each_step_once_and_checkpoint_every_zero_saves_at_the_end(tmp_path):
    """The GRPO loop on the demo task at its smallest (tests/test_grpo_loop.py helper): 1-4 min on 2 loaded cores."""
    import logging as pylogging

    from tests.test_grpo_loop import _run

    records = []
    handler = pylogging.Handler()
    handler.emit = records.append
    absl_logger = pylogging.getLogger("absl")
    level = absl_logger.level
    absl_logger.addHandler(handler)
    absl_logger.setLevel(pylogging.INFO)
    try:
        _run(tmp_path, 3, checkpoint_every=0)
    finally:
        absl_logger.removeHandler(handler)
        absl_logger.setLevel(level)
    steps = [r.getMessage().split(" |")[0] for r in records if re.match(r"step \d+ \|", r.getMessage())]
    assert steps == ["step 1", "step 2", "step 3"]  # before: each step twice
    assert sorted(p for p in os.listdir(tmp_path / "checkpoints") if p.isdigit()) == ["3"]


def test_a_malformed_data_file_is_one_line(tmp_path):
    """A data file with a broken row (here: not JSON) names the file and line, exit 2, no traceback."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "math500.jsonl").write_text('{"id": "a", "problem": "1+1", "answer": "2"}\n{"id": "b", "problem\n')
    completions = tmp_path / "c.jsonl"
    completions.write_text(json.dumps({"id": "a", "completion": "\\boxed{2}"}) + "\n")
    out = _cli("--config=configs/eval.py", "--config.eval.backend=file", "--config.eval.benchmarks=math500",
               f"--config.eval.completions={completions}", f"--config.data.dir={data}", f"--workdir={tmp_path / 'w'}")
    _one_line_error(out, "math500.jsonl:2", "not valid JSON")
