"""What a compiled program's HLO text says: its attention kernel, and per loop iteration the bytes its
instructions read and write and the copies it makes.

Read from `compiled.as_text()` (the optimized HLO after buffer assignment decisions), so it describes
the program the target runs, not the program JAX traced.
"""

from __future__ import annotations

import re

# cuDNN fused attention custom calls (jax._src.cudnn.fused_attention_stablehlo): forward and backward,
# with or without a dense bias.
_CUDNN_FMHA = re.compile(r'custom_call_target="__cudnn\$fmha(\w*)"')


def custom_call_targets(hlo_text: str) -> set[str]:
    return set(re.findall(r'custom_call_target="([^"]+)"', hlo_text))


def attention_kernel(hlo_text: str) -> str:
    """"cudnn" when the program's attention is cuDNN's fused attention with no bias, "cudnn+bias" when
    any cuDNN attention call carries a dense bias (a mask turned into one), "xla" otherwise (XLA's
    own attention: dot, softmax and dot fusions)."""
    calls = _CUDNN_FMHA.findall(hlo_text)
    if not calls:
        return "xla"
    return "cudnn+bias" if any("Bias" in c for c in calls) else "cudnn"


# --- parsing the HLO text ---------------------------------------------------------------------------

_ITEMSIZE = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
             "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1, "s4": 1, "u4": 1}
_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\]")
# Instructions that move no data of their own.
_FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all", "partition-id",
         "replica-id", "iota", "opt-barrier"}


def array_bytes(shape: str) -> int:
    """Bytes of every array in an HLO shape string ("bf16[2,3]{1,0}" or a tuple of them)."""
    total = 0
    for dtype, dims in _ARRAY.findall(shape):
        if dtype not in _ITEMSIZE:
            continue
        n = 1
        for d in filter(None, dims.split(",")):
            n *= int(d)
        total += n * _ITEMSIZE[dtype]
    return total


class Instruction:
    """One HLO instruction: name, result shape, opcode, operand names and the raw attribute text."""

    __slots__ = ("name", "shape", "opcode", "operands", "attrs", "root")

    def __init__(self, name, shape, opcode, operands, attrs, root):
        self.name, self.shape, self.opcode, self.operands, self.attrs, self.root = (
            name, shape, opcode, operands, attrs, root)

    @property
    def bytes(self) -> int:
        return array_bytes(self.shape)

    def called(self, key: str) -> str | None:
        m = re.search(rf"\b{key}=%([\w.\-]+)", self.attrs)
        return m.group(1) if m else None

    @property
    def trip_count(self) -> int | None:
        m = re.search(r'"known_trip_count":\{"n":"(\d+)"', self.attrs)
        return int(m.group(1)) if m else None


def _matching(text: str, start: int) -> int:
    """Index just past the bracket closing the one at text[start]."""
    pairs = {"(": ")", "{": "}", "[": "]"}
    stack = [pairs[text[start]]]
    i = start + 1
    while stack:
        ch = text[i]
        if ch in pairs:
            stack.append(pairs[ch])
        elif ch == stack[-1]:
            stack.pop()
        i += 1
    return i


def _parse_instruction(line: str) -> Instruction | None:
    body = line.strip()
    root = body.startswith("ROOT ")
    if root:
        body = body[5:]
    if not body.startswith("%") or " = " not in body:
        return None
    name, rest = body[1:].split(" = ", 1)
    if rest.startswith("("):
        end = _matching(rest, 0)
        shape, rest = rest[:end], rest[end:].lstrip()
    else:
        shape, _, rest = rest.partition(" ")
    paren = rest.find("(")
    if paren < 0:
        return None
    opcode = rest[:paren]
    end = _matching(rest, paren)
    operands = re.findall(r"%([\w.\-]+)", rest[paren:end])
    return Instruction(name, shape, opcode, operands, rest[end:], root)


def parse_module(hlo_text: str) -> tuple[dict[str, list[Instruction]], str]:
    """(computation name -> instructions, name of the entry computation) of a module's HLO text."""
    computations: dict[str, list[Instruction]] = {}
    entry, current = "", None
    for line in hlo_text.splitlines():
        if not line.startswith(" ") and line.rstrip().endswith("{") and "(" in line and "%" in line:
            head = line.split("(", 1)[0].split()
            current = head[-1].lstrip("%")
            computations[current] = []
            if head[0] == "ENTRY":
                entry = current
        elif line.startswith("}"):
            current = None
        elif current is not None:
            inst = _parse_instruction(line)
            if inst is not None:
                computations[current].append(inst)
    return computations, entry


# --- bytes moved ---------------------------------------------------------------------------------------


def _scatter_updates(inst: Instruction) -> list[str]:
    """The update operands of a scatter: scatter(operands..., indices, updates...)."""
    n = (len(inst.operands) - 1) // 2
    return inst.operands[n + 1:]


