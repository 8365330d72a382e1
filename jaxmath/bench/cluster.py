"""`python -m jaxmath.bench cluster --config=configs/local_full.py --target=h100 --devices=8`: one GRPO
train step of a run, compiled for N GPUs at once (deviceless), and its memory per GPU.

`python -m jaxmath.bench memory` compiles each program for one device. XLA also compiles for several
devices that are not there: `jax.experimental.topologies.get_topology_desc(platform="cuda",
topology="<slices>x<hosts>x<devices per host>")` describes N H100s (8 per host here) and the program is
partitioned over them as a run would be: the config's mesh (`mesh.data/fsdp/tp`, one of them -1 for the
rest) over the N devices, parameters, LoRA adapters and Adam's moments placed by the sharding tables
(`jaxmath.model.sharding.variable_sharding`, `like_params_shardings`), the batch's rows over the batch
axes. `memory_analysis()` of such a program is one device's: its share of the arguments, the
temporaries XLA gives it, its outputs. Per GPU: peak = arguments + temporaries + outputs - aliased (the
train step donates the parameters and optimizer state). The rollouts' memory is not here: the study's
configs roll out on vLLM, one engine per GPU or per tensor-parallel group, which `bench memory` plans.

Flags: --config (with --config.* overrides as main reads them), --target (h100 or h200), --devices (a
multiple of 8, or fewer than 8 on one host), --micro_batch_rows (0: loss.micro_batch_rows, else the step's
rows), --preset (model preset; default as `bench memory`). The last line is JSON.
"""

from __future__ import annotations

from typing import Any

GB = 1e9
PER_HOST = 8  # H100 / H200 GPUs per host (an HGX board)


def _flags(argv: list[str]):
    from absl import flags
    from ml_collections import config_flags

    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "a GRPO config file, e.g. configs/local_full.py", flag_values=fv,
                                    sys_argv=["cluster"] + list(argv))
    flags.DEFINE_enum("target", "h100", ("h100", "h200"), "the GPU to compile for", flag_values=fv)
    flags.DEFINE_integer("devices", 8, "GPUs the run spans", flag_values=fv)
    flags.DEFINE_integer("micro_batch_rows", 0, "rows per train micro-batch, over all GPUs (0: the config's)",
                         flag_values=fv)
    flags.DEFINE_string("preset", "", "model preset (default: model.preset, model.path's config.json, else "
                                      "qwen3-4b-instruct-2507)", flag_values=fv)
    fv(["cluster"] + list(argv))
    if not fv.config:
        raise SystemExit("cluster: --config is required, e.g. --config=configs/local_full.py")
    return fv


def topology_mesh(target_name: str, devices: int, data: int, fsdp: int, tp: int):
    """The (data, fsdp, tp) mesh over `devices` deviceless GPUs of `target_name`, PER_HOST per host."""
    from jax.experimental import topologies

    from jaxmath.aot import targets
    from jaxmath.model import sharding

    targets.require_plugin(target_name)
    if devices > PER_HOST and devices % PER_HOST:
        raise SystemExit(f"cluster: --devices={devices} must be a multiple of {PER_HOST} (GPUs per host), or fewer")
    hosts, per_host = (devices // PER_HOST, PER_HOST) if devices >= PER_HOST else (1, devices)
    topology = topologies.get_topology_desc(platform="cuda", target_config=targets._textproto(target_name),
                                            topology=f"1x{hosts}x{per_host}")
    return sharding.make_mesh(data, fsdp, tp, devices=topology.devices)


def abstract_placed_state(plan, model_cfg, mesh):
    """(graphdef, trainable, frozen, opt_state, optimizer) of the run as ShapeDtypeStructs placed on
    `mesh` by the sharding tables, as `train_state.init_or_restore` places the real ones."""
    import jax
    from flax import nnx

    from jaxmath import optim
    from jaxmath.model import lora as lora_lib
    from jaxmath.model import sharding
    from jaxmath.model.qwen3 import Qwen3

    def build():
        model = Qwen3(model_cfg, rngs=nnx.Rngs(0))
        if plan.trains_lora:
            lora_lib.apply_lora(model, plan.lora)
        return model

    graphdef, trainable, frozen = lora_lib.split_trainable(nnx.eval_shape(build))

    def place(state):
        def one(v):
            if not isinstance(v, nnx.Variable):
                return v
            value = v.get_value()
            where = sharding.canonical(sharding.variable_sharding(v, mesh))
            return v.replace(jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=where))
        return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))

    trainable, frozen = place(trainable), place(frozen)
    optimizer = optim.make_optimizer(plan.optimizer)
    abstract = jax.eval_shape(optimizer.init, trainable)
    shardings = sharding.like_params_shardings(abstract, trainable, mesh)
    opt_state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)
    return graphdef, trainable, frozen, opt_state, optimizer


