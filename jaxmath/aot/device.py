"""The run's plans applied to this process, before jax touches the device: JAX's allocator from the
device plan (`prepare_device`, where a colocated vLLM shares the GPU), and loss.micro_batch_rows fitted
to the device (`fit_micro_batch_rows`). The plans themselves are `jaxmath.aot.run`'s.
"""

from __future__ import annotations

import os

from absl import logging

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


def fit_micro_batch_rows(cfg, loss_cfg, target=None):
    """loss_cfg with loss.micro_batch_rows fitted to the device, before any weight loads: 0 (auto)
    becomes the largest that fits, a value that cannot fit is refused (ConfigError naming the knob
    and the largest value that fits; `jaxmath.aot.fit`). A run on the JAX sampler of which not even
    one generation row fits is refused first (`fit.check_generation`, naming the KV cache). Where not
    one train row fits with model.remat "full", the plan's "offload" is written into cfg.model.remat,
    which the model is then built with, as is a policy that keeps more for the backward where the plan
    models it faster (`fit.with_micro_batch_rows`). target: the device (default: this process's
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
    if plan.sampler is not None:  # the JAX sampler: one row of its rollout or evaluation must fit
        fit.check_generation(plan, target)
    plan = fit.with_micro_batch_rows(dataclasses.replace(plan, loss=loss_cfg), target, budget=budget)
    rows = plan.loss.micro_batch_rows
    if rows != loss_cfg.micro_batch_rows:
        logging.info("loss.micro_batch_rows: %d rows per micro-batch fit %s", rows, target.description)
    if plan.model.remat != cfg.model.remat:  # the plan chose another policy (`fit.with_micro_batch_rows`)
        why = ("each layer's saved input in host memory, to fit" if plan.model.remat == "offload" else
               "the fastest modeled train step that fits")
        logging.info("model.remat: %s (%s %s)", plan.model.remat, why, target.description)
        cfg.model.remat = plan.model.remat
    return dataclasses.replace(loss_cfg, micro_batch_rows=rows)


def current_plan():
    """The DevicePlan `prepare_device` made for this run, or None."""
    return _device_plan
