"""Entry point of a grading worker process: `python -m jaxmath.reward.worker`.

Reads length-prefixed pickled messages `(request_id, deadline, request)` on stdin and answers each with
`(request_id, finished_at, status, result)` on stdout: status "ok", "late" (its deadline passed; the
timer armed for it interrupted the work) or "error". `deadline` and `finished_at` are `time.monotonic()`
values, which all processes of the machine share, so the parent can tell whether the work finished in
time however late it reads the reply. The parent (`pool.py`) kills this process if it does not answer
at all (stuck in one long C call that no timer interrupts).

Requests:
    ("symbolic", [(pred_tree, gold_tree, symmetric), ...])  -> bool: any pair equal on the symbolic path
    ("grade", pred_text, gold_text)                          -> bool: a whole in-process grading
    ("clear_caches",)                                        -> True: parse caches emptied
    ("sleep", seconds)                                       -> True after sleeping (tests)
    ("crash",)                                               -> the process exits (tests)
    ("stuck", seconds)                                       -> sleeps with the timer blocked (tests)
"""

from __future__ import annotations

import os
import pickle
import resource
import signal
import struct
import sys
import time


class _DeadlinePassed(BaseException):
    """Raised by the timer; a BaseException so that sympy's `except Exception` blocks let it through."""


def _on_alarm(signum, frame):
    raise _DeadlinePassed()


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


def _handle(request, grading, symbolic):
    if request[0] == "symbolic":
        return grading.symbolic_verdict_local(request[1])
    if request[0] == "grade":
        return grading.grade_local(request[1], request[2])
    if request[0] == "clear_caches":
        symbolic.to_sympy.cache_clear()
        return True
    if request[0] == "sleep":
        time.sleep(request[1])
        return True
    if request[0] == "crash":
        os._exit(3)
    if request[0] == "stuck":
        # Work that the deadline timer cannot interrupt, like one long C call inside sympy (tests: the
        # parent must kill and replace the worker).
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
        time.sleep(request[1])
        return True
    return False


def serve(stdin, stdout) -> None:
    """Answers requests until stdin closes."""
    import importlib

    memory = int(os.environ.get("JAXMATH_REWARD_WORKER_MEMORY", "0"))
    if memory:
        try:
            resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
        except (ValueError, OSError):
            pass
    # `jaxmath.reward.grade` the function shadows the module of the same name on the package.
    grading = importlib.import_module("jaxmath.reward.grade")
    symbolic = importlib.import_module("jaxmath.reward.symbolic")  # import cost paid before "ready"
    # ANTLR's Python runtime builds its parsing automaton lazily: the first parse of each construct
    # costs tens of milliseconds. Parsing one of each now keeps that out of the first gradings.
    for latex in _WARMUP:
        symbolic.to_sympy(latex)
    signal.signal(signal.SIGALRM, _on_alarm)

    def send(obj) -> None:
        payload = pickle.dumps(obj)
        stdout.write(struct.pack("<Q", len(payload)) + payload)
        stdout.flush()

    send("ready")
    while True:
        header = _read_exactly(stdin, 8)
        if header is None:
            return
        request_id, deadline, request = pickle.loads(_read_exactly(stdin, struct.unpack("<Q", header)[0]))
        status, result = "ok", False
        try:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _DeadlinePassed()
            signal.setitimer(signal.ITIMER_REAL, remaining)
            try:
                result = _handle(request, grading, symbolic)
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
        except _DeadlinePassed:
            status = "late"
        except Exception:
            status = "error"
        finished_at = time.monotonic()
        if finished_at > deadline and status == "ok":
            status = "late"
        try:
            send((request_id, finished_at, status, result))
        except _DeadlinePassed:
            send((request_id, time.monotonic(), "late", False))


if __name__ == "__main__":
    # The request stream is binary; stdout must not be used for anything else.
    binary_out = sys.stdout.buffer
    sys.stdout = sys.stderr
    serve(sys.stdin.buffer, binary_out)
