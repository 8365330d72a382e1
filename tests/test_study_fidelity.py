"""The study's runs as the study ran them (issue 24): the Tinker rows' LoRA and loss, the SFT rows'
optimizer, local_lora's length, checkpoints and evaluations, and the README's commands. Config files
only, plus one small loss computation; a few seconds."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmath import sections as typed
from jaxmath.config import build, load_config
from jaxmath.model.lora import DEFAULT_TARGETS, LoRAConfig
from jaxmath.rl import grpo

ROOT = Path(__file__).resolve().parents[1]
TINKER_GRPO = ("grpo_v1", "grpo_v2", "grpo_v3", "sft_then_rl")
SFT_ROWS = ("v1", "v2", "v3", "v4", "a", "b")


def _config(name: str):
    return load_config(str(ROOT / "configs" / name))


@pytest.mark.parametrize("row", TINKER_GRPO)
def test_tinker_rows_build_tinkers_lora(row):
    """Tinker's LoraConfig: attention, MLP and the unembedding (train_unembed True by default), and its
    fixed alpha 32 (scale 0.5 at rank 64), not jaxmath's 128."""
    lora_cfg = build(LoRAConfig, _config(f"{row}.py").lora, prefix="lora")
    assert (lora_cfg.rank, lora_cfg.alpha, lora_cfg.scale) == (64, 32.0, 0.5)
    assert lora_cfg.targets == DEFAULT_TARGETS and lora_cfg.train_unembed is True


def test_the_trl_rows_keep_their_own_lora():
    lora_cfg = build(LoRAConfig, _config("local_lora.py").lora, prefix="lora")
    assert (lora_cfg.rank, lora_cfg.alpha, lora_cfg.train_unembed) == (64, 128.0, False)
    assert build(LoRAConfig, _config("local_full.py").lora, prefix="lora").rank == 0


@pytest.mark.parametrize("row", SFT_ROWS)
def test_sft_rows_take_tinkers_adam_and_lora_scale(row):
    """The study ran SFT on Tinker: AdamParams' eps 1e-12 and no clipping (grad_clip_norm 0), beside
    the study's own beta2 0.95 and linear decay; LoRA alpha 32 on the attention and MLP projections
    (the study's words), no head adapter."""
    sft = typed.sft_config(_config(f"sft_sweep.py:{row}"))
    opt = sft.optimizer
    assert (opt.b1, opt.b2, opt.eps, opt.max_grad_norm, opt.weight_decay) == (0.9, 0.95, 1e-12, 0.0, 0.0)
    assert opt.schedule in ("linear", "warmup_linear") and opt.warmup_steps == 0 and opt.end_lr_ratio == 0.0
    assert (sft.lora.rank, sft.lora.alpha, sft.lora.train_unembed) == (64, 32.0, False)


@pytest.mark.parametrize("row", TINKER_GRPO)
def test_tinker_rows_aggregate_as_eq3_states(row):
    _, loss_cfg, _ = typed.grpo_configs(_config(f"{row}.py"))
    assert loss_cfg.loss_agg == "seq_sum" and loss_cfg.is_level == "token" and loss_cfg.tis_cap == 0.0


def test_seq_sum_has_eq3s_gradient():
    """Eq. 3 on-policy, written out: -mean over prompts of sum over the K samples of min(r_i A_i,
    clip(r_i) A_i) with r_i = pi(y_i|x) / pi_old(y_i|x) the ratio of WHOLE sequences (the product of
    the token ratios). loss_agg="seq_sum" with per-token ratios has the same gradient divided by K;
    the per-sequence token mean (the previous setting) does not: it divides each sequence by its length."""
    rng = np.random.RandomState(0)
    prompts, k, t = 3, 4, 6
    rows = prompts * k
    logits = jnp.asarray(rng.randn(rows, t, 11), jnp.float32)
    tokens = jnp.asarray(rng.randint(0, 11, (rows, t)))
    lengths = rng.randint(1, t + 1, rows)
    mask = jnp.asarray(np.arange(t)[None, :] < lengths[:, None])
    advantages = grpo.group_advantages(jnp.asarray(rng.randint(0, 2, rows), jnp.float32), k)

    def logprobs(logits):
        return jnp.take_along_axis(jax.nn.log_softmax(logits, -1), tokens[..., None], -1)[..., 0]

    def eq3(logits):
        lp = logprobs(logits)
        seq = jnp.sum(jnp.where(mask, lp - jax.lax.stop_gradient(lp), 0.0), axis=1)  # log pi/pi_old per sequence
        ratio = jnp.exp(seq)
        per_seq = jnp.minimum(ratio * advantages, jnp.clip(ratio, 0.8, 1.2) * advantages)
        return -jnp.mean(per_seq.reshape(prompts, k).sum(axis=1))

    def ours(logits, agg):
        lp = logprobs(logits)
        loss, _ = grpo.policy_loss(lp, jax.lax.stop_gradient(lp), advantages, mask, eps_low=0.2, eps_high=0.2,
                                   loss_agg=agg, is_level="token")
        return loss

    expected = np.asarray(jax.grad(eq3)(logits)) / k
    np.testing.assert_allclose(np.asarray(jax.grad(ours)(logits, "seq_sum")), expected, rtol=1e-5, atol=1e-7)
    assert not np.allclose(np.asarray(jax.grad(ours)(logits, "seq_mean_token_mean")), expected, atol=1e-4)


