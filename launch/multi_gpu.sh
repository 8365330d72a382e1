#!/usr/bin/env bash
# One host, N GPUs: one process drives every visible GPU through one (data, fsdp, tp) mesh.
#
#   FSDP=4 TP=2 launch/multi_gpu.sh configs/grpo_v2.py --config.model.path=/models/Qwen3-4B-Instruct-2507
#
# DATA, FSDP, TP: mesh sizes; one of them may be -1 to take the remaining GPUs (default: FSDP=-1,
# i.e. parameters, optimizer state and batch rows split over all GPUs). CUDA_VISIBLE_DEVICES limits
# which GPUs are used; the mesh uses the first data x fsdp x tp of them.
set -euo pipefail
if [[ $# -lt 1 ]]; then
    echo "usage: [DATA=1] [FSDP=-1] [TP=1] $0 configs/<name>.py [--config.key=value ...]" >&2
    exit 2
fi
CONFIG=$1
shift
exec "${PYTHON:-python}" -m jaxmath.main --config="$CONFIG" \
    --config.mesh.data="${DATA:-1}" --config.mesh.fsdp="${FSDP:--1}" --config.mesh.tp="${TP:-1}" "$@"
