"""Prompts rendered with the real Qwen3 tokenizer on disk: template, few-shot prefix, budgets."""

from pathlib import Path

import pytest

from jaxmath.data import datasets, prompts
from jaxmath.reward.extract import extract_boxed

from tests.conftest import DATA_DIR as SHARED, TOKENIZER_DIR


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))


def test_zero_shot_prompt_is_the_chat_template(tokenizer):
    text = prompts.build_prompt("What is 1+1?", tokenizer, few_shot=0)
    assert text == ("<|im_start|>user\nWhat is 1+1?\n\n" + prompts.INSTRUCTION + "<|im_end|>\n"
                    "<|im_start|>assistant\n<think>\n\n</think>\n\n")
    thinking = prompts.build_prompt("What is 1+1?", tokenizer, enable_thinking=True)
    assert thinking.endswith("<|im_start|>assistant\n")


def test_instruction_is_the_qwen_math_sentence():
    assert prompts.INSTRUCTION == "Please reason step by step, and put your final answer within \\boxed{}."


def test_few_shot_prefix_turns_and_system(tokenizer):
    text = prompts.build_prompt("Final problem", tokenizer, few_shot=2, system="You are careful.")
    assert text.startswith("<|im_start|>system\nYou are careful.<|im_end|>\n")
    assert text.count("<|im_start|>user") == 3 and text.count("<|im_start|>assistant") == 3
    assert text.index(prompts.FEW_SHOT[0][1]) < text.index(prompts.FEW_SHOT[1][1]) < text.index("Final problem")
    assert prompts.FEW_SHOT[2][1] not in text
    messages = prompts.build_messages("x", few_shot=4)
    assistant_turns = [m["content"] for m in messages if m["role"] == "assistant"]
    assert len(assistant_turns) == 4 and all("\\boxed{" in turn for turn in assistant_turns)
    with pytest.raises(ValueError, match="few_shot must be between 0 and 4"):
        prompts.build_messages("x", few_shot=5)


def test_few_shot_examples_are_verbatim_math_train_rows():
    rows = {ex.id: ex for ex in datasets.load_math_train(SHARED)}
    for source_id, problem, solution in prompts.FEW_SHOT:
        assert rows[source_id].problem == problem
        assert rows[source_id].meta["solution"] == solution
        assert extract_boxed(solution) == rows[source_id].answer


def test_encode_prompts_and_budget(tokenizer):
    examples = datasets.load("gsm8k", SHARED, limit=2)
    ids = prompts.encode_prompts(examples, tokenizer, max_prompt_tokens=4096, few_shot=4)
    assert len(ids) == 2
    assert tokenizer.decode(ids[0]) == prompts.build_prompt(examples[0].problem, tokenizer, few_shot=4)
    assert ids[0][0] == tokenizer.convert_tokens_to_ids("<|im_start|>")  # no extra BOS
    shortest = min(len(row) for row in ids)
    with pytest.raises(ValueError, match=f"example {examples[0].id} has {len(ids[0])} tokens, over the budget"):
        prompts.encode_prompts(examples, tokenizer, max_prompt_tokens=shortest - 1, few_shot=4)


def test_single_turn_length_matches_provenance(tokenizer):
    # PROVENANCE.md: this sentence as one user turn with the generation prompt is 44 tokens (no think block).
    sentence = "Let $f(x) = 3x^2 - 5$. What is the value of $f(f(1))$? Put your final answer within \\boxed{}."
    text = tokenizer.apply_chat_template([{"role": "user", "content": sentence}], add_generation_prompt=True,
                                         tokenize=False)
    assert len(tokenizer(text, add_special_tokens=False)["input_ids"]) == 44


def test_stop_token_ids(tokenizer):
    assert prompts.stop_token_ids(tokenizer) == (151645, 151643)


def test_tokenizer_without_template_is_rejected():
    class NoTemplate:
        chat_template = None

    with pytest.raises(ValueError, match="no chat_template"):
        prompts.build_prompt("x", NoTemplate())
