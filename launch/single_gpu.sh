#!/usr/bin/env bash
# One GPU: the whole run in one process on GPU 0 (mesh 1 x 1 x 1).
#
#   launch/single_gpu.sh configs/grpo_v2.py --config.model.path=/models/Qwen3-4B-Instruct-2507 --workdir=runs/grpo_v2
#
# GPU=<index> picks another GPU. jaxmath.main sets JAX's memory itself: with vLLM in the same process
# (the study configs' rollout.engine=vllm) from the run's device plan, which splits the GPU between
# the two (jaxmath.aot.colocate, docs/BENCHMARKS.md); otherwise 95% of the GPU for JAX.
set -euo pipefail
if [[ $# -lt 1 ]]; then
    echo "usage: $0 configs/<name>.py [--config.key=value ...] [--workdir=DIR]" >&2
    exit 2
fi
CONFIG=$1
shift
export CUDA_VISIBLE_DEVICES=${GPU:-0}
exec "${PYTHON:-python}" -m jaxmath.main --config="$CONFIG" \
    --config.mesh.data=1 --config.mesh.fsdp=1 --config.mesh.tp=1 "$@"
