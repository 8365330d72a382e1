"""Supervised fine-tuning: the jitted step (`step`), the trace data and its order (`data`), the host
loop (`loop`).

The pieces, in the order data flows through them:

    load_sft_examples(paths, tokenizer)   -> TokenizedExample(input_ids, loss_mask)   (jaxmath.data.chat)
    pack_plan / pack_examples             -> rows [rows, max_seq_len] of documents   (jaxmath.data.packing)
    make_sft_step(graphdef, optimizer)    -> jitted (trainable, frozen, opt_state, batch) -> new state
    run_sft(model, examples, SFTConfig)   -> the run: order, steps, eval loss, checkpoints, export

The train-state set-up and the accumulated update are `jaxmath.train_state`'s, shared with GRPO.
"""

from jaxmath.data.chat import TokenizedExample, tokenize_chat
from jaxmath.data.packing import BATCH_KEYS, pack_examples, pack_plan, truncate
from jaxmath.model.lora import split_trainable
from jaxmath.sft.data import load_sft_examples, plan_batches, plan_run
from jaxmath.sft.loop import SFTConfig, export, run_sft
from jaxmath.sft.step import make_eval_step, make_sft_step, stack_micro, token_nll

__all__ = [
    "BATCH_KEYS",
    "SFTConfig",
    "TokenizedExample",
    "export",
    "load_sft_examples",
    "make_eval_step",
    "make_sft_step",
    "pack_examples",
    "pack_plan",
    "plan_batches",
    "plan_run",
    "run_sft",
    "split_trainable",
    "stack_micro",
    "token_nll",
    "tokenize_chat",
    "truncate",
]
