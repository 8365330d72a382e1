"""Benchmark metrics: accuracy with its 95% interval, majority vote (maj@k) and unbiased pass@k.

Pure Python on lists of booleans and answer strings; answer equivalence is passed in as a function
(`jaxmath.reward.equivalent` in the evaluator), so this module has no grader and no JAX in it.

Conventions, fixed here so numbers are comparable across runs:
- ci95 is the study's normal approximation 1.96 * sqrt(p (1 - p) / n) over problems.
- pass@k is the unbiased estimator of Chen et al. 2021 (Codex paper), 1 - C(n-c, k) / C(n, k),
  evaluated as a product so large n does not overflow.
- maj@k for k < n averages the majority-vote correctness over the n // k disjoint chunks of k
  consecutive samples (samples n // k * k .. n - 1 are unused), which uses every sample once instead
  of only the first k. Answers are grouped once over all n samples of a problem: a sample joins the
  first earlier group whose first answer is equivalent to its own. The vote goes to the largest group
  in the chunk; a tie goes to the group whose first sample in the chunk comes earliest. Samples with
  no extracted answer (None) never vote; a chunk of only None answers is wrong.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

Equivalent = Callable[[str, str], bool]


def accuracy(correct: Sequence[bool]) -> float:
    """Fraction of True in `correct`; 0.0 for an empty list."""
    return sum(bool(c) for c in correct) / len(correct) if correct else 0.0


def ci95(p: float, n: int) -> float:
    """Half-width of the normal-approximation 95% interval of a proportion p over n problems."""
    if n <= 0:
        return 0.0
    return 1.96 * math.sqrt(p * (1.0 - p) / n)


def pass_at_k(num_samples: int, num_correct: int, k: int) -> float:
    """Unbiased probability that at least one of k samples (drawn without replacement from
    `num_samples`, of which `num_correct` are correct) is correct."""
    if not 0 <= num_correct <= num_samples or not 1 <= k <= num_samples:
        raise ValueError(f"need 0 <= correct <= samples and 1 <= k <= samples, got "
                         f"samples={num_samples} correct={num_correct} k={k}")
    if num_samples - num_correct < k:
        return 1.0
    # C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k / i)
    fail = 1.0
    for i in range(num_samples - num_correct + 1, num_samples + 1):
        fail *= 1.0 - k / i
    return 1.0 - fail


def group_answers(answers: Sequence[str | None], equivalent: Equivalent) -> list[int | None]:
    """Group label per sample: [num_samples] ints (labels in order of first appearance), None for None.

    Identical strings (after stripping) share a label without calling `equivalent`, which may be slow.
    """
    labels: list[int | None] = []
    representatives: list[str] = []
    by_text: dict[str, int] = {}
    for answer in answers:
        if answer is None:
            labels.append(None)
            continue
        key = answer.strip()
        if key not in by_text:
            match = next((g for g, rep in enumerate(representatives) if equivalent(key, rep)), None)
            if match is None:
                match = len(representatives)
                representatives.append(key)
            by_text[key] = match
        labels.append(by_text[key])
    return labels


def majority_index(labels: Sequence[int | None]) -> int | None:
    """Index (within `labels`) of the first sample of the winning group, or None if all are None."""
    counts: dict[int, int] = {}
    first: dict[int, int] = {}
    for i, label in enumerate(labels):
        if label is None:
            continue
        counts[label] = counts.get(label, 0) + 1
        first.setdefault(label, i)
    if not counts:
        return None
    winner = max(counts, key=lambda label: (counts[label], -first[label]))
    return first[winner]


def maj_at_k(labels: Sequence[int | None], correct: Sequence[bool], k: int) -> float:
    """Majority-vote correctness of one problem, averaged over its n // k disjoint chunks of k samples.

    labels:  [num_samples] group labels from `group_answers`
    correct: [num_samples] whether each sample's answer matches the gold answer
    """
    n = len(labels)
    if len(correct) != n or not 1 <= k <= n:
        raise ValueError(f"need len(labels) == len(correct) and 1 <= k <= n, got {n}, {len(correct)}, k={k}")
    chunks = n // k
    wins = 0
    for chunk in range(chunks):
        index = majority_index(labels[chunk * k:(chunk + 1) * k])
        wins += index is not None and bool(correct[chunk * k + index])
    return wins / chunks


def default_ks(num_samples: int) -> list[int]:
    """1, 2, 4, ... up to num_samples, plus num_samples itself when it is not a power of two."""
    ks = [2 ** i for i in range(num_samples.bit_length()) if 2 ** i <= num_samples]
    return ks if ks[-1] == num_samples else ks + [num_samples]


def summarize(correct: Sequence[Sequence[bool]], labels: Sequence[Sequence[int | None]],
              ks: Sequence[int]) -> dict:
    """Benchmark metrics from per-problem samples.

    correct: [num_problems][num_samples] bool
    labels:  [num_problems][num_samples] group labels (see `group_answers`)
    ks:      the k values to report (those above num_samples are skipped)

    Returns {"n", "num_samples", "accuracy", "ci95", "mean_sample_accuracy", "maj@k": {str(k): float},
    "pass@k": {str(k): float}}. With one sample per problem (greedy) accuracy is that sample's; with
    several, accuracy is maj@1 averaged over chunks, i.e. the mean per-sample accuracy.
    """
    n = len(correct)
    num_samples = len(correct[0]) if n else 0
    if any(len(row) != num_samples for row in correct):
        raise ValueError("every problem must have the same number of samples")
    per_sample = accuracy([c for row in correct for c in row])
    ks = sorted({k for k in ks if 1 <= k <= num_samples})
    maj = {str(k): sum(maj_at_k(lab, cor, k) for lab, cor in zip(labels, correct)) / n if n else 0.0 for k in ks}
    passes = {str(k): sum(pass_at_k(num_samples, sum(map(bool, row)), k) for row in correct) / n if n else 0.0
              for k in ks}
    return {"n": n, "num_samples": num_samples, "accuracy": per_sample, "ci95": ci95(per_sample, n),
            "mean_sample_accuracy": per_sample, "maj@k": maj, "pass@k": passes}
