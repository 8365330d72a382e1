#!/usr/bin/env bash
# A vLLM rollout server (vllm.mode=server) in the foreground, on its own GPU; the trainer reaches it
# over HTTP on this host and syncs weights through /dev/shm.
#
#   GPU=1 launch/vllm_server.sh /models/Qwen3-4B-Instruct-2507 --port=8000 --max_model_len=8192 \
#       [--enable_lora --max_lora_rank=64]
#   GPU=0 launch/single_gpu.sh configs/grpo_v2.py --config.model.path=/models/Qwen3-4B-Instruct-2507 \
#       --config.rollout.engine=vllm --config.vllm.mode=server --config.vllm.url=http://127.0.0.1:8000
#
# The model is the trainer's model.path; --dtype, --max_model_len and LoRA (--enable_lora when
# lora.rank > 0, --max_lora_rank >= lora.rank) must match the trainer's settings. Run it in the
# trainer's environment: the server imports jaxmath's worker extension. --print_only prints the
# command and runs nothing; `python -m jaxmath.rollout.vllm --help` lists the flags.
set -euo pipefail
if [[ $# -lt 1 ]]; then
    echo "usage: [GPU=1] $0 MODEL_PATH [--port=8000] [--dtype=auto] [--max_model_len=0 (fit the model)] [--enable_lora ...]" >&2
    exit 2
fi
export CUDA_VISIBLE_DEVICES=${GPU:-1}
exec "${PYTHON:-python}" -m jaxmath.rollout.vllm "$@"
