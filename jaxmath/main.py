"""The entry point: `python -m jaxmath.main --config=configs/<name>.py [--config.key=value ...] --workdir=W`.

`--help` lists the configs; `--keys` prints a config's keys with their values and meaning; `--debug`
shows the traceback behind a one-line error.

Parses the locked config (an unknown override is an error naming the nearest key), checks every
setting the mode uses before any work (`jaxmath.config.check_settings`, then each section built as
its dataclass), prepares the workdir (a workdir remembers its run in config.json: a rerun with other
settings is refused unless resuming allows the change, `jaxmath.config.RESUMABLE`), builds the device
mesh, and dispatches on `config.mode`. This is the only module that reads the ConfigDict: each
`_run_<mode>` turns its sections into the typed dataclasses the library takes (`jaxmath.config.MODES`
says which), filling the few fields that come from another setting (`eval.data_dir` from `data.dir`,
...) itself.

Errors the user can fix (bad settings, missing or unreadable files, a full disk, permissions, too few
devices, a damaged checkpoint, a rejecting teacher endpoint) end in one line and exit code 2; Ctrl-C
says where the last checkpoint is and exits 130; anything else is a bug and shows its traceback.
"""

from __future__ import annotations

import errno
import glob
import json
import logging as pylogging
import os
import sys
import time
import traceback

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "A config file from configs/, e.g. configs/demo.py.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory for checkpoints, metrics and results "
                                                "(default: config.workdir, else runs/<config file name>).")
_KEYS = flags.DEFINE_bool("keys", False, "Print the config's keys with their values and meaning, then exit.")
_DEBUG = flags.DEFINE_bool("debug", False, "Show the traceback behind a one-line error.")
_ALLOW_UNVERIFIED = flags.DEFINE_bool("allow_unverified", False, "Restore checkpoints and weights that carry no "
                                      "digests (written by an older jaxmath) instead of refusing them.")
_CHECK = flags.DEFINE_bool("check", False, "Check every setting, as a run does before any work, then exit.")

CONFIGS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130
_config_spec = ""  # what --config named (path[:arg]), recorded by the flags parser


def one_line(message: str) -> str:
    return "error: " + " ".join(str(message).split())


def _fail(message: str, debug: bool) -> None:
    """Ends the run with one line on stderr (the traceback first under --debug) and exit code 2."""
    if debug:
        traceback.print_exc()
    print(one_line(message) + ("" if debug else "  (--debug shows the traceback)"), file=sys.stderr, flush=True)
    sys.exit(EXIT_USER_ERROR)


def _config_files() -> list[tuple[str, str]]:
    """(path, first line of its docstring) of each config in configs/ that defines get_config."""
    import ast

    out = []
    for path in sorted(glob.glob(os.path.join(CONFIGS_DIR, "*.py"))):
        with open(path) as f:
            tree = ast.parse(f.read())
        if any(isinstance(node, ast.FunctionDef) and node.name == "get_config" for node in tree.body):
            paragraph = " ".join((ast.get_docstring(tree) or "").strip().split("\n\n")[0].split())
            sentence = paragraph.split(". ")[0].rstrip(".")
            if len(sentence) > 100:
                sentence = sentence[:100].rsplit(" ", 1)[0] + " ..."
            out.append((os.path.relpath(path), sentence))
    return out


def usage() -> str:
    rows = "\n".join(f"  {path:<28} {purpose}" for path, purpose in _config_files())
    return f"""usage: python -m jaxmath.main --config=CONFIG [--config.KEY=VALUE ...] [--workdir=DIR] [--keys] [--check] [--allow_unverified] [--debug]

Post-training Qwen3 on math with JAX: GRPO, SFT, evaluation, distillation and the demo.

configs:
{rows}

  --config.KEY=VALUE  override a setting, e.g. --config.steps=3 --config.eval.limit=50
  --keys              print the config's keys with their values and meaning, then exit:
                        python -m jaxmath.main --config=configs/demo.py --keys
  --check             check every setting, as a run does before any work, then exit
  --workdir=DIR       the run directory (default: config.workdir, else runs/<config file name>);
                      rerunning a command resumes there, --config.resume=false starts over
  --allow_unverified  restore checkpoints that carry no digests (an older jaxmath's) instead of refusing them
  --debug             show the traceback behind a one-line error
  --helpfull          every absl flag
"""


def _override_keys(argv: list[str]) -> list[str]:
    keys = []
    for arg in argv:
        if arg.startswith("--config.") or arg.startswith("--noconfig."):
            keys.append(arg.split("=", 1)[0].split(".", 1)[1])
    return keys


def _config_arg(argv: list[str]) -> str:
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return ""


