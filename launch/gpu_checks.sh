#!/usr/bin/env bash
# The GPU figures of docs/BENCHMARKS.md in one pass, for a lent single-GPU machine (H100 or H200)
# with CUDA JAX, flax, optax, orbax-checkpoint, transformers and torch installed and no vLLM; run
# from the repository root. Every check is a `python -m jaxmath.bench` command on the Qwen3-4B shape
# with random weights; each prints a JSON last line, kept in $OUT/<check>.json with its log in
# $OUT/<check>.log, and runs under its own time limit so one slow check cannot starve the rest.
#
#   OUT=/tmp/gpu launch/gpu_checks.sh [check ...]      # default: all of them, in the order below
#   PRINT_ONLY=1 launch/gpu_checks.sh                  # the commands, one per line, nothing run
#
# Checks (about 7 minutes in all on an H200, compiles included):
#   versions      jax, flax, optax, orbax, transformers, the device
#   rollout       sampler decode, 128 rows x 2,048 tokens: tokens/s and the bandwidth-roofline fraction
#   rollout_full  the same with decode_window=0 (attention over the whole cache), for the ratio
#   grpo          one GRPO step, LoRA r64, 4 prompts x K=8 x 2,048 tokens: seconds per phase, train MFU
#   sft_full      SFT step, sequence 4,096, batch 4, full-parameter, cuDNN attention, remat dots: MFU
#   sft_lora      the same with LoRA r64
#   sync_full     JAX side of a full weight sync (layout, gather, DLPack handover)
#   sync_lora     JAX side of a LoRA r64 sync (PEFT export)
set -uo pipefail
OUT=${OUT:-/tmp/jaxmath_gpu_checks}
PYTHON=${PYTHON:-python}
mkdir -p "$OUT"
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$(pwd)

M4B="--preset=qwen3-4b --random_weights --dtype=bfloat16"
declare -A CMD=(
    [rollout]="rollout $M4B --batch=128 --max_new_tokens=2048 --repeats=1 --vllm_python="
    [rollout_full]="rollout $M4B --batch=128 --max_new_tokens=2048 --repeats=1 --vllm_python= --decode_window=0"
    [grpo]="grpo_step $M4B --lora_rank=64 --k=8 --prompts=4 --max_new_tokens=2048 --prompt_tokens=128 --micro_batch_rows=8 --steps=2"
    [sft_full]="sft_step $M4B --batch=4 --seq=4096 --skip_hf --lora_rank=0 --attention_impl=cudnn --remat=dots"
    [sft_lora]="sft_step $M4B --batch=4 --seq=4096 --skip_hf --lora_rank=64 --attention_impl=cudnn --remat=dots"
    [sync_full]="weight_sync --preset=qwen3-4b --jax_side_only"
    [sync_lora]="weight_sync --preset=qwen3-4b --jax_side_only --lora_rank=64"
)
declare -A LIMIT=([rollout]=150 [rollout_full]=150 [grpo]=200 [sft_full]=90 [sft_lora]=90 [sync_full]=60 [sync_lora]=60)
ORDER=(versions rollout rollout_full grpo sft_full sft_lora sync_full sync_lora)

checks=("$@")
[[ ${#checks[@]} -eq 0 ]] && checks=("${ORDER[@]}")
for check in "${checks[@]}"; do
    if [[ $check == versions && -z ${PRINT_ONLY:-} ]]; then
        "$PYTHON" -c "import jax, flax, optax, orbax.checkpoint as ocp, transformers, json; print(json.dumps({
            'jax': jax.__version__, 'flax': flax.__version__, 'optax': optax.__version__,
            'transformers': transformers.__version__, 'devices': [d.device_kind for d in jax.devices()]}))" \
            | tee "$OUT/versions.json"
        continue
    fi
    [[ $check == versions ]] && continue
    if [[ -z ${CMD[$check]:-} ]]; then
        echo "unknown check '$check'; known: ${ORDER[*]}" >&2
        exit 2
    fi
    if [[ -n ${PRINT_ONLY:-} ]]; then
        echo "$check: ${CMD[$check]}"
        continue
    fi
    echo "+ [$check, ${LIMIT[$check]} s] $PYTHON -m jaxmath.bench ${CMD[$check]}"
    start=$SECONDS
    # shellcheck disable=SC2086  # the command is a word list on purpose
    timeout "${LIMIT[$check]}" "$PYTHON" -m jaxmath.bench ${CMD[$check]} >"$OUT/$check.log" 2>&1
    rc=$?
    tail -n 1 "$OUT/$check.log" >"$OUT/$check.json"
    echo "  rc=$rc after $((SECONDS - start)) s: $(head -c 600 "$OUT/$check.json")"
done
