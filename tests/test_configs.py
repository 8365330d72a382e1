"""Every default lives once, in the dataclasses: config files start from `jaxmath.config.defaults(mode)`
and state only what differs, no setting is declared in two places, and every config loads by path
from any directory. About 20 s (config files only, no model)."""

from __future__ import annotations

import collections
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from jaxmath import config as config_lib
from jaxmath import sections as typed
from jaxmath.config import MODES, ConfigError, build, defaults, load_config
from jaxmath.model.lora import LoRAConfig

ROOT = Path(__file__).resolve().parents[1]
SWEEP_ROWS = ("v1", "v2", "v3", "v4", "a", "b")
NOT_YET_ON_DEFAULTS: set[str] = set()

# Field names that more than one section of a mode uses, each for its own setting.
DISTINCT_SETTINGS = {
    "mode": "the run's mode (top level) vs how vLLM runs (vllm.mode: colocated | server)",
    "dtype": "the trainer's compute dtype (model) vs the vLLM engine's (vllm, 'auto': the checkpoint's)",
    "seed": "the run's seed (top level), evaluation sampling (eval.seed) and the vLLM engine's (vllm.seed)",
    "limit": "training problems kept (data.limit) vs problems evaluated per benchmark (eval.limit)",
    "few_shot": "training prompts (prompt.few_shot, 0 as the study trains) vs evaluation prompts (eval, 4)",
    "enable_thinking": "training prompts (prompt.*) vs evaluation prompts (eval.*)",
    "max_prompt_tokens": "training prompts (rl) vs evaluation prompts with their few-shot prefix (eval)",
    "temperature": "training rollouts (rl, 1.0) vs evaluation sampling (eval, 0.01 in the study)",
    "answer_fallback": "the training reward's extraction (rl) vs the evaluation's grading (eval)",
    "remat": "the rematerialization policy (model.remat) vs whether SFT's backward pass applies it (sft.remat)",
}
# Fields filled from another key that still declare a default of their own.
DERIVED_WITH_DEFAULT = {
    ("distill", "data_dir"): "jaxmath/distill.py is being rewritten (issue 19); drop its data_dir default there",
    ("vllm", "max_lora_rank"): "also the bound of a server started on its own (python -m jaxmath.rollout.vllm "
                               "--max_lora_rank); a trainer sets it from lora.rank",
    ("eval", "backend"): "a key of the eval mode (configs/eval.py); in a GRPO run the periodic evaluation "
                         "runs on the rollout engine, so there it follows rollout.engine",
}


def _config_specs() -> list[str]:
    """Every runnable config: configs/<name>.py, and configs/sft_sweep.py:<row> for each row."""
    specs = []
    for path in sorted((ROOT / "configs").glob("*.py")):
        if "def get_config" not in path.read_text():
            continue  # configs/grpo_common.py: the study base the rows start from
        rows = SWEEP_ROWS if path.name == "sft_sweep.py" else ("",)
        specs += [str(path) + (f":{row}" if row else "") for row in rows]
    return specs


def _flat(config, prefix: str = "") -> dict:
    out = {}
    for key, value in config.items():
        if hasattr(value, "items"):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def _perturbed(config):
    """The same keys, every value changed (placeholders stay empty)."""
    out = config.copy_and_resolve_references()
    for key, value in _flat(config).items():
        if value is None:
            continue
        if isinstance(value, bool):
            changed = not value
        elif isinstance(value, (int, float)):
            changed = value + 7
        else:
            changed = str(value) + "~"
        out.update_from_flattened_dict({key: changed})
    return out