def compile_step(plan, model_cfg, mesh, rows: int):
    """The GRPO train step at `rows` per micro-batch, compiled for `mesh`; its CompiledMemoryStats."""
    import dataclasses

    import jax
    import jax.numpy as jnp

    from jaxmath.model import sharding
    from jaxmath.rl.step import Batch, make_train_step

    graphdef, trainable, frozen, opt_state, optimizer = abstract_placed_state(plan, model_cfg, mesh)
    g = plan.grpo
    width, t = g.prompt_tokens + g.completion_tokens, g.completion_tokens

    def spec(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.batch_sharding(mesh, shape))

    batch = Batch(tokens=spec((g.rows, width), jnp.int32), valid=spec((g.rows, width), jnp.bool_),
                  completion_mask=spec((g.rows, t), jnp.bool_), advantages=spec((g.rows,), jnp.float32),
                  old_logprobs=spec((g.rows, t), jnp.float32), engine_logprobs=spec((g.rows, t), jnp.float32),
                  ref_logprobs=spec((g.rows, t), jnp.float32) if plan.loss.beta > 0 else None)
    loss = dataclasses.replace(plan.loss, micro_batch_rows=rows)
    step = make_train_step(graphdef, optimizer, loss, on_policy=g.on_policy, temperature=plan.rollout.temperature,
                           max_completion_tokens=t)
    lowered = step.lower(trainable, frozen, opt_state, batch)
    try:
        compiled = lowered.compile()
    except Exception as e:  # XLA's or a kernel's partitioner refusing the program: say so in one line
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        raise SystemExit(f"cluster: XLA did not compile the step for {mesh.size} GPUs at {rows} rows per "
                         f"micro-batch of {g.rows} ({type(e).__name__}: {lines[0][:200] if lines else ''}); some steps that "
                         "accumulate micro-batches fail in cuDNN attention's partitioner (docs/SCALING.md): try "
                         f"other --micro_batch_rows (the whole step: {g.rows}) or --config.model.attention_impl=xla"
                         ) from None
    from jaxmath.aot import hlo

    return compiled.memory_analysis(), hlo.attention_kernel(compiled.as_text())


def main(argv: list[str]) -> dict[str, Any]:
    from jaxmath.aot import run as run_lib
    from jaxmath.aot import targets

    fv = _flags(argv)
    targets.prepare_process()
    cfg = fv.config
    if cfg.get("mode") != "grpo":
        raise SystemExit(f"cluster: a GRPO config is needed (config.mode is {cfg.get('mode')!r})")
    from jaxmath.config import MeshConfig, build

    m = build(MeshConfig, cfg.get("mesh", {}), prefix="mesh")
    mesh = topology_mesh(fv.target, fv.devices, m.data, m.fsdp, m.tp)
    model_name, model_cfg = run_lib.model_config(cfg, fv.preset)
    model_cfg = model_cfg.for_platform("gpu")
    plan = run_lib.run_plan(cfg, model_cfg, micro_batch_rows=fv.micro_batch_rows)
    rows = fv.micro_batch_rows or plan.loss.micro_batch_rows or plan.grpo.rows
    stats, attention = compile_step(plan, model_cfg, mesh, rows)
    peak = (stats.argument_size_in_bytes + stats.temp_size_in_bytes + stats.output_size_in_bytes
            - stats.alias_size_in_bytes)
    result = {"target": fv.target, "devices": fv.devices, "mesh": dict(mesh.shape), "model": model_name,
              "lora_rank": plan.lora.rank, "step_rows": plan.grpo.rows, "micro_batch_rows": rows,
              "arguments_bytes": int(stats.argument_size_in_bytes), "temporaries_bytes": int(stats.temp_size_in_bytes),
              "outputs_bytes": int(stats.output_size_in_bytes), "aliased_bytes": int(stats.alias_size_in_bytes),
              "peak_bytes_per_device": int(peak), "attention": attention}
    print(f"cluster: the GRPO train step of {fv['config'].config_filename} with {model_name} on {fv.devices} x "
          f"{fv.target}, mesh {dict(mesh.shape)}, {rows} rows per micro-batch of {plan.grpo.rows}: per GPU "
          f"arguments {stats.argument_size_in_bytes / GB:.1f} GB, temporaries {stats.temp_size_in_bytes / GB:.1f} GB, "
          f"peak {peak / GB:.1f} GB; attention {attention}", flush=True)
    return result
