"""Prompts: the model's own chat template, an optional few-shot prefix and the `\\boxed{}` instruction.

Every prompt is rendered by the tokenizer's chat template (`apply_chat_template`), so the text matches
what the model saw in post-training. The user turn is the problem followed by INSTRUCTION, the
sentence the Qwen2.5-Math and Qwen3 model cards recommend for math ("Please reason step by step, and
put your final answer within \\boxed{}.", QwenLM/Qwen2.5-Math `evaluation` "qwen25-math-cot" prompt;
also the instruction behind OpenR1-Math-220k's traces).

The study evaluates with "a standardized few-shot prefix" without printing it. Ours is FEW_SHOT:
four short MATH train problems copied verbatim with their reference solutions (each ends in
`\\boxed{answer}`), rendered as earlier user/assistant turns. `few_shot=0` turns it off.

Thinking: Qwen3-*-Instruct-2507 templates have no thinking mode and ignore `enable_thinking`. The
hybrid Qwen3 template (the one in the test tokenizer) thinks unless told otherwise; we pass
`enable_thinking=False` by default, which appends an empty `<think>\\n\\n</think>` block, because the
study's student is the non-thinking Instruct model and its token budgets assume no thinking trace.

Prompts are never truncated: `encode_prompts` raises when one exceeds its token budget.
"""

from __future__ import annotations

from typing import Any, Sequence

from jaxmath.data.datasets import DataError, Example

INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."

# (source id in math_train.jsonl, problem, reference solution), verbatim from MATH train (levels 1-2,
# four subjects, short solutions so the prefix costs few tokens).
FEW_SHOT: tuple[tuple[str, str, str], ...] = (
    (
        "train/algebra/8.json",
        "Find the distance between the points $(-5,-2)$ and $(7,3)$.",
        "We use the distance formula to find that the distance is "
        "\\[\\sqrt{(-5 -7)^2 + (-2-3)^2} = \\!\\sqrt{144 + 25} = \\boxed{13}.\\]",
    ),
    (
        "train/counting_and_probability/59.json",
        "Johnny has 7 different colored marbles in his bag.  In how many ways can he choose three different "
        "marbles from his bag to play a game?",
        "He can choose 3 marbles from 7 distinct marbles in $\\binom{7}{3}=\\boxed{35}$ ways.",
    ),
    (
        "train/prealgebra/4.json",
        "What is $\\frac{2}{5}$ divided by 3?",
        "Recall that division is the same as multiplication by a reciprocal. In other words, if $b$ is nonzero, "
        "then $a \\div b = a\\cdot \\frac{1}{b}$. In this case, \\[\n\\frac{2}{5}\\div 3 = \\frac{2}{5}\\cdot "
        "\\frac{1}{3} = \\frac{2\\cdot 1}{5\\cdot 3}=\\boxed{\\frac{2}{15}}.\n\\]",
    ),
    (
        "train/number_theory/61.json",
        "When $n$ is divided by 3, the remainder is 2. What is the remainder when $5n$ is divided by 3?",
        "Since $n \\equiv 2 \\pmod{3}$, $5n \\equiv 5 \\cdot 2 \\equiv 10 \\equiv \\boxed{1} \\pmod{3}$.",
    ),
)


def user_turn(problem: str) -> str:
    """The user message for one problem: the statement, a blank line, then INSTRUCTION."""
    return f"{problem}\n\n{INSTRUCTION}"


def build_messages(problem: str, few_shot: int = 0, system: str | None = None) -> list[dict[str, str]]:
    """Chat messages: [system], `few_shot` worked examples as user/assistant pairs, then the problem."""
    if not 0 <= few_shot <= len(FEW_SHOT):
        raise ValueError(f"few_shot must be between 0 and {len(FEW_SHOT)} (the stored examples), got {few_shot}")
    messages = [{"role": "system", "content": system}] if system else []
    for _, shot_problem, shot_solution in FEW_SHOT[:few_shot]:
        messages += [{"role": "user", "content": user_turn(shot_problem)},
                     {"role": "assistant", "content": shot_solution}]
    messages.append({"role": "user", "content": user_turn(problem)})
    return messages


def render_chat(tokenizer: Any, messages: Sequence[dict[str, str]], *, generation_prompt: bool,
                enable_thinking: bool = False) -> str:
    """`messages` rendered by the tokenizer's own chat template (the one place jaxmath applies it).

    generation_prompt: end with the assistant header, as a prompt for the model to answer.
    tokenizer: a Hugging Face tokenizer whose `chat_template` is set (e.g. Qwen3's).
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "the tokenizer has no chat_template; load the model's own tokenizer "
            "(its tokenizer_config.json or chat_template.jinja holds the template)"
        )
    return tokenizer.apply_chat_template(list(messages), add_generation_prompt=generation_prompt, tokenize=False,
                                         enable_thinking=enable_thinking)


def encode_text(tokenizer: Any, text: str) -> list[int]:
    """Token ids of rendered template text. The template writes every special token itself, so the
    tokenizer adds none of its own (no BOS)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def build_prompt(problem: str, tokenizer: Any, few_shot: int = 0, system: str | None = None,
                 enable_thinking: bool = False) -> str:
    """The prompt text, ending with the template's assistant header (generation prompt)."""
    return render_chat(tokenizer, build_messages(problem, few_shot, system), generation_prompt=True,
                       enable_thinking=enable_thinking)


def encode_prompts(examples: Sequence[Example], tokenizer: Any, max_prompt_tokens: int, *, few_shot: int = 0,
                   system: str | None = None, enable_thinking: bool = False) -> list[list[int]]:
    """Token ids of each example's prompt: [num_examples] lists of int, never truncated.

    Raises DataError (a ValueError) naming the first example whose prompt is longer than `max_prompt_tokens`.
    """
    encoded = []
    for ex in examples:
        ids = encode_text(tokenizer, build_prompt(ex.problem, tokenizer, few_shot, system, enable_thinking))
        if len(ids) > max_prompt_tokens:
            raise DataError(
                f"prompt of example {ex.id} has {len(ids)} tokens, over the budget of {max_prompt_tokens}; "
                "raise max_prompt_tokens (and the engine's context length) or lower few_shot"
            )
        encoded.append(ids)
    return encoded


def stop_token_ids(tokenizer: Any) -> tuple[int, ...]:
    """Ids that end an assistant turn: the eos (`<|im_end|>` for Qwen3) and `<|endoftext|>` when present."""
    ids = []
    for token in (tokenizer.eos_token, "<|im_end|>", "<|endoftext|>"):
        if token is None:
            continue
        token_id = tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id and token_id not in ids:
            ids.append(token_id)
    return tuple(ids)
