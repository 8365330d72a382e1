#!/usr/bin/env bash
# The GPU figures of docs/BENCHMARKS.md in one pass, for a lent single-GPU machine (H100 or H200)
# with CUDA JAX, flax, optax, orbax-checkpoint, transformers and torch installed and no vLLM; run
# from the repository root. Every check is a `python -m jaxmath.bench` command on the Qwen3-4B shape;
# each prints a JSON last line, kept in $OUT/<check>.json with its log in $OUT/<check>.log, and runs
# under its own time limit so one slow check cannot starve the rest. At the end $OUT/summary.json
# (also printed) holds every check's JSON and exit code: one object.
#
#   OUT=/tmp/gpu launch/gpu_checks.sh [check ...]      # default: all of them, in the order below
#   PRINT_ONLY=1 launch/gpu_checks.sh                  # the commands, one per line, nothing run
#   launch/gpu_checks.sh --smoke [check ...]           # the same checks at tiny shapes on the CPU (CI)
#
# Checks (planned to take at most 8 minutes on an H100, compiles included; not yet run on one):
#   versions          jax, flax, optax, orbax, transformers, the device
#   grpo_v2_train     grpo_v2's train step as shipped (LoRA r64, K=16, 4,096 tokens, 16 rows = one micro-batch):
#                     measured seconds and MFU beside the roofline's, peak memory beside the plan's
#   local_full_train  local_full's train step and old-policy logprob pass (full-parameter, 8 rows)
#   decode            grpo_v2's prefill and decode loop at 64 rows and 512 fixed-length tokens: tokens/s,
#                     the fraction of the bandwidth roofline, measured and modeled
#   decode_varying    the sampler's slots at 64 rows (4 prompts x 16) of up to 512 tokens that end at
#                     different steps (stop ids 0.5% of the vocabulary): generated tokens/s, slot
#                     occupancy, the fraction of the bandwidth roofline
#   sft               configs/sft_config_a.py's SFT step (LoRA r64, sequence 4,096): MFU, peak memory
#   roofline_grpo_v2, roofline_local_full   the model alone, at the shipped shapes (compiled for the
#                     device's kind, no run)
#   sync_full, sync_lora                    the JAX side of a weight sync (no vLLM on these machines)
set -uo pipefail
SMOKE=""
if [[ ${1:-} == --smoke ]]; then
    SMOKE=1
    shift
fi
OUT=${OUT:-/tmp/jaxmath_gpu_checks}
PYTHON=${PYTHON:-python}
mkdir -p "$OUT"
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$(pwd)
# The programs run without vLLM beside them: JAX may take the device (local_full's step needs ~64 GB).
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}

if [[ -n $SMOKE ]]; then
    # Tiny shapes on the CPU: every check's pipeline runs, in CI, so the script cannot rot.
    export JAX_PLATFORMS=cpu JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1
    M="--preset=tiny"
    # One prompt of 4 samples per step (the decode check asks for 4 prompts) in micro-batches of 4 rows:
    # the roofline checks' plan weighs each remat policy at those rows (one compile each; the search
    # over rows is tests/test_aot.py's)
    GRPO="--config.rl.max_prompt_tokens=64 --config.rl.max_completion_tokens=32 --config.sampler.decode_window=16
          --config.rl.prompts_per_step=1 --config.rl.num_generations=4 --config.loss.micro_batch_rows=4"
    SFT="--config.sft.max_seq_len=128 --config.sft.batch_size=4 --config.sft.micro_batch_size=2"
    TARGET=h100
    SYNC="--preset=tiny"
    DECODE="--sampler_rows=16"
    VARYING="--preset=tiny --random_weights --num_prompts=2 --batch=8 --max_new_tokens=32 --stop_fraction=0.05 --decode_window=16"
    LIMIT_ALL=300
else
    M="--preset=qwen3-4b-instruct-2507"
    GRPO=""
    SFT=""
    TARGET=$("$PYTHON" -c "import jax; print('h200' if 'H200' in jax.devices()[0].device_kind.upper() else 'h100')" 2>/dev/null || echo h100)
    SYNC="--preset=qwen3-4b"
    DECODE="--config.rl.max_completion_tokens=512 --sampler_rows=64"
    VARYING="--preset=qwen3-4b-instruct-2507 --random_weights --dtype=bfloat16 --num_prompts=4 --batch=64 --max_new_tokens=512 --stop_fraction=0.005"
    LIMIT_ALL=""
