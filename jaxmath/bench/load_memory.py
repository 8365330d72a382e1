"""`python -m jaxmath.bench load_memory --model=DIR`: peak host memory while `from_pretrained` loads an
HF checkpoint, per parameter dtype, relative to the checkpoint's file size.

Each load runs in a fresh Python process, so one measurement's allocations cannot raise another's
peak. The child imports everything and initialises the JAX backend first, records its peak RSS
(`ru_maxrss`) and current RSS as the baseline, loads, and records the peak again; the load's cost is
peak minus baseline. On the CPU backend the loaded parameters themselves live in host memory, so the
ideal is one copy of the weights in the target dtype (file size for float32 from a float32 file,
half of it for bfloat16); anything above that is the loader's transient overhead.
`--hf` measures transformers' `from_pretrained` the same way, as a reference.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from typing import Any

_MIB = 1024 ** 2


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status; this benchmark needs Linux")


def _peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


def _child(model_dir: str, dtype: str, loader: str) -> dict[str, Any]:
    """Runs in the fresh process: baseline, load, peak."""
    if loader == "jaxmath":
        import jax
        import jax.numpy as jnp
        from flax import nnx

        from jaxmath.model import from_pretrained
        from jaxmath.model.config import dtype_from_name

        jax.devices()
        jnp.zeros(1).block_until_ready()  # backend and its thread pools up before the baseline
        base_peak, base_rss = _peak_bytes(), _rss_bytes()
        start = time.perf_counter()
        model = from_pretrained(model_dir, dtype=dtype_from_name(dtype))
        leaves = jax.tree.leaves(nnx.state(model))
        jax.block_until_ready(leaves)
        param_bytes = sum(x.nbytes for x in leaves)
    else:
        import torch
        from transformers import AutoModelForCausalLM

        base_peak, base_rss = _peak_bytes(), _rss_bytes()
        start = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype))
        param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    seconds = time.perf_counter() - start
    return {"base_peak": base_peak, "base_rss": base_rss, "peak": _peak_bytes(), "rss_after": _rss_bytes(),
            "param_bytes": param_bytes, "seconds": seconds}


def _measure(model_dir: str, dtype: str, loader: str) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "jaxmath.bench.load_memory", "--child", f"--model={model_dir}",
           f"--dtypes={dtype}", f"--loader={loader}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"loading {model_dir} as {dtype} with {loader} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jaxmath.bench load_memory", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="HF-format Qwen3 directory (e.g. a 0.6b-shape float32 model)")
    p.add_argument("--dtypes", default="bfloat16,float32", help="comma-separated parameter dtypes to load as")
    p.add_argument("--hf", action="store_true", help="also measure transformers' from_pretrained")
    p.add_argument("--loader", default="jaxmath", choices=["jaxmath", "hf"], help=argparse.SUPPRESS)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str]) -> dict[str, Any]:
    args = _parse(argv)
    from jaxmath.model.hf_io import CheckpointReader

    file_bytes = CheckpointReader(args.model).nbytes()
    result: dict[str, Any] = {"model": args.model, "file_mib": round(file_bytes / _MIB, 1)}
    loaders = ["jaxmath"] + (["hf"] if args.hf else [])
    for loader in loaders:
        for dtype in [d.strip() for d in args.dtypes.split(",") if d.strip()]:
            m = _measure(args.model, dtype, loader)
            # Peak minus the RSS just before loading. If loading never rose above an import-time
            # spike, ru_maxrss cannot see below it, so this is an upper bound; `baseline_spike`
            # says whether that happened.
            added = m["peak"] - m["base_rss"]
            prefix = f"{loader}_{dtype}"
            result[f"{prefix}_peak_added_mib"] = round(added / _MIB, 1)
            result[f"{prefix}_params_mib"] = round(m["param_bytes"] / _MIB, 1)
            result[f"{prefix}_peak_over_file"] = round(added / file_bytes, 3)
            result[f"{prefix}_peak_over_params"] = round(added / m["param_bytes"], 3)
            result[f"{prefix}_baseline_spike"] = m["peak"] == m["base_peak"]
            result[f"{prefix}_load_s"] = round(m["seconds"], 2)
            result[f"{prefix}_rss_after_added_mib"] = round((m["rss_after"] - m["base_rss"]) / _MIB, 1)
    return result


if __name__ == "__main__":
    # Child mode only: `python -m jaxmath.bench load_memory ...` goes through jaxmath.bench.__main__.
    _args = _parse(sys.argv[1:])
    if not _args.child:
        sys.exit("run this benchmark as `python -m jaxmath.bench load_memory --model=DIR`")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    print(json.dumps(_child(_args.model, _args.dtypes, _args.loader)))
