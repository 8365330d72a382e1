"""Every key of a GRPO run, with the study's defaults. Each configs/grpo_*.py file is one row of the
study's Table 3 on top of this base; `python -m jaxmath.main --config=configs/grpo_v2.py
--config.rl.num_generations=8` overrides any key, and an unknown key is an error.

Assumptions where the study is silent (stated here so nobody mistakes them for the study's):
- prompts per step: 8, derived from the local full-parameter run (998 steps for 2 epochs of 3,994
  problems); used for every row so step counts compare;
- clip epsilon 0.2 on both sides (TRL's default), advantage std is TRL's sample std, eps 1e-4;
- LoRA alpha 128 for rank 64 (scale 2); AdamW betas (0.9, 0.999), no weight decay, grad clip 1.0,
  constant learning rate (Tinker's default);
- sampling temperature 1.0 for training rollouts, no top-p / top-k;
- training prompts are zero-shot (the few-shot prefix is an evaluation convention in the study).
"""

import ml_collections


def get_config(*, data: str, lr: float, num_generations: int, max_tokens: int, steps: int, lora_rank: int = 64,
               name: str = "grpo") -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.mode = "grpo"
    c.seed = 0
    c.steps = steps
    c.checkpoint_every = 50
    c.workdir = f"runs/{name}"

    c.model = ml_collections.ConfigDict()
    c.model.path = ""  # HF-format Qwen3-4B-Instruct-2507
    c.model.preset = ""  # or a random preset for smoke runs ("tiny", "bench", "qwen3-4b")
    c.model.dtype = "bfloat16"
    c.model.param_dtype = ""
    c.model.remat = "full"
    c.model.attention_impl = ""

    c.data = ml_collections.ConfigDict()
    c.data.dir = "data"
    c.data.train = data  # math_train | math_train_hard | gsm8k_train
    c.data.limit = 0  # > 0: only the first N training problems

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = 1
    c.mesh.fsdp = -1
    c.mesh.tp = 1

    c.init = ml_collections.ConfigDict()
    c.init.checkpoint = ""  # a previous run's workdir: start from its trained weights (grpo_v3)

    c.prompt = ml_collections.ConfigDict()
    c.prompt.few_shot = 0
    c.prompt.system = ""
    c.prompt.enable_thinking = False

    c.rl = ml_collections.ConfigDict()
    c.rl.prompts_per_step = 8
    c.rl.num_generations = num_generations
    c.rl.max_prompt_tokens = 1024
    c.rl.max_completion_tokens = max_tokens
    c.rl.temperature = 1.0
    c.rl.num_iterations = 1
    c.rl.adv_scale = "group_std"  # group_std (GRPO) | none (Dr. GRPO)
    c.rl.adv_std = "sample"  # sample (TRL) | population
    c.rl.adv_eps = 1e-4
    c.rl.filter_groups = False  # DAPO dynamic sampling at static shapes
    c.rl.oversample = 1.5
    c.rl.tis_cap = 0.0  # > 0: truncated importance sampling against the engine's logprobs
    c.rl.reward_workers = 0
    c.rl.reward_timeout = 1.0
    c.rl.answer_fallback = ""
    c.rl.prompt_bucket = 64
    c.rl.keep_last = 3
    c.rl.keep_best = 0
    c.rl.eval_every = 0
    c.rl.plot_every = 10
    c.rl.early_stop_reward = 0.0
    c.rl.early_stop_grad_norm = 0.0
    c.rl.early_stop_patience = 3
    c.rl.warn_truncation = 0.5
    c.rl.warn_zero_std = 0.8

    c.loss = ml_collections.ConfigDict()
    c.loss.eps_low = 0.2
    c.loss.eps_high = 0.2
    c.loss.beta = 0.0  # the study: no KL term
    c.loss.loss_agg = "seq_mean_token_mean"  # TRL "grpo"; token_mean (DAPO); constant (Dr. GRPO)
    c.loss.is_level = "token"  # token | sequence (GSPO)
    c.loss.micro_batch_rows = 16
    c.loss.logprob_chunk = 1024
    c.loss.with_entropy = True

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.learning_rate = lr
    c.optimizer.schedule = "constant"
    c.optimizer.warmup_steps = 0
    c.optimizer.end_lr_ratio = 0.0
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.999
    c.optimizer.eps = 1e-8
    c.optimizer.weight_decay = 0.0
    c.optimizer.max_grad_norm = 1.0
    c.optimizer.master_fp32 = lora_rank == 0

    c.lora = ml_collections.ConfigDict()
    c.lora.rank = lora_rank  # 0: full-parameter training
    c.lora.alpha = 128.0
    c.lora.targets = r"(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$"

    c.rollout = ml_collections.ConfigDict()
    c.rollout.engine = "jax"  # jax | vllm
    c.sampler = ml_collections.ConfigDict()  # jaxmath.rollout.jax_sampler.SamplerConfig
    c.sampler.max_batch_rows = 256
    c.sampler.cache_dtype = ""
    c.sampler.vocab_chunk = 2048
    c.sampler.decode_window = 64  # attention reads prompt + 64, 128, 256, ... slots, not the whole cache
    c.sampler.lora_mode = "auto"
    c.vllm = ml_collections.ConfigDict()  # jaxmath.rollout.vllm_engine.VLLMConfig (LoRA settings follow lora.*)
    c.vllm.mode = "colocated"  # colocated | server
    c.vllm.url = ""  # server mode: an OpenAI-compatible vLLM server
    c.vllm.dtype = "auto"
    c.vllm.max_model_len = 8192
    c.vllm.gpu_memory_utilization = 0.0  # 0: derived from the measured JAX peak
    c.vllm.enable_sleep_mode = False
    c.vllm.sync_method = "auto"  # auto | load_weights | file

    c.eval = ml_collections.ConfigDict()  # periodic evaluation (rl.eval_every) with the rollout engine
    c.eval.benchmarks = "math500"
    c.eval.limit = 0
    c.eval.temperature = 0.01
    c.eval.max_new_tokens = max_tokens
    c.eval.few_shot = 4
    c.eval.batch_size = 64
    return c