def _parse(argv: list[str], flag_values: flags.FlagValues) -> list[str]:
    """absl's flag parsing into `flag_values`, raising app.UsageError for a missing config file, a config
    file that fails to load, an unknown key (naming the nearest one) or a value of the wrong type."""
    spec = _config_arg(argv)
    path = spec.partition(":")[0]
    if spec and not os.path.isfile(path):
        from jaxmath.config import nearest_key

        near = nearest_key(path, [p for p, _ in _config_files()])
        hint = f"did you mean {near}? " if near else ""
        raise app.UsageError(f"config file {path} not found; {hint}`python -m jaxmath.main --help` lists the configs")
    try:
        return flag_values(argv)
    except Exception as e:  # absl names the flag; the config's own error and an unknown key are said here
        if spec:
            from jaxmath.config import flat_items, load_config, nearest_key

            try:
                keys = list(flat_items(load_config(spec)))
            except Exception as load_error:  # the user's config file: its own error, in one line
                raise app.UsageError(f"config file {spec} failed to load: {type(load_error).__name__}: "
                                     f"{load_error}") from load_error
            for key in _override_keys(argv):
                if key not in keys:
                    near = nearest_key(key, keys)
                    hint = f"; did you mean --config.{near}?" if near else ""
                    raise app.UsageError(f"unknown config key {key!r} in {spec}{hint} (`--keys` lists them)") from e
        raise app.UsageError(str(e).splitlines()[0] if str(e) else repr(e)) from e


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with a person's help, and one line (exit 2) for a missing config file, an
    unknown key (naming the nearest one) or a value of the wrong type."""
    global _config_spec
    if any(arg in ("--help", "-h", "-?", "--helpshort") for arg in argv[1:]):
        print(usage())
        sys.exit(0)
    try:
        rest = _parse(argv, flags.FLAGS)
    except app.UsageError as e:
        _fail(str(e), "--debug" in argv)
    _config_spec = _config_arg(argv)
    return rest


def settings_error(argv: list[str]) -> str | None:
    """The one line `python -m jaxmath.main ARGV --check` ends with, or None when every setting passes:
    the same parsing and checks as a run makes before any work, in this process (nothing runs).
    An exception that is not the user's (a bug) propagates."""
    from ml_collections import config_flags as cf

    flag_values = flags.FlagValues()
    cf.DEFINE_config_file("config", None, "", flag_values=flag_values, lock_config=True, sys_argv=list(argv))
    try:
        _parse(list(argv), flag_values)
        check(flag_values.config)
    except _user_errors() as e:
        return one_line(_message(e))
    return None


def _mesh(cfg):
    import jax

    from jaxmath.config import ConfigError, MeshConfig, build
    from jaxmath.model import sharding

    m = build(MeshConfig, cfg.get("mesh", {}), prefix="mesh")
    try:
        return sharding.make_mesh(m.data, m.fsdp, m.tp)
    except ValueError as e:
        raise ConfigError(f"{e}; set --config.mesh.data/fsdp/tp to fit the {jax.device_count()} devices "
                          "(one of them -1 takes the rest)") from e


def _load_model(cfg, mesh):
    """(model, tokenizer) from config.model: an HF directory, or a random preset for smoke runs."""
    from jaxmath.config import ModelConfig, build
    from jaxmath.model import config as model_config
    from jaxmath.model import from_pretrained, init_model, preset

    m = build(ModelConfig, cfg.model, prefix="model")
    dtype = model_config.dtype_from_name(m.dtype)
    param_dtype = model_config.dtype_from_name(m.param_dtype or m.dtype)
    overrides = dict(remat=m.remat, attention_impl=m.attention_impl or None)
    if m.path:
        model = from_pretrained(m.path, dtype=dtype, param_dtype=param_dtype, mesh=mesh, **overrides)
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(m.path)
        except (OSError, ValueError) as e:
            raise SystemExit(f"model.path {m.path} has weights but no usable tokenizer files ({e}); copy "
                             "tokenizer.json and tokenizer_config.json from the original model") from e
        return model, tokenizer
    if m.preset:
        return init_model(preset(m.preset, dtype=dtype, param_dtype=param_dtype, **overrides), mesh=mesh), None
    raise SystemExit(_NO_MODEL)


# huggingface_hub's download command, as its current releases name it
HF_DOWNLOAD = "hf download Qwen/Qwen3-4B-Instruct-2507"
_NO_MODEL = ("config.model.path is empty: pass --config.model.path=DIR, an HF-format Qwen3 folder "
             f"(e.g. `{HF_DOWNLOAD} --local-dir DIR`)")


# --- typed configs: each mode's sections as the dataclasses of jaxmath.config.MODES -----------------


def eval_config(cfg, **derived):
    """EvalConfig from the eval section; data_dir comes from data.dir. In a GRPO run the periodic
    evaluation runs on the rollout engine (backend = rollout.engine), without a progress bar."""
    from jaxmath.config import build
    from jaxmath.eval.run import EvalConfig

    if cfg.get("mode") == "grpo":
        derived = {"backend": cfg.rollout.engine, "progress": False, **derived}

    return build(EvalConfig, cfg.eval, prefix="eval", data_dir=cfg.data.dir, **derived)


