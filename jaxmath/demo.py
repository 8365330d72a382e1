"""The embedded demo: on the same budget, does reinforcement learning beat imitation on correctness?

A tiny Qwen3, trained from scratch on a CPU in minutes, learns multi-digit addition written as a
worked solution (`jaxmath.data.demo_task`) from an imperfect teacher whose traces are always boxed
but whose answers are wrong more often the more (chained) carries a problem has. Two arms start from
the same initialization and take the same number of optimizer steps:

    sft       SFT on the teacher's traces for the whole budget (the prefix + steps)
    sft_grpo  the same SFT run for its first `DemoConfig.prefix_steps(steps)` steps (the prefix),
              then GRPO with the study's `\\boxed{}` reward for `steps` (jaxmath.rl.loop.train)

The arms share the SFT prefix: it runs once (in <workdir>/sft, whose run continues as the `sft` arm)
and its weights at the branch point are saved to <workdir>/branch, where GRPO starts (<workdir>/grpo).
Both arms are evaluated greedily on held-out problems along the way, graded twice: by the boxed
reward (`jaxmath.reward.correctness_rewards`) and format-blind (the last number in the completion),
with the share of unboxed completions beside, so the gain is seen to be correctness, not format.

Outputs: demo_results.json (every figure), held_out.jsonl (the evaluations along the way, reused by
a rerun), plots/demo_accuracy.png and plots/demo_unboxed.png, and the runs' own metrics and
checkpoints. Rerunning the same command resumes each stage where it stopped and reuses finished ones.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from jaxmath import checkpoint as ckpt_lib
from jaxmath.checkpoint.digests import json_digest
from jaxmath import metrics as metrics_lib
from jaxmath import optim
from jaxmath.config import ConfigError
from jaxmath.data import demo_task
from jaxmath.data.datasets import Example
from jaxmath.distributed import is_writer
from jaxmath.eval.metrics import ci95
from jaxmath.model import init_model
from jaxmath.model.config import Qwen3Config
from jaxmath.model.lora import LoRAConfig
from jaxmath.reward import correctness_rewards
from jaxmath.rl import loop as rl_loop
from jaxmath.rl import step as step_lib
from jaxmath.rollout.jax_sampler import JaxSampler, SamplerConfig
from jaxmath.rollout.types import SamplingParams
from jaxmath.sft import SFTConfig, TokenizedExample

ARMS = ("sft", "sft_grpo")


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """The task, its teacher, the model, and the SFT side of the comparison.

    digits:             operand length of the additions (2: 47+85=)
    num_train:          training problems (the teacher writes one trace each)
    num_eval:           held-out problems (num_eval + num_train at most the digits' additions: 8,100
                        for 2 digits)
    drop_carry:         the teacher's chance of forgetting a carry ...
    drop_chained_carry: ... and of forgetting one that must ripple on (see jaxmath.data.demo_task)
    hidden_size .. head_dim: the Qwen3 trained from scratch
    sft_steps:          the shared SFT prefix, for `default_steps` GRPO steps; it scales with the GRPO
                        steps asked for (sft_steps * steps / default_steps, at least min_sft_steps),
                        so a 3-step smoke run stays short. The `sft` arm trains prefix + steps.
    min_sft_steps:      the shortest SFT prefix, however few GRPO steps are asked for
    default_steps:      the GRPO steps `sft_steps` is set for (the shipped run); a run of fewer is a
                        smoke run, whose figures are not results
    sft_eval_every:     held-out evaluations along the prefix (the arms use rl.eval_every)
    sft_batch_size, sft_learning_rate, sft_warmup_steps: the SFT optimizer (warmup, then linear decay
                        to 0 at the end of the `sft` arm's budget)
    """

    digits: int = 2
    num_train: int = 7000
    num_eval: int = 400
    drop_carry: float = 0.1
    drop_chained_carry: float = 0.7
    hidden_size: int = 64
    intermediate_size: int = 256
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 16
    sft_steps: int = 300
    min_sft_steps: int = 20
    default_steps: int = 100
    sft_eval_every: int = 50
    sft_batch_size: int = 64
    sft_learning_rate: float = 3e-3
    sft_warmup_steps: int = 20

    def __post_init__(self):
        pool = demo_task.AdditionTask(digits=self.digits).num_problems if self.digits >= 1 else 0
        if self.num_eval + self.num_train > pool:
            raise ValueError(f"demo.num_eval + demo.num_train = {self.num_eval + self.num_train} is more than the "
                             f"{pool} {self.digits}-digit additions; lower them or raise demo.digits")

    def smoke_reason(self, grpo_steps: int) -> str:
        """Why a run of `grpo_steps` is a smoke run (fewer steps than the figures are for), or ""."""
        if grpo_steps < self.default_steps:
            return f"{grpo_steps} GRPO steps of the {self.default_steps} the demo's figures are for"
        return ""

    def prefix_steps(self, grpo_steps: int) -> int:
        return max(self.min_sft_steps, round(self.sft_steps * grpo_steps / self.default_steps))


def restore_branch(branch: Path, model) -> None:
    """The SFT prefix's weights (saved at `branch` by `ckpt_lib.save_pytree`) into `model`, verified
    against their digests: a flipped byte is refused (DamagedCheckpointError, one line), never trained on."""
    nnx.update(model, ckpt_lib.load_pytree(branch, target=nnx.state(model)))


def model_config(cfg: DemoConfig, vocab_size: int) -> Qwen3Config:
    return Qwen3Config(vocab_size=vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                       num_layers=cfg.num_layers, num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads,
                       head_dim=cfg.head_dim, rope_theta=10000.0, max_position_embeddings=128,
                       tie_word_embeddings=True, eos_token_id=demo_task.EOS, pad_token_id=demo_task.PAD,
                       dtype=jnp.float32, param_dtype=jnp.float32, remat="none")


# --- held-out evaluation --------------------------------------------------------------------------


def evaluate_held_out(engine: JaxSampler, tokenizer: demo_task.CharTokenizer, examples: Sequence[Example],
                      max_new_tokens: int) -> dict[str, Any]:
    """Greedy completions of the held-out problems with the engine's current weights, graded by the
    study's boxed reward and format-blind. Fractions in [0, 1]; `format_blind_by_chained_carries`
    maps a chained-carry count to the format-blind accuracy on the problems that have it."""
    rollout = engine.generate([tokenizer.encode(e.problem) for e in examples],
                              SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0,
                                             stop_token_ids=(demo_task.EOS,)))
    texts = [tokenizer.decode(ids) for ids in rollout.completion_token_lists()]
    golds = [e.answer for e in examples]
    boxed, answers = correctness_rewards(texts, golds)
    blind = np.asarray([demo_task.format_blind_correct(t, g) for t, g in zip(texts, golds)])
    chained = np.asarray([e.meta["chained_carries"] for e in examples])
    return {"boxed_accuracy": float(np.mean(boxed)), "format_blind_accuracy": float(blind.mean()),
            "unboxed_rate": float(np.mean([a is None for a in answers])),
            "format_blind_by_chained_carries": {str(k): float(blind[chained == k].mean())
                                                for k in sorted(set(chained.tolist()))}}


class HeldOutLog:
    """The held-out evaluations of a run, one JSON line per (arm, step) in <workdir>/held_out.jsonl.

    A step's weights are a pure function of the config (seeded, exact resume), so a rerun reuses an
    evaluation already written instead of repeating it; the last line for a key wins. Each line carries
    the digest of its record (`sha256`): a line that does not match it (edited, flipped, torn) or has
    none (an older jaxmath's) is not reused, with one warning line, and the evaluation runs again."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.records: dict[tuple[str, int], dict] = {}
        if self.path.is_file():
            for number, line in enumerate(self.path.read_text().splitlines(), start=1):
                if line.strip():
                    record = self._verified(line)
                    if record is None:
                        logging.warning("%s:%d does not match its digest (or has none): evaluating that step "
                                        "again instead of reusing it", self.path, number)
                        continue
                    self.records[(record["arm"], record["step"])] = record

    @staticmethod
    def _verified(line: str) -> dict | None:
        try:
            record = json.loads(line)
            digest = record.pop("sha256")
            if digest == json_digest(record):
                return record
        except (ValueError, KeyError, TypeError, AttributeError):
            pass
        return None

    def get(self, arm: str, step: int, compute: Callable[[], dict]) -> dict:
        if (arm, step) not in self.records:
            record = {"arm": arm, "step": step, **compute()}
            if is_writer():  # every process of a job computes it; process 0 writes it
                with open(self.path, "a") as f:
                    f.write(json.dumps({**record, "sha256": json_digest(record)}) + "\n")
            self.records[(arm, step)] = record
        return self.records[(arm, step)]

    def curve(self, arm: str) -> list[dict]:
        return [r for (a, _), r in sorted(self.records.items(), key=lambda kv: kv[0][1]) if a == arm]


# --- the run --------------------------------------------------------------------------------------


def run_demo(cfg: DemoConfig, grpo_cfg: rl_loop.GRPOConfig, loss_cfg: step_lib.LossConfig,
             optim_cfg: optim.OptimizerConfig, workdir: str, *, seed: int = 0, mesh=None, sampler_mesh=None,
             run_config: dict | None = None) -> dict[str, Any]:
    """Runs both arms (resuming whatever a previous run in `workdir` left), writes demo_results.json
    and the plots, prints the table and returns the results. sampler_mesh: the sampler's own devices
    (rl.rollout_devices; None: `mesh`'s)."""
    from jaxmath.sft import run_sft

    start, cpu_start = time.perf_counter(), time.process_time()
    workdir = Path(workdir)
    tokenizer = demo_task.CharTokenizer()
    train, held_out = demo_task.AdditionTask(digits=cfg.digits, seed=seed).split(cfg.num_eval, cfg.num_train)
    traces = [demo_task.teacher_solution(e, cfg.drop_carry, cfg.drop_chained_carry, seed) for e in train]
    sft_examples = [TokenizedExample(*demo_task.sft_example(tokenizer, e.problem, t)) for e, t in zip(train, traces)]

    prefix = cfg.prefix_steps(grpo_cfg.steps)
    budget = prefix + grpo_cfg.steps
    longest = max(len(e.input_ids) for e in sft_examples) - 1  # positions a document needs
    sft_cfg = SFTConfig(batch_size=cfg.sft_batch_size, max_seq_len=-(-longest // 8) * 8, steps=budget, seed=seed,
                        optimizer=optim.OptimizerConfig(learning_rate=cfg.sft_learning_rate, schedule="warmup_linear",
                                                        warmup_steps=min(cfg.sft_warmup_steps, budget - 1),
                                                        b1=0.9, b2=0.95),
                        lora=LoRAConfig(rank=0), export=False, remat=False, chunk_size=256, keep_last=1,
                        log_every=50)
    _check_plan(workdir / "demo_plan.json", {"seed": seed, "prefix_steps": prefix, "budget_steps": budget,
                                              **{f"{name}.{k}": v for name, c in (("demo", cfg), ("rl", grpo_cfg),
                                                                                  ("loss", loss_cfg),
                                                                                  ("optimizer", optim_cfg))
                                                 for k, v in dataclasses.asdict(c).items()}})
    model = init_model(model_config(cfg, tokenizer.vocab_size), seed=seed, mesh=mesh)
    engine = JaxSampler(model, SamplerConfig(min_bucket=8, vocab_chunk=0),
                        mesh=mesh if sampler_mesh is None else sampler_mesh)
    log = HeldOutLog(workdir / "held_out.jsonl")

    def evaluate(arm: str, step: int, weights) -> dict:
        def compute():
            engine.update_weights(weights)
            return evaluate_held_out(engine, tokenizer, held_out, grpo_cfg.max_completion_tokens)
        return log.get(arm, step, compute)

    def sft_until(stop: int) -> None:
        run_sft(model, sft_examples, sft_cfg, workdir / "sft", mesh=mesh, stop_after_step=stop)
        evaluate("sft", stop, model)

    # 1. The shared SFT prefix, then its weights saved as the GRPO arm's starting point.
    phases: dict[str, dict[str, float]] = {}
    clock = _PhaseClock()
    branch = workdir / "branch"
    if not branch.is_dir():
        _refuse_if_past(workdir / "sft" / "checkpoints", prefix)
        evaluate("sft", 0, model)
        for stop in _stops(0, prefix, cfg.sft_eval_every):
            logging.info("demo: SFT on the teacher's traces, steps to %d of %d (shared prefix)", stop, budget)
            sft_until(stop)
        ckpt_lib.save_pytree(branch, nnx.state(model))
    phases["sft_prefix"] = clock.lap()

    # 2. The GRPO arm, from the branch point.
    grpo_model = init_model(model_config(cfg, tokenizer.vocab_size), seed=seed, mesh=mesh)
    restore_branch(branch, grpo_model)
    engine.update_weights(grpo_model)

    def grpo_eval(weights, step: int) -> dict[str, float]:
        r = evaluate("sft_grpo", prefix + step, weights)
        return {"eval_accuracy": r["boxed_accuracy"], "eval_format_blind_accuracy": r["format_blind_accuracy"],
                "eval_unboxed_rate": r["unboxed_rate"]}

    logging.info("demo: GRPO with the boxed reward, %d steps from SFT step %d", grpo_cfg.steps, prefix)
    rl_loop.train(grpo_model, train, encode=lambda batch: [tokenizer.encode(e.problem) for e in batch],
                  decode=tokenizer.decode, cfg=grpo_cfg, loss_cfg=loss_cfg, optim_cfg=optim_cfg,
                  lora_cfg=LoRAConfig(rank=0), workdir=str(workdir / "grpo"), engine=engine,
                  stop_token_ids=(demo_task.EOS,), evaluate=grpo_eval, run_config=run_config)
    evaluate("sft_grpo", budget, grpo_model)  # present already unless rl.eval_every is 0
    phases["grpo"] = clock.lap()

    # 3. The SFT arm: the same SFT run, continued for the GRPO arm's steps.
    for stop in _stops(prefix, budget, grpo_cfg.eval_every or grpo_cfg.steps):  # the GRPO arm's eval steps
        logging.info("demo: SFT arm, steps to %d of %d", stop, budget)
        sft_until(stop)
    phases["sft_rest"] = clock.lap()

    teacher = _teacher_figures(cfg, train, traces, held_out, seed)
    results = _results(log, prefix, budget, grpo_cfg.steps, len(held_out), len(train), teacher)
    chained = [str(e.meta["chained_carries"]) for e in held_out]
    results["held_out_by_chained_carries"] = {k: chained.count(k) for k in sorted(set(chained), key=int)}
    # Seconds of this invocation (a rerun that reuses finished work reports only its own).
    results.update(seed=seed, seconds=time.perf_counter() - start, cpu_seconds=time.process_time() - cpu_start,
                   phase_seconds=phases, smoke=cfg.smoke_reason(grpo_cfg.steps))
    if is_writer():
        with open(workdir / "demo_results.json", "w") as f:
            json.dump(results, f, indent=2)
        plot_demo(log, prefix, workdir / "plots")
        print(results_table(results))
    return results


class _PhaseClock:
    """Wall and CPU seconds (all of this process's threads) since the previous lap."""

    def __init__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def lap(self) -> dict[str, float]:
        wall, cpu = time.perf_counter(), time.process_time()
        out = {"wall": wall - self.wall, "cpu": cpu - self.cpu}
        self.wall, self.cpu = wall, cpu
        return out


def _stops(begin: int, end: int, every: int) -> list[int]:
    """Where to stop and evaluate after `begin`: every `every` steps, and at `end`."""
    return list(range(begin + every, end, every)) + [end] if end > begin else []


def _check_plan(path: Path, plan: dict) -> None:
    """Records what this workdir's runs are (the first time) and refuses to mix runs: the arms' weights
    and the reused evaluations belong to one setting, so a rerun with another one would resume
    checkpoints and report evaluations that are not its own. jaxmath.main's config.json check comes
    first and allows more steps; this one also holds the branch point derived from them, which more
    steps move, so a longer demo starts in a fresh workdir (or with --config.resume=false)."""
    if not is_writer():  # process 0 checks (a refusal there ends every process) and writes it
        return
    plan = json.loads(json.dumps(plan, default=str))
    if path.is_file():
        saved = json.loads(path.read_text())
        changed = sorted(k for k in set(saved) | set(plan) if saved.get(k) != plan.get(k))
        if changed:
            listed = ", ".join(f"{k}: {saved.get(k)!r} -> {plan.get(k)!r}" for k in changed[:6])
            raise ConfigError(f"{path.parent} holds a demo run with other settings ({listed}); rerun with those, "
                              "pass --config.resume=false to start over (the old run is moved aside), or pass a "
                              "fresh --workdir")
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(plan, indent=2))


def _refuse_if_past(checkpoints: Path, prefix: int) -> None:
    """The branch point must be taken on the way: a workdir whose SFT run went past it without
    saving it (deleted files, or a run with another prefix) cannot give the GRPO arm its start."""
    if not checkpoints.is_dir():
        return
    steps = [int(p.name) for p in checkpoints.iterdir() if p.name.isdigit()]
    if steps and max(steps) > prefix:
        raise FileNotFoundError(f"{checkpoints.parent} has SFT checkpoints past the branch point (step {max(steps)} > "
                                f"{prefix}) but no {checkpoints.parent.parent / 'branch'}; start in a fresh workdir")


def _teacher_figures(cfg: DemoConfig, train, traces, held_out, seed: int) -> dict:
    held_traces = [demo_task.teacher_solution(e, cfg.drop_carry, cfg.drop_chained_carry, seed) for e in held_out]

    def accuracy(examples, texts):
        return float(np.mean([demo_task.format_blind_correct(t, e.answer) for e, t in zip(examples, texts)]))

    return {"drop_carry": cfg.drop_carry, "drop_chained_carry": cfg.drop_chained_carry,
            "train_accuracy": accuracy(train, traces), "held_out_accuracy": accuracy(held_out, held_traces),
            "held_out_share_with_chained_carry": float(np.mean([e.meta["chained_carries"] > 0 for e in held_out]))}


def _results(log: HeldOutLog, prefix: int, budget: int, grpo_steps: int, n_eval: int, n_train: int,
             teacher: dict) -> dict:
    arms = {}
    for arm, steps in (("sft", {"sft": budget}), ("sft_grpo", {"sft": prefix, "grpo": grpo_steps})):
        r = log.records[(arm, budget)]
        arms[arm] = {key: r[key] for key in ("boxed_accuracy", "format_blind_accuracy", "unboxed_rate",
                                               "format_blind_by_chained_carries")}
        arms[arm].update(ci95=ci95(r["format_blind_accuracy"], n_eval), boxed_ci95=ci95(r["boxed_accuracy"], n_eval),
                         steps=steps)
    sft, grpo = arms["sft"], arms["sft_grpo"]
    gain = grpo["format_blind_accuracy"] - sft["format_blind_accuracy"]
    branch = log.records[("sft", prefix)]
    return {
        "arms": arms, "n_eval": n_eval, "n_train": n_train, "branch_step": prefix, "budget_steps": budget,
        "branch": {k: branch[k] for k in ("boxed_accuracy", "format_blind_accuracy", "unboxed_rate")},
        "format_blind_gain": gain,
        "intervals_overlap": bool(abs(gain) <= sft["ci95"] + grpo["ci95"]),
        "teacher": teacher,
        "curve": {arm: [{k: r[k] for k in ("step", "boxed_accuracy", "format_blind_accuracy", "unboxed_rate")}
                        for r in log.curve(arm)] for arm in ARMS},
    }


def plot_demo(log: HeldOutLog, prefix: int, out_dir: Path) -> list[Path]:
    """demo_accuracy.png (both arms' held-out accuracy, format-blind and boxed, over optimizer steps,
    the GRPO arm starting at the SFT prefix's point) and demo_unboxed.png, both on 0-100% axes."""
    sft = log.curve("sft")
    grpo = [r for r in sft if r["step"] == prefix] + log.curve("sft_grpo")

    def series(curve, key):
        return [r["step"] for r in curve], [100 * r[key] for r in curve]

    accuracy = {"SFT only, format-blind": series(sft, "format_blind_accuracy"),
                "SFT then GRPO, format-blind": series(grpo, "format_blind_accuracy"),
                "SFT only, boxed reward": series(sft, "boxed_accuracy"),
                "SFT then GRPO, boxed reward": series(grpo, "boxed_accuracy")}
    unboxed = {"SFT only": series(sft, "unboxed_rate"), "SFT then GRPO": series(grpo, "unboxed_rate")}
    out_dir.mkdir(parents=True, exist_ok=True)
    xlabel = f"optimizer steps (SFT to step {prefix}, then each arm its own way)"
    return [
        metrics_lib.plot_series(accuracy, out_dir / "demo_accuracy.png", xlabel=xlabel,
                                ylabel="held-out greedy accuracy (%)", title="Held-out accuracy, same budget",
                                ylim=(0, 100), vline=(prefix, "GRPO starts")),
        metrics_lib.plot_series(unboxed, out_dir / "demo_unboxed.png", xlabel=xlabel,
                                ylabel="held-out completions without \\boxed{} (%)", title="Unboxed completions",
                                ylim=(0, 100), vline=(prefix, "GRPO starts")),
    ]


def _chained_label(count: int) -> str:
    if count == 0:
        return "without a chained carry"
    return f"with {count} chained carr{'y' if count == 1 else 'ies'}"


def results_table(r: dict) -> str:
    sft, grpo = r["arms"]["sft"], r["arms"]["sft_grpo"]

    def pct(arm, key, ci_key=None):
        text = f"{100 * arm[key]:.1f}%"
        return text + (f" ± {100 * arm[ci_key]:.1f}" if ci_key else "")

    counts = sorted(set(sft["format_blind_by_chained_carries"]), key=int)
    rows = [""]
    if r.get("smoke"):
        rows += [f"A SMOKE RUN ({r['smoke']}): these figures say only that the pipeline runs; they are not "
                 "results. The shipped command (README) gives the figures that are.", ""]
    rows += [
        f"| held-out {r['n_eval']} problems, greedy | SFT only ({sft['steps']['sft']} steps) | "
        f"SFT {grpo['steps']['sft']} + GRPO {grpo['steps']['grpo']} steps |",
        "|---|---|---|",
        f"| accuracy, format-blind (last number) | {pct(sft, 'format_blind_accuracy', 'ci95')} | "
        f"{pct(grpo, 'format_blind_accuracy', 'ci95')} |",
        f"| accuracy, boxed reward | {pct(sft, 'boxed_accuracy', 'boxed_ci95')} | "
        f"{pct(grpo, 'boxed_accuracy', 'boxed_ci95')} |",
        f"| unboxed completions | {pct(sft, 'unboxed_rate')} | {pct(grpo, 'unboxed_rate')} |",
    ]
    sizes = r["held_out_by_chained_carries"]
    rows += [f"| format-blind, the {sizes[k]} problems {_chained_label(int(k))} | "
             f"{100 * sft['format_blind_by_chained_carries'][k]:.1f}% | "
             f"{100 * grpo['format_blind_by_chained_carries'][k]:.1f}% |" for k in counts]
    t, branch = r["teacher"], r["branch"]
    rows += [
        "",
        f"SFT then GRPO minus SFT only: {100 * r['format_blind_gain']:+.1f} points format-blind; the 95% intervals "
        f"{'overlap' if r['intervals_overlap'] else 'do not overlap'}.",
        f"Both arms start from SFT step {r['branch_step']}: {100 * branch['format_blind_accuracy']:.1f}% format-blind, "
        f"{100 * branch['boxed_accuracy']:.1f}% boxed.",
        f"The teacher's traces are right on {100 * t['train_accuracy']:.1f}% of the training problems "
        f"({100 * t['held_out_accuracy']:.1f}% of the held-out ones), and all are boxed.",
        f"{r['seconds']:.0f} s ({r['cpu_seconds']:.0f} s of CPU time) for this command.",
    ]
    return "\n".join(rows)
