"""Benchmark evaluation: metrics (accuracy, CI, maj@k, pass@k), the runner, and markdown reports."""

from jaxmath.eval.run import EvalConfig, evaluate

__all__ = ["EvalConfig", "evaluate"]
