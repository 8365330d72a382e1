"""A roofline cost model of a compiled program, read from its optimized HLO (`compiled.as_text()`).

    costs = kernel_costs(hlo_text)                       # one KernelCost per kernel the program launches
    summary = program_cost(hlo_text, target)             # FLOPs, bytes, modeled seconds, the costliest five

A kernel is a top-level instruction that does work on the device: a fusion (XLA's elementwise and
reduction fusions, Triton GEMM fusions), a custom call (cuBLAS GEMMs, cuDNN's fused attention), a copy,
a dynamic slice or update. Instructions inside a `while` body run as many times as the loop's known
trip count (once when XLA does not know it); `call` and `conditional` bodies are walked in place.

Per kernel:
- FLOPs: 2 x (result elements) x (contracted elements) for every `dot` (also inside a GEMM fusion) and
  convolution; cuDNN fused attention 4 x B x H x Sq x Sk x D forward (its two matmuls), 2.5 times that
  backward (the recomputed scores and four gradient matmuls), halved under a causal mask. Elementwise
  arithmetic is not counted (a GPU's vector units are not the bound there).
- bytes: what it reads and writes (`jaxmath.aot.hlo.Traffic`: a slice counts its size, an in-place update
  its update, a fusion only the slices it takes of a parameter). An upper bound on DRAM traffic: small
  buffers stay in L2.
- modeled seconds: max(FLOPs / peak FLOP/s for its dtype, bytes / bandwidth) + `LAUNCH_SECONDS`.

Peaks live beside the targets' memory descriptions (`jaxmath.aot.targets.peaks`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re

from jaxmath.aot import hlo

LAUNCH_SECONDS = 2e-6  # a kernel launch on an H100 (XLA issues kernels back to back on one stream)
_DIMS = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\]")


@dataclasses.dataclass
class KernelCost:
    """One kernel: per execution `flops`, `read` and `written` bytes; `count` executions per program run."""

    name: str
    opcode: str
    kind: str  # "gemm", "attention", "fusion", "copy", "slice", "other"
    flops: float
    read: int
    written: int
    count: int
    dtype: str  # the element type its FLOPs run in ("" without FLOPs)
    op_name: str = ""

    def _times(self, peaks: dict) -> tuple[float, float]:
        """(compute seconds, memory seconds) of one execution on a target with `peaks`
        (`jaxmath.aot.targets.peaks`)."""
        compute = self.flops / peaks["flops"].get(self.dtype, peaks["flops"]["bf16"]) if self.flops else 0.0
        return compute, (self.read + self.written) / peaks["bandwidth"]

    def seconds(self, peaks: dict) -> float:
        """Modeled seconds of one execution: the larger of compute and memory time, plus the launch."""
        return max(self._times(peaks)) + LAUNCH_SECONDS

    def as_json(self, peaks: dict) -> dict:
        compute, memory = self._times(peaks)
        return {"name": self.name, "kind": self.kind, "op": self.op_name, "count": self.count,
                "flops": self.flops * self.count, "bytes": (self.read + self.written) * self.count,
                "modeled_s": self.seconds(peaks) * self.count, "bound": "compute" if compute > memory else "memory"}


def _shape_dims(shape: str) -> tuple[str, list[int]]:
    m = _DIMS.search(shape)
    if not m:
        return "", []
    return m.group(1), [int(d) for d in m.group(2).split(",") if d]


def _contracting(attrs: str, key: str) -> list[int]:
    m = re.search(rf"{key}=\{{([0-9,]*)\}}", attrs)
    return [int(d) for d in m.group(1).split(",") if d] if m else []


def dot_flops(inst: hlo.Instruction, names: dict[str, hlo.Instruction]) -> tuple[float, str]:
    """(FLOPs, operand dtype) of an HLO `dot`: 2 x result elements x contracted elements."""
    lhs = names.get(inst.operands[0]) if inst.operands else None
    if lhs is None:
        return 0.0, ""
    dtype, dims = _shape_dims(lhs.shape)
    contracted = math.prod(dims[d] for d in _contracting(inst.attrs, "lhs_contracting_dims") if d < len(dims))
    _, out = _shape_dims(inst.shape)
    return 2.0 * math.prod(out) * contracted, dtype


def _conv_flops(inst: hlo.Instruction, names: dict[str, hlo.Instruction]) -> tuple[float, str]:
    """2 x result elements x (kernel elements / output features): a convolution's multiply-adds."""
    if len(inst.operands) < 2 or inst.operands[1] not in names:
        return 0.0, ""
    dtype, kernel = _shape_dims(names[inst.operands[1]].shape)
    _, out = _shape_dims(inst.shape)
    m = re.search(r"dim_labels=\w+_(\w+)->", inst.attrs)
    features = kernel[m.group(1).index("o")] if m and "o" in m.group(1) else 1
    return 2.0 * math.prod(out) * math.prod(kernel) / max(features, 1), dtype


def attention_flops(inst: hlo.Instruction, names: dict[str, hlo.Instruction]) -> float:
    """FLOPs of a cuDNN fused attention call (module docstring), from its scores' shape
    [B, H, Sq, Sk] (`intermediate_tensor_shape`) and the query's head dim."""
    m = re.search(r'"intermediate_tensor_shape":\s*\{"element_type":\s*"\w+",\s*"dimensions":\s*\[([^\]]*)\]',
                  inst.attrs)
    if not m or not inst.operands or inst.operands[0] not in names:
        return 0.0
    b, h, sq, sk = (int(x.strip().strip('"')) for x in m.group(1).split(","))
    head_dim = _shape_dims(names[inst.operands[0]].shape)[1][-1]
    flops = 4.0 * b * h * sq * sk * head_dim
    if "CAUSAL" in inst.attrs:
        flops /= 2
    target = re.search(r'custom_call_target="([^"]+)"', inst.attrs)
    if target and "Backward" in target.group(1):
        flops *= 2.5
    return flops