def test_local_lora_keys_show_100_steps_checkpoints_and_evaluations_at_50_and_100_and_no_early_stop():
    out = subprocess.run([sys.executable, "-m", "jaxmath.main", "--config=configs/local_lora.py", "--keys"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    keys = {line.split(" = ")[0]: line.split(" = ")[1].split("    #")[0]
            for line in out.stdout.splitlines() if " = " in line}
    assert keys["steps"] == "100" and keys["checkpoint_every"] == "50" and keys["rl.eval_every"] == "50"
    assert [keys[f"rl.early_stop_{s}"] for s in ("reward", "grad_norm", "ratio")] == ["0.0"] * 3
    # TRL's linear schedule over the planned two epochs, stopped at step 100: lr 3.6e-5 there, not 0
    grpo_cfg, _, opt = typed.grpo_configs(_config("local_lora.py"))
    from jaxmath import optim

    assert grpo_cfg.steps == 100 and opt.schedule == "linear" and opt.total_steps == 998
    assert optim.lr_at(opt, 50) == pytest.approx(4e-5 * (1 - 50 / 998))
    assert optim.lr_at(opt, 99) > 3.5e-5


# Settings the study states for its Table 3 rows: a documented command may not change them.
STATED = ("rl.num_generations", "rl.max_completion_tokens", "optimizer.learning_rate", "steps", "data.train",
          "lora.rank", "rl.prompts_per_step")
STUDY_ROWS = ("grpo_v1", "grpo_v2", "grpo_v3", "local_full", "local_lora", "sft_then_rl", "sft_config_a",
              "sft_config_b", "sft_sweep")


def _documented_study_commands() -> list[str]:
    texts = [m.group(1) for m in re.finditer(r"```(?:bash)?\n(.*?)```", (ROOT / "README.md").read_text(), re.S)]
    texts += [(ROOT / "configs" / f"{row}.py").read_text().split('"""')[1] for row in STUDY_ROWS]
    commands = []
    for text in texts:
        for line in re.sub(r"\\\n\s*", " ", text).splitlines():
            line = line.strip()
            if line.startswith("python -m jaxmath.main") and any(f"configs/{r}.py" in line for r in STUDY_ROWS):
                commands.append(line)
    return commands


def test_the_readme_and_docstring_commands_run_the_study_as_it_ran():
    """The README's GRPO v2 command once added --config.rl.num_generations=8 under a table row saying
    K=16; no documented command of a study row overrides a setting the study states."""
    commands = _documented_study_commands()
    assert any("configs/grpo_v2.py" in c for c in commands)
    for command in commands:
        overrides = {a.split("=", 1)[0][len("--config."):] for a in shlex.split(command) if a.startswith("--config.")}
        assert not overrides & set(STATED), command


def test_grpo_v3_does_not_replay_v2s_data_order():
    """v3 is two more epochs: with v2's seed its prompt order (and rollout seeds) would repeat v2's."""
    from jaxmath.rl.loop import PromptIterator

    v2, v3 = (typed.grpo_configs(_config(f"{row}.py"))[0] for row in ("grpo_v2", "grpo_v3"))
    problems = list(range(100))
    assert PromptIterator(problems, v2.seed).next(8) != PromptIterator(problems, v3.seed).next(8)


# Table 3: data, lr, K, max completion tokens, epochs (as steps of 8 prompts), LoRA rank; local_lora
# runs to step 100 (Table 8), sft_then_rl is GRPO v1's recipe.
TABLE3 = {
    "grpo_v1": ("math_train", 4e-5, 16, 2048, 937, 64),
    "grpo_v2": ("math_train_hard", 4e-5, 16, 4096, 998, 64),
    "grpo_v3": ("math_train_hard", 2e-5, 16, 4096, 998, 64),
    "local_full": ("math_train_hard", 5e-6, 8, 2048, 998, 0),
    "local_lora": ("math_train_hard", 4e-5, 8, 2048, 100, 64),
    "sft_then_rl": ("math_train", 4e-5, 16, 2048, 937, 64),
}


@pytest.mark.parametrize("row", sorted(TABLE3))
def test_each_grpo_row_is_its_table3_line(row):
    cfg = _config(f"{row}.py")
    grpo_cfg, loss_cfg, opt = typed.grpo_configs(cfg)
    got = (cfg.data.train, opt.learning_rate, grpo_cfg.num_generations, grpo_cfg.max_completion_tokens,
           grpo_cfg.steps, cfg.lora.rank)
    assert got == TABLE3[row]
    assert loss_cfg.beta == 0.0 and grpo_cfg.prompts_per_step == 8
