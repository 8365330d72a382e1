"""`python -m jaxmath.rollout.vllm MODEL_PATH --port=8000`: a vLLM server in the foreground (see server.main)."""

from jaxmath.rollout.vllm.server import main

main()