fi

declare -A CMD=(
    [grpo_v2_train]="programs --config=configs/grpo_v2.py $M $GRPO --config.rl.prompts_per_step=1 --phases=train/step --repeats=1"
    [local_full_train]="programs --config=configs/local_full.py $M $GRPO --config.rl.prompts_per_step=1 --phases=train/logprobs,train/step --repeats=1"
    [decode]="programs --config=configs/grpo_v2.py $M $GRPO --config.rl.prompts_per_step=4 $DECODE --phases=rollout/prefill,rollout/decode --repeats=1"
    [decode_varying]="rollout $VARYING --repeats=1"
    [sft]="programs --config=configs/sft_config_a.py $M $SFT --phases=train/sft_step --repeats=1"
    [roofline_grpo_v2]="roofline --config=configs/grpo_v2.py --target=$TARGET $M $GRPO"
    [roofline_local_full]="roofline --config=configs/local_full.py --target=$TARGET $M $GRPO"
    [sync_full]="weight_sync $SYNC --jax_side_only --dtype=bfloat16"
    [sync_lora]="weight_sync $SYNC --jax_side_only --dtype=bfloat16 --lora_rank=64"
)
declare -A LIMIT=([grpo_v2_train]=150 [local_full_train]=150 [decode]=120 [decode_varying]=180 [sft]=90 [roofline_grpo_v2]=60
                  [roofline_local_full]=60 [sync_full]=45 [sync_lora]=30)
ORDER=(versions grpo_v2_train local_full_train decode decode_varying sft roofline_grpo_v2 roofline_local_full sync_full sync_lora)

checks=("$@")
[[ ${#checks[@]} -eq 0 ]] && checks=("${ORDER[@]}")
failed=0
for check in "${checks[@]}"; do
    if [[ $check == versions ]]; then
        [[ -n ${PRINT_ONLY:-} ]] && continue
        "$PYTHON" -c "import jax, flax, optax, orbax.checkpoint as ocp, transformers, json; print(json.dumps({
            'jax': jax.__version__, 'flax': flax.__version__, 'optax': optax.__version__,
            'transformers': transformers.__version__, 'devices': [d.device_kind for d in jax.devices()]}))" \
            >"$OUT/versions.json" 2>"$OUT/versions.log"
        echo $? >"$OUT/versions.rc"
        cat "$OUT/versions.json"
        continue
    fi
    if [[ -z ${CMD[$check]:-} ]]; then
        echo "unknown check '$check'; known: ${ORDER[*]}" >&2
        exit 2
    fi
    if [[ -n ${PRINT_ONLY:-} ]]; then
        echo "$check: ${CMD[$check]}"
        continue
    fi
    limit=${LIMIT_ALL:-${LIMIT[$check]}}
    echo "+ [$check, $limit s] $PYTHON -m jaxmath.bench ${CMD[$check]}"
    start=$SECONDS
    # shellcheck disable=SC2086  # the command is a word list on purpose
    timeout "$limit" "$PYTHON" -m jaxmath.bench ${CMD[$check]} >"$OUT/$check.log" 2>&1
    rc=$?
    echo $rc >"$OUT/$check.rc"
    tail -n 1 "$OUT/$check.log" >"$OUT/$check.json"
    [[ $rc -ne 0 ]] && failed=1
    echo "  rc=$rc after $((SECONDS - start)) s: $(head -c 400 "$OUT/$check.json")"
done
[[ -n ${PRINT_ONLY:-} ]] && exit 0

# One object: {"smoke": bool, "checks": {name: {"rc": int, "result": <its JSON or null>}}}
"$PYTHON" - "$OUT" "${SMOKE:-0}" "${checks[@]}" <<'EOF' | tee "$OUT/summary.json"
import json, os, sys
out, smoke, names = sys.argv[1], sys.argv[2] == "1", sys.argv[3:]
checks = {}
for name in names:
    rc_path, json_path = os.path.join(out, name + ".rc"), os.path.join(out, name + ".json")
    rc = int(open(rc_path).read().strip() or 1) if os.path.exists(rc_path) else None
    try:
        result = json.loads(open(json_path).read())
    except (OSError, ValueError):
        result = None
    checks[name] = {"rc": rc, "result": result}
print(json.dumps({"smoke": smoke, "checks": checks}, sort_keys=True))
EOF
exit $failed