def test_every_config_loads_from_any_directory_and_builds_its_dataclasses(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # configs/ is not a package: config files load by path, bases included
    for spec in _config_specs():
        cfg = load_config(spec)
        assert cfg.mode in MODES, spec
        if cfg.mode in ("grpo", "demo"):
            grpo, loss, optimizer = typed.grpo_configs(cfg)
            # 0 in the config: the run's length (local_lora plans 998 steps and stops at 100, as TRL would)
            assert optimizer.total_steps == (cfg.optimizer.total_steps or grpo.steps)
        if cfg.mode == "grpo":
            typed.eval_config(cfg, progress=False)
            cfg.model.path = "/models/any"
            # a colocated vLLM takes LoRA merged in memory; a server takes the adapters, unless the LM head
            # has one (the Tinker rows): vLLM's LoRA layers take none, so those go merged there too
            assert not typed.vllm_config(cfg, build(LoRAConfig, cfg.lora)).enable_lora
            cfg.vllm.mode, cfg.vllm.url = "server", "http://127.0.0.1:8000"
            assert typed.vllm_config(cfg, build(LoRAConfig, cfg.lora)).enable_lora == (
                cfg.lora.rank > 0 and not cfg.lora.train_unembed)
        elif cfg.mode == "sft":
            assert typed.sft_config(cfg).optimizer.schedule == "warmup_linear"
        elif cfg.mode == "eval":
            typed.eval_config(cfg)
        elif cfg.mode == "distill":
            with pytest.raises(ConfigError, match="distill.endpoint is required"):
                typed.distill_config(cfg)  # no default: the teacher's URL must be given
    # The entry point from another directory: the config loads, and it stops at the missing model.
    out = subprocess.run([sys.executable, "-m", "jaxmath.main", f"--config={ROOT / 'configs' / 'grpo_v2.py'}",
                          f"--workdir={tmp_path / 'run'}"], capture_output=True, text=True, cwd=tmp_path, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode != 0 and "config.model.path is empty" in out.stderr, out.stderr[-2000:]


def test_no_config_sets_a_key_to_its_default(monkeypatch):
    """A key a config assigns keeps its value whatever the defaults are; if that value is the default,
    the assignment restates it."""
    real_defaults = config_lib.defaults
    restated = []
    for spec in _config_specs():
        if Path(spec.partition(":")[0]).name in NOT_YET_ON_DEFAULTS:
            continue
        monkeypatch.setattr(config_lib, "defaults", real_defaults)
        real = _flat(load_config(spec))
        mode = real["mode"]
        monkeypatch.setattr(config_lib, "defaults", lambda m: _perturbed(real_defaults(m)))
        perturbed = _flat(load_config(spec))
        base = _flat(real_defaults(mode))
        assert set(real) == set(base), (spec, set(real) ^ set(base))
        restated += [f"{spec}: {key} = {value!r}" for key, value in real.items()
                     if key != "mode" and value is not None and value == perturbed[key] and value == base[key]]
    monkeypatch.setattr(config_lib, "defaults", real_defaults)
    assert not restated, "config files set keys to their defaults:\n" + "\n".join(restated)


def test_the_check_catches_a_restated_default(tmp_path, monkeypatch):
    bad = tmp_path / "bad.py"
    bad.write_text("from jaxmath.config import defaults\n\n\ndef get_config():\n    c = defaults('grpo')\n"
                   "    c.optimizer.learning_rate = 1e-5\n    c.rl.num_generations = 8\n    return c\n")
    monkeypatch.setattr(sys.modules[__name__], "_config_specs", lambda: [str(bad)])
    with pytest.raises(AssertionError, match=r"rl.num_generations = 8"):
        test_no_config_sets_a_key_to_its_default(monkeypatch)


def test_each_default_is_declared_once():
    for mode, sections in MODES.items():
        users = collections.defaultdict(list)
        for section in sections:
            for name in section.keys() + list(section.top):
                users[name].append(section.name or "top")
        shared = {name: where for name, where in users.items() if len(where) > 1}
        undeclared = {name: where for name, where in shared.items() if name not in DISTINCT_SETTINGS}
        assert not undeclared, (mode, undeclared)
        keys = _flat(defaults(mode))
        for section in sections:
            fields = {f.name: f for f in dataclasses.fields(section.dataclass())}
            for name, source in section.derived:
                copies_a_key = source in keys
                has_default = fields[name].default is not dataclasses.MISSING
                if copies_a_key and has_default and (section.name, name) not in DERIVED_WITH_DEFAULT:
                    pytest.fail(f"{section.cls}.{name} is filled from {source} but declares a default of its own")


def test_defaults_read_back_as_the_dataclass_defaults():
    """Every key of defaults(mode), read as its field's type, is the dataclass's default (tuples are
    comma-separated strings in the ConfigDict; required fields are empty placeholders)."""
    import typing

    for mode, sections in MODES.items():
        config = defaults(mode)
        for section in sections:
            cls, base = section.dataclass(), section.default_instance()
            hints = typing.get_type_hints(cls)
            values = config if not section.name else config[section.name]
            for field in dataclasses.fields(cls):
                if field.name not in section.keys() + list(section.top) or field.name == "mode":
                    continue
                default = getattr(base, field.name) if base is not None else field.default
                value = config[field.name] if field.name in section.top else values[field.name]
                if default is dataclasses.MISSING:
                    assert value is None, (mode, section.name, field.name)
                    continue
                read = config_lib._coerce(field.name, hints[field.name], value, default)
                assert read == default, (mode, section.name, field.name, read, default)


def test_a_derived_field_is_not_a_key():
    with pytest.raises(ConfigError, match="eval.data_dir is not a key"):
        typed.eval_config(_with_eval_data_dir())


def _with_eval_data_dir():
    cfg = load_config(str(ROOT / "configs" / "eval.py"))
    cfg.unlock()
    cfg.eval.data_dir = "elsewhere"
    return cfg


def test_each_grpo_row_runs_its_frameworks_optimizer_and_loss():
    """configs/grpo_common.py names, per row of Table 3, where each optimizer and loss setting comes
    from (Tinker's AdamParams for the Tinker rows, TRL 0.24 for the local ones) and the row's built
    dataclasses hold those values."""
    common = config_lib.load_module(str(ROOT / "configs" / "grpo_common.py"))
    assert set(common.FRAMEWORK) == {"grpo_v1", "grpo_v2", "grpo_v3", "sft_then_rl", "local_full", "local_lora"}
    for row, framework in common.FRAMEWORK.items():
        cfg = load_config(str(ROOT / "configs" / f"{row}.py"))
        _, loss, optimizer = typed.grpo_configs(cfg)
        built = {"loss": loss, "optimizer": optimizer, "lora": build(LoRAConfig, cfg.lora, prefix="lora")}
        for key, (value, source) in common.SETTINGS[framework].items():
            section, field = key.split(".")
            assert getattr(built[section], field) == value, (row, key, source)
            assert source, (row, key)
    tinker, trl = common.SETTINGS["tinker"], common.SETTINGS["trl"]
    # Tinker's AdamParams defaults (beta2 0.95, eps 1e-12, no clipping), constant learning rate.
    assert {k: tinker[k][0] for k in ("optimizer.b1", "optimizer.b2", "optimizer.eps", "optimizer.max_grad_norm",
                                      "optimizer.schedule")} == {
        "optimizer.b1": 0.9, "optimizer.b2": 0.95, "optimizer.eps": 1e-12, "optimizer.max_grad_norm": 0.0,
        "optimizer.schedule": "constant"}
    # TRL: per-token aggregation over the batch ("dapo"), vLLM IS correction on (cap 2), linear decay.
    assert {k: trl[k][0] for k in ("loss.loss_agg", "loss.tis_cap", "optimizer.schedule")} == {
        "loss.loss_agg": "token_mean", "loss.tis_cap": 2.0, "optimizer.schedule": "linear"}
