"""Compiling a run's programs for a target (jaxmath.aot, `python -m jaxmath.bench memory`).

On the CPU (always): the plan's shapes agree with the sampler's own planning, the HLO reader finds
copies, in-place updates and kernels, and the bench reports every phase of a GRPO, SFT and eval
config (a tiny model, compiled for this CPU). Marked `aot` (skipped without JAX's CUDA plugin, the
`aot` extra): the real Qwen3-4B GRPO step at GRPO v2's shapes and one decode window, compiled for an
H100, fit and use the kernels they should.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmath.aot import hlo, targets
from jaxmath.aot import plan as plan_lib
from jaxmath.bench import memory
from jaxmath.rollout.jax_sampler import JaxSampler, SamplerConfig

ROOT = Path(__file__).resolve().parents[1]
H100_BUDGET = 76e9  # 80 GB less the bench's 4 GB of headroom (issue 13)
needs_plugin = pytest.mark.skipif(not targets.plugin_installed(),
                                  reason="JAX's CUDA plugin is not installed (pip install -e '.[aot]')")


def test_plan_shapes_follow_the_sampler():
    for cfg in (SamplerConfig(), SamplerConfig(min_bucket=64), SamplerConfig(prompt_buckets=(100, 700, 1500))):
        for length in (1, 16, 17, 100, 640, 1000, 1024, 1025, 1500):
            assert plan_lib.sampler_bucket(cfg, length) == JaxSampler.bucket_for(SimpleNamespace(config=cfg), length)
    # 8 prompts x 16 samples under max_batch_rows 256: one sub-batch of 128 rows; 64 rows: 4 prompts each
    gen = plan_lib.Generation(prompts=8, num_samples=16, prompt_tokens=1024, max_new_tokens=4096)
    assert plan_lib.sub_batch_rows(SamplerConfig(), gen) == 128
    assert plan_lib.sub_batch_rows(SamplerConfig(max_batch_rows=64), gen) == 64
    # 3 eval prompts pad to 4, as generate pads a sub-batch to a power of two
    assert plan_lib.sub_batch_rows(SamplerConfig(), plan_lib.Generation(3, 1, 100, 10)) == 4


def _compile_for_cpu(f, *args):
    cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
    specs = [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=cpu) for a in args]
    return jax.jit(f, donate_argnums=0).lower(*specs).compile().as_text()


def test_traffic_counts_in_place_updates_slices_and_copies():
    """A loop writing one row per step into a donated buffer updates it in place (no copy, one row
    written per step); a transpose of the whole buffer is a copy of all of it."""
    rows, width = 512, 256

    def fill(buf, x):
        def body(i, b):
            row = jax.lax.dynamic_slice(b, (i, 0), (1, width)) * 2.0 + x[i]
            return jax.lax.dynamic_update_slice(b, row, (i, 0))
        return jax.lax.fori_loop(0, rows, body, buf)

    buf, x = np.zeros((rows, width), np.float32), np.zeros((rows, width), np.float32)
    report = hlo.program_traffic(_compile_for_cpu(fill, buf, x))
    (loop,) = report["loops"]
    assert loop["largest_copy"] < width * 4 and report["largest_copy"] < rows * width * 4  # loop counters only
    assert loop["written"] <= 2 * width * 4  # one row (and loop scalars), not the buffer
    assert loop["read"] < rows * width * 4 / 10
    cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
    spec = jax.ShapeDtypeStruct((rows, width), jnp.float32, sharding=cpu)
    transposed = hlo.program_traffic(jax.jit(lambda b: b.T).lower(spec).compile().as_text())
    assert transposed["copies"] == 1 and transposed["largest_copy"] == rows * width * 4
    computed = hlo.program_traffic(jax.jit(lambda b: b * 2.0).lower(spec).compile().as_text())
    assert computed["copies"] == 0
    assert hlo.array_bytes("(bf16[2,3]{1,0}, s32[4])") == 2 * 6 + 16


def test_attention_kernel_read_from_hlo_text():
    assert hlo.attention_kernel('custom_call_target="__cudnn$fmhaSoftmax"') == "cudnn"
    assert hlo.attention_kernel('custom_call_target="__cudnn$fmhaScaleBiasSoftmaxBackward"') == "cudnn+bias"
    assert hlo.attention_kernel('custom_call_target="__cublas$gemm"') == "xla"


TINY = ["--preset=tiny", "--target=cpu"]
# ml_collections' config loader uses importlib's load_module (its deprecation, not ours)
config_loader = pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")


def _plan(*argv):
    fv = memory._flags(list(argv))
    return memory.run_plan(fv.config, memory.model_config(fv.config, "tiny")[1], micro_batch_rows=fv.micro_batch_rows,
                           sampler_rows=fv.sampler_rows, sft_micro=fv.sft_micro)


@config_loader
def test_each_config_lists_the_programs_its_run_executes():
    # As shipped, vLLM generates (its memory is jaxmath.aot.colocate's, tests/test_colocate.py): JAX
    # runs only the train step. On the JAX engine the sampler's programs join it.
    assert list(_plan("--config=configs/grpo_v2.py").phases) == ["train/step"]
    assert _plan("--config=configs/eval.py").phases == {}
    jax_engine = "--config.rollout.engine=jax"
    grpo = _plan("--config=configs/grpo_v2.py", jax_engine)
    assert list(grpo.phases) == ["rollout/prefill", "rollout/decode", "train/step", "sync/merge"]
    # 8 prompts x 16; loss.micro_batch_rows=0 (auto): the whole batch until fitted to a device (jaxmath.aot.fit)
    assert grpo.phases["rollout/decode"] == 128 and grpo.phases["train/step"] == 128 and grpo.loss.micro_batch_rows == 0
    assert grpo.grpo.prompt_tokens == 1024 and grpo.grpo.completion_tokens == 4096
    # importance correction needs the old-policy pass; periodic evaluation generates with the sampler
    assert "train/logprobs" in _plan("--config=configs/grpo_v2.py", "--config.loss.tis_cap=2.0").phases
    lora = _plan("--config=configs/local_lora.py", jax_engine)
    assert lora.phases["eval/decode"] == 64 and lora.evaluation.max_new_tokens == 2048
    full = _plan("--config=configs/local_full.py", jax_engine, "--micro_batch_rows=4", "--sampler_rows=32")
    assert "sync/merge" not in full.phases and full.phases["train/step"] == 4 and full.phases["rollout/decode"] == 32
    # main's overrides: the prompt budget sets the train prompt bucket and the sampler's
    p1500 = _plan("--config=configs/grpo_v2.py", jax_engine, "--config.rl.max_prompt_tokens=1500")
    assert p1500.grpo.prompt_tokens == 1536 and plan_lib.sampler_bucket(p1500.sampler, 1500) == 2048
    sft = _plan("--config=configs/sft_config_a.py", "--sft_micro=2")
    assert list(sft.phases) == ["train/sft_step", "eval/sft_loss"] and sft.phases["train/sft_step"] == 2
    assert not sft.sft.packed and sft.sft.batch == 32 and sft.sft.seq == 4096
    ev = _plan("--config=configs/eval.py", "--config.eval.backend=jax")
    assert list(ev.phases) == ["eval/prefill", "eval/decode"] and ev.phases["eval/decode"] == 64
    with pytest.raises(SystemExit, match="not a flag|key"):
        memory._flags(["--config=configs/eval.py", "--config.eval.no_such_key=1"])


@pytest.mark.slow  # ~30 s of compiles
@config_loader
def test_memory_report_on_a_tiny_model():
    """The decode loop and the train step of a tiny GRPO run compiled for this CPU, twice (about 30 s):
    the second time with a headroom that leaves one byte too few, which must not fit."""
    shapes = ["--config.rl.max_prompt_tokens=40", "--config.rl.max_completion_tokens=24",
              "--config.rl.num_generations=2", "--config.rl.prompts_per_step=4", "--config.loss.micro_batch_rows=4",
              "--config.sampler.decode_window=8", "--phases=rollout/decode,train/step,sync/merge",
              "--config.rollout.engine=jax"]
    out = memory.main(["--config=configs/grpo_v2.py", *TINY, *shapes])
    assert out["target"] == "cpu" and out["fits"] and out["capacity_bytes"] > 0
    assert list(out["phases"]) == ["rollout/decode", "train/step", "sync/merge"]
    assert out["phases"]["train/step"]["rows"] == 4 and out["phases"]["rollout/decode"]["rows"] == 8
    assert out["peak_bytes"] == max(p["peak_bytes"] for p in out["phases"].values())
    assert out["phases"]["train/step"]["attention"] == "xla"  # a CPU
    # prompt bucket 64 (40 tokens), 24 completion tokens: the decode program of the largest window
    # (8, 16 and 24 new tokens) bounds the memory; `roofline` compiles each
    (step,) = out["phases"]["rollout/decode"]["decode_steps"]
    assert step["window"] == 64 + 24 and step["steps_to"] == 24
    # a step reads at least what it must (every weight once, the window's keys and values)
    assert step["buffers_read"] >= step["must_read"]
    # "fits" is the peak plus the headroom against the capacity: one byte less headroom than the gap fits,
    # the gap plus one byte does not
    gap = out["capacity_bytes"] - out["peak_bytes"]
    assert out["fits"] == (out["peak_bytes"] + 4e9 <= out["capacity_bytes"])
    tight = memory.main(["--config=configs/grpo_v2.py", *TINY, *shapes, f"--headroom_bytes={gap + 1}"])
    assert tight["peak_bytes"] == out["peak_bytes"] and tight["fits"] is False


@config_loader
def test_gpu_target_without_the_plugin_names_the_extra(monkeypatch):
    monkeypatch.setattr(targets, "plugin_installed", lambda: False)
    with pytest.raises(SystemExit, match=r"\.\[aot\]"):
        memory.main(["--config=configs/grpo_v2.py", "--target=h100", "--preset=tiny"])


def test_targets_describe_their_devices():
    h100, h200 = targets.load_target("h100"), targets.load_target("h200")
    assert h100.device_bytes == 84_929_347_584 and h100.capacity_bytes == 80e9 and h100.platform == "gpu"
    assert h200.device_bytes == 150_149_398_528 and h200.capacity_bytes == 141e9 and "H200" in h200.description
    with pytest.raises(ValueError, match="h100, h200, cpu"):
        targets.load_target("a100")


# --- fitting by construction (jaxmath.aot.fit) --------------------------------------------------------------


def test_largest_fitting_rows_for_a_capacity():
    """Auto picks the largest candidate within the budget, with few evaluations; a requested value is
    kept when it fits and refused, naming the knob, the value and what fits, when it does not."""
    from jaxmath.aot import fit
    from jaxmath.config import ConfigError

    calls = []

    def peak_of(rows):  # a fake cost: 10 GB resident + 3 GB per row
        calls.append(rows)
        return int(10e9 + 3e9 * rows)

    candidates = fit.divisors(128)
    assert candidates == [1, 2, 4, 8, 16, 32, 64, 128]
    for capacity, expected in ((80e9, 16), (40e9, 8), (250e9, 64), (12e9, 0)):
        budget = fit.budget_bytes(fit.with_capacity(targets.load_target("cpu"), capacity))
        rows, peak = fit.largest_fitting(candidates, peak_of, budget)
        assert rows == expected and peak <= budget
        if rows and rows < 128:
            assert peak_of(candidates[candidates.index(rows) + 1]) > budget
    calls.clear()
    assert fit.choose_rows("loss.micro_batch_rows", 0, candidates, peak_of, 72e9) == 16
    assert len(calls) <= 4  # bisection over 8 candidates
    assert fit.choose_rows("loss.micro_batch_rows", 8, candidates, peak_of, 72e9) == 8
    with pytest.raises(ConfigError, match=r"^loss\.micro_batch_rows=32 does not fit: .* the largest value that fits "
                                          r"is 16 "):
        fit.choose_rows("loss.micro_batch_rows", 32, candidates, peak_of, 72e9)
    with pytest.raises(ConfigError, match=r"loss\.micro_batch_rows=0 \(auto\): not even 1 row"):
        fit.choose_rows("loss.micro_batch_rows", 0, candidates, peak_of, 11e9)
    # a refusal names the term that does not fit, in one line
    with pytest.raises(ConfigError) as refused:
        fit.choose_rows("loss.micro_batch_rows", 0, candidates, peak_of, 11e9,
                        what=lambda rows: f"the step's activations at {rows} row")
    assert "\n" not in str(refused.value) and "fits a 11.0 GB budget: the step's activations at 1 row;" in str(refused.value)


def test_the_plan_offloads_layer_inputs_only_where_not_one_row_fits_otherwise():
    """`fit.with_micro_batch_rows` on GRPO v2's plan with made-up compiled peaks (no compile): where one
    row fits with model.remat "full" it stays (the policies that save more, `fit.SAVING_REMATS`, fit no
    row here, and the search stops at the first that fits none); a policy that saves more is taken at the
    rows it fits where its step (the whole batch) is modeled faster; where none fits on a GPU target,
    the plan retries with each layer's saved input in host memory ("offload") and carries that choice;
    where neither fits, one line says so; on a CPU target there is no retry."""
    from jaxmath.aot import fit
    from jaxmath.config import ConfigError

    plan = _grpo_v2_plan(loss=__import__("jaxmath.rl.step", fromlist=["x"]).LossConfig(micro_batch_rows=0))
    h100 = targets.load_target("h100")
    calls = []

    def compiler(per_row, seconds=None, at=None):
        def compile(plan_, phase, rows):
            calls.append((plan_.model.remat, rows))
            peak = int(10e9 + per_row.get(plan_.model.remat, 100e9) * rows)
            modeled = (at or {}).get((plan_.model.remat, rows),
                                     (seconds or {}).get(plan_.model.remat, 1.0) * (1 + 1 / rows))
            return SimpleNamespace(phase=phase, rows=rows, peak_bytes=peak, temporaries=peak - int(10e9),
                                   modeled_seconds=modeled)
        return compile

    fitted = fit.with_micro_batch_rows(plan, h100, budget=int(70e9), compile=compiler({"full": 20e9, "offload": 9e9}))
    assert fitted.model.remat == "full" and fitted.loss.micro_batch_rows == 2 and fitted.phases["train/step"] == 2
    assert {remat for remat, _ in calls} == {"full", "attention"}  # "attention" fits no row: the search stops
    # A policy that saves more is taken at the rows it fits where its step is modeled faster, else not
    peaks = {"full": 5e9, "attention": 12e9, "attention_mlp": 50e9}
    calls.clear()
    fitted = fit.with_micro_batch_rows(plan, h100, budget=int(70e9),
                                       compile=compiler(peaks, {"full": 1.0, "attention": 0.8, "attention_mlp": 0.6}))
    assert (fitted.model.remat, fitted.loss.micro_batch_rows) == ("attention", 4)  # 0.8 x 1.25 < 1.0 x 1.125 < 0.6 x 2
    # each policy's bisection looks no higher than the rows the policy before it fit (8, then 4)
    assert max(rows for remat, rows in calls if remat == "attention") <= 8
    assert max(rows for remat, rows in calls if remat == "attention_mlp") <= 4
    fitted = fit.with_micro_batch_rows(plan, h100, budget=int(70e9),
                                       compile=compiler(peaks, {"full": 1.0, "attention": 1.2, "attention_mlp": 1.2}))
    assert (fitted.model.remat, fitted.loss.micro_batch_rows) == ("full", 8)
    # where the largest rows that fit model slower (XLA rematerializing inside the program), the divisor
    # below them is taken: "full" at 4 rows (1.25) beats "full" at 8 (made 3.0) and "attention" at 4 (1.5)
    fitted = fit.with_micro_batch_rows(plan, h100, budget=int(70e9),
                                       compile=compiler(peaks, {"full": 1.0, "attention": 1.2, "attention_mlp": 1.2},
                                                        at={("full", 8): 3.0}))
    assert (fitted.model.remat, fitted.loss.micro_batch_rows) == ("full", 4)
    # rows the user configured stay: only the policy is chosen
    configured = dataclasses.replace(plan, loss=dataclasses.replace(plan.loss, micro_batch_rows=8))
    fitted = fit.with_micro_batch_rows(configured, h100, budget=int(70e9),
                                       compile=compiler(peaks, {"full": 1.0, "attention": 1.2, "attention_mlp": 1.2},
                                                        at={("full", 8): 3.0}))
    assert (fitted.model.remat, fitted.loss.micro_batch_rows) == ("full", 8)
    fitted = fit.with_micro_batch_rows(plan, h100, budget=int(70e9), compile=compiler({"full": 80e9, "offload": 25e9}))
    assert fitted.model.remat == "offload" and fitted.loss.micro_batch_rows == 2
    with pytest.raises(ConfigError) as refused:
        fit.with_micro_batch_rows(plan, h100, budget=int(70e9), compile=compiler({"full": 80e9, "offload": 70e9}))
    message = str(refused.value)
    assert "\n" not in message and message.startswith("loss.micro_batch_rows=0 (auto): not even 1 row fits")
    assert message.endswith("(nor with each layer's saved input offloaded to host memory, model.remat=offload)")
    cpu = fit.with_capacity(targets.load_target("cpu"), 80e9)
    with pytest.raises(ConfigError, match="not even 1 row") as refused:
        fit.with_micro_batch_rows(plan, cpu, budget=int(70e9), compile=compiler({"full": 80e9, "offload": 25e9}))
    assert "offload" not in str(refused.value)


def test_the_plans_compiler_compiles_a_forward_pass_once_for_every_remat_policy(monkeypatch):
    """`fit.phase_compiler`: each (policy, phase, rows) once; the phases without a backward pass (the
    logprob pass, generation) once whatever the policy, since a remat policy only changes a backward."""
    from jaxmath.aot import fit

    compiled = []
    monkeypatch.setattr(plan_lib, "compile_phase", lambda plan, phase, rows, target, keep=False:
                        compiled.append((plan.model.remat, phase, rows, keep)) or SimpleNamespace(rows=rows))
    plan = _grpo_v2_plan()
    compile = fit.phase_compiler(targets.load_target("h100"), keep=True)
    for remat in ("full", *fit.SAVING_REMATS, "full"):
        policy = dataclasses.replace(plan, model=plan.model.replace(remat=remat))
        for phase in ("train/logprobs", "train/step", "rollout/decode"):
            assert compile(policy, phase, 4).rows == 4
    assert compiled == [("full", "train/logprobs", 4, True), ("full", "train/step", 4, True),
                        ("full", "rollout/decode", 4, True), ("attention", "train/step", 4, True),
                        ("attention_mlp", "train/step", 4, True)]


@pytest.mark.aot
@needs_plugin
def test_the_logprob_pass_compiles_to_one_program_under_every_remat_policy():
    """The premise of `fit.phase_compiler`'s cache: the logprob pass (no backward) of a tiny run,
    compiled for an H100, is one optimized program whatever model.remat says."""
    fv = memory._flags(["--config=configs/local_full.py", "--config.model.preset=tiny",
                        "--config.rl.max_prompt_tokens=64", "--config.rl.max_completion_tokens=32"])
    plan = memory.run_plan(fv.config, memory.model_config(fv.config)[1])
    texts = {remat: plan_lib.compile_phase(dataclasses.replace(plan, model=plan.model.replace(remat=remat)),
                                           "train/logprobs", 2, targets.load_target("h100"), keep=True
                                           ).compiled.as_text()
             for remat in ("full", "attention_mlp", "offload")}
    assert texts["full"] == texts["attention_mlp"] == texts["offload"]


def test_a_synchronous_run_holds_no_sampler_copy_through_the_train_phase():
    """The JAX sampler sleeps through a synchronous run's train phase (`JaxSampler.sleep`), so the plan's
    logprob pass and train step hold no copy of its layers; with the next rollout overlapping the
    training (rl.max_staleness=1) they hold it, and the step trains off policy after a logprob pass."""
    plans = {}
    for staleness in (0, 1):
        fv = memory._flags(["--config=configs/local_full.py", "--config.model.preset=tiny",
                            "--config.rollout.engine=jax", f"--config.rl.max_staleness={staleness}",
                            "--config.rl.max_prompt_tokens=64", "--config.rl.max_completion_tokens=32"])
        plans[staleness] = memory.run_plan(fv.config, memory.model_config(fv.config)[1])
    sync, overlap = plans[0], plans[1]
    assert not sync.grpo.overlap and overlap.grpo.overlap and not overlap.grpo.on_policy
    assert "train/logprobs" in overlap.phases
    state = plan_lib._abstract_state(sync, sync.model, None)
    assert state.sampler_copy_bytes > 0
    assert plan_lib._train_phase_sampler_bytes(sync, state) == 0
    assert plan_lib._train_phase_sampler_bytes(overlap, state) == state.sampler_copy_bytes
    # what the train step's program holds beside its arguments (lowered, not compiled)
    resident = {k: plan_lib._grpo_step(p, state, p.phases["train/step"], None)[1] for k, p in plans.items()}
    assert resident == {0: 0, 1: state.sampler_copy_bytes}


def test_a_generation_of_which_not_one_row_fits_is_refused_naming_the_kv_cache():
    """The JAX sampler at GRPO v2's shapes (Qwen3-4B, K=16) on an 80 GB device: at 32,768 and 131,072
    completion tokens fewer rows than K fit, and the plan takes them (the sampler spreads a group over
    admissions, `JaxSampler.plan`); at 259,072 not one row does, and the run is refused before any
    weight loads, in one line naming the KV cache (abstract shapes only, no compile)."""
    from jaxmath.aot import fit
    from jaxmath.config import ConfigError
    from jaxmath.rollout.jax_sampler import rows_that_fit, sub_batch_cost

    device = fit.with_capacity(targets.load_target("cpu"), 80e9)
    rows = {}
    for tokens in (4096, 32768, 131072):
        plan = _grpo_v2_plan(max_completion_tokens=tokens)
        rows[tokens] = plan_lib.generation_rows(plan, "rollout/decode", device)
        fit.check_generation(plan, device)  # does not raise
        cost = sub_batch_cost(plan.model, prompt_len=1024, max_new_tokens=tokens)
        assert rows[tokens] == min(rows_that_fit(cost, plan_lib.sampler_budget(plan, device), 16), 64)
    assert rows[4096] == 64 and 1 <= rows[131072] < rows[32768] < 16
    with pytest.raises(ConfigError) as refused:
        fit.check_generation(_grpo_v2_plan(max_completion_tokens=259072), device)
    message = str(refused.value)
    assert "\n" not in message and message.startswith("rollout/decode: not even one row fits")
    assert "KV cache of 260,096 positions" in message and "rl.max_completion_tokens" in message


@pytest.mark.slow
@config_loader
def test_main_fits_the_micro_batch_to_the_device_before_weights_load():
    """`jaxmath.aot.device.fit_micro_batch_rows` on a tiny GRPO run (4 rows) compiled for this CPU, with a
    capacity between the train step's peaks at 1 and 4 rows: auto (0) takes the largest rows that fit,
    a value too large is refused with one line naming the knob and what fits (about 60 s; 6 compiles)."""
    from jaxmath import sections
    from jaxmath.aot import device
    from jaxmath.aot import fit
    from jaxmath.config import ConfigError

    fv = memory._flags(["--config=configs/grpo_v2.py", "--config.model.preset=tiny",
                        "--config.rl.max_prompt_tokens=40", "--config.rl.max_completion_tokens=256",
                        "--config.rl.num_generations=2", "--config.rl.prompts_per_step=2"])
    cfg = fv.config
    _, loss_cfg, _ = sections.grpo_configs(cfg)
    plan = memory.run_plan(cfg, memory.model_config(cfg)[1])
    cpu = targets.load_target("cpu")
    peak = {rows: plan_lib.compiled_peak_bytes(plan, "train/step", rows, cpu) for rows in (1, 4)}
    assert peak[1] < peak[4]  # the step's logits grow with the rows
    target = fit.with_capacity(cpu, (peak[1] + peak[4]) / 2 / (1 - fit.MARGIN))
    auto = device.fit_micro_batch_rows(cfg, dataclasses.replace(loss_cfg, micro_batch_rows=0), target)
    assert auto.micro_batch_rows in (1, 2)
    with pytest.raises(ConfigError) as refused:
        device.fit_micro_batch_rows(cfg, dataclasses.replace(loss_cfg, micro_batch_rows=4), target)
    message = str(refused.value)
    assert "\n" not in message and message.startswith("loss.micro_batch_rows=4 does not fit")
    assert f"the largest value that fits is {auto.micro_batch_rows}" in message
    # On this CPU (no GPU memory limit to plan against) nothing is refused or changed.
    assert fit.local_target() is None
    assert device.fit_micro_batch_rows(cfg, dataclasses.replace(loss_cfg, micro_batch_rows=4)).micro_batch_rows == 4


# --- compiled for an H100 (the aot extra) ---------------------------------------------------------------


def _grpo_v2_plan(**changes):
    from jaxmath.model import preset
    from jaxmath.model.lora import LoRAConfig
    from jaxmath.optim import OptimizerConfig
    from jaxmath.rl.step import LossConfig

    model = preset("qwen3-4b-instruct-2507", dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, remat="full")
    kwargs = dict(lora=LoRAConfig(rank=64, alpha=128.0), optimizer=OptimizerConfig(learning_rate=4e-5),
                  loss=LossConfig(micro_batch_rows=16, logprob_chunk=1024), prompts=8, num_generations=16,
                  max_prompt_tokens=1024, max_completion_tokens=4096, prompt_bucket=64, temperature=1.0,
                  on_policy=True, sampler=SamplerConfig(max_batch_rows=64))
    return plan_lib.grpo_plan(model, **{**kwargs, **changes})


@pytest.mark.aot
@needs_plugin
@pytest.mark.slow  # 8-17 s: out of the fast subset's 10 minutes (the whole suite runs it)
def test_h100_grpo_v2_step_fits_with_cudnn_attention():
    """GRPO v2's train step (Qwen3-4B, LoRA r64, prompt bucket 1,024 + 4,096 completion tokens: 5,119
    positions, which JAX's cuDNN wrapper refuses as it is) compiles for an H100 at the config's 16
    rows per micro-batch, with cuDNN's fused attention and no dense bias, within 76 GB."""
    plan = _grpo_v2_plan()
    memory_ = plan_lib.compile_phase(plan, "train/step", 16, targets.load_target("h100"))
    assert memory_.attention == "cudnn"
    assert memory_.peak_bytes <= H100_BUDGET, memory_