def vllm_config(cfg, lora_cfg=None, plan=None, fit=True, model_path=None):
    """VLLMConfig from the vllm section; vLLM loads model.path in model.dtype (unless vllm.dtype says
    otherwise), and takes LoRA syncs when lora.rank > 0. Its max_model_len is fitted to the run's
    longest request (`longest_request`), or refused up front when the model's max_position_embeddings
    cannot hold it (fit=False leaves it as set). model_path: instead of model.path. plan: the run's device plan (`jaxmath.aot.colocate.DevicePlan`), whose memory
    settings vLLM takes."""
    from jaxmath.config import build
    from jaxmath.rollout.vllm import VLLMConfig
    from jaxmath.rollout.vllm.config import fit_context

    section = dict(cfg.get("vllm", {}))
    # A colocated vLLM takes a LoRA run's weights merged, in memory (no adapter files, no LoRA kernels
    # while decoding); a server, or a file sync, takes the adapters through vLLM's LoRA support.
    in_memory = section.get("mode", "colocated") == "colocated" and section.get("sync_method", "auto") != "file"
    lora = {} if lora_cfg is None else dict(enable_lora=lora_cfg.enabled and not in_memory,
                                            max_lora_rank=max(lora_cfg.rank, 1))
    section["dtype"] = vllm_dtype(cfg)
    if plan is not None:
        section["gpu_memory_utilization"] = plan.gpu_memory_utilization
        lora.update(kv_cache_memory_bytes=plan.kv_cache_bytes, max_num_seqs=plan.max_num_seqs)
    config = build(VLLMConfig, section, prefix="vllm", model_path=cfg.model.path if model_path is None else model_path,
                   **lora)
    return fit_context(config, *longest_request(cfg)) if fit else config


def vllm_dtype(cfg) -> str:
    """The dtype vLLM computes in: vllm.dtype, or model.dtype when that is "auto" (VLLMConfig.dtype says
    why the trainer's)."""
    dtype = cfg.get("vllm", {}).get("dtype", "auto")
    return cfg.model.get("dtype", "auto") if dtype == "auto" else dtype


# --- the device: one plan before jax touches it ------------------------------------------------------

PLAN_TARGET_ENV = "JAXMATH_PLAN_TARGET"  # plan for this named target instead of the local device
_XLA_FRACTIONS = ("XLA_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_MEM_FRACTION")
_device_plan = None  # the run's DevicePlan where vLLM is colocated on a GPU (prepare_device)


def _plan_target():
    """The device a colocated run is planned for, found without jax: the named target of
    JAXMATH_PLAN_TARGET, else this process's GPU as torch sees it (torch comes with vLLM); None on a
    machine without a GPU (vLLM's CPU build has its own KV-cache setting, `vllm.cpu_kvcache_gib`)."""
    from jaxmath.aot import targets
    from jaxmath.config import ConfigError

    name = os.environ.get(PLAN_TARGET_ENV, "")
    if name:
        if name not in targets.GPU_TARGETS:
            raise ConfigError(f"{PLAN_TARGET_ENV}={name!r} is not a GPU target; choose one of {targets.GPU_TARGETS}")
        return targets.load_target(name)
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    free, total = torch.cuda.mem_get_info()
    kind = torch.cuda.get_device_name()
    nominal = next((b for n, b in targets.NOMINAL_BYTES.items() if n.upper() in kind.upper()), total)
    return targets.Target(targets.LOCAL, "gpu", min(total, nominal), f"{kind} (this process's device)", total)


def prepare_device(cfg):
    """Sets JAX's allocator before jax creates its device client, from the run's device plan.

    A run whose rollouts or evaluation run on a vLLM in this process, on a GPU, splits the device by
    `jaxmath.aot.colocate` (its one line is logged; one that cannot fit is refused, naming the setting
    to change); a fraction the user set for XLA is refused there, since the plan sets the allocator.
    Any other run gives JAX 95% of the device (XLA_CLIENT_MEM_FRACTION; JAX's own default is 75%) unless
    the user set a fraction. Returns the plan, or None."""
    global _device_plan
    from jaxmath.aot import run as run_lib
    from jaxmath.config import ConfigError

    _device_plan = None
    target = _plan_target() if run_lib.colocated_engine(cfg) else None
    if target is None:
        if not any(os.environ.get(name) for name in _XLA_FRACTIONS):
            os.environ["XLA_CLIENT_MEM_FRACTION"] = "0.95"
        return None
    user_set = [name for name in _XLA_FRACTIONS + ("XLA_PYTHON_CLIENT_ALLOCATOR",) if os.environ.get(name)]
    if user_set:
        raise ConfigError(f"{', '.join(user_set)} is set, but this run shares the GPU with a colocated vLLM and "
                          "its device plan sets JAX's allocator; unset it (`python -m jaxmath.bench memory "
                          "--config=... --target=h100` shows the plan)")
    plan = run_lib.device_plan(cfg, target)
    os.environ.update(plan.jax_env)
    logging.info("%s", plan.summary())
    _device_plan = plan
    return plan


def engines_line(cfg) -> str:
    """Which engine runs each phase of the run, for its first log lines."""
    from jaxmath.aot import run as run_lib

    section = cfg.get("vllm", {})
    sleeps = run_lib.colocated_engine(cfg) and section.get("enable_sleep_mode", True)
    on_vllm = f"vLLM ({section.get('mode', 'colocated')}{', sleeping through the train phase' if sleeps else ''})"
    if cfg.mode == "grpo":
        engine = on_vllm if cfg.rollout.engine == "vllm" else "the JAX sampler (sampler.*)"
        evaluation = f"; evaluation on {engine}" if cfg.rl.eval_every else ""
        return (f"engines: rollouts on {engine}{evaluation}; logprobs and the train step on JAX "
                f"(--config.rollout.engine={'jax' if cfg.rollout.engine == 'vllm' else 'vllm'} switches the rollouts)")
    if cfg.mode == "eval":
        backend = cfg.eval.backend
        engine = {"vllm": on_vllm, "jax": "the JAX sampler (sampler.*)", "file": "no engine (graded files)"}[backend]
        return f"engines: evaluation on {engine}"
    return f"engines: {cfg.mode} on JAX"


