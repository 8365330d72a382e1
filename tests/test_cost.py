"""The roofline cost model of compiled programs (`jaxmath.aot.cost`, `python -m jaxmath.bench roofline`):
FLOPs and bytes of a hand-written HLO module by hand; on the H100 target (the `aot` extra), a GEMM's
FLOPs are 2MNK, cuDNN attention's 4 B H S^2 D, and the command reports every program of a tiny run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from jaxmath.aot import cost, targets

ROOT = Path(__file__).resolve().parents[1]
needs_plugin = pytest.mark.skipif(not targets.plugin_installed(),
                                  reason="JAX's CUDA plugin is not installed (pip install -e '.[aot]')")
PEAKS = {"flops": {"bf16": 1e12, "f32": 0.5e12}, "bandwidth": 1e11}

# A loop of 10 steps, each a [64, 128] x [128, 32] bf16 GEMM fusion and an elementwise add fusion.
MODULE = """HloModule m, entry_computation_layout={(bf16[64,128]{1,0}, bf16[128,32]{1,0})->bf16[64,32]{1,0}}

%gemm (p0: bf16[64,128], p1: bf16[128,32]) -> bf16[64,32] {
  %p0 = bf16[64,128]{1,0} parameter(0)
  %p1 = bf16[128,32]{1,0} parameter(1)
  ROOT %dot.1 = bf16[64,32]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%add (a: bf16[64,32], b: bf16[64,32]) -> bf16[64,32] {
  %a = bf16[64,32]{1,0} parameter(0)
  %b = bf16[64,32]{1,0} parameter(1)
  ROOT %sum = bf16[64,32]{1,0} add(%a, %b)
}

%body (state: (s32[], bf16[64,128], bf16[128,32], bf16[64,32])) -> (s32[], bf16[64,128], bf16[128,32], bf16[64,32]) {
  %state = (s32[], bf16[64,128]{1,0}, bf16[128,32]{1,0}, bf16[64,32]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%state), index=0
  %x = bf16[64,128]{1,0} get-tuple-element(%state), index=1
  %w = bf16[128,32]{1,0} get-tuple-element(%state), index=2
  %acc = bf16[64,32]{1,0} get-tuple-element(%state), index=3
  %gemm_fusion = bf16[64,32]{1,0} fusion(%x, %w), kind=kCustom, calls=%gemm, metadata={op_name="jit(f)/while/body/dot_general"}
  %add_fusion = bf16[64,32]{1,0} fusion(%acc, %gemm_fusion), kind=kLoop, calls=%add
  ROOT %next = (s32[], bf16[64,128]{1,0}, bf16[128,32]{1,0}, bf16[64,32]{1,0}) tuple(%i, %x, %w, %add_fusion)
}

%cond (s: (s32[], bf16[64,128], bf16[128,32], bf16[64,32])) -> pred[] {
  %s = (s32[], bf16[64,128]{1,0}, bf16[128,32]{1,0}, bf16[64,32]{1,0}) parameter(0)
  ROOT %t = pred[] constant(true)
}

ENTRY %main (x: bf16[64,128], w: bf16[128,32]) -> bf16[64,32] {
  %x = bf16[64,128]{1,0} parameter(0)
  %w = bf16[128,32]{1,0} parameter(1)
  %zero = bf16[64,32]{1,0} constant(0)
  %zi = s32[] constant(0)
  %init = (s32[], bf16[64,128]{1,0}, bf16[128,32]{1,0}, bf16[64,32]{1,0}) tuple(%zi, %x, %w, %zero)
  %loop = (s32[], bf16[64,128]{1,0}, bf16[128,32]{1,0}, bf16[64,32]{1,0}) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"10"}}
  ROOT %out = bf16[64,32]{1,0} get-tuple-element(%loop), index=3
}
"""


def test_a_loop_of_gemms_by_hand():
    kernels = cost.kernel_costs(MODULE)
    gemm, add = kernels
    assert (gemm.kind, gemm.count, gemm.dtype) == ("gemm", 10, "bf16")
    assert gemm.flops == 2 * 64 * 32 * 128
    assert gemm.read == 2 * (64 * 128 + 128 * 32) and gemm.written == 2 * 64 * 32
    assert (add.kind, add.flops, add.read, add.written) == ("fusion", 0, 2 * 2 * 64 * 32, 2 * 64 * 32)
    # modeled: the larger of compute and memory time, plus the launch
    assert gemm.seconds(PEAKS) == pytest.approx(max(gemm.flops / 1e12, (gemm.read + gemm.written) / 1e11)
                                                + cost.LAUNCH_SECONDS)
    summary = cost.program_cost(MODULE, PEAKS)
    assert summary["flops"] == 10 * gemm.flops and summary["kernels"] == 20
    assert summary["modeled_s"] == pytest.approx(10 * (gemm.seconds(PEAKS) + add.seconds(PEAKS)))
    assert summary["top_kernels"][0]["name"] == "gemm_fusion"
    (loop,) = summary["loops"]
    assert loop["trip_count"] == 10 and loop["flops"] == gemm.flops  # one iteration


# A split-K GEMM's four partial sums [4, 64, 96] f32, read by a fusion that adds them up and keeps the
# first 32 columns (XLA's pattern for q of a q/k/v projection merged into one GEMM): the fusion computes
# only the 64 x 32 elements it returns, so it reads 4 x 64 x 32 of the partials, not all of them.
SPLIT_K = """HloModule s, entry_computation_layout={(f32[4,64,96]{2,1,0})->bf16[64,32]{1,0}}

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %c = f32[] add(%a, %b)
}

