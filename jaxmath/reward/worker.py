"""Entry point of a grading worker process: `python -m jaxmath.reward.worker`.

Reads length-prefixed pickled requests on stdin and writes pickled replies on stdout. The parent
(`pool.py`) is the only peer; it kills this process when a request runs past its time bound, which is
the one interruption that works while sympy is inside a long big-integer computation.

Requests:
    ("symbolic", [(pred, gold), ...])  -> bool: any pair equal on the symbolic path
    ("grade", pred_text, gold_text)    -> bool: a whole in-process grading (used by grade_batch)
"""

from __future__ import annotations

import os
import pickle
import struct
import sys


def _read_exactly(stream, size: int) -> bytes | None:
    data = b""
    while len(data) < size:
        chunk = stream.read(size - len(data))
        if not chunk:
            return None
        data += chunk
    return data


_WARMUP = (
    "1", "-2", "0.5", "\\frac{1}{2}", "-\\frac{3}{4}", "\\sqrt{2}", "2\\sqrt{3}", "\\sqrt[3]{x}", "x^2+1",
    "\\frac{x+1}{x-1}", "\\pi", "e^{x}", "\\sin(x)", "\\cos^2(y)", "\\tan x", "\\sec^2(y)", "\\log_2 8", "\\ln x",
    "[0,1)", "(1,2]", "(-\\infty, 3)", "\\{1,2\\}", "(1,2)", "x<1", "-x>-1", "x\\geq 2", "x\\leq5", "y=2x+1",
    "2x+4y-3=0", "\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}", "\\sum_{k=0}^{n} k", "|x|", "n!", "\\binom{5}{2}",
    "10^{3}", "3.5\\times10^{2}", "a_{1}", "x_1+x_2", "\\frac{\\sqrt{3}}{2}", "12:00", "[-1,2]\\cup[3,4]",
)


def serve(stdin, stdout) -> None:
    """Answers requests until stdin closes."""
    import importlib

    # `jaxmath.reward.grade` the function shadows the module of the same name on the package.
    grading = importlib.import_module("jaxmath.reward.grade")
    symbolic = importlib.import_module("jaxmath.reward.symbolic")  # import cost paid before "ready"
    # ANTLR's Python runtime builds its parsing automaton lazily: the first parse of each construct
    # costs tens of milliseconds. Parsing one of each now keeps that out of the first gradings.
    for latex in _WARMUP:
        symbolic.to_sympy(latex)

    def send(obj) -> None:
        payload = pickle.dumps(obj)
        stdout.write(struct.pack("<Q", len(payload)) + payload)
        stdout.flush()

    send("ready")
    while True:
        header = _read_exactly(stdin, 8)
        if header is None:
            return
        request = pickle.loads(_read_exactly(stdin, struct.unpack("<Q", header)[0]))
        try:
            if request[0] == "symbolic":
                reply = grading.symbolic_verdict_local(request[1])
            elif request[0] == "grade":
                reply = grading.grade_local(request[1], request[2])
            elif request[0] == "clear_caches":
                # Benchmarks clear parse caches between passes so that repeats measure real work.
                symbolic.to_sympy.cache_clear()
                reply = True
            elif request[0] == "crash":
                # Used by tests to check that a batch survives a worker dying mid-request.
                os._exit(3)
            else:
                reply = False
        except Exception:
            reply = False
        send(reply)


if __name__ == "__main__":
    # The request stream is binary; stdout must not be used for anything else.
    binary_out = sys.stdout.buffer
    sys.stdout = sys.stderr
    serve(sys.stdin.buffer, binary_out)
