"""What the benchmarks share: the model flags (`--model=DIR`, or `--preset=NAME --random_weights`),
loading that model, and the rule for peers run in a subprocess (TRL, vLLM): a peer runs only when
its Python and script are given as flags, and otherwise the result says how to run it."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable


def add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="", help="HF-format Qwen3 directory (e.g. from make_bench_model.py)")
    p.add_argument("--preset", default="", help="instead of --model: a jaxmath preset, e.g. qwen3-4b")
    p.add_argument("--random_weights", action="store_true", help="with --preset: random weights (required)")


def check_model_flags(p: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    if bool(a.model) == bool(a.preset):
        p.error("pass exactly one of --model=DIR or --preset=NAME --random_weights")
    if a.preset and not a.random_weights:
        p.error("--preset builds a model without weights; add --random_weights (or pass --model=DIR)")


def load_model(a: argparse.Namespace, dtype: Any, param_dtype: Any = None, seed: int = 0, **overrides: Any):
    """The model of the flags: loaded from --model, or the --preset shape with random weights (rbg
    init, whose temporaries fit a 4B model)."""
    from jaxmath.model import from_pretrained, init_model, preset

    param_dtype = dtype if param_dtype is None else param_dtype
    if a.model:
        return from_pretrained(a.model, dtype=dtype, param_dtype=param_dtype, **overrides)
    return init_model(preset(a.preset, dtype=dtype, param_dtype=param_dtype, **overrides), seed=seed, rng_impl="rbg")


def run_peer(result: dict, peer: str, *, python: str, script: str, flag: str, model: str,
             run: Callable[[], tuple[Any, str]]) -> Any:
    """The peer's measurement, from `run() -> (measurement or None, why not)` when --<flag>_python and
    --<flag>_script name it; otherwise, or when it fails, None, with why (and how to run it) in
    result["<flag>_note"]."""
    how = f"pass --{flag}_python=PYTHON (an environment with {peer} installed) and --{flag}_script=SCRIPT"
    value = None
    if not python or not script:
        note = f"{peer} not run: {how}"
    elif not Path(script).is_file():
        note = f"{peer} not run: --{flag}_script={script} does not exist; {how}"
    elif not model:
        note = f"{peer} not run: it needs --model=DIR (an HF folder), not a preset"
    else:
        value, note = run()
    if note:
        result[f"{flag}_note"] = note
        print(note, file=sys.stderr, flush=True)
    return value