def longest_request(cfg) -> tuple[int, str]:
    """(tokens, how they add up) of the longest request a run gives its rollout engine: the prompt
    bucket plus the completion budget, of the GRPO rollouts and of the evaluation, whichever is longer."""
    requests = []
    if "rl" in cfg:
        requests.append((cfg.rl.max_prompt_tokens + cfg.rl.max_completion_tokens,
                         f"rl.max_prompt_tokens + rl.max_completion_tokens = {cfg.rl.max_prompt_tokens} + "
                         f"{cfg.rl.max_completion_tokens}"))
    if "eval" in cfg and ("rl" not in cfg or cfg.rl.eval_every):
        requests.append((cfg.eval.max_prompt_tokens + cfg.eval.max_new_tokens,
                         f"eval.max_prompt_tokens + eval.max_new_tokens = {cfg.eval.max_prompt_tokens} + "
                         f"{cfg.eval.max_new_tokens}"))
    return max(requests)


def sft_config(cfg):
    """SFTConfig from the top-level seed / steps / checkpoint_every and the sft, lora and optimizer
    sections (optimizer.total_steps 0: the run's step count, known once the data is planned)."""
    from jaxmath.config import build
    from jaxmath.model.lora import LoRAConfig
    from jaxmath.optim import OptimizerConfig
    from jaxmath.sft import SFTConfig

    defaults = SFTConfig()  # its lora and optimizer are SFT's own defaults for those sections
    lora = build(LoRAConfig, cfg.lora, prefix="lora", base=defaults.lora)
    optimizer = build(OptimizerConfig, cfg.optimizer, prefix="optimizer", base=defaults.optimizer)
    return build(SFTConfig, cfg.sft, prefix="sft", seed=cfg.seed, steps=cfg.steps,
                 checkpoint_every=cfg.checkpoint_every, lora=lora, optimizer=optimizer)


def distill_config(cfg):
    from jaxmath.config import build
    from jaxmath.distill import DistillConfig

    return build(DistillConfig, cfg.distill, prefix="distill", data_dir=cfg.data.dir)


def grpo_configs(cfg):
    """(GRPOConfig, LossConfig, OptimizerConfig) from the top-level seed / steps / checkpoint_every and
    the rl, loss and optimizer sections; the optimizer's total_steps 0 becomes the run's steps."""
    from jaxmath.config import ConfigError, build
    from jaxmath.optim import OptimizerConfig
    from jaxmath.rl.loop import GRPOConfig
    from jaxmath.rl.step import LossConfig
    from jaxmath.train_state import resolve_total_steps

    grpo_cfg = build(GRPOConfig, cfg.rl, prefix="rl", steps=cfg.steps, seed=cfg.seed,
                     checkpoint_every=cfg.checkpoint_every)
    loss_cfg = build(LossConfig, cfg.get("loss", {}), prefix="loss")
    try:  # checked here, before any weights load
        optim_cfg = resolve_total_steps(build(OptimizerConfig, cfg.optimizer, prefix="optimizer"), grpo_cfg.steps)
    except ValueError as e:
        raise ConfigError(f"optimizer: {e}") from e
    return grpo_cfg, loss_cfg, optim_cfg


def fit_micro_batch_rows(cfg, loss_cfg, target=None):
    """loss_cfg with loss.micro_batch_rows fitted to the device, before any weight loads: 0 (auto)
    becomes the largest that fits, a value that cannot fit is refused (ConfigError naming the knob
    and the largest value that fits; `jaxmath.aot.fit`). target: the device (default: this process's
    GPU); on a CPU, or over a mesh of several devices (one device's plan would overstate a sharded
    step), loss_cfg is returned as it is (0: the whole batch at once)."""
    import dataclasses

    import jax

    from jaxmath.aot import fit
    from jaxmath.aot import run as run_lib

    budget = None
    if target is None and _device_plan is not None:  # JAX's share of a device it shares with vLLM
        if _device_plan.target != "local":  # planned for a named target, run here: nothing to fit
            return loss_cfg
        target, budget = fit.local_target(_device_plan.capacity_bytes), _device_plan.jax_budget_bytes
    target = target or fit.local_target()
    if target is None or (target.name == "local" and jax.device_count() > 1):
        return loss_cfg
    _, model_cfg = run_lib.model_config(cfg)
    plan = run_lib.run_plan(cfg, model_cfg)
    rows = fit.micro_batch_rows(plan, target, loss_cfg.micro_batch_rows, budget=budget)
    if rows != loss_cfg.micro_batch_rows:
        logging.info("loss.micro_batch_rows: %d rows per micro-batch fit %s", rows, target.description)
    return dataclasses.replace(loss_cfg, micro_batch_rows=rows)


