"""Problem sets (`jaxmath.data.datasets`) and prompts (`jaxmath.data.prompts`)."""

from jaxmath.data.datasets import BENCHMARKS, FILES, TRAIN_SETS, Example, load, load_math_train, read_jsonl

__all__ = ["BENCHMARKS", "FILES", "TRAIN_SETS", "Example", "load", "load_math_train", "read_jsonl"]
