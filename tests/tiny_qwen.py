"""A tiny random Qwen3 in HF format that looks like Qwen3-4B-Instruct-2507 apart from its sizes, for
tests that run the documented commands (no download, nothing from ../shared).

    python tests/tiny_qwen.py OUT_DIR [--max_position_embeddings=N] [--answers_briefly] [--answers_boxed]

config.json is Qwen3-4B-Instruct-2507's (as published on the hub, written by transformers 4.51:
`rope_theta` at the top level, 262,144 positions, bos/eos 151643/151645, tied embeddings, the full
151,936-row vocabulary) with the layer sizes shrunk: hidden 64, 2 layers, 4 query / 2 KV heads of
head_dim 32 (vLLM's CPU attention takes 32/64/128, not 40). The tokenizer and its chat template are
the real Qwen3 files in tests/fixtures/data/qwen_tokenizer. The weights are random (seeded), ~10M
parameters, almost all the embedding.

The published config.json is not stored beside the repository and the hub is not reachable from the
project's machines: QWEN3_4B_INSTRUCT_2507 is written out from the model card's published values
(36 layers, 2560 wide, 32/8 heads of 128, 262,144 positions, rope theta 5,000,000, tied embeddings)
in the layout transformers 4.51 writes; jaxmath.model.config's "qwen3-4b-instruct-2507" preset agrees.
generation_config.json holds the card's recommended sampling (temperature 0.7, top_p 0.8, top_k 20).

`answers_briefly=True` writes the same random model with one direction built into its weights so that
it ends its answers soon, as a trained model does, and the documented commands keep their shipped
4,096-token limits yet finish in seconds: otherwise a random model never emits <|im_end|> and every
completion runs to the limit (one GRPO v2 step and one vLLM evaluation of 2 problems took 20+ min on 2
cores). Hidden coordinate 0 of every tied-embedding row gets a small positive component, <|im_end|>
(the eos of the chat template and generation_config) a large one, and the final norm's weight
emphasises that coordinate, so <|im_end|>'s logit is a large multiple of how much of it the last
position carries. Measured with transformers on the fixture prompts (4-shot): near-greedy decoding
ends at the first token (an argmax of a random model has no way to count, so it stops at once or
never; this stops at once), temperature 0.7 after 1-4 tokens, temperature 1 after 1-6.

`answers_boxed=True` writes a model that always answers `\\boxed{7}` or `\\boxed{8}`, at even odds when
sampled at temperature 1, and stops (`_answer_boxed`): a policy that a GRPO step can learn from.
"""

import argparse
import json
import os
import shutil
from pathlib import Path

TOKENIZER_DIR = Path(__file__).resolve().parent / "fixtures" / "data" / "qwen_tokenizer"

QWEN3_4B_INSTRUCT_2507 = {
    "architectures": ["Qwen3ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": 2560,
    "initializer_range": 0.02,
    "intermediate_size": 9728,
    "max_position_embeddings": 262144,
    "max_window_layers": 36,
    "model_type": "qwen3",
    "num_attention_heads": 32,
    "num_hidden_layers": 36,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 5000000,
    "sliding_window": None,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.51.0",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 151936,
}
TINY_SIZES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, max_window_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=32)


EOS = 151645  # <|im_end|>
# the brief answers' direction (see the module docstring); tuned on the fixture prompts with transformers
BRIEF_SHARED, BRIEF_SPREAD, BRIEF_EOS, BRIEF_NORM = 0.02, 0.05, 0.3, 10.0


def _answer_briefly(model, seed: int) -> None:
    """Builds the early-<|im_end|> direction (hidden coordinate 0) into `model`'s tied embedding and final norm."""
    import torch

    with torch.no_grad():
        embedding = model.model.embed_tokens.weight  # [vocab, hidden], also the output head (tied)
        spread = torch.randn(embedding.shape[0], generator=torch.Generator().manual_seed(seed + 1)).abs()
        embedding[:, 0] = BRIEF_SHARED + BRIEF_SPREAD * spread
        embedding[EOS, 0] = BRIEF_EOS
        model.model.norm.weight[0] = BRIEF_NORM