def _run_eval(cfg, workdir: str) -> dict:
    from jaxmath.eval.run import evaluate

    eval_cfg = eval_config(cfg)
    meta = {"model": cfg.model.get("path", ""), "config": json.loads(cfg.to_json_best_effort())}
    if eval_cfg.backend == "file":
        return evaluate(None, None, eval_cfg, workdir, meta)
    mesh = _mesh(cfg)
    if eval_cfg.backend == "jax":
        model, tokenizer = _load_model(cfg, mesh)
        engine = _rollout_engine(cfg, "jax", model, mesh)
    else:  # vLLM loads the weights itself, from model.path
        engine = _rollout_engine(cfg, "vllm", None, mesh)
        tokenizer = engine.tokenizer
    meta["engine"] = eval_cfg.backend
    return evaluate(engine, tokenizer, eval_cfg, workdir, meta)


def _run_sft(cfg, workdir: str) -> dict:
    from jaxmath.sft import load_sft_examples, run_sft

    sft_cfg = sft_config(cfg)
    if not sft_cfg.train_files:
        raise SystemExit("sft.train_files is empty; point it at trace files under data.dir "
                         "(e.g. traces.jsonl from configs/distill.py)")
    mesh = _mesh(cfg)
    model, tokenizer = _load_model(cfg, mesh)
    if tokenizer is None:
        raise SystemExit("SFT on chat traces needs the model's tokenizer: set model.path to an HF folder")
    paths = [os.path.join(cfg.data.dir, f) for f in sft_cfg.train_files]
    examples = load_sft_examples(paths, tokenizer, max_trace_chars=sft_cfg.max_trace_chars,
                                 sources=sft_cfg.train_sources)
    logging.info("sft: %d documents from %s", len(examples), paths)
    return run_sft(model, examples, sft_cfg, workdir, tokenizer=tokenizer, mesh=mesh)


def _run_distill(cfg, workdir: str) -> dict:
    from jaxmath.distill import run_distill

    return run_distill(distill_config(cfg), workdir)


def _init_from_run(model, run_dir: str, lora_cfg, optim_cfg, seed: int) -> None:
    """Start from the trained weights of an earlier run (GRPO v3 continues v2): the trainable params
    of its latest checkpoint; the optimizer state starts fresh."""
    from flax import nnx

    from jaxmath import checkpoint as ckpt_lib
    from jaxmath import train_state

    # refuse: a damaged latest checkpoint must stop the run, not silently start it from an older step
    # (and rename the other run's files).
    with ckpt_lib.CheckpointManager(os.path.join(run_dir, "checkpoints"), on_damaged="refuse") as manager:
        if manager.latest_step() is None:
            raise SystemExit(f"init.checkpoint={run_dir} has no checkpoints under {manager.directory}; run the "
                             "earlier configuration (e.g. configs/grpo_v2.py) with that workdir first")
        setup = train_state.init_or_restore(model, optim_cfg, lora_cfg=lora_cfg, seed=seed,
                                            total_steps=optim_cfg.total_steps, checkpoints=manager)
    nnx.update(model, setup.state.params)
    logging.info("initialised from %s step %d", manager.directory, setup.state.step)


def _run_grpo(cfg, workdir: str) -> dict:
    from jaxmath.config import DataConfig, InitConfig, PromptConfig, RolloutConfig, build
    from jaxmath.data import datasets, prompts
    from jaxmath.model.lora import LoRAConfig
    from jaxmath.rl import loop

    grpo_cfg, loss_cfg, optim_cfg = grpo_configs(cfg)
    lora_cfg = build(LoRAConfig, cfg.lora, prefix="lora")
    data = build(DataConfig, cfg.data, prefix="data")
    prompt = build(PromptConfig, cfg.prompt, prefix="prompt")
    init = build(InitConfig, cfg.init, prefix="init")
    rollout = build(RolloutConfig, cfg.rollout, prefix="rollout")
    eval_cfg = eval_config(cfg, progress=False) if grpo_cfg.eval_every else None
    loss_cfg = fit_micro_batch_rows(cfg, loss_cfg)
    mesh = _mesh(cfg)
    model, tokenizer = _load_model(cfg, mesh)
    if tokenizer is None:
        raise SystemExit("GRPO on math problems needs the model's tokenizer: set model.path to an HF folder")
    if init.checkpoint:
        _init_from_run(model, init.checkpoint, lora_cfg, optim_cfg, grpo_cfg.seed)
    examples = datasets.load(data.train, data.dir, limit=data.limit)

    def encode(batch):
        return prompts.encode_prompts(batch, tokenizer, grpo_cfg.max_prompt_tokens, few_shot=prompt.few_shot,
                                      system=prompt.system or None, enable_thinking=prompt.enable_thinking)

    def decode(ids):
        return tokenizer.decode(ids, skip_special_tokens=True)

    # vLLM syncs LoRA runs through its own adapter support, full runs through in-memory weights
    engine = _rollout_engine(cfg, rollout.engine, model, mesh, lora_cfg)
    stop = tuple(dict.fromkeys(prompts.stop_token_ids(tokenizer) + model.config.stop_token_ids))
    evaluate = None
    if eval_cfg is not None:
        from jaxmath.eval.run import evaluate as run_eval

        def evaluate(_, step):
            results = run_eval(engine, tokenizer, eval_cfg, os.path.join(workdir, f"eval_step_{step}"), {"step": step})
            first = next(k for k in results if k != "meta")
            return {"eval_accuracy": results[first]["accuracy"]}

    return loop.train(model, examples, encode=encode, decode=decode, cfg=grpo_cfg, loss_cfg=loss_cfg,
                      optim_cfg=optim_cfg, lora_cfg=lora_cfg, workdir=workdir, engine=engine, stop_token_ids=stop,
                      evaluate=evaluate, run_config=json.loads(cfg.to_json_best_effort()))