%q_of_partials (p: f32[4,64,96]) -> bf16[64,32] {
  %p = f32[4,64,96]{2,1,0} parameter(0)
  %zero = f32[] constant(0)
  %sum = f32[64,96]{1,0} reduce(%p, %zero), dimensions={0}, to_apply=%add
  %narrow = bf16[64,96]{1,0} convert(%sum)
  %q = bf16[64,32]{1,0} slice(%narrow), slice={[0:64], [0:32]}
  ROOT %sq = bf16[64,32]{1,0} multiply(%q, %q)
}

ENTRY %main (partials: f32[4,64,96]) -> bf16[64,32] {
  %partials = f32[4,64,96]{2,1,0} parameter(0)
  ROOT %fusion = bf16[64,32]{1,0} fusion(%partials), kind=kLoop, calls=%q_of_partials
}
"""


def test_a_fusion_reads_only_the_elements_its_slice_needs():
    (kernel,) = cost.kernel_costs(SPLIT_K)
    assert kernel.read == 4 * 64 * 32 * 4  # was 4 * 64 * 96 * 4: every partial sum
    assert kernel.written == 64 * 32 * 2


def _h100_hlo(f, *args) -> str:
    target = targets.load_target("h100")
    placed = [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=target.sharding()) for a in args]
    return jax.jit(f).lower(*placed).compile().as_text()


@pytest.mark.aot
@needs_plugin
def test_h100_gemm_and_cudnn_attention_flops():
    targets.prepare_process()
    m, k, n = 1024, 2048, 512
    text = _h100_hlo(lambda a, b: a @ b, jnp.zeros((m, k), jnp.bfloat16), jnp.zeros((k, n), jnp.bfloat16))
    assert cost.program_cost(text, targets.peaks("h100"))["flops"] == 2 * m * n * k
    b, s, h, d = 2, 512, 8, 128
    q = jnp.zeros((b, s, h, d), jnp.bfloat16)
    text = _h100_hlo(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="cudnn"), q, q, q)
    attention = [k for k in cost.kernel_costs(text) if k.kind == "attention"]
    assert len(attention) == 1 and attention[0].flops == 4 * b * h * s * s * d
    causal = _h100_hlo(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn"),
                       q, q, q)
    assert [k.flops for k in cost.kernel_costs(causal) if k.kind == "attention"] == [2 * b * h * s * s * d]


@pytest.mark.slow
@pytest.mark.long  # 127 s since the plan weighs remat policies; launch/gpu_checks.sh --smoke runs the roofline in CI
@pytest.mark.aot
@needs_plugin
def test_roofline_cli_on_a_tiny_model():
    cmd = [sys.executable, "-m", "jaxmath.bench", "roofline", "--config=configs/grpo_v2.py", "--target=h100",
           "--preset=tiny", "--config.rl.max_completion_tokens=64", "--config.sampler.decode_window=16"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    # the study config rolls out on vLLM; the roofline costs the JAX sampler's programs in its place
    assert set(result["programs"]) == {"rollout/prefill", "rollout/decode", "train/step"}
    for program in result["programs"].values():
        assert program["flops"] > 0 and program["bytes"] > 0 and program["modeled_s"] > 0
        assert len(program["top_kernels"]) == 5
    assert 0 < result["train_modeled_mfu"] < 1
    windows = result["decode"]["rollout/decode"]
    assert [w["window"] for w in windows] == [1024 + 16, 1024 + 32, 1024 + 64]
    for w in windows:
        assert w["read_ratio"] >= 0.5 and w["write_ratio"] >= 0 and 0 < w["bandwidth_fraction"] <= 1