@pytest.mark.aot
@needs_plugin
@pytest.mark.slow  # 8-17 s: out of the fast subset's 10 minutes (the whole suite runs it)
def test_h100_decode_window_reads_what_it_must_and_updates_the_cache_in_place():
    """GRPO v2's rollout decode (Qwen3-4B, 64 rows, 1,024-token prompt bucket, a cache of 5,120 slots)
    at its first attention window (1,088 slots) compiled for an H100: it fits, the cache is updated in
    place, no copy of the cache or of a layer's weights or window is made, and a step reads at most
    1.15x and writes at most 0.1x the bytes it must (every weight once, the window's keys and values).
    Before the sampler's per-layer layout, every step copied each layer's weights and window and the
    LM head's chunks out before their matmuls: 2.16x read, 1.10x written (docs/BENCHMARKS.md)."""
    from jaxmath.model.qwen3 import KVCache

    plan = _grpo_v2_plan(sampler=SamplerConfig(max_batch_rows=64))
    plan = dataclasses.replace(plan, phases={**plan.phases, "rollout/decode": 64})
    memory_ = plan_lib.compile_phase(plan, "rollout/decode", 64, targets.load_target("h100"), window=1088)
    assert memory_.peak_bytes <= H100_BUDGET, memory_
    cache = KVCache.nbytes_for(plan.model, 64, 1024 + 4096)
    assert memory_.aliased >= cache  # the donated cache is updated in place and returned
    (loop,) = memory_.traffic["loops"]
    smallest_layer_array = plan.model.num_kv_heads * plan.model.head_dim * plan.model.hidden_size * 2
    assert memory_.traffic["largest_copy"] < smallest_layer_array
    assert loop["largest_copy"] < smallest_layer_array  # was one layer's window (0.3 GB), every layer, every step
    must = memory.decode_must_read(plan, "rollout/decode", 1088)
    assert loop["read"] <= 1.15 * must, loop["read"] / must
    assert loop["written"] <= 0.1 * must, loop["written"] / must