def _rollout_engine(cfg, kind: str, model, mesh, lora_cfg=None):
    """The rollout engine `kind` ("jax" or "vllm") with its config section (sampler / vllm)."""
    from jaxmath.config import build

    if kind == "jax":
        from jaxmath.rollout.jax_sampler import JaxSampler, SamplerConfig

        return JaxSampler(model, build(SamplerConfig, cfg.get("sampler", {}), prefix="sampler"), mesh=mesh)
    from jaxmath.rollout.vllm import make_engine

    return make_engine(vllm_config(cfg, lora_cfg, _device_plan))


def _run_demo(cfg, workdir: str) -> dict:
    from jaxmath.config import build
    from jaxmath.demo import DemoConfig, run_demo

    grpo_cfg, loss_cfg, optim_cfg = grpo_configs(cfg)
    return run_demo(build(DemoConfig, cfg.demo, prefix="demo"), grpo_cfg, loss_cfg, optim_cfg, workdir,
                    seed=cfg.seed, mesh=_mesh(cfg), run_config=json.loads(cfg.to_json_best_effort()))


MODES = {
    "eval": _run_eval,
    "sft": _run_sft,
    "distill": _run_distill,
    "grpo": _run_grpo,
    "demo": _run_demo,
}


def check(cfg) -> None:
    """Everything a run checks before any work: its mode, then every setting (`validate`)."""
    mode = cfg.get("mode")
    if mode not in MODES:
        raise app.UsageError(f"config.mode {mode!r} is not one of {sorted(MODES)}")
    validate(cfg)


def validate(cfg) -> None:
    """Every setting the mode uses, checked before any work: each key's range (`check_settings`), each
    section built as its dataclass (types, unknown keys, the dataclasses' own rules), and the paths
    the run reads. Raises ConfigError naming the key."""
    from jaxmath.config import (ConfigError, DataConfig, InitConfig, MeshConfig, ModelConfig, PromptConfig,
                                RolloutConfig, build, check_settings)

    check_settings(cfg)
    mode = cfg.mode
    if "mesh" in cfg:
        build(MeshConfig, cfg.mesh, prefix="mesh")
    if mode in ("grpo", "demo"):
        grpo_cfg, loss_cfg, _ = grpo_configs(cfg)
        rows, micro = grpo_cfg.prompts_per_step * grpo_cfg.num_generations, loss_cfg.micro_batch_rows
        if 0 < micro < rows and rows % micro:
            raise ConfigError(f"loss.micro_batch_rows={micro} does not divide the step's {rows} rows "
                              f"(rl.prompts_per_step x rl.num_generations); use a divisor of {rows}, or 0 to fit it")
    if mode == "demo":
        from jaxmath.demo import DemoConfig

        build(DemoConfig, cfg.demo, prefix="demo")
        if loss_cfg.beta > 0:  # the demo trains every parameter: no LoRA reference policy
            raise ConfigError("loss.beta > 0 (a KL term) needs LoRA, which the demo does not use; set loss.beta=0")
    if mode == "sft":
        sft_config(cfg)
    if mode == "distill":
        distill_config(cfg)
    needs_model = mode in ("grpo", "sft") or (mode == "eval" and eval_config(cfg).backend != "file")
    lora_cfg = None
    if mode == "grpo":
        from jaxmath.model.lora import LoRAConfig

        lora_cfg = build(LoRAConfig, cfg.lora, prefix="lora")
        if loss_cfg.beta > 0 and not lora_cfg.enabled:
            raise ConfigError("loss.beta > 0 (a KL term) needs LoRA (lora.rank > 0): the reference policy is the "
                              "base model with adapters off; full-parameter KL is not supported")
        build(PromptConfig, cfg.prompt, prefix="prompt")
        init = build(InitConfig, cfg.init, prefix="init")
        engine = build(RolloutConfig, cfg.rollout, prefix="rollout").engine
        eval_config(cfg, progress=False)  # checked even where rl.eval_every=0 leaves it unused
        if init.checkpoint and not os.path.isdir(init.checkpoint):
            raise ConfigError(f"init.checkpoint {init.checkpoint} is not a directory; point it at the earlier "
                              "run's workdir")
    if mode == "eval":
        engine = eval_config(cfg).backend
    if needs_model:
        model = build(ModelConfig, cfg.model, prefix="model")
        if not model.path and not model.preset:
            raise ConfigError(_NO_MODEL)
        if model.path and not os.path.isdir(model.path):
            what = "is a file" if os.path.exists(model.path) else "does not exist"
            raise ConfigError(f"model.path {model.path} {what}; download Qwen3-4B-Instruct-2507 in HF format "
                              f"({HF_DOWNLOAD} --local-dir DIR) and pass --config.model.path=DIR")
    if mode in ("grpo", "eval"):
        from jaxmath.rollout.jax_sampler import SamplerConfig

        build(SamplerConfig, cfg.get("sampler", {}), prefix="sampler")
        if engine == "vllm":
            require_vllm(cfg)
            vllm_config(cfg, lora_cfg)
        else:  # unused by this run, yet a bad value is still one the user should hear about now
            vllm_config(cfg, lora_cfg, fit=False, model_path=cfg.model.path or "(no model: vLLM unused)")
    if mode in ("grpo", "sft", "eval") and not os.path.isdir(cfg.data.dir):
        raise ConfigError(f"data.dir {cfg.data.dir} is not a directory; write the data with "
                          "`python -m jaxmath.data.datasets --out DIR` and pass --config.data.dir=DIR")
    if mode == "grpo":
        from jaxmath.data.datasets import FILES

        data = build(DataConfig, cfg.data, prefix="data")
        path = os.path.join(data.dir, FILES[data.train])
        if not os.path.isfile(path):
            raise ConfigError(f"data.train={data.train} reads {path}, which does not exist; write the data with "
                              f"`python -m jaxmath.data.datasets --out {data.dir}` or choose another data.train")