# The boxed answers' chain: after the assistant header's "\n" (or the empty think block's "\n\n"),
# `\boxed{7}` or `\boxed{8}` (even odds), then <|im_end|>.
BOXED_CHAIN = {198: (59,), 271: (59,), 59: (79075,), 79075: (90,), 90: (22, 23), 22: (92,), 23: (92,), 92: (EOS,)}
BOXED_ANSWERS = ("\\boxed{7}", "\\boxed{8}")


def _answer_boxed(model) -> None:
    """Makes `model` a bigram machine on the few tokens of BOXED_CHAIN: each of them gets its own hidden
    coordinate (1-9) in the tied embedding, attention and the first layer's MLP write nothing, and the
    last layer's MLP moves a chain token's coordinate to its successors' (equal shares where there are
    two), so sampling after the assistant header writes `\\boxed{7}` or `\\boxed{8}` at even odds and
    stops. Every other weight stays random: a policy whose reward against the gold 7 is a coin flip."""
    import torch

    tokens = sorted({t for source, targets in BOXED_CHAIN.items() for t in (source, *targets)})
    coordinate = {token: 1 + i for i, token in enumerate(tokens)}
    with torch.no_grad():
        embedding = model.model.embed_tokens.weight  # [vocab, hidden], also the output head (tied)
        for token, c in coordinate.items():
            embedding[token] = 0.0
            embedding[token, c] = 1.0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        mlp = model.model.layers[-1].mlp
        mlp.gate_proj.weight.zero_()
        mlp.up_proj.weight.zero_()
        model.model.layers[-1].post_attention_layernorm.weight.fill_(1.0)
        hidden = embedding.shape[1]
        for unit, (source, targets) in enumerate(BOXED_CHAIN.items()):
            # A chain token's normed hidden state is sqrt(hidden) on its coordinate: the unit's output is
            # silu(8) * 8 ~ hidden there, scaled back so the token's coordinate is replaced by its successors'.
            mlp.gate_proj.weight[unit, coordinate[source]] = 1.0
            mlp.up_proj.weight[unit, coordinate[source]] = 1.0
            gain = 1.0 / (torch.nn.functional.silu(torch.tensor(hidden ** 0.5)) * hidden ** 0.5)
            mlp.down_proj.weight[coordinate[source], unit] = -gain
            for target in targets:
                mlp.down_proj.weight[coordinate[target], unit] = gain
        model.model.norm.weight[1:1 + len(tokens)] = 10.0


def write_tiny_qwen3(out_dir: str | os.PathLike, *, max_position_embeddings: int = 262144, seed: int = 0,
                     answers_briefly: bool = False, answers_boxed: bool = False) -> Path:
    """Writes the model (config.json, model.safetensors, generation_config.json, tokenizer) to `out_dir`.

    answers_briefly: build in the direction that makes it end its answers within a few tokens (module docstring).
    answers_boxed: make it answer `\\boxed{7}` or `\\boxed{8}` at even odds and stop (`_answer_boxed`).
    """
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    out = Path(out_dir)
    hf_config = {**QWEN3_4B_INSTRUCT_2507, **TINY_SIZES, "max_position_embeddings": max_position_embeddings,
                 "torch_dtype": "float32"}
    torch.manual_seed(seed)
    fields = {k: v for k, v in hf_config.items() if k not in ("architectures", "transformers_version", "torch_dtype")}
    model = Qwen3ForCausalLM(Qwen3Config(**fields)).eval()
    if answers_briefly:
        _answer_briefly(model, seed)
    if answers_boxed:
        _answer_boxed(model)
    model.save_pretrained(out)
    # the file as transformers 4 wrote it (transformers 5 would nest rope_theta in rope_parameters)
    (out / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 151643, "eos_token_id": [151645, 151643], "pad_token_id": 151643, "do_sample": True,
         "temperature": 0.7, "top_p": 0.8, "top_k": 20}, indent=2) + "\n")
    for name in os.listdir(TOKENIZER_DIR):
        shutil.copyfile(TOKENIZER_DIR / name, out / name)
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--max_position_embeddings", type=int, default=262144)
    parser.add_argument("--answers_briefly", action="store_true", help="end answers within a few tokens")
    parser.add_argument("--answers_boxed", action="store_true", help="answer \\boxed{7} or \\boxed{8}, then stop")
    args = parser.parse_args()
    write_tiny_qwen3(args.out, max_position_embeddings=args.max_position_embeddings,
                     answers_briefly=args.answers_briefly, answers_boxed=args.answers_boxed)