class Traffic:
    """Bytes an HLO computation's instructions read and write per execution (loops times their trip
    counts), and the copies among them: explicit copies and transposes, and fusion outputs that only
    move existing data (`copied_bytes`)."""

    def __init__(self, hlo_text: str):
        self.computations, self.entry = parse_module(hlo_text)
        self._by_name = {c: {i.name: i for i in insts} for c, insts in self.computations.items()}

    def _fusion_io(self, inst: Instruction) -> tuple[int, int]:
        """(bytes read, bytes written) by one fusion: a parameter used only by slices counts the
        slices, a dynamic-update-slice or scatter root on a parameter (in place) writes only the update."""
        fused = self.computations.get(inst.called("calls") or "", [])
        users: dict[str, list[Instruction]] = {}
        for i in fused:
            for o in i.operands:
                users.setdefault(o, []).append(i)
        names = self._by_name.get(inst.called("calls") or "", {})
        roots = [i for i in fused if i.root]
        outs = roots[0].operands if roots and roots[0].opcode == "tuple" else [r.name for r in roots]
        written = 0
        for out in outs:
            node = names.get(out)
            while node is not None and node.opcode == "bitcast":
                node = names.get(node.operands[0])
            if node is not None and node.opcode == "dynamic-update-slice":
                written += names[node.operands[1]].bytes if node.operands[1] in names else 0
            elif node is not None and node.opcode == "scatter":
                written += sum(names[u].bytes for u in _scatter_updates(node) if u in names)
            elif node is not None:
                written += node.bytes
        outputs = set(outs) | {r.name for r in roots}
        read = sum(self._read_of(p, users, outputs) for p in fused if p.opcode == "parameter")
        return read, written

    def _read_of(self, node: Instruction, users: dict, outputs: set[str]) -> int:
        """Bytes of `node` (a fused parameter or a value derived from it in place) the fusion reads:
        only the slices taken of it, through bitcasts and in-place updates; a value that leaves the
        fusion (an in-place output) reads nothing more; any other use reads all of it."""
        total = 0
        for use in users.get(node.name, []):
            if use.opcode == "bitcast" or (use.opcode in ("dynamic-update-slice", "scatter")
                                           and use.operands[0] == node.name):
                total += 0 if use.name in outputs and not users.get(use.name) else self._read_of(use, users, outputs)
            elif use.opcode in ("dynamic-slice", "slice", "gather") and use.operands[0] == node.name:
                total += use.bytes  # a gather reads the rows it returns
            elif use.opcode == "tuple" and use.root:
                continue
            elif use.opcode in _PER_ELEMENT or use.opcode == "reduce" and use.operands[0] == node.name:
                total += int(node.bytes * _demanded(use, users, outputs))
            else:
                return node.bytes
        return min(total, node.bytes)

    def instruction_io(self, inst: Instruction, names: dict[str, Instruction]) -> tuple[int, int]:
        """(bytes read, bytes written) by one instruction that does work (not a loop or a call) of the
        computation whose instructions are `names`: a fusion per `_fusion_io`, a slice its size, an
        in-place update (dynamic-update-slice, scatter) its update, a custom call its operands and its
        result less workspace."""
        op = inst.opcode
        if op == "fusion":
            return self._fusion_io(inst)
        if op in ("copy", "transpose", "dynamic-slice", "slice"):
            return inst.bytes, inst.bytes
        if op == "dynamic-update-slice":
            update = names[inst.operands[1]].bytes if inst.operands[1] in names else 0
            return update, update
        if op == "scatter":  # in place (its operand aliases its result): reads the indices and updates
            updates = sum(names[u].bytes for u in _scatter_updates(inst) if u in names)
            index = inst.operands[(len(inst.operands) - 1) // 2]
            return updates + (names[index].bytes if index in names else 0), updates
        read = sum(names[o].bytes for o in inst.operands if o in names)
        return read, _result_without_workspace(inst.shape) if op == "custom-call" else inst.bytes

    def run(self, computation: str | None = None) -> dict:
        """{"read", "written", "copies": [(name, bytes)], "copy_bytes"} of one execution of `computation`
        (default: the entry), counting called loops and computations with their trip counts (a loop of
        unknown trip count counts once)."""
        insts = self.computations[computation or self.entry]
        names = self._by_name[computation or self.entry]
        read = written = 0
        copies: list[tuple[str, int]] = []
        for inst in insts:
            op = inst.opcode
            if op in _FREE:
                continue
            if op == "while":
                inner = self.run(inst.called("body"))
                n = inst.trip_count or 1
                read, written = read + n * inner["read"], written + n * inner["written"]
                copies += inner["copies"] * n
                continue
            if op in ("call", "conditional"):
                callee = inst.called("to_apply") or inst.called("calls")
                if callee:
                    inner = self.run(callee)
                    read, written, copies = read + inner["read"], written + inner["written"], copies + inner["copies"]
                continue
            r, w = self.instruction_io(inst, names)
            if op == "fusion":
                moved = copied_bytes(inst, self.computations.get(inst.called("calls") or "", []))
                if moved:
                    copies.append((inst.name, moved))
            elif op in ("copy", "transpose"):
                copies.append((inst.name, inst.bytes))
            read, written = read + r, written + w
        return {"read": read, "written": written, "copies": copies, "copy_bytes": sum(b for _, b in copies)}


# Fused instructions that compute each element of their result from the same element of their operands
# (or, for a reduce, from the elements reduced into it): a fusion evaluates them only at the elements
# its outputs need, so a slice taken after them reads only its share of their operands.
_PER_ELEMENT = {"convert", "bitcast", "copy", "negate", "abs", "exponential", "log", "sqrt", "rsqrt", "tanh",
                "logistic", "add", "subtract", "multiply", "divide", "maximum", "minimum", "select", "compare",
                "and", "or", "not", "power"}


def _elements(shape: str) -> int:
    m = _ARRAY.search(shape)
    n = 1
    for d in filter(None, (m.group(2) if m else "").split(",")):
        n *= int(d)
    return n


def _demanded(node: Instruction, users: dict, outputs: set[str], memo: dict | None = None) -> float:
    """The share of `node`'s elements a fusion computes: all of them where it leaves the fusion or has a
    use other than a slice or a per-element instruction (`_PER_ELEMENT`, reduce); a slice's share where
    every path from it ends in slices. (A bitcast or reduce changes the shape, not the share.)"""
    memo = {} if memo is None else memo
    if node.name not in memo:
        memo[node.name] = _share(node, users, outputs, memo)
    return memo[node.name]


def _share(node: Instruction, users: dict, outputs: set[str], memo: dict) -> float:
    if node.name in outputs:
        return 1.0
    share = 0.0
    for use in users.get(node.name, []):
        if use.opcode == "slice" and use.operands[0] == node.name:
            share += _elements(use.shape) / max(_elements(node.shape), 1)
        elif use.opcode in _PER_ELEMENT or use.opcode == "reduce" and use.operands[0] == node.name:
            share += _demanded(use, users, outputs, memo)
        else:
            return 1.0
        if share >= 1.0:
            return 1.0
    return share


def _result_without_workspace(shape: str) -> int:
    """A custom call's result bytes without the scratch (s8/u8) workspace cuBLAS and cuDNN return."""
    return sum(array_bytes(f"{d}[{dims}]") for d, dims in _ARRAY.findall(shape) if d not in ("s8", "u8"))


def copied_bytes(inst: Instruction, fused: list[Instruction]) -> int:
    """Bytes of a fusion's outputs that only move data: an output that is, through bitcasts, a copy,
    transpose or slice of a fused parameter (or of an in-place update of one) materializes data that
    already exists in memory. 0 for a fusion that computes its outputs."""
    names = {i.name: i for i in fused}
    roots = [i for i in fused if i.root]
    if not roots:
        return 0
    outs = roots[0].operands if roots[0].opcode == "tuple" else [roots[0].name]

    def moved(name: str) -> bool:
        node = names.get(name)
        if node is None:
            return False
        if node.opcode == "parameter":
            return True
        if node.opcode in ("bitcast", "copy", "transpose", "slice", "dynamic-slice"):
            return moved(node.operands[0])
        if node.opcode == "dynamic-update-slice":  # a slice taken after an in-place write
            return moved(node.operands[0])
        return False

    total = 0
    for out in outs:
        node = names.get(out)
        while node is not None and node.opcode == "bitcast":
            node = names.get(node.operands[0])
        if node is not None and node.opcode in ("copy", "transpose", "slice", "dynamic-slice") and moved(node.name):
            total += node.bytes
    return total


def program_traffic(hlo_text: str) -> dict:
    """A compiled program's data movement: copies outside its loops (count, bytes, the largest), and
    per top-level loop (e.g. each decode window) one iteration's bytes read and written and its copies.
    Bytes are of the buffers instructions touch (a slice counts its size, an in-place update its
    update), an upper bound on memory traffic (small buffers stay in L2 on a GPU)."""
    traffic = Traffic(hlo_text)
    top = traffic.computations[traffic.entry]
    outside = [i for i in top if i.opcode != "while"]
    copies = []
    for inst in outside:
        if inst.opcode in ("copy", "transpose"):
            copies.append(inst.bytes)
        elif inst.opcode == "fusion":
            moved = copied_bytes(inst, traffic.computations.get(inst.called("calls") or "", []))
            if moved:
                copies.append(moved)
    loops = []
    for inst in top:
        if inst.opcode != "while":
            continue
        one = traffic.run(inst.called("body"))
        loops.append({"name": inst.name, "trip_count": inst.trip_count, "read": one["read"],
                      "written": one["written"], "copies": len(one["copies"]), "copy_bytes": one["copy_bytes"],
                      "largest_copy": max((b for _, b in one["copies"]), default=0)})
    return {"copies": len(copies), "copy_bytes": sum(copies), "largest_copy": max(copies, default=0),
            "loops": loops}