@pytest.mark.slow
@pytest.mark.long  # 106 s since the plan weighs remat policies; the CLI over fit/plan, tested here without it
@pytest.mark.aot
@needs_plugin
@config_loader
def test_memory_cli_for_h100_on_a_tiny_model():
    """The command line as a user runs it (its own process: the plugin's environment set up by the
    command), last line JSON."""
    cmd = [sys.executable, "-m", "jaxmath.bench", "memory", "--config=configs/grpo_v2.py", "--target=h100",
           "--preset=tiny", "--config.rl.max_completion_tokens=64", "--config.sampler.decode_window=0",
           "--phases=train/step"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["target"] == "h100" and result["fits"]
    assert result["phases"]["train/step"]["attention"] == "cudnn"
    # vLLM generates as shipped: its phases beside JAX's, and the split it would run with
    assert {"vllm/generate", "vllm/sync"} <= set(result["phases"])
    assert 0 < result["gpu_memory_utilization"] < 1 and result["kv_cache_rows"] >= 1
    assert result["phases"]["train/step"]["holds"]["jax/program"] <= result["jax_budget_bytes"]
    assert "vllm/weights" not in result["phases"]["train/step"]["holds"]  # asleep through the train step
    assert result["peak_bytes"] == max(p["peak_bytes"] for p in result["phases"].values())


@pytest.mark.aot
@pytest.mark.slow
@needs_plugin
@config_loader
def test_grpo_v2_fits_a_device_by_construction():
    """GRPO v2 as shipped, at the small "bench" model shape, for an H100 cut to 2 GB: the sampler's
    sub-batch rows (chosen by memory, as `JaxSampler.plan` does) and the auto micro-batch rows
    (`jaxmath.aot.fit`) both come out below the config's, and every program the run executes,
    compiled for that device at those rows, fits it: the fitting logic and the AOT plan agree."""
    from jaxmath.aot import fit

    fv = memory._flags(["--config=configs/grpo_v2.py", "--config.model.preset=bench", "--config.rollout.engine=jax"])
    plan = memory.run_plan(fv.config, memory.model_config(fv.config)[1])
    target = fit.with_capacity(targets.load_target("h100"), 2e9)
    fitted = plan_lib.on_target(plan, target)
    micro = fit.micro_batch_rows(fitted, target, requested=0)
    assert 0 < fitted.phases["rollout/decode"] < plan.phases["rollout/decode"] == 128
    assert 0 < micro < plan.grpo.rows and plan.grpo.rows % micro == 0
    for phase, rows in fitted.phases.items():
        rows = micro if phase.startswith("train/") else rows
        m = plan_lib.compile_phase(fitted, phase, rows, target)
        budget = fit.budget_bytes(target) if phase.startswith("train/") else target.capacity_bytes
        assert m.peak_bytes <= budget, (phase, rows, m.peak_bytes)
        if phase == "train/step":
            assert m.attention == "cudnn"


@pytest.mark.aot
@pytest.mark.slow  # compiles Qwen3-4B's train step (and logprob pass) for an H100 a few times: minutes
@needs_plugin
@config_loader
@pytest.mark.parametrize("config,tokens,rows,remat", [("grpo_v2", 131072, 1, "full"), ("local_full", 32768, 1, "full"),
                                                      pytest.param("local_full", 65536, 1, "offload",
                                                                   marks=pytest.mark.long)])
def test_long_completions_fit_an_h100_by_construction(config, tokens, rows, remat):
    """The command of issue 27 as a user runs it: GRPO v2 (LoRA) at 131,072 completion tokens and
    local_full (full-parameter) at 32,768 on one H100, the study's model and vLLM colocated as
    shipped: the plan picks the rows per micro-batch itself and every phase fits. local_full at
    65,536 fits only with each layer's saved input in host memory, which the plan picks."""
    cmd = [sys.executable, "-m", "jaxmath.bench", "memory", f"--config=configs/{config}.py", "--target=h100",
           f"--config.rl.max_completion_tokens={tokens}"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=1800)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["fits"] and result["peak_bytes"] <= H100_BUDGET
    step = result["phases"]["train/step"]
    assert step["rows"] == rows and step["attention"] == "cudnn" and step["remat"] == remat
    assert (step["host_temporaries"] > 0) == (remat == "offload")
    assert result["kv_cache_rows"] >= 1 and result["device_plan"]["max_model_len"] >= tokens
    for phase in ("train/step", "train/logprobs"):
        if phase in result["phases"]:
            assert result["phases"][phase]["holds"]["jax/program"] <= result["jax_budget_bytes"]


def test_the_roofline_peaks_of_this_process_gpu_follow_its_name():
    """A run on its own GPU (`fit.local_target`, named "local") weighs remat policies by the peaks of the
    named GPU its device kind names (an H200's bandwidth for an H200), else the H100's; a CPU has none."""
    from jaxmath.aot.targets import Target, peaks

    def local(kind):
        return Target("local", "gpu", int(80e9), f"{kind} (this process's device)", int(80e9))

    assert plan_lib.roofline_peaks(local("NVIDIA H200")) == peaks("h200") != peaks("h100")
    assert plan_lib.roofline_peaks(local("NVIDIA A100-SXM4-80GB")) == peaks("h100")
    assert plan_lib.roofline_peaks(targets.load_target("h100")) == peaks("h100")
    assert plan_lib.roofline_peaks(targets.load_target("cpu")) is None