def _op_name(inst: hlo.Instruction) -> str:
    m = re.search(r'op_name="([^"]+)"', inst.attrs)
    return m.group(1).rsplit("/", 2)[-2] + "/" + m.group(1).rsplit("/", 1)[-1] if m and "/" in m.group(1) else \
        (m.group(1) if m else "")


class _Walker(hlo.Traffic):
    """Traffic's walk, keeping each kernel instead of totals."""

    def kernels(self, computation: str | None = None, count: int = 1) -> list[KernelCost]:
        name = computation or self.entry
        insts, names = self.computations[name], self._by_name[name]
        out: list[KernelCost] = []
        for inst in insts:
            op = inst.opcode
            if op in hlo._FREE:
                continue
            if op == "while":
                out += self.kernels(inst.called("body"), count * (inst.trip_count or 1))
                continue
            if op in ("call", "conditional"):
                callee = inst.called("to_apply") or inst.called("calls")
                if callee:
                    out += self.kernels(callee, count)
                continue
            read, written = self.instruction_io(inst, names)  # the same bytes Traffic.run counts
            flops, dtype, kind = 0.0, "", "other"
            if op == "fusion":
                fused_name = inst.called("calls") or ""
                fused = self._by_name.get(fused_name, {})
                for f in self.computations.get(fused_name, []):
                    if f.opcode in ("dot", "convolution"):
                        more, dtype = (dot_flops if f.opcode == "dot" else _conv_flops)(f, fused)
                        flops += more
                kind = "gemm" if flops else ("copy" if hlo.copied_bytes(inst, self.computations.get(fused_name, []))
                                             else "fusion")
            elif op == "custom-call":
                target = re.search(r'custom_call_target="([^"]+)"', inst.attrs)
                target = target.group(1) if target else ""
                if target.startswith("__cudnn$fmha"):
                    flops, kind = attention_flops(inst, names), "attention"
                    dtype = _shape_dims(names[inst.operands[0]].shape)[0] if inst.operands[0] in names else "bf16"
                elif "gemm" in target or "matmul" in target:
                    flops, dtype = _custom_gemm_flops(inst, names)
                    kind = "gemm"
            elif op in ("dot", "convolution"):
                flops, dtype = (dot_flops if op == "dot" else _conv_flops)(inst, names)
                kind = "gemm"
            elif op in ("copy", "transpose"):
                kind = "copy"
            elif op in ("dynamic-update-slice", "dynamic-slice", "slice"):
                kind = "slice"
            out.append(KernelCost(inst.name, op, kind, flops, read, written, count, dtype, _op_name(inst)))
        return out


def _custom_gemm_flops(inst: hlo.Instruction, names: dict[str, hlo.Instruction]) -> tuple[float, str]:
    """A cuBLAS GEMM custom call: its backend config's contracting dimensions on the lhs operand."""
    if not inst.operands or inst.operands[0] not in names:
        return 0.0, ""
    dtype, dims = _shape_dims(names[inst.operands[0]].shape)
    m = re.search(r'"lhs_contracting_dimensions":\s*\[([^\]]*)\]', inst.attrs)
    contracting = [int(x.strip().strip('"')) for x in m.group(1).split(",") if x.strip()] if m else []
    out_dtype, out = _shape_dims(inst.shape)
    return 2.0 * math.prod(out) * math.prod(dims[d] for d in contracting if d < len(dims)), dtype


def kernel_costs(hlo_text: str, computation: str | None = None) -> list[KernelCost]:
    """Every kernel of the program (or of one computation, e.g. a loop body), with its execution count."""
    return _Walker(hlo_text).kernels(computation)


def summarize(kernels: list[KernelCost], peaks: dict, top: int = 5) -> dict:
    """FLOPs, bytes and modeled seconds of a list of kernels, and the `top` costliest."""
    rows = sorted((k.as_json(peaks) for k in kernels), key=lambda r: -r["modeled_s"])
    return {"flops": sum(r["flops"] for r in rows), "bytes": sum(r["bytes"] for r in rows),
            "modeled_s": sum(r["modeled_s"] for r in rows), "kernels": sum(r["count"] for r in rows),
            "top_kernels": rows[:top]}


def program_cost(hlo_text: str, peaks: dict, top: int = 5) -> dict:
    """`summarize` of a whole program, and of one iteration of each top-level loop (a decode window's
    step): {"flops", "bytes", "modeled_s", "kernels", "top_kernels", "loops": [{"name", "trip_count",
    "flops", "bytes", "read", "written", "modeled_s"}]}."""
    walker = _Walker(hlo_text)
    out = summarize(walker.kernels(), peaks, top)
    loops = []
    for inst in walker.computations[walker.entry]:
        if inst.opcode != "while":
            continue
        body = walker.kernels(inst.called("body"))
        one = summarize(body, peaks, top=0)
        loops.append({"name": inst.name, "trip_count": inst.trip_count, "flops": one["flops"], "bytes": one["bytes"],
                      "read": sum(k.read * k.count for k in body), "written": sum(k.written * k.count for k in body),
                      "modeled_s": one["modeled_s"], "kernels": one["kernels"]})
    out["loops"] = loops
    return out


def dumps(result: dict) -> str:
    return json.dumps(result, sort_keys=True, default=float)