def require_vllm(cfg) -> None:
    """A run on vLLM stops before any work where vllm is not installed, naming the extra and the
    override that runs it on JAX instead."""
    import importlib.util

    from jaxmath.config import ConfigError

    if cfg.get("vllm", {}).get("mode", "colocated") == "server" or importlib.util.find_spec("vllm") is not None:
        return
    key = "rollout.engine" if cfg.mode == "grpo" else "eval.backend"
    raise ConfigError(f"{key}=vllm needs vLLM, which is not installed: pip install -e '.[vllm]' (vLLM's CPU build; "
                      "on a CUDA machine '.[vllm-cuda]'), or run on JAX with --config."
                      f"{key}=jax")


def _workdir(cfg) -> str:
    from jaxmath.config import RunConfig, build

    run = build(RunConfig, {k: cfg[k] for k in ("mode", "workdir", "resume") if k in cfg}, prefix="config")
    if _WORKDIR.value or run.workdir:
        return _WORKDIR.value or run.workdir
    stem = os.path.splitext(os.path.basename(_config_spec.partition(":")[0]))[0] or run.mode
    arg = _config_spec.partition(":")[2]
    return os.path.join("runs", f"{stem}-{arg}" if arg else stem)


def prepare_workdir(cfg, workdir: str) -> None:
    """A workdir remembers its run in config.json. A rerun there continues it when the settings match,
    apart from what resuming allows (`jaxmath.config.RESUMABLE`); other differences are refused, naming
    the keys. `resume=false` moves the old run aside (to <workdir>.old-<time>, nothing deleted) and starts
    over. Then writes this run's config.json."""
    from jaxmath.config import ConfigError, resume_conflicts

    saved_path = os.path.join(workdir, "config.json")
    new = json.loads(cfg.to_json_best_effort())
    held = os.path.isdir(workdir) and bool(os.listdir(workdir))
    if held and not cfg.get("resume", True):
        aside = f"{os.path.normpath(workdir)}.old-{time.strftime('%Y%m%d-%H%M%S')}"
        os.rename(workdir, aside)
        logging.warning("config.resume=false: starting over; the previous run in %s was moved to %s", workdir, aside)
    elif os.path.isfile(saved_path):
        try:
            with open(saved_path) as f:
                saved = json.load(f)
        except (ValueError, UnicodeDecodeError) as e:
            raise ConfigError(f"{saved_path} is unreadable ({e}); pass --config.resume=false to move the old run "
                              "aside and start over, or another --workdir") from e
        conflicts = resume_conflicts(saved, new) if isinstance(saved, dict) else ["config.json: not a config"]
        if conflicts:
            raise ConfigError(f"{workdir} holds a run with other settings ({'; '.join(conflicts[:8])}); rerun with "
                              "those, pass --config.resume=false to start over (the old run is moved aside), or "
                              "choose another --workdir")
        logging.info("resuming the run in %s", workdir)
    os.makedirs(workdir, exist_ok=True)
    with open(saved_path, "w") as f:
        f.write(cfg.to_json_best_effort(indent=2))


def _last_checkpoint(workdir: str) -> str | None:
    """The newest finished checkpoint step directory under `workdir` (any of its runs), or None."""
    steps = [p for p in glob.glob(os.path.join(glob.escape(workdir), "**", "checkpoints", "*"), recursive=True)
             if os.path.basename(p).isdigit() and os.path.isdir(p)]
    return max(steps, key=os.path.getmtime) if steps else None


def _interrupted(workdir: str | None) -> None:
    last = _last_checkpoint(workdir) if workdir else None
    where = (f"the last checkpoint is {last}" if last else
             f"no checkpoint was saved yet{' in ' + workdir if workdir else ''}")
    print(f"interrupted: {where}; run the same command to resume", file=sys.stderr, flush=True)
    sys.exit(EXIT_INTERRUPTED)


def _user_errors() -> tuple[type, ...]:
    """Exceptions caused by the user's input or the machine: reported in one line."""
    from jaxmath.checkpoint import CheckpointError
    from jaxmath.config import ConfigError
    from jaxmath.data.datasets import DataError
    from jaxmath.distill import DistillError

    return (ConfigError, CheckpointError, DistillError, DataError, OSError, UnicodeDecodeError, json.JSONDecodeError,
            app.UsageError)


