#!/usr/bin/env bash
# One GPU: the whole run in one process on GPU 0 (mesh 1 x 1 x 1).
#
#   launch/single_gpu.sh configs/grpo_v2.py --config.model.path=/models/Qwen3-4B-Instruct-2507 --workdir=runs/grpo_v2
#
# GPU=<index> picks another GPU. XLA preallocates 90% of the GPU for JAX by default; with vLLM in
# the same process (rollout.engine=vllm) set vllm.gpu_memory_utilization and lower
# XLA_PYTHON_CLIENT_MEM_FRACTION so both fit (see docs/SCALING.md).
set -euo pipefail
if [[ $# -lt 1 ]]; then
    echo "usage: $0 configs/<name>.py [--config.key=value ...] [--workdir=DIR]" >&2
    exit 2
fi
CONFIG=$1
shift
export CUDA_VISIBLE_DEVICES=${GPU:-0}
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.90}
exec "${PYTHON:-python}" -m jaxmath.main --config="$CONFIG" \
    --config.mesh.data=1 --config.mesh.fsdp=1 --config.mesh.tp=1 "$@"