_OS_HINTS = {
    errno.ENOSPC: "free space there and rerun the same command (it resumes from the last checkpoint)",
    errno.EDQUOT: "free space there and rerun the same command (it resumes from the last checkpoint)",
    errno.EACCES: "make it readable/writable or choose another --workdir",
    errno.EPERM: "make it readable/writable or choose another --workdir",
    errno.EROFS: "the filesystem is read-only: choose another --workdir",
    errno.ENOENT: "check the path",
    errno.ENOTDIR: "a directory was expected: check the path",
    errno.EISDIR: "a file was expected: check the path",
}


def _message(e: BaseException) -> str:
    if isinstance(e, OSError) and e.errno in _OS_HINTS:
        return f"{e}; {_OS_HINTS[e.errno]}"
    return str(e) or type(e).__name__


class _QuietLibraries(pylogging.Filter):
    """Keeps orbax's per-save INFO chatter and jax's backend probing ("Unable to initialize backend
    'tpu'") out of the run log; their warnings and errors still show."""

    def filter(self, record: pylogging.LogRecord) -> bool:
        if record.levelno >= pylogging.WARNING:
            return True
        return "/orbax/" not in record.pathname and not record.name.startswith("jax._src.xla_bridge")


class _AboveTheBar:
    """The log's stream: each line written above a progress bar (tqdm.write), never through it."""

    def write(self, text: str) -> None:
        from tqdm import tqdm

        tqdm.write(text, file=sys.stderr, end="")

    def flush(self) -> None:
        sys.stderr.flush()

    def close(self) -> None:  # stderr stays open
        pass


def main(argv: list[str]) -> None:
    debug = _DEBUG.value
    workdir = None
    try:
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments {argv[1:]}; pass settings as --config.key=value")
        cfg = _CONFIG.value
        if cfg is None:
            raise app.UsageError("--config is required, e.g. --config=configs/demo.py (--help lists the configs)")
        if _KEYS.value:
            _print_keys(cfg)
            return
        check(cfg)
        if _CHECK.value:
            print(f"{_config_spec}: every setting passes")
            return
        mode = cfg.mode
        if _ALLOW_UNVERIFIED.value:
            from jaxmath import checkpoint

            checkpoint.accept_unverified()
        # JAX's allocator from the run's device plan, before any jax device is touched.
        prepare_device(cfg)
        # A multi-host job joins here, before any jax device is touched (one process: a no-op).
        from jaxmath.distributed import initialize_from_env

        initialize_from_env()
        workdir = _workdir(cfg)
        prepare_workdir(cfg, workdir)
        logging.info("jaxmath %s: workdir %s", mode, workdir)
        logging.info("%s", engines_line(cfg))
        result = MODES[mode](cfg, workdir)
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        _interrupted(workdir)
    except SystemExit as e:  # a message the code raised for the user (an exit code passes through)
        if isinstance(e.code, str):
            _fail(e.code, debug)
        raise
    except _user_errors() as e:
        _fail(_message(e), debug)
    if isinstance(result, dict):
        logging.info("%s", finish(cfg, workdir, result))


SUMMARY_FILE = "run_summary.json"


def finish(cfg, workdir: str, result: dict) -> str:
    """Writes the run's whole summary to <workdir>/run_summary.json and returns the run's short last line:
    its headline figure, whether it was a smoke run, and where the rest is."""
    path = os.path.join(workdir, SUMMARY_FILE)
    with open(path, "w") as f:
        json.dump({k: v for k, v in result.items() if k != "meta"}, f, indent=2, default=str)
    smoke = smoke_reason(cfg, result)
    note = f"; a smoke run ({smoke}): its figures are not results" if smoke else ""
    return f"done: {_headline(result)}{note}; every figure in {path}"


def smoke_reason(cfg, result: dict) -> str:
    """Why a run's figures are not results (too few steps, random weights, a few problems), or ""."""
    if cfg.mode == "demo":
        return result.get("smoke", "")
    if cfg.mode in ("grpo", "sft", "eval") and cfg.model.get("preset") and not cfg.model.get("path"):
        return f"a randomly initialised {cfg.model.preset} model"
    if cfg.mode == "eval" and cfg.eval.limit:
        return f"the first {cfg.eval.limit} problems of each benchmark"
    return ""


def _headline(result: dict) -> str:
    """A few of the run's figures, short: the demo's gain, each benchmark's accuracy, or its first numbers."""
    if "format_blind_gain" in result:
        return f"SFT then GRPO minus SFT only: {100 * result['format_blind_gain']:+.1f} points format-blind"
    accuracies = [f"{k} {100 * v['accuracy']:.1f}%" for k, v in result.items()
                  if isinstance(v, dict) and isinstance(v.get("accuracy"), (int, float))]
    numbers = [f"{k}={v:.4g}" for k, v in result.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)]
    parts, line = accuracies or numbers, ""
    for part in parts:
        if len(line) + len(part) > 100:
            break
        line = f"{line}, {part}" if line else part
    return line or "finished"


def _print_keys(cfg) -> None:
    from jaxmath.config import describe_keys

    for key, value, meaning in describe_keys(cfg):
        shown = json.dumps(value) if not isinstance(value, str) else repr(value)
        print(f"{key} = {shown}" + (f"    # {meaning}" if meaning else ""))


def run() -> None:
    handler = logging.get_absl_handler()
    handler.addFilter(_QuietLibraries())
    handler.python_handler.stream = _AboveTheBar()
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    sys.exit(run())
